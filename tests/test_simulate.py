"""Scan simulator: file layout, reproducibility, geometry, truth, and the round trip
simulate -> integrate -> non-negative least squares that must recover the phase fractions.

The frame machinery is checked with an analytic stand-in library (Gaussian Bragg peaks at
chosen Q), whose true pattern is known independently of xrdmap; the acceptance checks use
the real reference library of :mod:`xrdmap.phases`.
"""

from __future__ import annotations

import json

import h5py
import hdf5plugin  # noqa: F401  (Bitshuffle-LZ4 frames)
import numpy as np
import pytest
import xarray as xr
from scipy.optimize import nnls
from typer.testing import CliRunner

from xrdmap.composition import formula_mass, parse_composition
from xrdmap.errors import ConfigError
from xrdmap.geometry import make_integrator, q_from_twotheta, read_poni
from xrdmap.simulate import (
    LAYOUTS,
    crystal_pattern,
    kapton_pattern,
    layout_truth,
    scan_geometry,
    self_scattering,
    simulate_scan,
)

FORMULAS = {
    "LVP": "Li3V2(PO4)3",
    "eps-LiVOPO4": "LiVOPO4",
    "Li3PO4-gamma": "Li3PO4",
    "LATP": "Li1.3Al0.3Ti1.7(PO4)3",
    "anti-NASICON": "Li2Al0.15V0.77Ti1.08(PO4)3",
    "LVP-Pbcn": "Li2V2(PO4)3",
    "AlPO4": "AlPO4",
}


class GaussianPhase:
    """Stand-in phase: Gaussian Bragg peaks of known position and area per unit mass."""

    def __init__(self, formula: str, peaks: list[tuple[float, float]]):
        self.formula = formula
        self.peaks = peaks

    def simulate_iq(self, q, *, stretch=1.0, fwhm_q=None, size_A=None, eta=0.5, u_iso=None):
        q = np.asarray(q, dtype=float)
        sigma = fwhm_q / np.sqrt(8 * np.log(2))
        out = np.zeros_like(q)
        for q0, area in self.peaks:
            out += (
                area
                * np.exp(-0.5 * ((q - q0 / stretch) / sigma) ** 2)
                / (sigma * np.sqrt(2 * np.pi))
            )
        return out

    def simulate_fq(self, q, *, stretch=1.0, size_A=None, u_iso=None, qdamp=None):
        q = np.asarray(q, dtype=float)
        return q * np.sin(q * 2.0 * stretch) * np.exp(-q * (size_A or 7.0) / 20.0)


@pytest.fixture(scope="module")
def standin():
    lib = {}
    for k, (name, formula) in enumerate(FORMULAS.items()):
        rng = np.random.default_rng(100 + k)
        lib[name] = GaussianPhase(
            formula, [(q0, rng.uniform(0.5, 2.0)) for q0 in rng.uniform(1.0, 14.0, 12)]
        )
    return lib


@pytest.fixture(scope="module")
def hotspot(tmp_path_factory, standin):
    path = tmp_path_factory.mktemp("sim") / "hotspot.h5"
    return simulate_scan("hotspot", path, points=12, size=256, seed=3, library=standin)


def test_same_seed_gives_byte_identical_frames(tmp_path, standin):
    kw = dict(points=4, size=64, library=standin)
    a = simulate_scan("composite", tmp_path / "a.h5", seed=7, **kw)
    b = simulate_scan("composite", tmp_path / "b.h5", seed=7, **kw)
    c = simulate_scan("composite", tmp_path / "c.h5", seed=8, **kw)
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        da, db, dc = (f["entry/instrument/detector/data"][()] for f in (fa, fb, fc))
        assert da.tobytes() == db.tobytes()
        assert (
            fa["entry/background/data"][()].tobytes() == fb["entry/background/data"][()].tobytes()
        )
        assert np.array_equal(fa["entry/monitor/data"][()], fb["entry/monitor/data"][()])
        assert not np.array_equal(da, dc)


