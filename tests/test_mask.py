"""Static masks (gaps, beamstop, hot/dead pixels, files) and per-frame sigma clipping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fabio
import h5py
import numpy as np
import pytest

from xrdmap.errors import InputError, OutputError
from xrdmap.geometry import make_integrator, read_poni
from xrdmap.mask import (
    beamstop_polygon,
    combine_masks,
    detector_gaps,
    find_beamstop,
    hot_dead_pixels,
    load_mask,
    save_mask,
    sigma_clip_profile,
)

DATA = Path(__file__).parent / "data" / "calibration"
XRDMAP = str(Path(sys.executable).parent / "xrdmap")


def test_pilatus1m_gaps_are_the_module_gaps():
    # 5 x 2 modules of 195 x 487 pixels on a 1043 x 981 array: the rest are gaps
    gaps = detector_gaps("Pilatus1M")
    assert gaps.shape == (1043, 981)
    assert gaps.sum() == 1043 * 981 - 10 * 195 * 487
    assert not gaps[0:195, 0:487].any()
    assert gaps[195:212, :].all()  # 17-row gap between module rows


def test_gaps_of_detector_without_gaps_and_shape_check():
    assert detector_gaps("perkinelmer_xrd4343ct").sum() == 0
    with pytest.raises(InputError, match="shape"):
        detector_gaps("Pilatus1M", (100, 100))


def test_beamstop_polygon_counts_pixel_centres():
    m = beamstop_polygon((50, 60), [(9.5, 19.5), (29.5, 19.5), (29.5, 24.5), (9.5, 24.5)])
    assert m.sum() == 20 * 5
    assert m[20:25, 10:30].all()


def test_find_beamstop_on_planted_shadow():
    rng = np.random.default_rng(3)
    shape = (256, 256)
    rows, cols = np.indices(shape)
    r = np.hypot(rows - 130.0, cols - 120.0)
    img = 200 + 800 * np.exp(-0.5 * ((r - 60) / 2) ** 2) + 300 * np.exp(-r / 40)
    stop = (r < 12) | ((np.abs(rows - 130) < 3) & (cols > 120))  # disc + arm to the edge
    img = np.where(stop, 5.0, img)
    img = rng.poisson(img).astype(float)
    gaps = np.zeros(shape, bool)
    gaps[:, 125:130] = True  # a module gap through the stop
    img[gaps] = -1
    found = find_beamstop(img, invalid=gaps, center=(120, 130), grow_px=0)
    truth = stop & ~gaps
    assert (found & truth).sum() >= 0.97 * truth.sum()
    assert (found & ~truth).sum() <= 0.1 * truth.sum()
    assert not (found & gaps).any()
    # without a centre it takes the low region nearest the middle
    assert (find_beamstop(img, invalid=gaps, grow_px=0) == found).all()


def test_find_beamstop_on_real_image_covers_the_beam_centre():
    with h5py.File(DATA / "CeO2_Pilatus1M.h5") as f:
        img = f["image"][()]
    gaps = detector_gaps("Pilatus1M", img.shape)
    found = find_beamstop(img, invalid=gaps)
    # direct beam = smallest 2theta of the reference geometry (orientation 2: array as read)
    cfg = {**read_poni(DATA / "CeO2_Pilatus1M.poni"), "detector": "Pilatus1M", "detector_config": {"orientation": 2}}
    tth = make_integrator(cfg).twoThetaArray()
    y, x = np.unravel_index(np.argmin(tth), tth.shape)  # (530, 487): inside the module gap
    fy, fx = np.nonzero(found)
    assert np.hypot(fy.mean() - y, fx.mean() - x) < 8
    assert found[y, x - 3] and found[y, x + 8]  # both sides of the gap
    assert 200 < found.sum() < 5000


def test_hot_pixels_from_darks_exactly_the_planted_ones():
    rng = np.random.default_rng(7)
    darks = rng.normal(100, 3, size=(5, 200, 240))
    hot = [(10, 20), (150, 3), (199, 239), (77, 128)]
    for y, x in hot:
        darks[:, y, x] += 60  # 20 sigma of a single frame
    m = hot_dead_pixels(darks=darks, n_sigma=6)
    assert sorted(zip(*np.nonzero(m), strict=True)) == sorted(hot)


def test_dead_and_hot_pixels_from_flats():
    rng = np.random.default_rng(8)
    flats = rng.normal(1000, 30, size=(3, 128, 128))
    flats[:, 5, 6] = 0  # dead
    flats[:, 60, 61] = 300  # weak
    flats[:, 100, 2] = 3000  # hot
    m = hot_dead_pixels(flats=list(flats), n_sigma=6)
    assert sorted(zip(*np.nonzero(m), strict=True)) == [(5, 6), (60, 61), (100, 2)]
    with pytest.raises(InputError):
        hot_dead_pixels()


def test_combine_masks_union_and_shape_check():
    a = np.zeros((4, 5), bool)
    a[0, 0] = True
    b = np.zeros((4, 5), np.uint8)
    b[3, 4] = 1
    assert combine_masks(a, None, b).sum() == 2
    with pytest.raises(InputError, match="shapes"):
        combine_masks(a, np.zeros((5, 4)))


@pytest.mark.parametrize("suffix", [".edf", ".edf.gz", ".npy"])
def test_save_mask_round_trip(tmp_path, suffix):
    m = np.zeros((37, 41), bool)
    m[3:9, 10:20] = True
    p = save_mask(m, tmp_path / f"mask{suffix}")
    assert (load_mask(p) == m).all()
    raw = np.load(p) if suffix == ".npy" else fabio.open(str(p)).data
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == [f"mask{suffix}"]  # no temp left
    with pytest.raises(InputError, match="shape"):
        load_mask(p, shape=(41, 37))


def test_save_mask_rejects_unknown_format(tmp_path):
    with pytest.raises(OutputError, match=".edf, .edf.gz or .npy"):
        save_mask(np.zeros((3, 3)), tmp_path / "mask.png")
    assert not (tmp_path / "mask.png").exists()


def test_sigma_clip_profile_removes_spots():
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    ai = AzimuthalIntegrator(detector=Detector(pixel1=1e-4, pixel2=1e-4, max_shape=(256, 256)),
                             dist=0.1, poni1=0.0128, poni2=0.0128, wavelength=1e-10)
    rng = np.random.default_rng(11)
    level = 400.0
    frame = rng.poisson(level, size=(256, 256)).astype(float)
    spots = rng.random((256, 256)) < 0.01
    frame[spots] += 5000.0  # single-crystal spots on 1 % of the pixels
    q, i_clip, sigma, frac = sigma_clip_profile(ai, frame, npt=50, polarization_factor=None)
    plain = ai.integrate1d(frame, 50, unit="q_A^-1", correctSolidAngle=True).intensity
    assert q.shape == i_clip.shape == sigma.shape == (50,)
    # the spots alone carry 1 % of the pixels: clipping rejects them, and little else
    assert 0.009 < frac < 0.02
    # solid-angle-corrected level without the spots (pyFAI's normalisation: solid angle 1 at the PONI)
    ref = sigma_clip_profile(ai, np.where(spots, np.nan, frame), npt=50, polarization_factor=None)[1]
    rel = np.abs(i_clip - ref) / ref
    assert np.nanmedian(rel) < 0.003 and np.mean(rel < 0.01) > 0.9  # corner bins hold few pixels
    assert np.nanmean(plain / ref) > 1.08  # unclipped: +1 % x 5000 / 400 = +12.5 % on average
    assert np.all(sigma[np.isfinite(sigma)] > 0)


# --- command line -----------------------------------------------------------------------


def test_cli_mask_gaps_beamstop_darks(tmp_path):
    with h5py.File(DATA / "CeO2_Pilatus1M.h5") as f:
        img = f["image"][()]
    image = tmp_path / "ceo2.edf"
    fabio.edfimage.EdfImage(data=img).write(str(image))
    dark = np.full(img.shape, 2, dtype=np.int32)
    dark[100, 100] = 500
    dark_file = tmp_path / "dark.npy"
    np.save(dark_file, dark)
    out = tmp_path / "mask.edf"
    p = subprocess.run([XRDMAP, "mask", "--detector", "Pilatus1M", "--image", str(image), "--beamstop", "auto",
                        "--dark", str(dark_file), "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    m = fabio.open(str(out)).data
    assert m.shape == img.shape
    assert m[100, 100] == 1 and m[530, 484] == 1
    assert "detector gaps" in p.stdout and "73,533" in p.stdout
    assert "hot pixels" in p.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--detector", "NoSuchCam"], "detector"),
        (["--detector", "Pilatus300k", "--image", "IMAGE"], "shape"),
        (["--detector", "Pilatus1M", "--beamstop", "auto"], "--image"),
        (["--detector", "Pilatus1M", "--beamstop", "1,2,3"], "beamstop"),
        (["--detector", "Pilatus1M", "--dark", "missing.edf"], "missing.edf"),
    ],
)
def test_cli_mask_errors(tmp_path, args, message):
    image = tmp_path / "img.npy"
    np.save(image, np.zeros((1043, 981), np.int32))
    args = [str(image) if a == "IMAGE" else str(tmp_path / a) if a == "missing.edf" else a for a in args]
    out = tmp_path / "mask.edf"
    p = subprocess.run([XRDMAP, "mask", *args, "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert not out.exists()
