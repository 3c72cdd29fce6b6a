"""Tests of xrdmap.decompose against the NMF-mapping app's outputs and simulated truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from scipy.ndimage import gaussian_filter1d

from xrdmap.decompose import (
    NMFDecomposition,
    cross_validation_errors,
    decompose,
    match_components,
)
from xrdmap.errors import ConfigError, InputError

DATA = Path(__file__).parent / "data" / "nmf_mapping"

# The three runs of the NMF-mapping app stored in tests/data/nmf_mapping (see README).
APP_CASES = {
    "output_1": [(5.0, 10.0)],
    "output_2": None,  # whole range
    "output_3": [(5.0, 10.0), (12.0, 15.0)],
}


@pytest.fixture(scope="module")
def app_gr() -> xr.DataArray:
    z = np.load(DATA / "synthetic_r_vs_gr.npz")
    return xr.DataArray(z["gr"], dims=("point", "r"), coords={"r": z["r"]}, name="gr")


def _app_weights(case: str) -> np.ndarray:
    exp = json.loads((DATA / case / "component_index_vs_pratio_col.json").read_text())
    n_comp = len(exp["0"])
    return np.array([[exp[str(p)][str(c)] for c in range(n_comp)] for p in range(len(exp))])


def _app_errors(case: str) -> dict[int, float]:
    exp = json.loads((DATA / case / "component_index_vs_RE_value.json").read_text())["0"]
    return {int(k): v for k, v in exp.items()}


@pytest.mark.parametrize("case", list(APP_CASES))
def test_parity_with_nmf_mapping_app(app_gr, case):
    x_ranges = APP_CASES[case]
    if x_ranges is None:
        x_ranges = [(float(app_gr.r.min()), float(app_gr.r.max()))]
    # the app's own criterion (relative drop of the NMF error), which fits every count, and
    # its solver (scikit-learn's coordinate descent, stopped after 1000 iterations)
    model = NMFDecomposition(x_ranges=x_ranges, n_restarts=0, criterion="nmf", solver="cd").fit(app_gr)
    expected = _app_weights(case)
    assert model.n_components_ == expected.shape[1] == 3
    _, corr = match_components(model.weights_.values, expected)
    assert np.all(corr >= 0.99), corr
    # Same matrix, same shift, same start: the app's reconstruction errors come back.
    app_err = _app_errors(case)
    for k in (2, 3):
        assert model.reconstruction_errors_.sel(n_components=k).item() == pytest.approx(app_err[k], rel=1e-3)
    np.testing.assert_allclose(model.weights_.sum("component"), 1.0, atol=1e-12)


# ---------------------------------------------------------------- simulated mixtures


def _peaks(x: np.ndarray, rng: np.random.Generator, n: int, width: float) -> np.ndarray:
    out = np.zeros_like(x)
    for pos in rng.uniform(x.min() + 0.5, x.max() - 0.5, n):
        out += rng.uniform(0.2, 1.0) * np.exp(-0.5 * ((x - pos) / width) ** 2)
    return out


def _mixture_q(k: int, n_points: int = 80, noise: float = 0.01, seed: int = 0):
    """I(Q)-like scan: k peak patterns, smooth overlapping weights, white noise."""
    rng = np.random.default_rng(seed)
    q = np.linspace(0.5, 16.0, 900)
    comps = np.array([_peaks(q, rng, 12, 0.05) + 0.2 * np.exp(-q / 5) for _ in range(k)])
    t = np.linspace(0, 1, n_points)
    centres = np.linspace(0.1, 0.9, k)
    w = np.array([np.exp(-0.5 * ((t - c) / 0.2) ** 2) for c in centres]).T + 0.05
    clean = w @ comps
    data = clean + rng.normal(0, noise * clean.max(), clean.shape)
    da = xr.DataArray(data, dims=("point", "q"), coords={"q": q, "position": ("point", t * 3.0)})
    return da, w, comps


def _mixture_gr(k: int, n_points: int = 60, seed: int = 1):
    """G(r)-like scan: weight fractions summing to 1, negative baseline, correlated noise."""
    rng = np.random.default_rng(seed)
    r = np.arange(0.5, 25.0, 0.01)
    rho0 = 0.07
    comps = []
    for _ in range(k):
        rdf = _peaks(r, rng, 40, 0.08) * 3
        comps.append(rdf - 4 * np.pi * rho0 * r * np.exp(-r / 8))
    comps = np.array(comps)
    t = np.linspace(0, 1, n_points)
    centres = np.linspace(0.1, 0.9, k)
    w = np.array([np.exp(-0.5 * ((t - c) / 0.22) ** 2) for c in centres]).T + 0.02
    w /= w.sum(axis=1, keepdims=True)
    clean = w @ comps
    # Noise correlated over ~pi/Qmax as in a G(r) from Qmax = 24 A^-1.
    white = rng.normal(0, 1, clean.shape)
    noise = gaussian_filter1d(white, 0.13 / 0.01 / 2.5, axis=1)
    noise *= 0.01 * np.abs(clean).max() / noise.std()
    return xr.DataArray(clean + noise, dims=("point", "r"), coords={"r": r}), w, comps


@pytest.mark.parametrize("k", [2, 3, 4])
def test_criterion_picks_true_number_of_components_q(k):
    da, w_true, _ = _mixture_q(k, seed=k)
    model = NMFDecomposition(min_components=2, max_components=6, n_restarts=0).fit(da)
    assert model.n_components_ == k
    # Abundances are the true weights up to a scale per component (the NMF scale freedom);
    # four overlapping components sharing a pedestal leave some rotational freedom.
    _, corr = match_components(w_true, model.abundances_.values)
    assert np.all(corr > 0.97), corr


@pytest.mark.parametrize("n_points", [30, 400])
def test_criterion_independent_of_number_of_points(n_points):
    da, _, _ = _mixture_q(3, n_points=n_points, seed=11)
    assert NMFDecomposition(max_components=6, n_restarts=0).fit(da).n_components_ == 3


def test_criterion_on_gr_with_correlated_noise():
    da, w_true, _ = _mixture_gr(3)
    model = NMFDecomposition(n_restarts=0).fit(da)
    assert model.negative_mode_ == "shift"
    assert model.shift_ == pytest.approx(-float(da.min()))
    assert model.x_ranges_ == ((1.0, 20.0),)
    assert model.n_components_ == 3
    # The noise is correlated along r: the criterion measured it (> 2 samples).
    assert model.residual_correlation_length_ > 2
    _, corr = match_components(w_true, model.abundances_.values)
    assert np.all(corr > 0.99), corr


def test_cross_validation_agrees_with_criterion():
    da, _, _ = _mixture_q(3, n_points=60, noise=0.02, seed=5)
    ks = [1, 2, 3, 4, 5]
    cv = cross_validation_errors(da, ks, n_folds=2, random_state=0)
    chosen = NMFDecomposition(max_components=5, n_restarts=0).fit(da).n_components_
    assert int(cv.idxmin()) == chosen == 3
    # Under-fitting is much worse than over-fitting by one component.
    assert cv.sel(n_components=2) > 1.5 * cv.sel(n_components=3)


@pytest.mark.parametrize("solver", ["anls", "cd"])
def test_reproducible_and_stable_across_seeds_and_restarts(solver):
    da, w_true, _ = _mixture_q(3, seed=21)
    fits = [NMFDecomposition(random_state=s, n_restarts=3, solver=solver).fit(da) for s in (0, 1, 2)]
    for f in fits[1:]:
        np.testing.assert_allclose(f.weights_.values, fits[0].weights_.values, atol=1e-6)
    # The random restarts reach the same error and agree with the kept answer ...
    np.testing.assert_allclose(fits[0].restart_errors_, fits[0].reconstruction_error_, rtol=1e-5)
    stability = fits[0].stability_.values
    _, truth = match_components(w_true / w_true.sum(axis=1, keepdims=True), fits[0].weights_.values)
    if solver == "cd":
        assert np.all(stability > 0.99), stability
    else:
        # ... as far as 1 % noise determines them: ANLS goes to the bottom of a flat
        # valley, where equally good answers (errors within 4e-6) differ by up to 0.98 in
        # one component's weights, as much as the kept answer differs from the truth.
        assert np.all(stability > 0.97), stability
    assert np.all(truth > 0.98), truth
    again = NMFDecomposition(random_state=0, n_restarts=3, solver=solver).fit(da)
    np.testing.assert_array_equal(again.weights_.values, fits[0].weights_.values)


def test_app_data_nndsvd_answer_is_kept_over_random_restarts(app_gr):
    model = NMFDecomposition(x_ranges=[(5, 10)], n_restarts=2, random_state=3, solver="cd").fit(app_gr)
    # The random starts end in worse local minima; the deterministic answer stays.
    assert np.all(model.restart_errors_ > model.reconstruction_error_)
    _, corr = match_components(model.weights_.values, _app_weights("output_1"))
    assert np.all(corr >= 0.99)


def test_smoothness_reduces_noise_in_weights():
    da, w_true, _ = _mixture_q(2, n_points=120, noise=0.15, seed=3)
    plain = NMFDecomposition(n_components=2, n_restarts=0).fit(da)
    smooth = NMFDecomposition(n_components=2, n_restarts=0, smoothness=3.0).fit(da)

    def misfit(model):
        # Relative misfit to the true weights after the best scale per component.
        a = model.abundances_.values
        order, _ = match_components(w_true, a)
        a = a[:, order]
        scale = (a * w_true).sum(0) / (a * a).sum(0)
        return np.linalg.norm(a * scale - w_true) / np.linalg.norm(w_true)

    def roughness(model):
        return np.abs(np.diff(model.weights_.values, 2, axis=0)).mean()

    # The truth is smooth on the scale of 3 points: smoothing removes scatter without
    # moving the weights away from it.
    assert roughness(smooth) < 0.3 * roughness(plain)
    assert misfit(smooth) < misfit(plain)


def test_transform_recovers_fitted_weights():
    da, _, _ = _mixture_q(3, seed=4)
    model = NMFDecomposition(n_components=3, n_restarts=0).fit(da)
    w = model.transform(da)
    np.testing.assert_allclose(w.values, model.weights_.values, atol=0.02)


def test_numpy_input_and_clip_of_negatives():
    rng = np.random.default_rng(0)
    data = np.abs(rng.normal(size=(10, 50)))
    data[0, 0] = -1.0
    model = NMFDecomposition(n_components=2, n_restarts=0).fit(data, x=np.linspace(0, 1, 50))
    assert model.dim_ == "x" and model.negative_mode_ == "clip" and model.shift_ == 0.0
    assert model.components_.dims == ("component", "x")


def test_decompose_dataset_contract():
    da, _, _ = _mixture_q(3, seed=8)
    ds = decompose(xr.Dataset({"iq": da}), "q", n_restarts=0)
    assert ds["nmf_q_weights"].dims == ("point", "component")
    assert ds["nmf_q_components"].dims == ("component", "q")
    # Components cover the whole input grid, the fit used 1-15 A^-1.
    assert ds.sizes["q"] == da.sizes["q"]
    assert ds.attrs["nmf_q_n_components"] == 3
    np.testing.assert_allclose(ds.attrs["nmf_q_x_ranges"], [1.0, 15.0])
    assert list(ds["nmf_q_reconstruction_error"].nmf_q_k.values) == [2, 3, 4, 5]
    assert "position" in ds.coords


def test_errors_name_the_input():
    da, _, _ = _mixture_q(2, seed=1)
    with pytest.raises(ConfigError, match="negative"):
        NMFDecomposition(negative="abs").fit(da)
    with pytest.raises(ConfigError, match="n_components"):
        NMFDecomposition(n_components=0).fit(da)
    with pytest.raises(InputError, match="x ranges"):
        NMFDecomposition(x_ranges=[(40, 50)]).fit(da)
    bad = da.copy()
    bad[3, :] = np.nan  # a pattern with nothing measured (NaN samples alone are left out)
    with pytest.raises(InputError, match="no finite value"):
        NMFDecomposition().fit(bad)
    with pytest.raises(InputError, match="negative values"):
        NMFDecomposition(negative="raise").fit(da - 10)
    with pytest.raises(InputError, match="expected"):
        NMFDecomposition().fit(np.ones(5))


# ---------------------------------------------------------------- command line


@pytest.fixture()
def gr_folder(tmp_path, app_gr):
    folder = tmp_path / "grs"
    folder.mkdir()
    names = np.load(DATA / "synthetic_r_vs_gr.npz")["names"]
    for name, row in zip(names, app_gr.values, strict=True):
        np.savetxt(folder / f"{name}.gr", np.column_stack([app_gr.r.values, row]), header="r g")
    return folder


def test_cli_folder_of_gr_files_matches_app(gr_folder, tmp_path):
    from typer.testing import CliRunner

    from xrdmap.cli import app

    out = tmp_path / "nmf.h5"
    result = CliRunner().invoke(app, ["decompose", str(gr_folder), "-x", "5,10", "--solver", "cd", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 components" in result.output
    payload = json.loads((tmp_path / "nmf_r_weights.json").read_text())
    assert payload["n_components"] == 3
    # Natural sort order of the files, as the app: synthetic0, synthetic1, ..., synthetic10
    assert payload["points"][:3] == ["synthetic0", "synthetic1", "synthetic2"]
    assert payload["points"][10] == "synthetic10"
    weights = np.array([payload["weights"][f"component_{c}"] for c in range(3)]).T
    _, corr = match_components(weights, _app_weights("output_1"))
    assert np.all(corr >= 0.99)
    csv = np.loadtxt(tmp_path / "nmf_r_weights.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
    np.testing.assert_allclose(csv, weights, rtol=1e-6)

    from xrdmap.results import open_result

    ds = open_result(out)
    assert ds["nmf_r_weights"].dims == ("point", "component")
    assert list(ds["file"].values[:2]) == ["synthetic0", "synthetic1"]


def test_cli_result_file_and_fixed_components(tmp_path, app_gr):
    from typer.testing import CliRunner

    from xrdmap.cli import app
    from xrdmap.results import save_result

    src = tmp_path / "scan.h5"
    save_result(xr.Dataset({"gr": app_gr}), src)
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(
        app, ["decompose", str(src), "--components", "2", "-x", "5,10", "-x", "12,15", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out_r_weights.json").read_text())["n_components"] == 2


def test_cli_reads_original_text_file_and_reports_bad_input(tmp_path):
    from typer.testing import CliRunner

    from xrdmap.cli import app
    from xrdmap.cli.decompose_cmd import _read_patterns

    # The verbatim app file (with its '# r g' header) reads onto the stored grid.
    da, dim = _read_patterns([DATA / "synthetic0.gr"], None)
    z = np.load(DATA / "synthetic_r_vs_gr.npz")
    assert dim == "r"
    np.testing.assert_array_equal(da.values[0], z["gr"][0])

    result = CliRunner().invoke(app, ["decompose", str(tmp_path / "missing"), "-o", str(tmp_path / "o.h5")])
    assert isinstance(result.exception, InputError)
    result = CliRunner().invoke(app, ["decompose", str(DATA), "--components", "many", "-o", str(tmp_path / "o.h5")])
    assert isinstance(result.exception, ConfigError)


def test_empty_bins_are_left_out_not_fatal():
    """Q bins that are NaN (beamstop shadow, beyond the detector) do not stop the fit."""
    rng = np.random.default_rng(5)
    q = np.linspace(0.5, 20, 400)
    basis = np.stack([np.exp(-0.5 * ((q - c) / 0.2) ** 2) for c in (3.0, 5.0, 8.0)])
    w = rng.dirichlet(np.ones(3), size=30)
    data = w @ basis + 0.001 * rng.random((30, q.size))
    clean = xr.DataArray(data, dims=("point", "q"), coords={"q": q})
    holed = clean.copy()
    holed[:, :9] = np.nan  # the first bins get no pixels
    a = decompose(clean, dim="q", x_ranges=[(1, 15)])
    b = decompose(holed, dim="q", x_ranges=[(1, 15)])
    assert a.attrs["nmf_q_n_components"] == b.attrs["nmf_q_n_components"] == 3
    np.testing.assert_allclose(b["nmf_q_weights"], a["nmf_q_weights"], atol=1e-6)
    assert np.isnan(b["nmf_q_components"][:, :9]).all()
    everything_missing = holed.copy()
    everything_missing[4] = np.nan
    with pytest.raises(InputError, match="no finite value"):
        decompose(everything_missing, dim="q")


def _end_member_scan(seed: int = 5):
    """A scan through three zones, each a fixed mixture of four peak patterns (end members
    that share phases, as the zones of a pellet do); graded between zones, pure inside."""
    rng = np.random.default_rng(seed)
    q = np.linspace(0.5, 16.0, 900)
    phases = np.array([_peaks(q, rng, 10, 0.06) for _ in range(4)])
    mix = np.array([[0.6, 0.4, 0.0, 0.0], [0.15, 0.25, 0.6, 0.0], [0.55, 0.35, 0.0, 0.1]])
    ends = mix @ phases
    # zone fractions along 40 points: rim | bulk | core | bulk | rim, linear ramps between
    knots = np.array([[0, 0, 1], [0, 0, 1], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]],
                     dtype=float)
    t = np.linspace(0, 1, 40)
    frac = np.array([np.interp(t, np.linspace(0, 1, len(knots)), knots[:, j]) for j in range(3)]).T
    data = frac @ ends
    data += rng.normal(0, 0.003 * data.max(), data.shape)
    return xr.DataArray(data, dims=("point", "q"), coords={"q": q}), frac, ends


def test_spa_start_gives_end_member_components():
    from xrdmap.decompose import successive_projections

    da, frac, ends = _end_member_scan()
    picked = successive_projections(np.clip(da.values, 0, None), 3)
    # each pick is a point where one end member is (nearly) pure, one per end member
    assert sorted(int(np.argmax(frac[p])) for p in picked) == [0, 1, 2]
    assert np.all(frac[picked].max(axis=1) > 0.95)
    spa = NMFDecomposition(n_components=3, init="spa", n_restarts=0).fit(da)
    ref = NMFDecomposition(n_components=3, init="nndsvd", n_restarts=0).fit(da)
    active = np.isin(da.q.values, spa.components_.q.values)
    _, corr = match_components(ends[:, active].T, spa.components_.values.T)
    assert np.all(corr > 0.99), corr
    _, wcorr = match_components(frac, spa.weights_.values)
    assert np.all(wcorr > 0.99), wcorr
    # an equally good factorisation: the end members cost no reconstruction error
    assert spa.reconstruction_error_ <= 1.01 * ref.reconstruction_error_
    # deterministic
    again = NMFDecomposition(n_components=3, init="spa", n_restarts=0).fit(da)
    np.testing.assert_array_equal(again.weights_.values, spa.weights_.values)


def test_unknown_init_is_a_config_error():
    da, _, _ = _end_member_scan()
    with pytest.raises(ConfigError, match="init='svd'"):
        NMFDecomposition(n_components=2, init="svd").fit(da)


def test_svd_criterion_factorises_only_the_chosen_count():
    # the count comes from the SVD errors; NMF errors exist for the chosen count only,
    # and the model equals an NMF fitted at that count directly
    da, _, _ = _mixture_q(3, seed=8)
    auto = NMFDecomposition(n_restarts=0).fit(da)
    errors = auto.reconstruction_errors_
    assert auto.n_components_ == 3
    assert np.isfinite(errors.sel(n_components=3).item())
    assert np.isnan(errors.drop_sel(n_components=3).values).all()
    assert np.isfinite(auto.svd_errors_.values).all()
    fixed = NMFDecomposition(n_components=3, n_restarts=0).fit(da)
    np.testing.assert_allclose(auto.components_.values, fixed.components_.values, rtol=1e-10, atol=1e-12)
    # the NMF criterion still fits every count
    assert np.isfinite(NMFDecomposition(n_restarts=0, criterion="nmf").fit(da).reconstruction_errors_.values).all()


# ---------------------------------------------------------------- solvers


def test_anls_solver_goes_below_the_app_error_and_keeps_the_app_count(app_gr):
    # The app's own reconstruction errors (coordinate descent, 1000 iterations) are the
    # bar; the rank-k SVD error is the floor no factorisation can pass.
    model = NMFDecomposition(x_ranges=[(5.0, 10.0)], n_restarts=0, criterion="nmf", solver="anls").fit(app_gr)
    assert model.n_components_ == 3
    app_err = _app_errors("output_1")
    for k in (2, 3):
        err = model.reconstruction_errors_.sel(n_components=k).item()
        assert model.svd_errors_.sel(n_components=k).item() * (1 - 1e-9) <= err < app_err[k]
    # k = 3 is exact up to noise: ANLS removes more than half of the error the app left
    assert model.reconstruction_errors_.sel(n_components=3).item() < 0.5 * app_err[3]
    np.testing.assert_allclose(model.weights_.sum("component"), 1.0, atol=1e-12)


def test_anls_factorises_exact_nonnegative_data_from_a_random_start():
    from xrdmap.decompose import _anls, _start

    rng = np.random.default_rng(4)
    w0 = rng.uniform(0, 1, (60, 3))
    h0 = rng.uniform(0, 1, (3, 300)) * (rng.uniform(0, 1, (3, 300)) > 0.6)
    # a pure point per component and a pure x sample per component: the NMF is unique
    w0[:3], h0[:, :3] = np.eye(3), np.eye(3)
    x = w0 @ h0
    w, h = _start(x, 3, "random", 0)
    start_err = np.linalg.norm(x - w @ h)
    w, h, err, rounds = _anls(x, w, h, 2000, 1e-10)
    assert err == pytest.approx(np.linalg.norm(x - w @ h), rel=1e-12)
    assert err < 1e-6 * np.linalg.norm(x) < start_err
    assert (w >= 0).all() and (h >= 0).all()
    order, corr = match_components(w0, w)
    assert np.all(corr > 0.9999), corr


@pytest.mark.parametrize("seed", range(3))
def test_anls_gives_up_only_a_start_that_cannot_reach_the_bar(seed):
    # Noisy data of three end members: every random start converges to the same minimum.
    # A bar below that minimum cannot be reached: the fit stops early; a bar at or above
    # it changes nothing (the restarts' rule: come within 5 % of the main answer or stop).
    from xrdmap.decompose import _anls, _start

    rng = np.random.default_rng(4)
    w0 = rng.uniform(0, 1, (60, 3))
    h0 = rng.uniform(0, 1, (3, 300)) * (rng.uniform(0, 1, (3, 300)) > 0.6)
    w0[:3], h0[:, :3] = np.eye(3), np.eye(3)
    x = w0 @ h0 + rng.normal(0, 0.01, (60, 300)).clip(0)
    w, h = _start(x, 3, "random", seed)
    w_full, h_full, err_full, rounds_full = _anls(x, w, h, 200, 1e-6)
    *_, err_low, rounds_low = _anls(x, w, h, 200, 1e-6, give_up_above=0.9 * err_full)
    assert rounds_low < rounds_full
    assert err_low >= err_full * (1 - 1e-9)
    for bar in (1.0, 1.05):
        w_b, h_b, err_b, rounds_b = _anls(x, w, h, 200, 1e-6, give_up_above=bar * err_full)
        assert (rounds_b, err_b) == (rounds_full, err_full)
        np.testing.assert_array_equal(w_b, w_full)
        np.testing.assert_array_equal(h_b, h_full)


@pytest.mark.parametrize("solver", ["anls", "cd"])
def test_both_solvers_recover_simulated_end_members(solver):
    da, frac, ends = _end_member_scan()
    fit = NMFDecomposition(n_components=3, init="spa", n_restarts=0, solver=solver).fit(da)
    active = np.isin(da.q.values, fit.components_.q.values)
    _, corr = match_components(ends[:, active].T, fit.components_.values.T)
    assert np.all(corr > 0.99), corr
    _, wcorr = match_components(frac, fit.weights_.values)
    assert np.all(wcorr > 0.99), wcorr


def test_anls_refit_of_a_long_scan_is_no_worse_than_the_sweep():
    # more points than sweep_points: the sweep's components are refitted on every pattern
    da, w_true, _ = _mixture_q(3, n_points=300, seed=5)
    long = NMFDecomposition(n_components=3, n_restarts=0, solver="anls", sweep_points=100).fit(da)
    full = NMFDecomposition(n_components=3, n_restarts=0, solver="anls", sweep_points=300).fit(da)
    assert long.reconstruction_error_ <= 1.001 * full.reconstruction_error_
    _, corr = match_components(w_true / w_true.sum(axis=1, keepdims=True), long.weights_.values)
    assert np.all(corr > 0.99), corr


def test_unknown_solver_is_a_config_error():
    da, _, _ = _mixture_q(2, seed=1)
    with pytest.raises(ConfigError, match="solver='mu'"):
        NMFDecomposition(solver="mu").fit(da)


def test_cli_rejects_an_unknown_solver(gr_folder, tmp_path):
    from typer.testing import CliRunner

    from xrdmap.cli import app

    out = tmp_path / "nmf.h5"
    result = CliRunner().invoke(app, ["decompose", str(gr_folder), "--solver", "mu", "-o", str(out)])
    assert isinstance(result.exception, ConfigError)
    assert "--solver 'mu'" in str(result.exception)
    assert not out.exists()


def test_run_configuration_chooses_the_solver():
    from xrdmap.config import DecomposeConfig
    from xrdmap.pipeline import _decompose

    da, _, _ = _mixture_q(3, seed=8)
    for solver in ("cd", "anls"):
        d = DecomposeConfig(solver=solver, components=3)
        res = _decompose(da, "q", [(0.5, 16.0)], d)
        assert f"'solver': '{solver}'" in res.attrs["nmf_q_parameters"]
    with pytest.raises(ValueError, match="solver"):
        DecomposeConfig(solver="mu")
