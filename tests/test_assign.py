"""Tests of xrdmap.assign on patterns built from the reference phases with known truth."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xrdmap.assign import UNASSIGNED, assign_components, phase_fractions
from xrdmap.errors import ConfigError, InputError
from xrdmap.phases import load_library

# A library subset keeps the tests fast; it still holds close relatives (LATP/LTP, the
# Li3PO4 polymorphs) that a wrong stretch or width would confuse.
NAMES = ["LVP", "LATP", "LTP", "Li3PO4-gamma", "Li3PO4-beta", "Li4P2O7", "AlPO4"]


@pytest.fixture(scope="module")
def lib():
    full = load_library()
    return {n: full[n] for n in NAMES}


@pytest.fixture(scope="module")
def q():
    return np.linspace(0.5, 16.0, 1800)


def _component(lib, name, q, stretch, fwhm, rng, noise=0.01):
    y = lib[name].simulate_iq(q, stretch=stretch, fwhm_q=fwhm)
    y = y / y.max()
    # NMF components carry a smooth pedestal (diffuse scattering, shift) and noise.
    return y + 0.15 * np.exp(-q / 4) + 0.05 + rng.normal(0, noise, q.size)


@pytest.fixture(scope="module")
def q_assignment(lib, q):
    rng = np.random.default_rng(7)
    truth = [("LVP", 1.012, 0.04), ("LATP", 0.985, 0.03), ("Li3PO4-gamma", 1.004, 0.05)]
    comps = [_component(lib, n, q, s, w, rng) for n, s, w in truth]
    # Mixture by mass: 0.7 LVP + 0.3 Li4P2O7 (references are per unit mass).
    mix = 0.7 * lib["LVP"].simulate_iq(q, stretch=1.0) + 0.3 * lib["Li4P2O7"].simulate_iq(q, stretch=1.0)
    comps.append(mix / mix.max() + 0.05 + rng.normal(0, 0.005, q.size))
    # AlPO4, with its reference removed from the library offered.
    comps.append(_component(lib, "AlPO4", q, 1.0, 0.03, rng))
    # A random smooth curve.
    smooth = np.convolve(rng.normal(size=q.size + 200), np.ones(60) / 60, "same")[100:-100]
    comps.append(smooth - smooth.min())
    da = xr.DataArray(np.array(comps), dims=("component", "q"), coords={"q": q})
    offered = {n: p for n, p in lib.items() if n != "AlPO4"}
    return truth, assign_components(da, offered, dim="q")


def test_assign_single_phases_names_and_stretch(q_assignment):
    truth, ds = q_assignment
    for i, (name, stretch, fwhm) in enumerate(truth):
        assert ds.component_phase.values[i] == name
        assert abs(ds.component_stretch.values[i] - stretch) < 0.002
        assert ds.component_width.values[i] == pytest.approx(fwhm, rel=0.25)
        assert ds.component_score.values[i] > 0.9
        assert ds.component_phase_fraction.sel(phase=name).values[i] == 1.0
        assert name not in ds.component_runners_up.values[i].split("; ")[0]


def test_assign_mixture_by_nnls(q_assignment):
    _, ds = q_assignment
    assert ds.component_phase.values[3] == "LVP + Li4P2O7"
    frac = ds.component_phase_fraction.isel(component=3)
    assert frac.sel(phase="LVP").item() == pytest.approx(0.7, abs=0.05)
    assert frac.sel(phase="Li4P2O7").item() == pytest.approx(0.3, abs=0.05)
    assert abs(ds.component_stretch.values[3] - 1.0) < 0.002
    # each member's reference as scored: both simulated unstretched; nothing for the others
    used = ds.component_mixture_stretch.isel(component=3)
    # (a minor phase's own search is pulled by the major phase's overlapping peaks)
    assert abs(used.sel(phase="LVP").item() - 1.0) < 0.002
    assert abs(used.sel(phase="Li4P2O7").item() - 1.0) < 0.01
    assert np.isnan(used.drop_sel(phase=["LVP", "Li4P2O7"]).values).all()
    assert np.isfinite(ds.component_mixture_width.isel(component=3).sel(phase=["LVP", "Li4P2O7"]).values).all()


def test_unknown_phase_and_random_curve_are_unassigned(q_assignment):
    _, ds = q_assignment
    for i in (4, 5):
        assert ds.component_phase.values[i] == UNASSIGNED
        assert np.isnan(ds.component_stretch.values[i])
        assert ds.component_score.values[i] < ds.attrs["assign_min_score"]
        assert ds.component_phase_fraction.values[i].sum() == 0
    # The runners-up are still listed for the user to judge.
    assert ds.component_runners_up.values[4].count(";") == 2


def test_assign_in_real_space(lib):
    r = np.arange(0.5, 22.0, 0.02)
    rng = np.random.default_rng(3)
    comps = []
    for name, stretch in (("LATP", 1.008), ("Li3PO4-gamma", 0.99)):
        g = lib[name].simulate_gr(r, stretch=stretch, u_iso=0.006)
        comps.append(g - g.min() + rng.normal(0, 0.01 * np.ptp(g), r.size))
    da = xr.DataArray(np.array(comps), dims=("component", "r"), coords={"r": r})
    ds = assign_components(da, {n: lib[n] for n in ("LATP", "Li3PO4-gamma", "Li4P2O7")}, dim="r")
    assert list(ds.component_phase.values) == ["LATP", "Li3PO4-gamma"]
    np.testing.assert_allclose(ds.component_stretch.values, [1.008, 0.99], atol=0.002)


# ------------------------------------------------------------------ phase fractions


@pytest.fixture(scope="module")
def mixtures(lib):
    q = np.linspace(0.3, 20.0, 2400)
    names = ["LVP", "LATP", "Li3PO4-gamma", "AlPO4"]
    refs = np.array([lib[n].simulate_iq(q) for n in names])
    rng = np.random.default_rng(11)
    w = rng.dirichlet(np.ones(len(names)), size=200)
    background = (0.5 * np.exp(-q / 6) + 0.2 * q / 20) * refs.max() / 10
    clean = w @ refs + background
    noisy = clean + rng.normal(0, 0.003 * clean.max(), clean.shape)
    da = xr.DataArray(noisy, dims=("point", "q"), coords={"q": q, "position": ("point", np.arange(200) * 0.01)})
    in_range = (q >= 1) & (q <= 15)
    bg_share = background[in_range].sum() / clean[:, in_range].sum(axis=1)
    return da, w, names, bg_share


def test_phase_fractions_recover_weight_fractions(lib, mixtures):
    da, w, names, bg_share = mixtures
    ds = phase_fractions(da, {n: lib[n] for n in names})
    assert ds.phase_fraction.dims == ("point", "phase")
    assert list(ds.phase.values) == names
    np.testing.assert_allclose(ds.phase_fraction.values, w, atol=0.02)
    np.testing.assert_allclose(ds.phase_fraction.sum("phase"), 1.0, atol=1e-9)
    # Everything not crystalline here is the smooth background.
    np.testing.assert_allclose(ds.residual.values, bg_share, atol=0.02)
    assert "position" in ds.coords


def test_phase_fractions_molar(lib, mixtures):
    da, w, names, _ = mixtures
    ds = phase_fractions(da, {n: lib[n] for n in names}, weight="mole")
    masses = np.array([lib[n].formula_mass for n in names])
    moles = w / masses
    np.testing.assert_allclose(ds.phase_fraction.values, moles / moles.sum(1, keepdims=True), atol=0.03)


def test_phase_fractions_extra_phase_gets_nothing(lib, mixtures):
    da, w, names, _ = mixtures
    offered = {n: lib[n] for n in [*names, "Li4P2O7"]}
    ds = phase_fractions(da.isel(point=slice(0, 40)), offered)
    assert ds.phase_fraction.sel(phase="Li4P2O7").max() < 0.02
    np.testing.assert_allclose(ds.phase_fraction.sel(phase=names).values, w[:40], atol=0.025)


def test_phase_fractions_use_stretch_found_by_assignment(lib):
    q = np.linspace(0.5, 16.0, 1800)
    names = ["LVP", "Li3PO4-gamma"]
    stretch = {"LVP": 1.01, "Li3PO4-gamma": 0.995}
    refs = np.array([lib[n].simulate_iq(q, stretch=stretch[n]) for n in names])
    w = np.array([[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]])
    da = xr.DataArray(w @ refs, dims=("point", "q"), coords={"q": q})
    comps = xr.DataArray(refs, dims=("component", "q"), coords={"q": q})
    assignment = assign_components(comps, {n: lib[n] for n in names}, max_phases_per_component=1)
    ds = phase_fractions(da, {n: lib[n] for n in names}, stretch=assignment)
    np.testing.assert_allclose(ds.phase_stretch.values, [1.01, 0.995], atol=0.002)
    np.testing.assert_allclose(ds.phase_fraction.values, w, atol=0.02)
    # Amorphous hump: reported in the residual, never hidden.
    hump = 0.3 * refs.max() * np.exp(-0.5 * ((q - 1.8) / 0.4) ** 2)
    ds = phase_fractions(da + hump, {n: lib[n] for n in names}, stretch=assignment)
    assert np.all(ds.residual.values > 0.05)


def test_phase_fractions_search_stretch_and_width(lib):
    q = np.linspace(0.5, 16.0, 1800)
    names = ["LATP", "Li3PO4-gamma", "Li4P2O7"]
    stretch = {"LATP": 0.988, "Li3PO4-gamma": 1.007, "Li4P2O7": 1.0}
    refs = np.array([lib[n].simulate_iq(q, stretch=stretch[n], fwhm_q=0.045) for n in names])
    w = np.random.default_rng(2).dirichlet(np.ones(3), size=30)
    clean = w @ refs + 0.05 * refs.max()
    noisy = clean + np.random.default_rng(3).normal(0, 0.002 * clean.max(), clean.shape)
    da = xr.DataArray(noisy, dims=("point", "q"), coords={"q": q})
    ds = phase_fractions(da, {n: lib[n] for n in names}, stretch_range=0.03)
    np.testing.assert_allclose(ds.phase_stretch.values, [stretch[n] for n in names], atol=0.002)
    np.testing.assert_allclose(ds.phase_width.values, 0.045, rtol=0.25)
    np.testing.assert_allclose(ds.phase_fraction.values, w, atol=0.02)


def test_errors_name_the_input(lib, q):
    da = xr.DataArray(np.ones((2, q.size)), dims=("component", "q"), coords={"q": q})
    with pytest.raises(ConfigError, match="dim"):
        assign_components(da, lib, dim="x")
    with pytest.raises(InputError, match="expected a 'r' dimension"):
        assign_components(da, lib, dim="r")
    with pytest.raises(InputError, match="expected at least one phase"):
        assign_components(da, {})
    with pytest.raises(ConfigError, match="weight"):
        phase_fractions(da.rename(component="point"), lib, weight="volume")
    with pytest.raises(InputError, match=r"\(point, q\)"):
        phase_fractions(np.ones((3, 4)), lib)


# ------------------------------------------------- end to end on the scan simulator


@pytest.fixture(scope="module")
def hotspot_truth(tmp_path_factory):
    """True sample patterns (Bragg + thermal diffuse + Compton) and weight fractions of the
    simulator's hotspot layout (xrdmap.simulate): an independent ground truth."""
    import h5py

    from xrdmap.simulate import simulate_scan

    path = simulate_scan("hotspot", tmp_path_factory.mktemp("sim") / "hotspot.h5", points=30, size=128,
                         seed=1, fwhm_q=0.05)
    with h5py.File(path, "r") as fh:
        tr = fh["entry/truth"]
        q = tr["q"][()]
        iq = tr["iq"][()]
        names = [v.decode() if isinstance(v, bytes) else str(v) for v in tr["phase"][()]]
        fractions = tr["phase_fraction"][()]
    return xr.DataArray(iq, dims=("point", "q"), coords={"q": q}), names, fractions


