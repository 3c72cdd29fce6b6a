"""Series descriptors against analytic patterns with known peaks, stretches and events."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xrdmap.errors import InputError
from xrdmap.series import crystallinity_index, detect_events, lattice_scale, peak_descriptors

Q = np.linspace(0.5, 16.0, 3100)


def gauss(q, centre, fwhm, area):
    sigma = fwhm / 2.3548200450309493
    return area / (sigma * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((q - centre) / sigma) ** 2)


class CubicPhase:
    """Stand-in reference: Gaussian Bragg peaks of a cubic cell, Q_hkl = 2 pi sqrt(h2+k2+l2) / (a s)."""

    name = "cubic"
    a = 4.0
    shells = np.array([3, 4, 8, 11, 12, 16, 19, 20, 24, 27])  # fcc-like h2+k2+l2

    def simulate_iq(self, q, *, stretch=1.0, fwhm_q=0.05):
        out = np.zeros_like(q, dtype=float)
        for i, m in enumerate(self.shells):
            qk = 2 * np.pi * np.sqrt(m) / (self.a * stretch)
            out += gauss(q, qk, fwhm_q, 10.0 / (1 + 0.3 * i))
        return out


def hump(q):
    return 5.0 * np.exp(-0.5 * ((q - 2.0) / 1.2) ** 2) + 1.0


def test_peak_descriptors_recover_a_gaussian_on_a_sloped_background():
    truth = [(3.0, 0.08, 2.0), (7.5, 0.12, 0.7)]
    y = 0.3 + 0.02 * Q + sum(gauss(Q, c, w, a) for c, w, a in truth)
    iq = xr.DataArray(np.stack([y, 2 * y]), dims=("point", "q"), coords={"q": Q})
    out = peak_descriptors(iq, [(2.6, 3.4), (7.0, 8.0)])
    np.testing.assert_allclose(out["peak_position"].values[0], [3.0, 7.5], atol=2e-4)
    np.testing.assert_allclose(out["peak_fwhm"].values[0], [0.08, 0.12], rtol=0.02)
    np.testing.assert_allclose(out["peak_area"].values[0], [2.0, 0.7], rtol=0.01)
    np.testing.assert_allclose(out["peak_area"].values[1], 2 * out["peak_area"].values[0])


def test_crystallinity_is_zero_for_a_glass_and_tracks_the_bragg_share():
    phase = CubicPhase()
    bragg = phase.simulate_iq(Q)
    fractions = np.array([0.0, 0.25, 0.5, 1.0])
    iq = xr.DataArray(
        np.stack([hump(Q) + f * bragg for f in fractions]), dims=("point", "q"), coords={"q": Q}
    )
    ci = crystallinity_index(iq, q_range=(1.0, 15.0)).values
    sel = (Q >= 1) & (Q <= 15)
    truth = [np.trapezoid(f * bragg[sel], Q[sel]) / np.trapezoid(hump(Q[sel]) + f * bragg[sel], Q[sel])
             for f in fractions]
    assert ci[0] < 0.03
    np.testing.assert_allclose(ci[1:], truth[1:], rtol=0.1)
    assert np.all(np.diff(ci) > 0)


@pytest.mark.parametrize("true_scale", [0.9931, 1.0, 1.00437])
def test_lattice_scale_within_half_a_permille(true_scale):
    phase = CubicPhase()
    rng = np.random.default_rng(3)
    clean = 1000 * phase.simulate_iq(Q, stretch=true_scale) + 200 * hump(Q)
    frames = rng.poisson(np.tile(clean, (6, 1))).astype(float)
    iq = xr.DataArray(frames, dims=("point", "q"), coords={"q": Q, "time": ("point", np.arange(6) * 1e-3)})
    scale = lattice_scale(iq, phase, stretch_range=0.01, fwhm_q=0.05)
    assert scale.dims == ("point",)
    np.testing.assert_allclose(scale.values, true_scale, atol=5e-4 * true_scale)


def test_lattice_scale_is_nan_where_the_phase_is_absent():
    phase = CubicPhase()
    iq = xr.DataArray(np.stack([hump(Q), hump(Q) + phase.simulate_iq(Q)]), dims=("point", "q"), coords={"q": Q})
    scale = lattice_scale(iq, phase, stretch_range=0.01, fwhm_q=0.05).values
    assert np.isnan(scale[0]) or abs(scale[0] - 1) > 0  # no Bragg: no meaningful answer
    assert scale[1] == pytest.approx(1.0, abs=5e-4)


def test_detect_events_finds_the_interval():
    rng = np.random.default_rng(0)
    t = np.arange(100) * 2e-3
    v = np.full(100, 40.0)
    v[31:67] = 6.0
    v += rng.normal(0, 1.0, 100)
    ev = detect_events(xr.DataArray(v, dims="point", coords={"time": ("point", t)}))
    assert ev["onset_point"] == 31
    assert ev["end_point"] == 67
    assert ev["onset_time"] == pytest.approx(t[31])
    assert ev["duration"] == pytest.approx(t[67] - t[31])


def test_detect_events_on_a_flat_series_reports_none():
    ev = detect_events(xr.DataArray(np.full(30, 5.0), dims="point"))
    assert ev["onset_point"] is None and ev["end_point"] is None


def test_bad_windows_are_named():
    iq = xr.DataArray(np.ones((2, Q.size)), dims=("point", "q"), coords={"q": Q})
    with pytest.raises(InputError, match="peak window"):
        peak_descriptors(iq, [(5.0, 4.0)])
    with pytest.raises(InputError, match="fewer than 5"):
        peak_descriptors(iq, [(30.0, 31.0)])
    with pytest.raises(InputError, match="dims"):
        detect_events(iq)


def _series_dataset():
    phase = CubicPhase()
    t = np.arange(30) * 0.01
    crystalline = np.where((t >= 0.1) & (t < 0.2), 0.2, 1.0)
    iq = np.stack([hump(Q) + c * phase.simulate_iq(Q) for c in crystalline])
    return xr.Dataset({"iq": (("point", "q"), iq)}, coords={"q": Q, "time": ("point", t)}), t


def test_describe_series_and_plot_mark_the_interval():
    import matplotlib

    matplotlib.use("Agg")
    from xrdmap.series import describe_series
    from xrdmap.series_plots import plot_series

    ds, t = _series_dataset()
    desc = describe_series(ds, peaks=[(2.9, 3.6)])
    assert desc.attrs["event_onset_point"] == 10 and desc.attrs["event_end_point"] == 20
    assert desc.attrs["event_onset_time"] == pytest.approx(t[10])
    fig = plot_series(ds.merge(desc, compat="override").assign_attrs(desc.attrs))
    axes = fig.axes
    assert len(axes) == 4  # crystallinity, peak position, width, area
    assert axes[-1].get_xlabel() == "time (s)"
    assert any(p.get_xy() is not None for p in axes[0].patches)  # the shaded interval


def test_series_cli_prints_events_and_writes_figure(tmp_path):
    from typer.testing import CliRunner

    from xrdmap.cli import app
    from xrdmap.results import open_result, save_result

    ds, _ = _series_dataset()
    save_result(ds, tmp_path / "r.h5")
    res = CliRunner().invoke(app, ["series", str(tmp_path / "r.h5"), "--peak", "2.9,3.6",
                                   "-o", str(tmp_path / "s.png"), "--save", str(tmp_path / "d.h5")])
    assert res.exit_code == 0, res.output
    assert "# event_onset_point: 10" in res.output and "# event_end_point: 20" in res.output
    assert (tmp_path / "s.png").stat().st_size > 0
    out = open_result(tmp_path / "d.h5")
    assert "crystallinity" in out and out.attrs["event_onset_point"] == 10
    bad = CliRunner().invoke(app, ["series", str(tmp_path / "r.h5"), "--peak", "3,2"])
    assert bad.exit_code != 0


def test_bragg_part_recovers_narrow_peaks_on_a_smooth_baseline():
    # peaks of unit height (sigma 0.02 A^-1) on a hump 3 A^-1 wide: the Bragg part is the
    # peaks alone, for plain arrays along any axis and for a DataArray alike
    from xrdmap.series import bragg_part, bragg_values

    q = np.linspace(0.5, 15.0, 2000)
    centres = (3.1, 5.2, 8.8, 12.0)
    peaks = sum(np.exp(-0.5 * ((q - c) / 0.02) ** 2) for c in centres)
    scale = np.array([0.5, 1.0, 2.0])[:, None]
    values = (0.3 + 0.5 * np.exp(-((q - 4.0) / 3.0) ** 2) + peaks)[None, :] * scale
    step = float(np.median(np.diff(q)))
    along_q = bragg_values(values, step, 1.0)
    np.testing.assert_allclose(along_q / scale, np.broadcast_to(peaks, values.shape), atol=0.02)
    np.testing.assert_array_equal(bragg_values(values.T, step, 1.0, axis=0).T, along_q)
    da = xr.DataArray(values, dims=("point", "q"), coords={"q": q})
    np.testing.assert_array_equal(bragg_part(da, window_A=1.0).values, along_q)
