"""Tests of xrdmap.integrate against pyFAI itself and against known 1-D patterns."""

from __future__ import annotations

import pickle

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from xrdmap.errors import InputError
from xrdmap.geometry import make_integrator
from xrdmap.integrate import (
    IntegrationEngine,
    get_engine,
    integrate_frames,
    integrate_scan,
    make_spec,
)

SHAPE = (256, 256)
NPT = 300
Q_RANGE = (1.0, 10.0)  # A^-1; the 256 x 256 detector below reaches 11.5 A^-1
PONI = {
    "dist": 0.1, "poni1": 0.02, "poni2": 0.018, "rot1": 0.01, "rot2": 0.02, "rot3": 0.0,
    "wavelength": 0.161669e-10, "detector": "Detector",
    "detector_config": {"pixel1": 150e-6, "pixel2": 150e-6, "max_shape": list(SHAPE)},
}
RTOL = 1e-5  # required agreement with pyFAI wherever |I| > 1 % of its maximum


@pytest.fixture(scope="module")
def ai():
    return make_integrator(PONI)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(7)
    f = rng.poisson(300, size=(6, *SHAPE)).astype(np.float32)
    f[1] = rng.random(SHAPE, dtype=np.float32) * 2  # counts below 1: Poisson floor max(x, 1)
    return f


@pytest.fixture(scope="module")
def extras():
    rng = np.random.default_rng(3)
    mask = np.zeros(SHAPE, bool)
    mask[100:112, :] = True  # a module gap
    mask[:30, :40] = True  # a beamstop corner
    dark = (rng.random(SHAPE) * 40).astype(np.float32)
    flat = (0.8 + 0.4 * rng.random(SHAPE)).astype(np.float32)
    return {"mask": mask, "dark": dark, "flat": flat}


def _pyfai(ai, frame, *, npt=NPT, q_range=Q_RANGE, polarization_factor=0.99, **kw):
    return ai.integrate1d(frame, npt, unit="q_A^-1", method=("bbox", "csr", "cython"),
                          correctSolidAngle=True, polarization_factor=polarization_factor,
                          radial_range=q_range, error_model="poisson", **kw)


def _max_rel(ours, ref, intensity):
    sel = np.abs(intensity) > 0.01 * np.nanmax(np.abs(intensity))
    assert sel.sum() > 10
    return float(np.max(np.abs(ours[sel] - ref[sel]) / np.abs(ref[sel])))


# ---- equality with pyFAI integrate1d ------------------------------------------------------