@pytest.mark.slow
def test_end_to_end_on_simulated_hotspot(hotspot_truth):
    from xrdmap.decompose import decompose

    da, names, fractions = hotspot_truth
    present = [n for n, f in zip(names, fractions.max(axis=0), strict=True) if f > 0.01]
    assert len(present) == 4
    rng = np.random.default_rng(0)
    noisy = da + rng.normal(0, 1, da.shape) * np.sqrt(np.clip(da.values, 0, None))  # counting noise
    for data in (da, noisy):
        ds = decompose(data, "q", n_restarts=0)
        assert ds.attrs["nmf_q_n_components"] == 4

    full = load_library()
    ds = decompose(da, "q", n_restarts=0)
    assigned = assign_components(ds["nmf_q_components"], full, dim="q")
    found = set(assigned.component_phase.values)
    assert {"LVP", "eps-LiVOPO4", "Li3PO4-gamma"} <= found
    # LVP-Pbcn and the anti-NASICON model are one framework: either name is right.
    assert found - {"LVP", "eps-LiVOPO4", "Li3PO4-gamma"} <= {"LVP-Pbcn", "anti-NASICON"}

    pf = phase_fractions(da, {n: full[n] for n in names}, stretch_range=0.03)
    np.testing.assert_allclose(pf.phase_fraction.values, fractions, atol=0.02)
    np.testing.assert_allclose(pf.phase_stretch.values, 1.0, atol=0.002)


