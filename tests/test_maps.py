"""Tests of xrdmap.maps on a synthetic result whose zones and fractions are known exactly."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import xarray as xr
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from PIL import Image

from xrdmap import maps
from xrdmap.errors import ConfigError, InputError

PHASES = ["Li3V2(PO4)3", "Li3PO4", "epsilon-LiVOPO4"]
PEAKS_Q = {  # peak centres (A^-1) of the three Gaussian "phases"
    "Li3V2(PO4)3": (1.5, 3.1, 4.4, 7.2),
    "Li3PO4": (1.9, 3.6, 5.2, 8.0),
    "epsilon-LiVOPO4": (2.4, 2.8, 6.0, 9.1),
}
DISTANCES_R = {"Li3V2(PO4)3": 1.55, "Li3PO4": 1.9, "epsilon-LiVOPO4": 2.3}  # A
STEP_MM = 0.1
N_POINTS = 50
# true zones: points 0-14, 15-31, 32-49 -> boundaries midway between neighbours
TRUE_SLICES = (slice(0, 15), slice(15, 32), slice(32, 50))
TRUE_BOUNDARIES = (1.45, 3.15)
TRUE_ZONE_FRACTIONS = np.array([[0.80, 0.15, 0.05], [0.10, 0.70, 0.20], [0.25, 0.15, 0.60]])
AMORPHOUS = (22, 23, 24)


def reference_iq(q: np.ndarray) -> np.ndarray:
    return np.array([
        sum(np.exp(-0.5 * ((q - c) / 0.05) ** 2) * (1 + 2 / c) for c in PEAKS_Q[p]) for p in PHASES
    ])


def reference_gr(r: np.ndarray) -> np.ndarray:
    return np.array([np.sin(2 * np.pi * r / DISTANCES_R[p]) * np.exp(-r / 8.0) * r for p in PHASES])


def make_result(*, seed: int = 0, noise: float = 0.02, scan: str = "position") -> xr.Dataset:
    """A result dataset (developers.md contract) with three phases in three zones."""
    rng = np.random.default_rng(seed)
    position = np.round(np.arange(N_POINTS) * STEP_MM, 6)
    truth = np.empty((N_POINTS, 3))
    for sl, frac in zip(TRUE_SLICES, TRUE_ZONE_FRACTIONS, strict=True):
        truth[sl] = frac
    fractions = np.clip(truth + rng.normal(0, noise, truth.shape), 0, None)
    fractions /= fractions.sum(axis=1, keepdims=True)
    residual = np.full(N_POINTS, 0.03)
    coherence = np.full(N_POINTS, 40.0)
    residual[list(AMORPHOUS)] = 0.35
    coherence[list(AMORPHOUS)] = 6.0
    q = np.linspace(0.5, 15.0, 400)
    r = np.linspace(1.0, 20.0, 380)
    ref_q, ref_r = reference_iq(q), reference_gr(r)
    iq = fractions @ ref_q + 0.2 * np.exp(-q / 4) + rng.normal(0, 0.005, (N_POINTS, q.size))
    gr = fractions @ ref_r + rng.normal(0, 0.01, (N_POINTS, r.size))
    comps_q = 3.0 * ref_q + 0.01
    comps_r = np.vstack([2.0 * ref_r[:2] + 5.0, np.full((1, r.size), np.nan)])  # r chose 2
    w_r = np.column_stack([fractions[:, 0], fractions[:, 1] + fractions[:, 2], np.full(N_POINTS, np.nan)])
    ds = xr.Dataset(
        {
            "iq": (("point", "q"), iq),
            "iq_sigma": (("point", "q"), np.full(iq.shape, 0.005)),
            "gr": (("point", "r"), gr),
            "nmf_q_weights": (("point", "component"), fractions / 3.0),
            "nmf_r_weights": (("point", "component"), w_r / 2.0),
            "nmf_q_components": (("component", "q"), comps_q),
            "nmf_r_components": (("component", "r"), comps_r),
            "q_component_phase": ("component", ["Li3V2(PO4)3", "Li3PO4", "unassigned"]),
            "r_component_phase": ("component", ["Li3V2(PO4)3", "Li3PO4", "unassigned"]),
            "component_score": ("component", [0.93, 0.87, 0.41]),
            "phase_fraction": (("point", "phase"), fractions),
            "residual": ("point", residual),
            "coherence_length": ("point", coherence),
            "reference_iq": (("phase", "q"), ref_q),
            "reference_gr": (("phase", "r"), ref_r),
        },
        coords={
            "point": np.arange(N_POINTS),
            "q": q,
            "r": r,
            "component": np.arange(1, 4),
            "phase": PHASES,
            "monitor": ("point", np.ones(N_POINTS)),
            scan: ("point", position * (10.0 if scan == "time" else 1.0)),
        },
        attrs={"configuration": {"pdf": {"qmax": 24.0}}},
    )
    return ds


@pytest.fixture(scope="module")
def result() -> xr.Dataset:
    return make_result()


# ----------------------------------------------------------------- zones


def test_zone_boundaries_found_within_one_step(result):
    found = maps.find_zone_boundaries(result["phase_fraction"])
    assert len(found) == 2
    np.testing.assert_allclose(found, TRUE_BOUNDARIES, atol=STEP_MM)


def test_zone_boundaries_fixed_count_and_noisier_data():
    ds = make_result(seed=3, noise=0.05)
    assert len(maps.find_zone_boundaries(ds["phase_fraction"], n_zones=3)) == 2
    np.testing.assert_allclose(maps.find_zone_boundaries(ds["phase_fraction"], n_zones=3),
                               TRUE_BOUNDARIES, atol=STEP_MM)


def test_gradual_transition_boundary_at_midpoint():
    pos = np.arange(60) * 0.05
    a = 1 / (1 + np.exp(-(pos - 1.5) / 0.08))  # sigmoid centred at 1.5 mm
    pf = xr.DataArray(np.column_stack([a, 1 - a]), dims=("point", "phase"),
                      coords={"position": ("point", pos), "phase": ["A", "B"]})
    found = maps.find_zone_boundaries(pf)
    assert len(found) == 1
    assert abs(found[0] - 1.5) <= 0.05


def test_no_boundary_in_uniform_sample():
    # noise sd 0.02 (below the 0.05 min_change): no zone in 20 independent uniform scans
    found = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        a = np.clip(0.6 + rng.normal(0, 0.02, 40), 0, 1)
        pf = xr.DataArray(np.column_stack([a, 1 - a]), dims=("point", "phase"),
                          coords={"position": ("point", np.arange(40) * 0.1)})
        found += maps.find_zone_boundaries(pf)
    assert found == []


def test_minor_phase_zone_detected():
    # a 6 wt% minor phase present only in an intermediate band (as eps-LiVOPO4 in Fig. 5)
    pos = np.arange(60) * 0.05
    minor = np.where((pos >= 0.5) & (pos < 1.0), 0.06, 0.0)
    pf = xr.DataArray(np.column_stack([1 - minor, minor]), dims=("point", "phase"),
                      coords={"position": ("point", pos)})
    np.testing.assert_allclose(maps.find_zone_boundaries(pf), [0.475, 0.975], atol=0.05)


def test_three_point_intermediate_plateau_kept():
    # a zone of 3 points whose composition lies between its neighbours' (the composite's
    # 0.3 mm intermediate zone at a 0.1 mm step) is a zone, not a ramp
    pos = np.arange(40) * 0.1
    a = np.where(pos < 1.75, 0.0, np.where(pos < 2.05, 0.4, 0.8))
    a = a + np.random.default_rng(1).normal(0, 0.02, pos.size)
    pf = xr.DataArray(np.column_stack([a, 1 - a]), dims=("point", "phase"),
                      coords={"position": ("point", pos)})
    np.testing.assert_allclose(maps.find_zone_boundaries(pf), [1.75, 2.05], atol=0.1)


def test_long_time_series_is_segmented_in_blocks():
    t = np.arange(5000) * 0.001  # s
    a = np.where((t >= 1.2) & (t < 3.1), 0.7, 0.1) + np.random.default_rng(4).normal(0, 0.02, t.size)
    pf = xr.DataArray(np.column_stack([a, 1 - a]), dims=("point", "phase"),
                      coords={"time": ("point", t)})
    found = maps.find_zone_boundaries(pf)  # blocks of 5 points
    np.testing.assert_allclose(found, [1.2, 3.1], atol=0.005)


def test_unsorted_scan_and_time_axis():
    ds = make_result(scan="time")
    perm = np.random.default_rng(2).permutation(N_POINTS)
    found = maps.find_zone_boundaries(ds["phase_fraction"].isel(point=perm))
    np.testing.assert_allclose(found, np.array(TRUE_BOUNDARIES) * 10.0, atol=STEP_MM * 10)


def test_zone_table_means_match_independent_slices(result):
    table = maps.zone_table(result, boundaries=TRUE_BOUNDARIES)
    pf = result["phase_fraction"].values
    expected = np.array([pf[sl].mean(axis=0) for sl in TRUE_SLICES])
    np.testing.assert_allclose(table["mean_fraction"].values, expected, rtol=1e-12)
    np.testing.assert_allclose(table["mean_fraction"].values, TRUE_ZONE_FRACTIONS, atol=0.02)
    assert table["n_points"].values.tolist() == [15, 17, 18]
    np.testing.assert_allclose(table["start"].values, [0.0, 1.5, 3.2])
    np.testing.assert_allclose(table["end"].values, [1.4, 3.1, 4.9])
    assert list(table["phase"].values) == PHASES
    auto = maps.zone_table(result)  # boundaries detected
    np.testing.assert_allclose(auto["mean_fraction"].values, expected, atol=1e-12)


def test_boundaries_from_nmf_weights_without_fractions(result):
    # a background component near 1 and phase components of a few per cent, as NMF of raw I(Q)
    f = result["phase_fraction"].values
    w = np.column_stack([0.95 + 0.01 * f[:, 0], 0.03 * f])
    ds = result.drop_vars(["phase_fraction", "nmf_q_weights"]).drop_dims("component")
    ds["nmf_q_weights"] = (("point", "component"), w / w.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(maps.zone_boundaries(ds), TRUE_BOUNDARIES, atol=STEP_MM)


def test_stored_boundaries_take_precedence(result):
    ds = result.assign_attrs(zone_boundaries=[2.0])
    assert maps.zone_boundaries(ds) == [2.0]


def test_uniform_residual_is_not_amorphous(result):
    # every point keeps 40 % unexplained signal (smooth background): nothing is amorphous
    ds = result.assign(residual=("point", np.full(N_POINTS, 0.4)),
                       coherence_length=("point", np.full(N_POINTS, 30.0)))
    assert not maps.amorphous_points(ds).values.any()


def test_amorphous_points(result):
    flags = maps.amorphous_points(result)
    assert np.flatnonzero(flags.values).tolist() == list(AMORPHOUS)
    flags = maps.amorphous_points(result, coherence_threshold_A=50.0)
    assert flags.values.all()


# ----------------------------------------------------------------- figures


def _labels(fig: Figure) -> list[str]:
    return [t for ax in fig.axes for t in (ax.get_xlabel(), ax.get_ylabel()) if t]


def test_iq_and_gr_maps_have_units(result):
    fig = maps.plot_iq_map(result)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Q (Å$^{-1}$)"
    assert ax.get_ylabel() == "position (mm)"
    assert "I(Q)" in fig.axes[1].get_ylabel()  # colour bar
    # heatmap spans the whole scan and Q range
    assert ax.get_xlim()[0] <= 0.5 and ax.get_xlim()[1] >= 15.0
    assert min(ax.get_ylim()) <= 0.0 and max(ax.get_ylim()) >= 4.9
    # zone boundaries drawn as horizontal lines at the detected positions
    ys = sorted({round(line.get_ydata()[0], 6) for line in ax.get_lines()})
    np.testing.assert_allclose(ys, TRUE_BOUNDARIES, atol=STEP_MM)
    fig = maps.plot_gr_map(result)
    assert fig.axes[0].get_xlabel() == "r (Å)"
    assert fig.axes[1].get_ylabel() == "G(r) (Å$^{-2}$)"
    norm = _heat(fig.axes[0]).norm
    assert norm.vmin == pytest.approx(-norm.vmax)  # diverging about G = 0


def _heat(ax):
    """The colour map of a heatmap axes: an image on even grids, else a quad mesh."""
    return (ax.images or ax.collections)[0]


def test_uneven_scan_grid_is_drawn_as_a_mesh(result):
    ds = result.isel(point=[0, 1, 2, 4, 8, 16])  # positions not evenly spaced
    ax = maps.plot_iq_map(ds, boundaries=None).axes[0]
    assert not ax.images and ax.collections
    ax = maps.plot_iq_map(result, boundaries=None).axes[0]
    assert ax.images  # evenly spaced: an image, cells centred on the coordinates
    q, pos = result["q"].values, result["position"].values
    left, right, bottom, top = ax.images[0].get_extent()
    assert left == pytest.approx(q[0] - (q[1] - q[0]) / 2) and bottom == pytest.approx(pos[0] - (pos[1] - pos[0]) / 2)


def test_contrast_map_is_relative_deviation(result):
    fig = maps.plot_iq_map(result, scale="contrast", boundaries=None)
    mesh = _heat(fig.axes[0])
    iq = result["iq"].values
    expected = iq / np.median(iq, axis=0) - 1.0
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(iq.shape), expected, rtol=1e-12)
    assert mesh.norm.vmin == pytest.approx(-mesh.norm.vmax)


def test_log_map_negative_is_lowest_colour_and_nan_is_missing(result):
    ds = result.copy(deep=True)
    ds["iq"][3, :] = -0.5  # over-subtracted background
    ds["iq"][7, :] = np.nan  # masked point (crack)
    mesh = _heat(maps.plot_iq_map(ds, q_range=None, boundaries=None).axes[0])
    values = np.ma.asarray(mesh.get_array()).reshape(ds["iq"].shape)
    assert not np.ma.is_masked(values[3]) and np.allclose(values[3], mesh.norm.vmin)
    assert np.all(~np.isfinite(np.ma.filled(values[7], np.nan)))


def test_time_series_axis():
    fig = maps.plot_iq_map(make_result(scan="time"), scale="robust")
    assert fig.axes[0].get_ylabel() == "time (s)"


def test_weights_and_components_coloured_by_phase(result):
    colors = maps.phase_colors(result)
    assert len(set(colors[p] for p in PHASES)) == 3
    assert set(colors.values()) - {"#7f7f7f"} <= set(maps.OKABE_ITO)
    fig_w = maps.plot_weights(result, "q")
    ax = fig_w.axes[0]
    assert ax.get_xlabel() == "position (mm)"
    lines = ax.get_lines()[:3]
    assert to_hex(lines[0].get_color()) == colors["Li3V2(PO4)3"].lower()
    assert to_hex(lines[2].get_color()) == "#7f7f7f"  # unassigned is grey
    # relative weights: per-point fractions equal the true mixture
    np.testing.assert_allclose(lines[0].get_ydata(), result["phase_fraction"].values[:, 0], atol=1e-12)

    fig_c = maps.plot_components(result, "q")
    legend = [t.get_text() for t in fig_c.axes[0].get_legend().get_texts()]
    assert any("0.93" in t and "V$_{2}$" in t for t in legend)
    assert any("unassigned" in t and "0.41" in t for t in legend)
    assert "reference (scaled)" in legend
    assert fig_c.axes[0].get_xlabel() == "Q (Å$^{-1}$)"
    comp_lines = [ln for ln in fig_c.axes[0].get_lines() if to_hex(ln.get_color()) == colors["Li3PO4"].lower()]
    assert comp_lines
    # the scaled reference lies on top of the component (component = 3 * reference + 0.01)
    ref_lines = [ln for ln in fig_c.axes[0].get_lines() if to_hex(ln.get_color()) == "#000000"]
    assert len(ref_lines) == 2  # unassigned component has no reference
    np.testing.assert_allclose(ref_lines[0].get_ydata(), fig_c.axes[0].get_lines()[1].get_ydata(), atol=1e-9)

    fig_r = maps.plot_components(result, "r")
    assert fig_r.axes[0].get_xlabel() == "r (Å)"
    r_legend = [t.get_text() for t in fig_r.axes[0].get_legend().get_texts()]
    assert len([t for t in r_legend if t.startswith("C")]) == 2  # NaN-padded component skipped


class _StubPhase:
    """Stands in for xrdmap.phases.Phase: Gaussian peaks stretched in Q (d scales by stretch)."""

    def __init__(self, name):
        self.name = name

    def simulate_iq(self, q, *, stretch=1.0, fwhm_q=None):
        return reference_iq(q * stretch)[PHASES.index(self.name)]


def test_components_reference_simulated_from_library(result):
    q = result["q"].values
    refs = reference_iq(q)
    comps = np.vstack([3 * reference_iq(q * 1.01)[0] + 0.02, 2 * (0.7 * refs[1] + 0.3 * refs[2]), refs[2]])
    mix = np.zeros((3, 3))
    mix[1] = [0.0, 0.7, 0.3]
    ds = result.drop_vars(["reference_iq", "nmf_q_components", "q_component_phase"]).assign(
        nmf_q_components=(("component", "q"), comps),
        q_component_phase=("component", ["Li3V2(PO4)3", "Li3PO4 + epsilon-LiVOPO4", "unassigned"]),
        q_component_stretch=("component", [1.01, 1.0, np.nan]),
        q_component_phase_fraction=(("component", "phase"), mix),
    )
    library = {p: _StubPhase(p) for p in PHASES}
    fig = maps.plot_components(ds, "q", phases=library)
    lines = fig.axes[0].get_lines()
    black = [i for i, ln in enumerate(lines) if to_hex(ln.get_color()) == "#000000"]
    assert len(black) == 2  # the unassigned component has no reference
    for i in black:  # each reference is drawn just before its component and matches it
        np.testing.assert_allclose(lines[i].get_ydata(), lines[i + 1].get_ydata(), atol=1e-6)
    assert len(fig.axes[0].get_lines()) == 5
    assert len(maps.plot_components(ds, "q", phases=None).axes[0].get_lines()) == 3


def test_phase_fractions_stack_and_residual_band(result):
    fig = maps.plot_phase_fractions(result)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "weight fraction" and ax.get_xlabel() == "position (mm)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[-1] == "unexplained above the\nscan's 3 % baseline\n(amorphous?)"
    assert ax.collections[-1].get_hatch() == "///"
    # top of the stack is 1 everywhere: the residual band closes the column
    top = ax.collections[-1].get_paths()[0].vertices
    upper = top[(top[:, 1] > 0.5)][:, 1]
    np.testing.assert_allclose(upper.max(), 1.0, atol=1e-9)
    xs = [ln.get_xdata()[0] for ln in ax.get_lines()]
    np.testing.assert_allclose(sorted(xs), TRUE_BOUNDARIES, atol=STEP_MM)
    fills = {to_hex(c.get_facecolor()[0]) for c in ax.collections[:3]}
    assert fills == {maps.phase_colors(result)[p].lower() for p in PHASES}


def test_fraction_bands_numbers(result):
    pf = result["phase_fraction"].values
    bands = maps.fraction_bands(result)  # excess over the 0.03 baseline
    band = np.zeros(N_POINTS)
    band[list(AMORPHOUS)] = 0.35 - 0.03
    np.testing.assert_allclose(bands["unexplained"].values, band, atol=1e-12)
    np.testing.assert_allclose(bands["fraction"].values, pf / pf.sum(1, keepdims=True) * (1 - band)[:, None],
                               atol=1e-12)
    total = maps.fraction_bands(result, "total")
    np.testing.assert_allclose(total["unexplained"].values, result["residual"].values)
    np.testing.assert_allclose(total["fraction"].sum("phase").values + total["unexplained"].values, 1.0)
    assert maps.fraction_bands(result, "none")["unexplained"].values.max() == 0.0


def test_minor_phases_pooled(result):
    pf = np.column_stack([result["phase_fraction"].values * 0.99, np.full(N_POINTS, 0.005),
                          np.full(N_POINTS, 0.005)])
    ds = result.drop_vars(["phase_fraction", "reference_iq", "reference_gr"]).drop_dims("phase").assign(
        phase_fraction=(("point", "phase"), pf)).assign_coords(phase=[*PHASES, "AlPO4", "Li4P2O7"])
    labels = [t.get_text() for t in maps.plot_phase_fractions(ds).axes[0].get_legend().get_texts()]
    assert "other phases (< 1 % each)" in labels and not any("AlPO" in t for t in labels)


def test_weights_panels_when_profiles_would_be_flat(result):
    f = result["phase_fraction"].values
    ds = result.copy()
    ds["nmf_q_weights"] = (("point", "component"), np.column_stack([0.95 + 0.01 * f[:, 0], 0.02 * f[:, 1:]]))
    fig = maps.plot_weights(ds, "q")
    assert len(fig.axes) == 3  # one panel per component, each with its own y range
    spans = [np.ptp(ax.get_lines()[0].get_ydata()) for ax in fig.axes]
    for ax, span in zip(fig.axes, spans, strict=True):
        lo, hi = ax.get_ylim()
        assert span > 0.5 * (hi - lo)  # the profile fills its panel
    assert len(maps.plot_weights(result, "q").axes) == 1  # comparable weights: one panel


def test_quality_and_overview(result):
    fig = maps.plot_quality(result)
    assert [ax.get_ylabel() for ax in fig.axes] == ["coherence length (Å)", "residual (fraction)"]
    assert fig.axes[-1].get_xlabel() == "position (mm)"
    fig = maps.plot_overview(result)
    assert "Q (Å$^{-1}$)" in _labels(fig) and "weight fraction" in _labels(fig)


def test_missing_variable_is_input_error(result):
    with pytest.raises(InputError, match="gr"):
        maps.plot_gr_map(result.drop_vars("gr"))
    with pytest.raises(ConfigError):
        maps.plot_weights(result, "x")
    with pytest.raises(ConfigError):
        maps.make_figures(result, "nonsense")


def test_save_figures_writes_valid_files(result, tmp_path):
    paths = maps.save_figures(result, tmp_path / "figs", formats=("png", "svg"))
    names = {p.name for p in paths}
    for stem in ("iq_map", "iq_contrast", "gr_map", "weights_q", "weights_r", "components_q", "components_r",
                 "phase_fractions", "overview", "quality"):
        assert f"{stem}.png" in names and f"{stem}.svg" in names
    for p in paths:
        assert p.stat().st_size > 1000
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.verify()
                assert im.format == "PNG"
        else:
            assert ET.parse(p).getroot().tag.endswith("svg")
    assert not list((tmp_path / "figs").glob("*.partial"))
    only = maps.save_figures(result.drop_vars(["gr", "nmf_r_components", "nmf_r_weights"]),
                             tmp_path / "few", formats=["png"], what=["gr", "iq"])
    assert [p.name for p in only] == ["iq_map.png", "iq_contrast.png"]


def test_plot_cli(result, tmp_path):
    from typer.testing import CliRunner

    from xrdmap.cli import app
    from xrdmap.results import save_result

    path = save_result(result, tmp_path / "result.h5")
    out = tmp_path / "plots"
    res = CliRunner().invoke(app, ["plot", str(path), "-o", str(out), "--format", "png",
                                   "--what", "fractions"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["overview.png", "phase_fractions.png"]


def test_plot_cli_errors(result, tmp_path):
    import subprocess
    import sys

    from xrdmap.results import save_result

    path = save_result(result, tmp_path / "result.h5")
    run = [sys.executable, "-m", "xrdmap", "plot", str(path), "-o", str(tmp_path / "p")]
    bad = subprocess.run([*run, "--what", "maps"], capture_output=True, text=True)
    assert bad.returncode == 3 and "--what" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "xrdmap", "plot", str(tmp_path / "nope.h5")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.h5" in missing.stderr


def test_wide_heatmaps_average_neighbouring_columns():
    # 3001 even Q columns drawn as 1500 averages of 2 (the last column dropped): centres
    # and values are the pairs' means, a NaN makes its pair NaN (grey, as before)
    from xrdmap.maps import _bin_columns

    x = 0.5 + 0.01 * np.arange(3001)
    z = np.vstack([np.sin(x), x**2])
    z[1, 10] = np.nan
    xb, zb = _bin_columns(x, z, 1600)
    assert xb.shape == (1500,) and zb.shape == (2, 1500)
    np.testing.assert_allclose(xb, (x[0:3000:2] + x[1:3000:2]) / 2)
    np.testing.assert_allclose(zb[0], (np.sin(x[0:3000:2]) + np.sin(x[1:3000:2])) / 2)
    assert np.isnan(zb[1, 5]) and np.isfinite(np.delete(zb[1], 5)).all()
    np.testing.assert_allclose(np.diff(xb), 0.02)  # still an even grid
    same_x, same_z = _bin_columns(x[:1600], z[:, :1600], 1600)
    assert same_z.shape == (2, 1600)


def test_pipeline_figure_rounds_match_one_round_and_find_the_zones_once(result, tmp_path, monkeypatch):
    """`xrdmap run` draws its figures in rounds as their data appear (pipeline._Figures);
    the files must be those one save_figures call draws, with the zones found once."""
    from types import SimpleNamespace

    from xrdmap import pipeline

    ref = maps.save_figures(result, tmp_path / "ref", formats=("png",), phases=None)
    calls = []
    original = maps.find_zone_boundaries
    monkeypatch.setattr(maps, "find_zone_boundaries", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = SimpleNamespace(output=SimpleNamespace(formats=["png"]),
                             decompose=SimpleNamespace(q_ranges=None, r_ranges=None))
    figures = pipeline._Figures(config, tmp_path / "run" / "result.h5", None)
    (tmp_path / "run").mkdir()
    early = result.drop_vars([v for v in result.data_vars if v.startswith("nmf_")])
    figures.draw_early(early)
    figures.draw_components("q", result)
    figures.draw_rest(result)
    assert sorted(p.name for p in figures.written) == sorted(p.name for p in ref)
    for path in ref:
        assert (figures.dir / path.name).read_bytes() == path.read_bytes(), path.name
    assert len(calls) == 1
    assert "zone_boundaries" not in result.attrs


def test_warm_up_draws_in_memory_only(tmp_path, monkeypatch):
    # the run's warm-up thread calls it during the integration: no file may appear
    monkeypatch.chdir(tmp_path)
    assert maps.warm_up(("png", "svg", "pdf")) is None
    assert list(tmp_path.iterdir()) == []


def test_optimal_segmentation_matches_exhaustive_search():
    # the dynamic programme behind find_zone_boundaries against every possible cut set
    from itertools import combinations

    from xrdmap.maps import _optimal_segmentation

    def sse(x, cs):
        edges = [0, *cs, len(x)]
        return sum(((x[a:b] - x[a:b].mean(axis=0)) ** 2).sum() for a, b in zip(edges[:-1], edges[1:]))

    rng = np.random.default_rng(11)
    for n, min_size in ((9, 1), (11, 2), (12, 3)):
        x = rng.random((n, 3)) + np.repeat(rng.random((3, 3)) * 2, [n // 3, n // 3, n - 2 * (n // 3)], axis=0)
        found = _optimal_segmentation(x, 4, min_size)
        for k, cuts in enumerate(found, start=1):
            allowed = [cs for cs in combinations(range(1, n), k - 1)
                       if all(b - a >= min_size for a, b in zip([0, *cs], [*cs, n]))]
            best = min(allowed, key=lambda cs, x=x: sse(x, cs))
            assert len(cuts) == k - 1 and all(b - a >= min_size for a, b in zip([0, *cuts], [*cuts, n]))
            assert sse(x, cuts) == pytest.approx(sse(x, best), rel=1e-12, abs=1e-12), (n, min_size, k)
        assert len(found) == min(4, n // min_size)