def test_nexus_layout(hotspot):
    with h5py.File(hotspot) as f:
        assert f["entry"].attrs["NX_class"] == "NXentry"
        det = f["entry/instrument/detector"]
        assert det.attrs["NX_class"] == "NXdetector"
        data = det["data"]
        assert data.shape == (12, 256, 256) and data.dtype == np.uint32
        assert data.chunks == (1, 256, 256)
        dcpl = data.id.get_create_plist()
        filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
        assert filters == [32008]  # Bitshuffle; its cd_values select LZ4 (2)
        assert dcpl.get_filter(0)[2][4] == 2
        nxdata = f["entry/data"]
        assert nxdata.attrs["NX_class"] == "NXdata" and nxdata.attrs["signal"] == "data"
        assert list(nxdata.attrs["axes"]) == ["position", ".", "."]
        assert nxdata["data"].id == data.id  # a link, not a copy
        pos = nxdata["position"][()]
        assert nxdata["position"].attrs["units"] == "mm"
        # 12 steps of 0.25 mm across the 3 mm pellet, sampled at step centres
        assert np.allclose(pos, 0.125 + 0.25 * np.arange(12))
        mon = f["entry/monitor/data"][()]
        assert f["entry/monitor"].attrs["NX_class"] == "NXmonitor"
        assert np.all(np.abs(mon / 1e6 - 1) < 0.03) and mon.std() > 0
        assert f["entry/background/data"].shape == (256, 256)
        truth = f["entry/truth"]
        phases = list(truth["phase"].asstr()[()])
        assert phases == list(truth["phase_fraction"].attrs["phases"])
        assert truth["phase_fraction"].shape == (12, len(phases))
        assert truth["iq"].shape == (12, truth["q"].shape[0])
        assert "alpha1" in truth.attrs["unavailable_phases"]
        poni_attrs = dict(f["entry/calibration/poni"].attrs)
        assert json.loads(poni_attrs["detector_config"])["max_shape"] == [256, 256]


def test_truth_rows_sum_to_one_and_zones_follow_the_study():
    for name in LAYOUTS:
        t = layout_truth(name, 30)
        assert np.allclose(t["fractions"].sum(axis=1), 1.0)
        assert np.all(t["fractions"] >= 0)
        assert np.all(np.diff(t["boundaries"]) > 0)
    hs = layout_truth("hotspot", 30)
    centre = hs["fractions"][14:16, hs["phases"].index("LVP")]
    assert np.allclose(centre, 1.0, atol=1e-3)  # phase-pure LVP core
    assert np.allclose(hs["fractions"], hs["fractions"][::-1])  # symmetric about the centre
    eps = hs["fractions"][:, hs["phases"].index("eps-LiVOPO4")]
    assert 0.05 <= eps.max() <= 0.10
    ml = layout_truth("multilayer", 50)
    z = ml["coord"]
    col = {p: ml["fractions"][:, i] for i, p in enumerate(ml["phases"])}
    electrolyte = (z > 2.05) & (z < 2.95)
    assert np.all(
        (col["anti-NASICON"][electrolyte] >= 0.05) & (col["anti-NASICON"][electrolyte] <= 0.08)
    )
    composite = (z < 1.65) | (z > 3.35)
    assert np.all((col["eps-LiVOPO4"][composite] >= 0.15) & (col["eps-LiVOPO4"][composite] <= 0.30))
    assert np.all(col["LVP"] < 0.05)
    left = z < 1.65  # doped phase rises towards the interface at 1.8 mm
    assert np.all(np.diff(col["anti-NASICON"][left]) > 0)


def test_flash_series_has_times_amorphous_window_and_expansion():
    t = layout_truth("flash", 40)
    assert t["axis"] == "time"
    assert np.allclose(np.diff(t["coord"]), 0.01)  # 10 ms frames
    onset, end = t["boundaries"][:2]
    amorphous = t["amorphous"]
    assert np.all(amorphous[t["coord"] < onset - 0.02] < 0.01)
    inside = (t["coord"] > onset + 0.015) & (t["coord"] < end - 0.015)
    assert np.all(amorphous[inside] > 0.6)
    assert amorphous[-1] < 0.02  # recrystallised
    assert np.all(t["lattice_scale"][inside] > 1.005)
    assert t["lattice_scale"][0] == 1.0