CASES = {
    "plain": dict(),
    "mask": dict(mask=True),
    "mask+dark+flat": dict(mask=True, dark=True, flat=True),
    "no polarization": dict(polarization_factor=None),
    "polarization -0.5, full q": dict(polarization_factor=-0.5, q_range=None),
    "dark only, full q": dict(dark=True, q_range=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_pyfai_integrate1d(case, ai, frames, extras):
    opts = dict(CASES[case])
    pol = opts.pop("polarization_factor", 0.99)
    q_range = opts.pop("q_range", Q_RANGE)
    arrays = {k: extras[k] for k in opts}
    spec = make_spec(PONI, SHAPE, npt=NPT, q_range=q_range, polarization_factor=pol, **arrays)
    res = integrate_frames(frames, spec)
    assert res.iq.shape == (len(frames), NPT) and res.iq.dtype == np.float64
    for k, frame in enumerate(frames):
        ref = _pyfai(ai, frame, q_range=q_range, polarization_factor=pol, **arrays)
        np.testing.assert_allclose(res.q, ref.radial, rtol=1e-12)
        assert _max_rel(res.iq[k], ref.intensity, ref.intensity) <= RTOL
        assert _max_rel(res.sigma[k], ref.sigma, ref.intensity) <= RTOL
    assert (res.masked_pixels == 0).all()


def test_nan_pixels_excluded_for_that_frame_only(ai, frames, extras):
    f = frames[:3].copy()
    bad = [(40, 50), (41, 50), (150, 200), (220, 17)]  # all inside the integrated region
    for y, x in bad:
        f[1, y, x] = np.nan
    f[1, 60, 60] = np.inf
    f[1, 61, 60] = -np.inf
    f[2, :, :] = np.nan  # a dead frame
    spec = make_spec(PONI, SHAPE, npt=NPT, q_range=Q_RANGE, mask=extras["mask"], dark=extras["dark"])
    res = integrate_frames(f, spec)
    # a dead frame counts every pixel of the integrated region: the pixels that pyFAI's
    # own bbox CSR matrix (same mask and q range) draws on
    csr = ai.setup_sparse_integrator(SHAPE, NPT, mask=extras["mask"].astype(np.int8),
                                     pos0_range=tuple(v * 10 for v in Q_RANGE), unit="q_A^-1",
                                     split="bbox", algo="CSR", scale=False)
    region = np.unique(csr.lut[1][csr.lut[0] != 0]).size
    assert res.masked_pixels.tolist() == [0, len(bad) + 2, region]
    # frame 1 equals pyFAI with the bad pixels added to the mask (and set to anything finite)
    mask1 = extras["mask"].copy()
    mask1[~np.isfinite(f[1])] = True
    ref = _pyfai(ai, np.nan_to_num(f[1], nan=0, posinf=0, neginf=0), mask=mask1, dark=extras["dark"])
    assert _max_rel(res.iq[1], ref.intensity, ref.intensity) <= RTOL
    assert _max_rel(res.sigma[1], ref.sigma, ref.intensity) <= RTOL
    # the other frames of the batch are untouched by frame 1's bad pixels
    ref0 = _pyfai(ai, f[0], mask=extras["mask"], dark=extras["dark"])
    assert _max_rel(res.iq[0], ref0.intensity, ref0.intensity) <= RTOL
    assert np.isnan(res.iq[2]).all() and np.isnan(res.sigma[2]).all()


def test_dectris_dummy_pixels_like_pyfai():
    """Pilatus frames flag bad pixels with -2 (pyFAI dummy -2 +- 1.5); 195 x 487 pixels."""
    poni = {"dist": 0.08, "poni1": 0.015, "poni2": 0.035, "rot1": 0.0, "rot2": 0.0, "rot3": 0.0,
            "wavelength": 0.5e-10, "detector": "Pilatus100k", "detector_config": {}}
    ai = make_integrator(poni)
    rng = np.random.default_rng(5)
    frame = rng.poisson(500, size=(195, 487)).astype(np.int32)
    frame[10:13, 100:140] = -2
    frame[150, 300] = -1
    spec = make_spec(poni, npt=200)
    res = integrate_frames(frame, spec)
    ref = ai.integrate1d(frame, 200, unit="q_A^-1", method=("bbox", "csr", "cython"),
                         polarization_factor=0.99, error_model="poisson")
    assert res.masked_pixels == 3 * 40 + 1
    assert _max_rel(res.iq, ref.intensity, ref.intensity) <= RTOL
    assert _max_rel(res.sigma, ref.sigma, ref.intensity) <= RTOL


# ---- recovery of a known pattern ---------------------------------------------------------

def test_recovers_known_pattern(ai):
    """A pattern of Gaussian peaks projected onto the detector by pyFAI's calcfrom1d
    (with solid angle and polarization) comes back from the integration.

    Tolerance: 2 % of the peak height on peaks, 0.1 % on the flat background. Both the
    q bins (0.045 A^-1) and bbox splitting (pixels <= 0.06 A^-1 wide radially) average
    the pattern over a box; a box of width d lowers the top of a Gaussian of width s by
    about d^2 / (24 s^2): (0.045^2 + 0.06^2) / (24 * 0.15^2) = 1.0 % for the sharpest peak.
    On a flat background there is nothing to smear, only calcfrom1d's interpolation."""
    q_true = np.linspace(0.0, 12.0, 6001)
    peaks = [(2.5, 0.15, 100.0), (4.1, 0.15, 60.0), (6.8, 0.2, 80.0), (8.9, 0.25, 40.0)]
    i_true = 5.0 + sum(a * np.exp(-0.5 * ((q_true - c) / w) ** 2) for c, w, a in peaks)
    image = ai.calcfrom1d(q_true, i_true, shape=SHAPE, dim1_unit="q_A^-1",
                          correctSolidAngle=True, polarization_factor=0.99)
    spec = make_spec(PONI, SHAPE, npt=200, q_range=(1.0, 10.0), polarization_factor=0.99)
    res = integrate_frames(image[None], spec)
    expected = np.interp(res.q, q_true, i_true)
    err = np.abs(res.iq[0] - expected)
    assert err.max() <= 0.02 * 100.0
    background = np.min([np.abs(res.q - c) / w for c, w, _ in peaks], axis=0) > 6
    assert background.sum() > 20 and err[background].max() <= 1e-3 * 5.0
    for c, _, _ in peaks:  # peak positions to a fraction of a bin
        win = np.abs(res.q - c) < 0.3
        assert abs(res.q[win][np.argmax(res.iq[0][win])] - c) <= 0.03


# ---- integrate_scan: lazy, coordinates, monitor ------------------------------------------

def _scan(frames, monitor=None, k=2):
    n = len(frames)
    coords = {"position": ("point", np.linspace(0.0, 0.5, n))}
    if monitor is not None:
        coords["monitor"] = ("point", monitor)
    return xr.DataArray(da.from_array(frames, chunks=(k, -1, -1)), dims=("point", "y", "x"), coords=coords)


def test_integrate_scan_lazy_and_monitor(frames, extras):
    monitor = np.array([1.0, 2.0, 0.5, 4.0, 1.0, 3.0])
    ds = integrate_scan(_scan(frames, monitor), PONI, mask=extras["mask"], dark=extras["dark"],
                        npt=NPT, q_range=Q_RANGE, polarization_factor=0.99)
    assert isinstance(ds["iq"].data, da.Array)
    assert ds["iq"].dims == ("point", "q") and ds["iq_sigma"].dims == ("point", "q")
    assert ds["q"].attrs["units"] == "1/angstrom"
    np.testing.assert_array_equal(ds["position"].values, np.linspace(0.0, 0.5, 6))
    assert ds.attrs["integration_method"] == ["bbox", "csr", "cython"]
    assert ds.attrs["npt"] == NPT and ds.attrs["polarization_factor"] == 0.99
    assert "pyfai_version" in ds.attrs
    out = ds.compute()
    spec = make_spec(PONI, SHAPE, mask=extras["mask"], dark=extras["dark"], npt=NPT, q_range=Q_RANGE)
    plain = integrate_frames(frames, spec)
    np.testing.assert_array_equal(out["q"].values, plain.q)
    # monitor normalisation: I and sigma are divided by the point's monitor
    np.testing.assert_allclose(out["iq"].values * monitor[:, None], plain.iq, rtol=1e-12)
    np.testing.assert_allclose(out["iq_sigma"].values * monitor[:, None], plain.sigma, rtol=1e-12)
    assert out["masked_pixels"].values.tolist() == [0] * 6


def test_graph_is_small_and_carries_only_the_spec(frames, extras):
    import cloudpickle

    def graph_bytes(n_chunks):
        scan = _scan(np.concatenate([frames] * 4)[:n_chunks], k=1)
        ds = integrate_scan(scan, PONI, mask=extras["mask"], npt=NPT, q_range=Q_RANGE)
        layers = ds.__dask_graph__().layers
        sizes = {name: len(cloudpickle.dumps(dict(layer))) for name, layer in layers.items()
                 if name != scan.data.name}  # everything but the frames themselves
        spec_layers = [name for name in layers if name.startswith("IntegrationSpec")]
        assert len(spec_layers) == 1 and len(layers[spec_layers[0]]) == 1  # one copy of the spec
        return sum(sizes.values()), sizes[spec_layers[0]]

    total_4, spec_4 = graph_bytes(4)
    total_24, spec_24 = graph_bytes(24)
    assert spec_4 == spec_24 < 10_000  # PONI + bit-packed, compressed mask
    assert (total_24 - total_4) / 20 < 2_000  # bytes per extra chunk of frames: no arrays, no integrator
    with pytest.raises(TypeError, match="must not be pickled"):
        pickle.dumps(get_engine(make_spec(PONI, SHAPE, npt=NPT, q_range=Q_RANGE)))


@pytest.mark.slow
def test_two_worker_processes_give_identical_numbers(frames, extras):
    distributed = pytest.importorskip("distributed")
    ds = integrate_scan(_scan(frames, np.arange(1.0, 7.0)), PONI, mask=extras["mask"],
                        dark=extras["dark"], flat=extras["flat"], npt=NPT, q_range=Q_RANGE)
    local = ds.compute(scheduler="sync")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        remote = client.compute(ds).result()
        pids = client.run(lambda: __import__("os").getpid())
    assert len(set(pids.values())) == 2
    for name in ("iq", "iq_sigma", "masked_pixels"):
        np.testing.assert_array_equal(remote[name].values, local[name].values)


def test_mask_given_as_file_path(tmp_path, frames, extras):
    path = tmp_path / "mask.npy"
    np.save(path, extras["mask"].astype(np.uint8))
    by_path = make_spec(PONI, SHAPE, mask=path, npt=NPT, q_range=Q_RANGE)
    by_value = make_spec(PONI, SHAPE, mask=extras["mask"], npt=NPT, q_range=Q_RANGE)
    assert by_path.mask.payload is None and len(pickle.dumps(by_path)) < 2000
    np.testing.assert_array_equal(integrate_frames(frames[:2], by_path).iq,
                                  integrate_frames(frames[:2], by_value).iq)


def test_no_error_model_gives_no_sigma(frames):
    ds = integrate_scan(_scan(frames[:2]), PONI, npt=NPT, q_range=Q_RANGE, error_model=None)
    assert "iq_sigma" not in ds and ds["iq"].shape == (2, NPT)


# ---- validation --------------------------------------------------------------------------

def test_frame_shape_must_match_the_detector():
    poni = dict(PONI, detector="Pilatus1M", detector_config={})
    with pytest.raises(InputError, match=r"frames have shape \(256, 256\) but the PONI dictionary is for detector "
                                         r"Pilatus ?1M, which expects \(1043, 981\)"):
        make_spec(poni, SHAPE)


def test_poni_without_a_detector_shape_needs_the_frame_shape(tmp_path):
    from xrdmap.geometry import write_poni

    poni = dict(PONI, detector_config={"pixel1": 150e-6, "pixel2": 150e-6})  # no max_shape
    path = tmp_path / "shapeless.poni"
    write_poni(poni, path)
    with pytest.raises(InputError, match=f"PONI file '{path}': detector .* has no fixed shape; expected the "
                                         "frame shape to be given"):
        make_spec(path)
    assert make_spec(path, SHAPE).shape == SHAPE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mask=np.zeros((10, 10))), r"mask has shape \(10, 10\) but the frames have shape \(256, 256\)"),
        (dict(dark=np.zeros((256, 255))), r"dark has shape"),
        (dict(flat=np.ones((256, 256, 2))), r"flat has shape .* 2-D"),
        (dict(q_range=(1.0, 30.0)), r"outside the geometry's reach"),
        (dict(q_range=(5.0, 2.0)), r"q_range"),
        (dict(npt=1), r"npt 1: expected an integer number of q bins >= 2"),
        (dict(error_model="azimuthal"), r"error_model"),
        (dict(polarization_factor=2.0), r"polarization_factor"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(InputError, match=message):
        make_spec(PONI, SHAPE, **kwargs)


def test_bad_scans(frames):
    with pytest.raises(InputError, match="monitor of point 1"):
        integrate_scan(_scan(frames[:3], np.array([1.0, 0.0, 1.0])), PONI, npt=NPT)
    with pytest.raises(InputError, match=r"dims \(point, y, x\)"):
        integrate_scan(xr.DataArray(frames[0], dims=("y", "x")), PONI)
    with pytest.raises(InputError, match="frames have shape"):
        get_engine(make_spec(PONI, SHAPE, npt=NPT, q_range=Q_RANGE)).integrate(frames[:, :100])


def test_engine_cache_is_per_spec():
    a = make_spec(PONI, SHAPE, npt=NPT, q_range=Q_RANGE)
    b = make_spec(dict(PONI), SHAPE, npt=NPT, q_range=Q_RANGE)
    assert a == b and hash(a) == hash(b) and get_engine(a) is get_engine(b)
    assert isinstance(get_engine(a), IntegrationEngine)
    c = make_spec(PONI, SHAPE, npt=NPT + 1, q_range=Q_RANGE)
    assert c != a and get_engine(c) is not get_engine(a)
    assert dask.base.tokenize(a) == dask.base.tokenize(b)


def _forget_engines(monkeypatch):
    """A fresh process as far as the engine cache goes."""
    from collections import OrderedDict

    import xrdmap.integrate as xi

    monkeypatch.setattr(xi, "_ENGINES", OrderedDict())


def test_engine_dir_builds_once_and_maps_it(tmp_path, monkeypatch, ai, frames, extras):
    opts = {"mask": extras["mask"], "dark": extras["dark"], "flat": extras["flat"]}
    spec = make_spec(PONI, SHAPE, npt=NPT, q_range=Q_RANGE, engine_dir=tmp_path / "engines", **opts)
    assert spec == make_spec(PONI, SHAPE, npt=NPT, q_range=Q_RANGE, **opts)  # same numbers, same digest
    _forget_engines(monkeypatch)
    built = get_engine(spec)
    (folder,) = [p for p in (tmp_path / "engines").iterdir() if p.is_dir()]
    assert (folder / "engine.json").is_file() and isinstance(built.arrays["data"], np.memmap)
    _forget_engines(monkeypatch)
    mapped = get_engine(spec)  # another process: maps the saved arrays, builds nothing
    assert mapped is not built and isinstance(mapped.arrays["data"], np.memmap)
    for blk in mapped.blocks:  # the matrices are views of the mapped files, not copies
        assert np.shares_memory(blk.w.data, mapped.arrays["data"])
        assert np.shares_memory(blk.w2.indices, mapped.arrays["indices"])
    res = mapped.integrate(frames)
    for k, frame in enumerate(frames):
        ref = _pyfai(ai, frame, **opts)
        assert _max_rel(res.iq[k], ref.intensity, ref.intensity) <= RTOL
        assert _max_rel(res.sigma[k], ref.sigma, ref.intensity) <= RTOL
    fresh = IntegrationEngine(spec).integrate(frames)
    np.testing.assert_array_equal(res.iq, fresh.iq)
    np.testing.assert_array_equal(res.sigma, fresh.sigma)


def test_engine_dir_damaged_or_unwritable(tmp_path, monkeypatch, frames):
    spec = make_spec(PONI, SHAPE, npt=NPT, q_range=Q_RANGE, engine_dir=tmp_path)
    _forget_engines(monkeypatch)
    expected = get_engine(spec).integrate(frames[:2]).iq
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (folder / "data.npy").write_bytes(b"truncated")
    _forget_engines(monkeypatch)
    np.testing.assert_array_equal(get_engine(spec).integrate(frames[:2]).iq, expected)  # rebuilt
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    spec = make_spec(PONI, SHAPE, npt=NPT, q_range=Q_RANGE, engine_dir=blocked / "engines")
    _forget_engines(monkeypatch)
    np.testing.assert_array_equal(get_engine(spec).integrate(frames[:2]).iq, expected)  # built in memory


# ---- the `xrdmap integrate` command -------------------------------------------------------

@pytest.fixture()
def scan_files(tmp_path, frames, extras):
    import h5py

    from xrdmap.geometry import write_poni

    scan = tmp_path / "scan.h5"
    with h5py.File(scan, "w") as fh:
        fh.create_dataset("entry/data/data", data=frames[:4])
    poni = write_poni(PONI, tmp_path / "geometry.poni")
    mask = tmp_path / "mask.npy"
    np.save(mask, extras["mask"].astype(np.uint8))
    return scan, poni, mask


def test_cli_integrate_writes_result(tmp_path, scan_files, ai, frames, extras):
    from typer.testing import CliRunner

    from xrdmap.cli import app
    from xrdmap.results import open_result

    scan, poni, mask = scan_files
    out = tmp_path / "result.h5"
    res = CliRunner().invoke(app, ["integrate", str(scan), "--poni", str(poni), "--mask", str(mask),
                                   "--npt", str(NPT), "--q-range", "1,10", "--frames-path",
                                   "entry/data/data", "--positions", "0,0.25", "-o", str(out),
                                   "--export-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    ds = open_result(out)
    from xrdmap.textio import read_columns

    cols = read_columns(tmp_path / "point_0002.xy")
    np.testing.assert_allclose(cols[:, 1], ds["iq"].values[2], rtol=1e-8)
    assert ds["iq"].shape == (4, NPT)
    np.testing.assert_allclose(ds["position"].values, [0.0, 0.25, 0.5, 0.75])
    ref = _pyfai(ai, frames[2], mask=extras["mask"])
    assert _max_rel(ds["iq"].values[2], ref.intensity, ref.intensity) <= RTOL
    assert _max_rel(ds["iq_sigma"].values[2], ref.sigma, ref.intensity) <= RTOL
    # every input file hashed (by the child process that runs beside the integration)
    import hashlib

    assert ds.attrs["input_checksums"] == {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                                           for p in (scan, poni, mask)}


def test_cli_bad_input_exits_nonzero_without_output(tmp_path, scan_files):
    import subprocess
    import sys
    from pathlib import Path

    scan, poni, _ = scan_files
    bad_mask = tmp_path / "small_mask.npy"
    np.save(bad_mask, np.zeros((10, 10), np.uint8))
    out = tmp_path / "result.h5"
    exe = Path(sys.executable).with_name("xrdmap")
    proc = subprocess.run([str(exe), "integrate", str(scan), "--poni", str(poni), "--mask", str(bad_mask),
                           "--frames-path", "entry/data/data", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "mask file" in proc.stderr and "(10, 10)" in proc.stderr and "(256, 256)" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".result.h5*"))


@pytest.mark.parametrize("q_range", [None, Q_RANGE])
def test_q_axis_without_engine_equals_engine_bins(q_range, extras):
    from xrdmap.integrate import IntegrationEngine, _q_axis

    spec = make_spec(PONI, SHAPE, mask=extras["mask"], npt=NPT + 7, q_range=q_range)
    np.testing.assert_array_equal(_q_axis(spec), IntegrationEngine(spec).q)


def test_real_ceo2_frame():
    """A real Pilatus frame of CeO2 (crop, see tests/data/README.md): equal to pyFAI, and
    the 111, 200, 220 rings where NIST SRM 674b's lattice parameter puts them."""
    from pathlib import Path

    from xrdmap.geometry import read_poni

    data = Path(__file__).parent / "data" / "integrate"
    npz = np.load(data / "CeO2_Pilatus1M_crop512.npz")
    image, (y0, x0) = npz["image"], npz["origin"]
    poni = read_poni(data / "CeO2_Pilatus1M.poni")
    pixel = poni["detector_config"]["pixel1"]
    poni = dict(poni, poni1=poni["poni1"] - y0 * pixel, poni2=poni["poni2"] - x0 * pixel,
                detector_config=dict(poni["detector_config"], max_shape=[512, 512]))
    spec = make_spec(poni, image.shape, npt=1500, q_range=(1.0, 4.0))
    res = integrate_frames(image, spec)
    ref = make_integrator(poni).integrate1d(image, 1500, unit="q_A^-1", method=("bbox", "csr", "cython"),
                                            polarization_factor=0.99, radial_range=(1.0, 4.0),
                                            error_model="poisson")
    assert _max_rel(res.iq, ref.intensity, ref.intensity) <= RTOL
    assert _max_rel(res.sigma, ref.sigma, ref.intensity) <= RTOL
    a = 5.411651  # A, NIST SRM 674b
    bin_width = 3.0 / 1500
    for hkl in ((1, 1, 1), (2, 0, 0), (2, 2, 0)):
        q_hkl = 2 * np.pi * np.linalg.norm(hkl) / a
        win = np.abs(res.q - q_hkl) < 0.05
        q_peak = res.q[win][np.argmax(res.iq[win])]
        assert abs(q_peak - q_hkl) <= 1.5 * bin_width


# ---- sigma clipping for spotty frames ------------------------------------------------------


def test_sigma_clipping_removes_planted_spots(ai, extras):
    """Spots from large crystallites are rejected; the powder average is what remains."""
    rng = np.random.default_rng(11)
    q_true = np.linspace(0.5, 12.0, 800)
    profile = 200.0 + 400.0 * np.exp(-0.5 * ((q_true - 4.0) / 0.1) ** 2)
    clean = ai.calcfrom1d(q_true, profile, shape=SHAPE, dim1_unit="q_A^-1",
                          correctSolidAngle=True, polarization_factor=0.99)
    powder = rng.poisson(clean).astype(np.float32)
    spotty = powder.copy()
    spots = rng.choice(powder.size, size=powder.size // 100, replace=False)
    spotty.flat[spots] += 20 * clean.flat[spots]  # 1 % of pixels lit by big grains
    scan = xr.DataArray(np.stack([spotty, powder]), dims=("point", "y", "x"))

    plain = integrate_scan(scan, PONI, mask=extras["mask"], npt=NPT, q_range=Q_RANGE).compute()
    clipped = integrate_scan(scan, PONI, mask=extras["mask"], npt=NPT, q_range=Q_RANGE,
                             outlier_sigma=4.0).compute()
    np.testing.assert_allclose(clipped["q"], plain["q"], rtol=1e-12)
    reference = plain["iq"][1].values  # the spot-free frame, fast path
    ratio_plain = np.nanmedian(plain["iq"][0].values / reference)
    ratio_clipped = np.nanmedian(clipped["iq"][0].values / reference)
    assert ratio_plain > 1.1  # the spots bias the plain mean upwards
    assert abs(ratio_clipped - 1) < 0.01
    frac = clipped["rejected_fraction"].values
    # at least the 1 % planted (pyFAI's clipping also drops pixels the spots' first-pass
    # mean pushed beyond the threshold); next to nothing on the clean frame
    assert frac[0] > 0.008
    assert frac[1] < 0.001
    assert "rejected_fraction" not in plain


def test_sigma_clipping_needs_a_positive_threshold():
    with pytest.raises(InputError, match="outlier_sigma"):
        make_spec(PONI, SHAPE, npt=NPT, outlier_sigma=-1)


def test_release_engines_drops_the_cache_and_the_numbers_stay(frames):
    # the run calls it on its local workers once the scan is integrated
    from xrdmap import integrate

    spec = make_spec(PONI, SHAPE, npt=NPT, q_range=Q_RANGE)
    engine = get_engine(spec)
    before = engine.integrate(frames[:2])
    integrate.release_engines()
    assert len(integrate._ENGINES) == 0
    rebuilt = get_engine(spec)
    assert rebuilt is not engine
    after = rebuilt.integrate(frames[:2])
    np.testing.assert_array_equal(after.iq, before.iq)
    np.testing.assert_array_equal(after.sigma, before.sigma)
