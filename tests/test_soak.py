"""Soak test: 20 000 small frames reduced in one run, with no growth in memory or open files.

Measured, not timed: the resident set size is sampled after 25, 50, 75 and 100 % of the
integration chunks, and the process's open file descriptors are counted before and after.
"""

from __future__ import annotations

import gc
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

psutil = pytest.importorskip("psutil")

N_FRAMES = 20_000
SIZE = 48
BLOCK = 1_000  # frames written per h5py call
CHUNK_FRAMES = 250  # frames per integration chunk: 80 chunks
NPT = 500  # results held in memory would grow RSS by 2 x 8 x NPT bytes per frame: 160 MB
RSS_MARGIN = 50 * 2**20  # bytes


def _scale(i: np.ndarray) -> np.ndarray:
    """Intensity scale of frame ``i``: the frames are exact multiples of one pattern."""
    return (1.0 + 0.5 * np.sin(i / 137.0)).astype(np.float32)


def _write_series(path: Path) -> tuple[np.ndarray, Path]:
    """One HDF5 time series of N_FRAMES float32 frames (bitshuffle-LZ4), written in blocks."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius = np.hypot(yy - SIZE / 2 + 0.5, xx - SIZE / 2 + 0.5)
    base = (100.0 + 400.0 * np.exp(-((radius - 14.0) ** 2) / 4.0) + 250.0 * np.exp(-((radius - 20.0) ** 2) / 3.0))
    base = base.astype(np.float32)
    times = np.arange(N_FRAMES) * 1e-3  # s
    with h5py.File(path, "w") as fh:
        entry = fh.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data = entry.create_group("data")
        data.attrs.update(NX_class="NXdata", signal="data", axes=["time", ".", "."], time_indices=0)
        frames = data.create_dataset("data", shape=(N_FRAMES, SIZE, SIZE), dtype=np.float32,
                                     chunks=(CHUNK_FRAMES, SIZE, SIZE), **hdf5plugin.Bitshuffle(cname="lz4"))
        for start in range(0, N_FRAMES, BLOCK):
            idx = np.arange(start, min(start + BLOCK, N_FRAMES))
            frames[idx[0]:idx[-1] + 1] = base[None] * _scale(idx)[:, None, None]
        t = data.create_dataset("time", data=times)
        t.attrs["units"] = "s"
    poni = path.with_suffix(".poni")
    pixel_m = 0.432 / SIZE  # the 43 cm PerkinElmer panel, scaled to SIZE pixels
    poni.write_text(
        "poni_version: 2.1\nDetector: PerkinElmerXRD4343CT\n"
        f'Detector_config: {{"pixel1": {pixel_m}, "pixel2": {pixel_m}, "orientation": 3, '
        f'"max_shape": [{SIZE}, {SIZE}]}}\n'
        f"Distance: 0.35\nPoni1: {0.216}\nPoni2: {0.216}\nRot1: 0.0\nRot2: 0.0\nRot3: 0.0\n"
        "Wavelength: 1.6166931599061192e-11\n"
    )
    return base, poni


@pytest.mark.slow
def test_twenty_thousand_frames_without_memory_or_file_growth(tmp_path, record_property):
    from xrdmap.config import validate_config
    from xrdmap.integrate import integrate_frames, make_spec
    from xrdmap.pipeline import _open_scan, integrate_checkpointed

    scan = tmp_path / "series.h5"
    base, poni = _write_series(scan)
    out = tmp_path / "out" / "result.h5"
    out.parent.mkdir()

    def config(path: Path, chunk_frames: int):
        return validate_config({
            "scan": {"source": str(scan), "chunk_frames": chunk_frames},
            "geometry": {"poni": str(poni)},
            "integration": {"npt": NPT, "q_range": [1.0, 20.0]},
            "output": {"path": str(path)},
            "compute": {"workers": 0},
        })

    # warm up (imports, the per-process integration engine) so that the baseline is fair
    warm = config(tmp_path / "out" / "warm.h5", N_FRAMES)
    scan_da = _open_scan(warm)
    assert scan_da.sizes["point"] == N_FRAMES
    integrate_checkpointed(scan_da.isel(point=slice(0, 10)), warm)
    proc = psutil.Process()
    gc.collect()
    fds_before = proc.num_fds()

    cfg = config(out, CHUNK_FRAMES)
    samples: dict[int, int] = {}
    total_chunks = N_FRAMES // CHUNK_FRAMES
    marks = {total_chunks * k // 4: k * 25 for k in (1, 2, 3, 4)}

    def progress(done: int, total: int) -> None:
        assert total == total_chunks
        if done in marks:
            gc.collect()
            samples[marks[done]] = proc.memory_info().rss

    ds = integrate_checkpointed(_open_scan(cfg), cfg, progress=progress)
    del scan_da
    gc.collect()
    fds_after = proc.num_fds()

    for percent, rss in samples.items():
        record_property(f"rss_MiB_at_{percent}_percent", round(rss / 2**20, 1))
    record_property("open_fds_before_after", (fds_before, fds_after))
    assert sorted(samples) == [25, 50, 75, 100]
    growth = max(samples[50], samples[75], samples[100]) - samples[25]
    assert growth <= RSS_MARGIN, {k: v / 2**20 for k, v in samples.items()}
    assert fds_after <= fds_before, (fds_before, fds_after)
    assert len(list(out.with_name("result.h5.checkpoint").glob("chunk_*.npz"))) == total_chunks

    # every one of the 20 000 patterns is right and in its place: frame i is scale_i * base,
    # and integration is linear, so I_i = scale_i * I(base)
    assert ds.sizes["point"] == N_FRAMES
    np.testing.assert_array_equal(ds["time"].values, np.arange(N_FRAMES) * 1e-3)
    spec = make_spec(str(poni), (SIZE, SIZE), npt=NPT, q_range=(1.0, 20.0))
    ref = integrate_frames(base, spec).iq
    finite = np.isfinite(ref)
    expected = _scale(np.arange(N_FRAMES)).astype(np.float64)[:, None] * ref[None, finite]
    np.testing.assert_allclose(ds["iq"].values[:, finite], expected, rtol=1e-5)
    assert int(ds["masked_pixels"].sum()) == 0