def test_geometry_covers_the_published_q_range():
    poni = scan_geometry(256)
    ai = make_integrator(poni)
    q = ai.qArray() / 10.0
    assert q.max() > 25.0  # "Q-range exceeding 25 A^-1"
    # complete rings out to the nearest panel edge
    n = 256
    p = poni["detector_config"]["pixel1"]
    nearest_edge_m = min(poni["poni1"], poni["poni2"], n * p - poni["poni1"], n * p - poni["poni2"])
    q_ring = q_from_twotheta(np.degrees(np.arctan(nearest_edge_m / poni["dist"])), 0.161669)
    assert q_ring > 15.0
    assert poni["wavelength"] * 1e10 == pytest.approx(0.161669, abs=2e-6)
    assert 256 * p == pytest.approx(0.432)  # the 2880 x 150 um panel, scaled


def test_frames_equal_pyfai_calcfrom1d(tmp_path, standin):
    path = simulate_scan(
        "composite", tmp_path / "s.h5", points=3, size=64, noise=False, defects=False,
        kapton=False, subsample=1, library=standin,
    )  # fmt: skip
    with h5py.File(path) as f:
        frames = f["entry/instrument/detector/data"][()].astype(float)
        dark = f["entry/instrument/detector/dark"][()]
        q, iq = f["entry/truth/q"][()], f["entry/truth/iq"][()]
        mon = f["entry/monitor/data"][()] / f["entry/truth"].attrs["monitor_reference"]
    ai = make_integrator(read_poni(path.with_suffix(".poni")))
    for i in range(3):
        expected = ai.calcfrom1d(
            q, iq[i], dim1_unit="q_A^-1", correctSolidAngle=True, polarization_factor=0.99
        )
        np.testing.assert_allclose(frames[i] - dark, mon[i] * expected, rtol=1e-5, atol=1e-2)


def test_poni_and_background_reproduce_the_true_pattern(hotspot):
    ai = make_integrator(read_poni(hotspot.with_suffix(".poni")))
    mask = np.load(hotspot.with_suffix(".mask.npy"))
    with h5py.File(hotspot) as f:
        dark = f["entry/instrument/detector/dark"][()]
        frame = f["entry/data/data"][6].astype(float) - dark
        bg = f["entry/background/data"][()].astype(float) - dark
        mref = f["entry/truth"].attrs["monitor_reference"]
        mon = f["entry/monitor/data"][6] / mref
        bg_mon = f["entry/background/monitor"][()] / mref
        q, iq, bg_iq = (
            f["entry/truth/q"][()],
            f["entry/truth/iq"][6],
            f["entry/truth/background_iq"][()],
        )
        assert np.array_equal(mask, f["entry/truth/mask"][()].astype(bool))
    kw = dict(
        unit="q_A^-1",
        mask=mask,
        polarization_factor=0.99,
        correctSolidAngle=True,
        method=("bbox", "csr", "cython"),
    )
    res = ai.integrate1d(frame, 300, radial_range=(2.0, 18.0), normalization_factor=mon, **kw)
    res_bg = ai.integrate1d(bg, 300, radial_range=(2.0, 18.0), normalization_factor=bg_mon, **kw)
    inner = slice(1, -1)  # pyFAI piles pixels that straddle the range limits into the end bins
    np.testing.assert_allclose(
        res_bg.intensity[inner], np.interp(res_bg.radial[inner], q, bg_iq), rtol=0.05
    )
    sample = (res.intensity - res_bg.intensity)[inner]
    true = np.interp(res.radial[inner], q, iq)
    assert np.corrcoef(sample, true)[0, 1] > 0.995
    assert np.median(sample / true) == pytest.approx(1.0, abs=0.02)