# ------------------------------------------------------------------ Bragg-part components


def _bragg(q, pattern, window=1.0):
    from xrdmap.series import diffuse_baseline

    da = xr.DataArray(pattern, dims="q", coords={"q": q})
    return (da - diffuse_baseline(da, window_A=window)).clip(min=0).values


@pytest.fixture(scope="module")
def coarse():
    """Components as the pipeline's NMF of Bragg parts gives them at coarse resolution
    (peaks 0.25 A^-1 wide, the diffuse baseline opened off with a 1 A^-1 window)."""
    full = load_library()
    q = np.arange(0.5, 20.0, 0.013)
    rng = np.random.default_rng(5)

    def iq(name):
        return full[name].simulate_iq(q, fwhm_q=0.25)

    comps = [
        _bragg(q, iq("LVP")),
        _bragg(q, 0.6 * iq("LATP") + 0.4 * iq("LVP")),
        _bragg(q, iq("LTP")),
        _bragg(q, iq("AlPO4")),
    ]
    comps = [c / c.max() + rng.normal(0, 0.003, q.size) for c in comps]
    da = xr.DataArray(np.array(comps), dims=("component", "q"), coords={"q": q})
    offered = {n: full[n] for n in ("LVP", "LATP", "LTP", "anti-NASICON", "LVP-Pbcn", "Li3PO4-gamma")}
    return da, offered


