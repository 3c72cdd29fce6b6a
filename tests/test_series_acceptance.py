"""Acceptance of the series descriptors on the simulator's in-situ ``flash`` layout.

The scan is simulated at 256 px with default counting statistics, integrated with the
pipeline's integration, the Kapton background subtracted, and the descriptors compared
with the simulator's stored truth (``/entry/truth``): the amorphous interval (zone
boundaries, ``zone_points``) and the LATP lattice scale of every frame.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.slow

POINTS = 40


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    from xrdmap.background import subtract_background
    from xrdmap.integrate import integrate_scan
    from xrdmap.io import open_scan
    from xrdmap.pdf import coherence_length, transform
    from xrdmap.pipeline import _background_frames
    from xrdmap.simulate import simulate_scan

    path = simulate_scan("flash", tmp_path_factory.mktemp("flash") / "flash.h5", points=POINTS, size=256, seed=4)
    scan = open_scan(str(path))
    kw = dict(mask=str(path.with_suffix(".mask.npy")), dark=str(path.with_suffix(".dark.npy")),
              npt=1500, q_range=(0.5, 20.0))
    ds = integrate_scan(scan, str(path.with_suffix(".poni")), **kw).compute(scheduler="sync")
    bg_frames = _background_frames(path, "/entry/background/data", "/entry/background/monitor")
    with h5py.File(path, "r") as fh:
        truth = {k: fh[f"entry/truth/{k}"][()] for k in ("lattice_scale", "zone_points", "amorphous_fraction", "time")}
    bg = integrate_scan(bg_frames, str(path.with_suffix(".poni")), **kw)["iq"].mean("point").compute(scheduler="sync")
    sub = subtract_background(ds["iq"], bg, scale=1.0, iq_sigma=ds["iq_sigma"])
    ds = ds.assign(iq=sub["iq"], iq_sigma=sub["iq_sigma"])
    pdf = transform(ds["iq"], composition="Li1.3Al0.3Ti1.7(PO4)3", qmin=0.5, qmax=18.0, qmaxinst=19.0,
                    lorch=True, rmax=30.0)
    ds["coherence_length"] = coherence_length(pdf["gr"])
    return ds, truth


def test_amorphous_interval_within_two_frames(flash):
    from xrdmap.series import crystallinity_index, describe_series, detect_events

    ds, truth = flash
    onset, end = (int(p) for p in truth["zone_points"])
    for signal in (ds["coherence_length"], crystallinity_index(ds["iq"])):
        ev = detect_events(signal)
        assert ev["onset_point"] is not None and abs(ev["onset_point"] - onset) <= 2, (signal.name, ev, onset, signal.values)
        assert abs(ev["end_point"] - end) <= 2, (signal.name, ev, end)
    desc = describe_series(ds)
    assert abs(desc.attrs["event_onset_point"] - onset) <= 2
    assert desc.attrs["event_onset_time"] == pytest.approx(truth["time"][desc.attrs["event_onset_point"]])


def test_lattice_scale_within_half_a_permille_per_frame(flash):
    from xrdmap.phases import load_library
    from xrdmap.series import lattice_scale

    ds, truth = flash
    latp = load_library()["LATP"]
    scale = lattice_scale(ds["iq"], latp, q_range=(4.0, 16.0), iq_sigma=ds["iq_sigma"])
    err = scale.values / truth["lattice_scale"] - 1.0
    print(f"lattice scale: max |error| {np.abs(err).max():.2e}, rms {np.sqrt(np.mean(err**2)):.2e}, "
          f"fitted FWHM {scale.attrs['fwhm_q']:.3f} A^-1")
    assert np.all(np.isfinite(err))
    assert np.abs(err).max() < 5e-4