def test_hot_pixels_gaps_and_beamstop(hotspot):
    with h5py.File(hotspot) as f:
        frame = f["entry/data/data"][0]
        hot = f["entry/truth/hot_pixels"][()]
        pixel_mask = f["entry/instrument/detector/pixel_mask"][()]
        mask = f["entry/truth/mask"][()].astype(bool)
    assert len(hot) >= 3 and np.all(frame[hot[:, 0], hot[:, 1]] >= 2**20)
    assert np.all(frame[(pixel_mask & 1).astype(bool)] == 0)  # gaps read zero
    shadow = mask & (pixel_mask == 0)  # beamstop: dark counts only
    assert shadow.sum() > 10 and np.median(frame[shadow]) < 0.2 * np.median(frame[~mask])


def test_counts_set_the_mean_signal(tmp_path, standin):
    path = simulate_scan(
        "hotspot", tmp_path / "c.h5", points=3, size=64, counts=5000, kapton=False, library=standin
    )
    with h5py.File(path) as f:
        frames = f["entry/data/data"][()].astype(float) - f["entry/instrument/detector/dark"][()]
        good = ~f["entry/truth/mask"][()].astype(bool)
    assert frames[:, good].mean() == pytest.approx(5000, rel=0.03)


def test_kapton_pattern_is_a_broad_low_q_hump():
    q = np.linspace(0.2, 20, 2000)
    k = kapton_pattern(q)
    assert 0.9 < q[np.argmax(k[q > 0.8]) + np.searchsorted(q, 0.8)] < 1.5
    assert k[q > 10].max() < 0.3 * k.max()


def test_self_scattering_tends_to_electron_count():
    # at Q = 0 sum f^2 = sum Z^2 (Compton vanishes); per amu of CeO2 = (58^2 + 2 * 8^2) / M
    q = np.array([0.0, 40.0])
    s = self_scattering("CeO2", q)
    assert s[0] == pytest.approx((58**2 + 2 * 64) / 172.114, rel=2e-3)
    # at high Q f -> 0 for a light atom and the Compton-like term approaches Z per atom
    assert self_scattering("C", q)[1] == pytest.approx(6 / 12.011, rel=0.01)


def test_bad_arguments_raise_config_errors(tmp_path, standin):
    with pytest.raises(ConfigError, match="layout"):
        simulate_scan("spiral", tmp_path / "x.h5", library=standin)
    with pytest.raises(ConfigError, match="counts"):
        simulate_scan("hotspot", tmp_path / "x.h5", counts=-1, library=standin)
    assert not (tmp_path / "x.h5").exists()


def test_crystal_pattern_mixture_is_linear_in_weights(standin):
    q = np.linspace(0.5, 20, 500)
    a = crystal_pattern(standin["LVP"], q, fwhm_q=0.1)
    b = crystal_pattern(standin["LATP"], q, fwhm_q=0.1)
    coef, _ = nnls(np.stack([a, b], 1), 0.3 * a + 0.7 * b)
    np.testing.assert_allclose(coef, [0.3, 0.7], atol=1e-9)


def test_flash_lattice_expansion_moves_the_peaks(tmp_path, standin):
    path = simulate_scan(
        "flash", tmp_path / "f.h5", points=20, size=64, fwhm_q=0.05, library=standin
    )
    with h5py.File(path) as f:
        q, iq = f["entry/truth/q"][()], f["entry/truth/iq"][()]
        scale = f["entry/truth/lattice_scale"][()]
        time = f["entry/data/time"][()]
        assert f["entry/data"].attrs["axes"][0] == "time"
        assert f["entry/truth/phase_fraction"].attrs["phases"][1] == "LATP-glass"
        np.testing.assert_allclose(
            f["entry/truth/amorphous_fraction"][()], f["entry/truth/phase_fraction"][:, 1]
        )
    assert np.allclose(time, 0.01 * np.arange(20))
    with h5py.File(path) as f:
        onset, end = f["entry/truth/zones"][()]
        assert list(f["entry/truth/zone_points"][()]) == [5, 11]  # 0.05 s and 0.11 s of 20 frames
    assert (onset, end) == pytest.approx((0.05, 0.11))
    hot = int(np.argmax(scale))
    assert scale[hot] == pytest.approx(1.008, abs=1e-6)
    # the stand-in's peak at q0 sits at q0 / stretch: the analytic shift
    q0 = max(standin["LATP"].peaks, key=lambda p: p[1])[0]
    window = np.abs(q - q0) < 0.3
    cold_peak = q[window][np.argmax(iq[0, window])]
    hot_peak = q[window][np.argmax(iq[hot, window])]
    assert cold_peak == pytest.approx(q0, abs=0.01)
    assert hot_peak == pytest.approx(q0 / 1.008, abs=0.01)