def test_bragg_part_references(coarse):
    da, offered = coarse
    treated = assign_components(da.isel(component=[0]), offered, diffuse_window_A=1.0)
    plain = assign_components(da.isel(component=[0]), offered)
    assert treated.component_phase.values[0] == "LVP"
    assert abs(treated.component_stretch.values[0] - 1.0) < 0.002
    # compared like with like, the right phase fits far better than untreated references
    assert treated.component_score.values[0] > 0.99 > plain.component_phase_score.sel(phase="LVP").values[0]


def test_scan_fit_names_mixture_and_lookalike(coarse):
    da, offered = coarse
    # a whole-scan fit that found LATP and LVP (at stretch 1, peaks 0.25 A^-1)
    scan_fit = xr.Dataset(
        {
            "phase_amount": (("point", "phase"), [[0.6, 0.4], [1.0, 0.0]]),
            "phase_stretch": ("phase", [1.0, 1.0]),
            "phase_width": ("phase", [0.25, 0.25]),
        },
        coords={"phase": ["LATP", "LVP"]},
    )
    ds = assign_components(da, offered, diffuse_window_A=1.0, scan_fit=scan_fit, max_phases_per_component=4)
    labels = list(ds.component_phase.values)
    assert labels[0] == "LVP"
    assert set(labels[1].split(" + ")) == {"LATP", "LVP"}
    frac = ds.component_phase_fraction.isel(component=1)
    assert frac.sel(phase="LATP").item() == pytest.approx(0.6, abs=0.1)
    assert frac.sel(phase="LVP").item() == pytest.approx(0.4, abs=0.1)
    # the mixture was fitted with the scan fit's references: its stretch and width
    for name in ("LATP", "LVP"):
        assert ds.component_mixture_stretch.sel(phase=name).values[1] == 1.0
        assert ds.component_mixture_width.sel(phase=name).values[1] == 0.25
    # LTP and LATP are one pattern at this resolution: the phase the scan fit kept is named
    assert labels[2] == "LATP"
    assert ds.component_phase_score.sel(phase="LTP").values[2] >= ds.component_phase_score.sel(phase="LATP").values[2] - 0.01
    # a phase not offered stays unassigned, scan fit or not
    assert labels[3] == UNASSIGNED


def test_scan_fit_must_be_a_phase_fit(coarse):
    da, offered = coarse
    with pytest.raises(InputError, match="scan_fit"):
        assign_components(da.isel(component=[0]), offered, scan_fit=xr.Dataset())
