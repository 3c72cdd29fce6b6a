"""Calibration from a calibrant image: real CeO2/Pilatus 1M image, orientation, synthetic truth, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.optimize import curve_fit

from xrdmap.calibrate import calibrate, make_detector
from xrdmap.geometry import make_integrator, read_poni

DATA = Path(__file__).parent / "data" / "calibration"
WAVELENGTH_A = 0.4066
A_CEO2 = 5.411651  # NIST SRM 674b certified lattice parameter, A
PIXEL = 172e-6
REF = read_poni(DATA / "CeO2_Pilatus1M.poni")
XRDMAP = str(Path(sys.executable).parent / "xrdmap")


def fcc_two_theta_deg(a_A, wavelength_A, tth_max_deg):
    """Distinct 2theta of an fcc lattice (h, k, l all even or all odd)."""
    out = set()
    for h in range(0, 12):
        for k in range(0, h + 1):
            for m in range(0, k + 1):
                if (h, k, m) == (0, 0, 0) or len({h % 2, k % 2, m % 2}) != 1:
                    continue
                s = wavelength_A * np.sqrt(h * h + k * k + m * m) / (2 * a_A)
                if s < 1:
                    out.add(round(float(np.degrees(2 * np.arcsin(s))), 9))
    return np.array(sorted(t for t in out if t <= tth_max_deg))


@pytest.fixture(scope="module")
def image():
    with h5py.File(DATA / "CeO2_Pilatus1M.h5") as f:
        return f["image"][()]


def reference_center_px():
    """Beam centre (x, y) of the reference PONI in pixels of the array as read (orientation 2)."""
    x = REF["poni2"] / PIXEL - 0.5
    y = 1043 - 1 - (REF["poni1"] / PIXEL - 0.5)
    return x, y


def guess():
    x, y = reference_center_px()
    return {"guess_distance_mm": REF["dist"] * 1e3 * 1.05, "guess_center_px": (x + 20.0, y - 20.0)}


@pytest.fixture(scope="module")
def result(image):
    return calibrate(image, calibrant="CeO2", wavelength_A=WAVELENGTH_A, detector="Pilatus1M",
                     orientation=2, **guess())


def ring_peaks(ai, img, tth_expected, half_window=0.12):
    """2theta of each ring from a Gaussian + line fit of the azimuthal average."""
    det = ai.detector
    mask = (img < 0) | (det.mask != 0)
    r = ai.integrate1d(img.astype(float), 6000, unit="2th_deg", mask=mask, radial_range=(5, 31),
                       correctSolidAngle=True)
    x, y = r.radial, r.intensity
    found = []
    for t in tth_expected:
        sel = np.abs(x - t) < half_window
        xs, ys = x[sel], y[sel]

        def model(u, amp, mu, sig, c0, c1, t=t):
            return amp * np.exp(-0.5 * ((u - mu) / sig) ** 2) + c0 + c1 * (u - t)

        p0 = [ys.max() - ys.min(), xs[np.argmax(ys)], 0.02, ys.min(), 0.0]
        p, _ = curve_fit(model, xs, ys, p0=p0)
        found.append(p[1])
    return np.array(found)


def strong_rings():
    # well separated, strong CeO2 rings inside the detector (up to (531) at 2theta ~ 22.5 deg)
    return fcc_two_theta_deg(A_CEO2, WAVELENGTH_A, 23.0)


def test_pyfai_ceo2_is_nist_674b():
    from pyFAI.calibrant import get_calibrant

    d111 = get_calibrant("CeO2").dspacing[0]
    assert d111 * np.sqrt(3) == pytest.approx(A_CEO2, abs=2e-5)


def test_real_image_geometry_matches_reference(result):
    assert abs(result.poni["dist"] - REF["dist"]) < 0.2e-3
    assert abs(result.poni["poni1"] - REF["poni1"]) < 0.2e-3
    assert abs(result.poni["poni2"] - REF["poni2"]) < 0.2e-3
    assert result.poni["detector_config"]["orientation"] == 2
    # uncertainties are finite, positive and small for what 6000 points determine
    for name in ("dist", "poni1", "poni2"):
        assert 0 < result.uncertainties[name] < 0.05e-3
    assert len(result.control_points) > 1000
    assert result.rms_deg < 0.03
    assert all(r["rms_px"] < 1.0 for r in result.ring_residuals if r["n_points"] > 50)


def test_real_image_integrated_rings_at_ceo2_positions(result, image):
    tth = strong_rings()
    found = ring_peaks(result.integrator(), image, tth)
    assert np.max(np.abs(found - tth)) < 0.01


def test_reference_poni_fits_raw_array_only_with_orientation_2(image):
    """The Dioptas PONI describes the up-down flipped array; orientation 2 says so."""
    tth = strong_rings()[:4]
    cfg = dict(REF)
    cfg["detector"] = "Pilatus1M"
    cfg["detector_config"] = {"orientation": 2}
    found = ring_peaks(make_integrator(cfg), image, tth)
    assert np.max(np.abs(found - tth)) < 0.01
    mask = (image < 0) | (make_integrator(cfg).detector.mask != 0)
    heights = {}
    for ori in (2, 3):
        ai = make_integrator({**cfg, "detector_config": {"orientation": ori}})
        heights[ori] = ai.integrate1d(image.astype(float), 3000, unit="2th_deg", mask=mask,
                                      radial_range=(5, 16)).intensity.max()
    # with pyFAI's native orientation (3) the rings are smeared to a fraction of their height
    assert heights[3] < 0.3 * heights[2]


@pytest.mark.slow
def test_flipped_array_with_native_orientation_gives_same_rings(result, image):
    flipped = image[::-1].copy()
    x, y = guess()["guess_center_px"]
    res3 = calibrate(flipped, calibrant="CeO2", wavelength_A=WAVELENGTH_A, detector="Pilatus1M",
                     guess_distance_mm=guess()["guess_distance_mm"], guess_center_px=(x, 1042 - y))
    assert res3.poni["detector_config"]["orientation"] == 3
    for name in ("dist", "poni1", "poni2"):
        assert res3.poni[name] == pytest.approx(result.poni[name], abs=0.02e-3)
    tth = strong_rings()
    a = ring_peaks(result.integrator(), image, tth)
    b = ring_peaks(res3.integrator(), flipped, tth)
    assert np.max(np.abs(a - b)) < 0.002


def test_synthetic_calibration_recovers_known_geometry():
    from pyFAI.calibrant import get_calibrant
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    truth = {"dist": 0.12, "poni1": 0.0421, "poni2": 0.0383, "rot1": 0.02, "rot2": -0.01, "rot3": 0.0}
    ai = AzimuthalIntegrator(detector=Detector(pixel1=2e-4, pixel2=2e-4, max_shape=(400, 400)),
                             wavelength=0.2e-10, **truth)
    cal = get_calibrant("CeO2")
    cal.wavelength = 0.2e-10
    ideal = cal.fake_calibration_image(ai, Imax=1000, Imin=20, resolution=0.2)
    img = np.random.default_rng(1).poisson(ideal).astype(np.int32)
    cx, cy = truth["poni2"] / 2e-4 - 0.5, truth["poni1"] / 2e-4 - 0.5
    res = calibrate(img, calibrant="CeO2", wavelength_A=0.2,
                    detector=Detector(pixel1=2e-4, pixel2=2e-4, max_shape=(400, 400)),
                    guess_distance_mm=120 * 0.95, guess_center_px=(cx + 10, cy - 12))
    assert res.poni["dist"] == pytest.approx(truth["dist"], abs=0.1e-3)
    for name in ("poni1", "poni2"):
        assert res.poni[name] == pytest.approx(truth[name], abs=0.3e-3)  # 1.5 px
    for name in ("rot1", "rot2"):
        assert res.poni[name] == pytest.approx(truth[name], abs=3e-3)
    # the quoted uncertainties cover the true error
    for name in ("dist", "poni1", "poni2", "rot1", "rot2"):
        assert abs(res.poni[name] - truth[name]) < 4 * res.uncertainties[name]


def test_fixed_parameters_and_mask_are_respected(image):
    x, y = reference_center_px()
    mask = np.zeros(image.shape, np.uint8)
    mask[:, :400] = 1
    res = calibrate(image, calibrant="CeO2", wavelength_A=WAVELENGTH_A, detector="Pilatus1M", orientation="TopRight",
                    guess_distance_mm=REF["dist"] * 1e3, guess_center_px=(x, y), fix=("dist", "rot1", "rot2", "rot3"),
                    max_rings=4, mask=mask)
    assert res.control_points[:, 1].min() >= 400
    assert res.poni["dist"] == REF["dist"]
    assert res.poni["rot1"] == 0 and res.poni["rot2"] == 0
    assert res.uncertainties["dist"] == 0
    assert {r["ring"] for r in res.ring_residuals} <= {0, 1, 2, 3}


def test_bad_inputs_raise_named_errors(image):
    from xrdmap.errors import ConfigError, InputError

    with pytest.raises(InputError, match="calibrant 'Unobtainium'"):
        calibrate(image, calibrant="Unobtainium", wavelength_A=WAVELENGTH_A, detector="Pilatus1M")
    with pytest.raises(InputError, match="shape"):
        calibrate(image[:500], calibrant="CeO2", wavelength_A=WAVELENGTH_A, detector="Pilatus1M")
    with pytest.raises(ConfigError, match="exactly one"):
        calibrate(image, calibrant="CeO2", detector="Pilatus1M")
    with pytest.raises(ConfigError, match="orientation"):
        make_detector("Pilatus1M", orientation=7)


# --- command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, image):
    import fabio.edfimage

    p = tmp_path_factory.mktemp("cal") / "ceo2.edf"
    fabio.edfimage.EdfImage(data=image).write(str(p))
    return p


def run_cli(args):
    from typer.testing import CliRunner

    from xrdmap.cli import app

    return CliRunner().invoke(app, args)


@pytest.mark.slow
def test_cli_calibrate_writes_poni_and_report(image_file, tmp_path):
    x, y = guess()["guess_center_px"]
    out = tmp_path / "geometry.poni"
    r = run_cli(["calibrate", str(image_file), "--calibrant", "CeO2", "--wavelength-A", "0.4066",
                 "--detector", "Pilatus1M", "--orientation", "2", "--guess-distance-mm",
                 str(guess()["guess_distance_mm"]), "--guess-center", f"{x},{y}", "-o", str(out)])
    assert r.exit_code == 0, r.output
    poni = read_poni(out)
    assert abs(poni["dist"] - REF["dist"]) < 0.2e-3
    assert int(poni["detector_config"]["orientation"]) == 2
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "dist" in r.output and "±" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calibrant", "Unobtainium", "--wavelength-A", "0.4", "--detector", "Pilatus1M"], "calibrant"),
        (["--calibrant", "CeO2", "--wavelength-A", "0.4", "--detector", "NoSuchCam"], "detector"),
        (["--calibrant", "CeO2", "--wavelength-A", "0.4", "--detector", "Pilatus300k"], "shape"),
        (["--calibrant", "CeO2", "--detector", "Pilatus1M"], "wavelength"),
    ],
)
def test_cli_calibrate_errors(image_file, tmp_path, args, message):
    out = tmp_path / "g.poni"
    p = subprocess.run([XRDMAP, "calibrate", str(image_file), *args, "-o", str(out)],
                       capture_output=True, text=True)
    assert p.returncode != 0
    assert message in p.stderr.lower()
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert not out.with_suffix(".png").exists()


def test_cli_calibrate_missing_image(tmp_path):
    out = tmp_path / "g.poni"
    p = subprocess.run([XRDMAP, "calibrate", str(tmp_path / "nope.tif"),
                        "--wavelength-A", "0.4", "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "nope.tif" in p.stderr
    assert not out.exists()


def test_example_i15_1_files_are_consistent():
    from xrdmap.mask import load_mask

    root = Path(__file__).parents[1] / "calibration"
    poni = read_poni(root / "I15-1_PE4343CT_76.69keV_350mm_example.poni")
    assert poni["wavelength"] * 1e10 == pytest.approx(12.398419843 / 76.69, rel=1e-8)  # 0.161669 A
    assert poni["dist"] == pytest.approx(0.350)
    ai = make_integrator(poni)
    assert tuple(ai.detector.shape) == (2880, 2880)
    assert ai.detector.pixel1 == pytest.approx(150e-6)
    mask = load_mask(root / "I15-1_PE4343CT_example_mask.edf.gz", shape=(2880, 2880))
    assert mask[1440, 1440] and mask[2879, 1440] and not mask[100, 100]


@pytest.mark.slow
def test_real_image_without_any_guess(image):
    res = calibrate(image, calibrant="CeO2", wavelength_A=WAVELENGTH_A, detector="Pilatus1M", orientation=2)
    for name in ("dist", "poni1", "poni2"):
        assert abs(res.poni[name] - REF[name]) < 0.2e-3