def test_cli_writes_scan_poni_and_mask(tmp_path, standin, monkeypatch):
    import xrdmap.phases
    from xrdmap.cli import app

    monkeypatch.setattr(xrdmap.phases, "load_library", lambda *a, **k: standin)
    out = tmp_path / "scan.h5"
    result = CliRunner().invoke(
        app,
        ["simulate", "vitreous", "-o", str(out), "--points", "9", "--size", "64", "--seed", "2"],
    )
    assert result.exit_code == 0, result.output
    assert "xrdmap integrate" in result.output and str(out.with_suffix(".poni")) in result.output
    assert tuple(read_poni(out.with_suffix(".poni"))["detector_config"]["max_shape"]) == (64, 64)
    with h5py.File(out) as f:
        assert f["entry/data/data"].shape == (9, 64, 64)
        assert f["entry/truth"].attrs["seed"] == 2
        glass = f["entry/truth/amorphous_fraction"][()]
    assert glass[0] > 0.5 and glass[4] < 0.05  # vitreous rim, crystalline core
    assert np.load(out.with_suffix(".mask.npy")).shape == (64, 64)
    assert np.load(out.with_suffix(".dark.npy")).shape == (64, 64)
    assert f"--dark {out.with_suffix('.dark.npy')}" in result.output
    bad = CliRunner().invoke(app, ["simulate", "spiral", "-o", str(tmp_path / "x.h5")])
    assert bad.exit_code != 0


# ------------------------------------------------------------------ acceptance
# simulate -> integrate -> non-negative least squares against the reference phases of
# xrdmap.phases recovers the stored weight fractions within 0.03 at every point.
# 512 px frames: at 256 px the Q resolution (0.4 A^-1) cannot separate LVP, LVP-Pbcn and
# the anti-NASICON phase, which share one framework.

ACCEPTANCE_LAYOUTS = ["hotspot", "composite", "multilayer"]


@pytest.fixture(scope="module")
def library():
    from xrdmap.phases import load_library

    return load_library()


def _scan_inputs(path):
    with h5py.File(path) as f:
        return {
            "dark": f["entry/instrument/detector/dark"][()],
            "background": f["entry/background/data"][()].astype(float),
            "background_monitor": f["entry/background/monitor"][()],
            "monitor_reference": f["entry/truth"].attrs["monitor_reference"],
            "q": f["entry/truth/q"][()],
            "fractions": f["entry/truth/phase_fraction"][()],
            "phases": list(f["entry/truth/phase"].asstr()[()]),
            "fwhm_q": f["entry/truth"].attrs["fwhm_q"],
        }


@pytest.mark.slow
@pytest.mark.parametrize("layout", ACCEPTANCE_LAYOUTS)
def test_acceptance_integrate_scan_and_nnls_recover_fractions(tmp_path, library, layout):
    from xrdmap.integrate import integrate_scan
    from xrdmap.io import open_scan

    path = simulate_scan(
        layout, tmp_path / "scan.h5", points=24, size=512, seed=11, library=library
    )
    t = _scan_inputs(path)
    poni = path.with_suffix(".poni")
    kw = dict(mask=np.load(path.with_suffix(".mask.npy")), npt=700, q_range=(1.0, 15.0))
    iq = integrate_scan(open_scan(path), poni, dark=t["dark"], **kw).iq.values
    background = xr.DataArray(
        (t["background"] - t["dark"])[None], dims=("point", "y", "x"),
        coords={"monitor": ("point", [t["background_monitor"]])},
    )  # fmt: skip
    iq = iq - integrate_scan(background, poni, **kw).iq.values[0]
    # references: per-mass total scattering of each phase from xrdmap.phases, seen by the
    # same detector (pyFAI calcfrom1d) and integrated the same way
    ai = make_integrator(read_poni(poni))
    ref_frames = np.stack([
        ai.calcfrom1d(t["q"], crystal_pattern(library[name], t["q"], fwhm_q=t["fwhm_q"]),
                      dim1_unit="q_A^-1", correctSolidAngle=True, polarization_factor=0.99)
        for name in t["phases"]
    ])  # fmt: skip
    refs = integrate_scan(
        xr.DataArray(ref_frames, dims=("point", "y", "x")), poni, **kw
    ).iq.values.T
    est = np.array([nnls(refs, y)[0] for y in iq])
    est /= est.sum(axis=1, keepdims=True)
    assert np.abs(est - t["fractions"]).max() < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("layout", ACCEPTANCE_LAYOUTS)
def test_acceptance_pyfai_and_simulate_iq_references_recover_fractions(tmp_path, library, layout):
    path = simulate_scan(layout, tmp_path / "scan.h5", points=20, size=512, seed=5, library=library)
    t = _scan_inputs(path)
    ai = make_integrator(read_poni(path.with_suffix(".poni")))
    kw = dict(
        unit="q_A^-1", mask=np.load(path.with_suffix(".mask.npy")), polarization_factor=0.99,
        correctSolidAngle=True, method=("no", "csr", "cython"), radial_range=(1.0, 15.0),
    )  # fmt: skip
    mref = t["monitor_reference"]
    bg = ai.integrate1d(
        t["background"] - t["dark"], 500, normalization_factor=t["background_monitor"] / mref, **kw
    )
    q = bg.radial
    refs = np.stack(
        [crystal_pattern(library[name], q, fwhm_q=t["fwhm_q"]) for name in t["phases"]], axis=1
    )
    with h5py.File(path) as f:
        monitor = f["entry/monitor/data"][()] / mref
        frames = f["entry/data/data"]
        est = []
        for i in range(frames.shape[0]):
            res = ai.integrate1d(
                frames[i].astype(float) - t["dark"], 500, normalization_factor=monitor[i], **kw
            )
            est.append(nnls(refs, res.intensity - bg.intensity)[0])
    est = np.array(est)
    est /= est.sum(axis=1, keepdims=True)
    assert np.abs(est - t["fractions"]).max() < 0.03


def test_vitreous_glass_has_no_correlations_beyond_7_angstrom(library):
    from xrdmap.composition import form_factor_moments
    from xrdmap.simulate import glass_pattern

    latp = library["LATP"]
    q = np.linspace(0.05, 24.0, 4000)
    per_amu = glass_pattern(latp, q, compton=False)
    f2, fbar2 = form_factor_moments(latp.formula, q)
    atoms_per_amu = sum(parse_composition(latp.formula).values()) / formula_mass(latp.formula)
    fq = q * (per_amu / atoms_per_amu - f2) / fbar2  # Faber-Ziman F(Q) = Q [S(Q) - 1]
    r = np.linspace(0.5, 20.0, 800)
    gr = 2.0 / np.pi * np.trapezoid(fq[None, :] * np.sin(np.outer(r, q)), q, axis=1)
    short = np.abs(gr[(r > 1.0) & (r < 5.0)]).max()
    # G(r) = -4 pi rho r beyond the correlations would still be linear; remove the baseline
    far = (r > 9.0) & (r < 20.0)
    slope = np.polyfit(r[far], gr[far], 1)
    assert np.abs(gr[far] - np.polyval(slope, r[far])).max() < 0.05 * short
    assert short > 0.5  # the P-O and Ti-O first-neighbour peaks are there
