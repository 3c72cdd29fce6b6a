"""Reliability: bad inputs, faults and interrupted runs lose nothing.

Each failure class is driven through the command line (``python -m xrdmap`` as a
subprocess) and through the Python API. Every failure must give one line naming the
input and what was expected, the documented exit code (``xrdmap.errors``: 2 input,
3 configuration, 4 output, 5 computation, 130 interrupted), and leave the output path
holding the previous complete result (checked byte for byte) with no temporary file
beside it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the simulated scans are bitshuffle-compressed)
import numpy as np
import pytest
import xarray as xr
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xrdmap.config import load_config, validate_config
from xrdmap.errors import ConfigError, InputError, OutputError
from xrdmap.integrate import integrate_scan
from xrdmap.io import open_scan
from xrdmap.pipeline import demo_config, integrate_checkpointed, run
from xrdmap.results import open_result, save_result

FRAMES = "/entry/data/data"
DETECTOR_FRAMES = "/entry/instrument/detector/data"
SIZE = 96
POINTS = 8


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def cli(*args, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m xrdmap ARGS`` and capture its output."""
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "xrdmap", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)


def error_line(proc: subprocess.CompletedProcess, code: int, *, worker_logs: bool = False) -> str:
    """The single ``error:`` line of a failed command, after checking its exit code.

    ``worker_logs``: dask's own log lines (which can hold tracebacks of dying workers)
    may precede the message.
    """
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{proc.stderr[-4000:]}"
    if not worker_logs:
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return error_line_of(proc.stderr)


def error_line_of(stderr: str) -> str:
    """The single ``error:`` line in ``stderr``."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-4000:]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def previous_result(path: Path) -> str:
    """Write a small complete result at ``path`` (the 'previous run') and return its digest."""
    ds = xr.Dataset(
        {"iq": (("point", "q"), np.arange(6.0).reshape(2, 3))},
        coords={"point": [0, 1], "q": [1.0, 2.0, 3.0], "position": ("point", [0.0, 0.1])},
        attrs={"note": "previous result"},
    )
    save_result(ds, path)
    return digest(path)


def strays(folder: Path) -> list[str]:
    """Temporary files left in ``folder`` or in a checkpoint directory inside it."""
    found = []
    for p in [*folder.iterdir(), *folder.glob("*.checkpoint/*")]:
        if p.name.endswith(".partial") or ".tmp" in p.name:
            found.append(str(p))
    return found


def assert_kept(out: Path, before: str, *, checkpoints: bool = True) -> None:
    """The output still holds the previous complete result; nothing temporary is left.

    ``checkpoints=False`` after a SIGKILL: the process may have died while saving a
    checkpoint, whose temporary file the next run removes; none may stand next to the
    output itself.
    """
    assert out.is_file()
    assert digest(out) == before, "the previous result was modified"
    assert open_result(out).attrs["note"] == "previous result"
    left = strays(out.parent)
    if not checkpoints:
        left = [p for p in left if ".checkpoint" not in p]
    assert left == []


def assert_commands_fail(expected: str, out: tuple[Path, str], *commands: tuple) -> None:
    """Each command (``xrdmap`` arguments) exits 2 with ``expected`` in its one error line
    and leaves the output path as it was."""
    out_path, before = out
    for args in commands:
        assert expected in error_line(cli(*args), 2)
        assert_kept(out_path, before)


def run_config(scan: Path, out: Path, **over) -> dict:
    """A JSON-able run configuration for a simulated scan (in-process, no figures)."""
    data = demo_config(scan, out.parent, workers=0).model_dump(mode="json")
    data["output"].update(path=str(out), figures=False, report=False)
    data["scan"]["chunk_frames"] = 2
    for dotted, value in over.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return data


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def copy_scan(scan: Path, folder: Path, name: str = "scan.h5") -> Path:
    """Copy a simulated scan with its PONI, mask and dark next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    shutil.copy(scan, target)
    for suffix in (".poni", ".mask.npy"):
        shutil.copy(scan.with_suffix(suffix), target.with_suffix(suffix))
    return target


def rewrite_frames(path: Path, frames: np.ndarray, **create) -> None:
    """Replace the frames dataset of a scan file (e.g. by float32 frames with NaNs)."""
    with h5py.File(path, "r+") as fh:
        # the NXdetector data and the NXdata signal are one dataset under two names
        del fh[FRAMES], fh[DETECTOR_FRAMES]
        fh[DETECTOR_FRAMES] = fh.create_dataset(FRAMES, data=frames, **create)


def read_frames(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as fh:
        return fh[FRAMES][()]


def corrupt_chunk(path: Path, index: int, keep: int = 8) -> None:
    """Overwrite one stored chunk of the frames with random bytes, but its first and
    last ``keep`` bytes (16 keeps bitshuffle's header, so that LZ4 decodes garbage)."""
    with h5py.File(path, "r") as fh:
        info = fh[FRAMES].id.get_chunk_info(index)
    rng = np.random.default_rng(index)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + keep)
        fh.write(rng.integers(0, 256, info.size - 2 * keep, dtype=np.uint8).tobytes())


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    from xrdmap.simulate import simulate_scan

    folder = tmp_path_factory.mktemp("scan")
    return simulate_scan("composite", folder / "scan.h5", points=POINTS, size=SIZE, seed=11)


@pytest.fixture()
def out(tmp_path) -> tuple[Path, str]:
    """Output path holding a previous complete result, and that result's digest."""
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "result.h5"
    return path, previous_result(path)


def _bad_pixels(poni: Path, mask: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Unmasked pixels well inside the integrated Q range (from pyFAI's geometry)."""
    from xrdmap.geometry import make_integrator

    q = make_integrator(str(poni)).qArray((SIZE, SIZE)) / 10.0  # nm^-1 -> A^-1
    ok = np.flatnonzero(((q > 1.0) & (q < 15.0) & ~mask).ravel())
    return np.random.default_rng(seed).choice(ok, count, replace=False)


@pytest.fixture(scope="module")
def nan_scan(scan, tmp_path_factory) -> tuple[Path, dict[int, np.ndarray]]:
    """The scan as float32 frames with NaN/+inf/-inf pixels in frames 1 and 4 (gzip)."""
    path = copy_scan(scan, tmp_path_factory.mktemp("nan"))
    frames = read_frames(path).astype(np.float32)
    mask = np.load(path.with_suffix(".mask.npy")).astype(bool)
    bad = {1: _bad_pixels(path.with_suffix(".poni"), mask, 7, 1),
           4: _bad_pixels(path.with_suffix(".poni"), mask, 3, 2)}
    for k, pixels in bad.items():
        flat = frames[k].reshape(-1)
        flat[pixels] = np.resize(np.array([np.nan, np.inf, -np.inf], np.float32), pixels.size)
    rewrite_frames(path, frames, chunks=(1, SIZE, SIZE), compression="gzip")
    return path, bad


# --------------------------------------------------------------------------------------
# corrupt or truncated HDF5
# --------------------------------------------------------------------------------------


def test_truncated_hdf5_is_an_input_error(scan, tmp_path, out):
    out_path, before = out
    bad = copy_scan(scan, tmp_path / "in")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])

    with pytest.raises(InputError, match="could not be opened as HDF5") as exc:
        open_scan(bad)
    assert str(bad) in str(exc.value) and "expected a complete, readable HDF5" in str(exc.value)

    proc = cli("integrate", bad, "--poni", bad.with_suffix(".poni"), "-o", out_path)
    line = error_line(proc, 2)
    assert str(bad) in line and "truncated file" in line and "expected a complete" in line
    assert_kept(out_path, before)

    cfg = write_yaml(tmp_path / "run.yaml", run_config(scan, out_path, scan__source=str(bad)))
    line = error_line(cli("run", cfg), 2)
    assert str(bad) in line and "could not be opened as HDF5" in line
    assert_kept(out_path, before)
    assert not out_path.with_name("result.h5.checkpoint").exists()


def test_corrupt_compressed_chunk_names_the_frames(scan, tmp_path, out):
    out_path, before = out
    bad = copy_scan(scan, tmp_path / "in")
    rewrite_frames(bad, read_frames(scan), chunks=(1, SIZE, SIZE), compression="gzip")
    corrupt_chunk(bad, 5)

    frames = open_scan(bad, chunk_frames=2)  # opening reads no frame data
    with pytest.raises(InputError, match=r"frames 4\.\.5 of /entry/\S+/data could not be read") as exc:
        integrate_scan(frames, bad.with_suffix(".poni"), npt=200).compute()
    assert str(bad) in str(exc.value)

    proc = cli("integrate", bad, "--poni", bad.with_suffix(".poni"), "--chunk-frames", 2, "-o", out_path)
    line = error_line(proc, 2)
    assert str(bad) in line and "frames 4..5" in line and "filter returned failure" in line
    assert_kept(out_path, before)

    cfg = write_yaml(tmp_path / "run.yaml", run_config(scan, out_path, scan__source=str(bad)))
    proc = cli("run", cfg)
    line = error_line(proc, 2)
    assert str(bad) in line and "frames 4..5 of /entry/" in line and "could not be read" in line
    assert_kept(out_path, before)


@pytest.mark.slow
def test_corrupt_bitshuffle_payload_with_worker_processes_is_an_input_error(scan, tmp_path, out):
    """The chunk check runs where the frames are read: in the dask workers too, whose
    InputError reaches the command (exit 2) instead of a crash (workers dying until dask
    gives up)."""
    out_path, before = out
    bad = copy_scan(scan, tmp_path / "in")
    corrupt_chunk(bad, 3, keep=16)  # simulated scans store one frame per bitshuffle chunk
    cfg = write_yaml(tmp_path / "run.yaml", run_config(scan, out_path, scan__source=str(bad),
                                                       compute__workers=2))
    line = error_line(cli("run", cfg), 2, worker_logs=True)
    assert str(bad) in line and "frames 2..3" in line and "frame 3 (HDF5 chunk at (3, 0, 0)) is a corrupt" in line
    assert_kept(out_path, before)

    proc = cli("integrate", bad, "--poni", bad.with_suffix(".poni"), "--workers", 2, "-o", out_path)
    line = error_line(proc, 2, worker_logs=True)
    assert str(bad) in line and "frame 3 (HDF5 chunk at (3, 0, 0)) is a corrupt bitshuffle-LZ4 chunk" in line
    assert_kept(out_path, before)


@pytest.mark.slow
def test_workers_dying_on_a_chunk_is_a_compute_error(scan, tmp_path):
    """A chunk whose reading kills every worker that tries it: dask gives up after its
    retries and the run stops with a ComputeError naming the frames and the scan."""
    import dask
    import dask.array as da

    from xrdmap.cluster import dask_client
    from xrdmap.errors import ComputeError

    frames = open_scan(scan, chunk_frames=2)
    dying = da.from_delayed(dask.delayed(os._exit)(70), (2, SIZE, SIZE), dtype=frames.dtype)
    frames = frames.copy(data=da.concatenate([frames.data[:2], dying, frames.data[4:]]))
    (tmp_path / "out").mkdir()
    cfg = validate_config(run_config(scan, tmp_path / "out" / "r.h5", compute__workers=2))
    with dask_client(workers=2) as client, pytest.raises(ComputeError) as exc:
        integrate_checkpointed(frames, cfg, client=client)
    message = str(exc.value)
    assert f"frames 2..3 of {frames.attrs['source']}" in message and "died repeatedly" in message


def test_a_failing_cluster_teardown_does_not_hide_the_error_of_the_work(monkeypatch):
    # distributed can raise while a cluster closes after its workers died (a nanny still
    # restarting one: "AssertionError: can only join a started process"); the error the
    # user sees must stay the one of the work
    import contextlib

    from xrdmap import cluster
    from xrdmap.errors import ComputeError

    @contextlib.contextmanager
    def teardown_fails(**_):
        try:
            yield "client"
        finally:
            raise AssertionError("can only join a started process")

    monkeypatch.setattr(cluster, "_open_client", teardown_fails)
    with pytest.raises(ComputeError, match="frames 2..3"):
        with cluster.dask_client(workers=2):
            raise ComputeError("integration of frames 2..3 failed")
    # without an error of the work, the teardown's error is not hidden
    with pytest.raises(AssertionError, match="can only join"):
        with cluster.dask_client(workers=2):
            pass


def test_corrupt_bitshuffle_header_is_an_input_error(scan, tmp_path, out):
    out_path, before = out
    bad = copy_scan(scan, tmp_path / "in")
    corrupt_chunk(bad, 3, keep=8)  # garbled block size in the bitshuffle header
    line = error_line(cli("integrate", bad, "--poni", bad.with_suffix(".poni"), "-o", out_path), 2)
    assert str(bad) in line and f"frames 0..{POINTS - 1} of {DETECTOR_FRAMES} could not be read" in line
    assert "frame 3 (HDF5 chunk at (3, 0, 0)) is a corrupt bitshuffle-LZ4 chunk (header gives blocks of" in line
    assert_kept(out_path, before)


def test_corrupt_bitshuffle_payload_in_process_is_an_input_error(scan, tmp_path, out):
    """Garbled block sizes inside a bitshuffle-LZ4 chunk whose header is intact: hdf5plugin's
    decoder would read outside the chunk and kill the process (SIGSEGV, no message). xrdmap
    checks each chunk's block structure first, so an in-process run stops with exit 2
    naming the file, the dataset and the frame.

    The Python API runs in a child process too, so that a regression crashes the child and
    not the test session."""
    out_path, before = out
    bad = copy_scan(scan, tmp_path / "in")
    corrupt_chunk(bad, 3, keep=16)  # one frame per chunk: frame 3; chunk_frames=2: frames 2..3
    expected = f"frames 2..3 of {DETECTOR_FRAMES} could not be read: frame 3 (HDF5 chunk at (3, 0, 0)) " \
               "is a corrupt bitshuffle-LZ4 chunk"

    proc = cli("integrate", bad, "--poni", bad.with_suffix(".poni"), "--chunk-frames", 2, "-o", out_path)
    line = error_line(proc, 2)
    assert str(bad) in line and expected in line and "expected intact compressed data" in line
    assert_kept(out_path, before)

    cfg = write_yaml(tmp_path / "run.yaml", run_config(scan, out_path, scan__source=str(bad)))
    line = error_line(cli("run", cfg), 2)
    assert str(bad) in line and expected in line
    assert_kept(out_path, before)

    api = textwrap.dedent(f"""
        from xrdmap.config import load_config
        from xrdmap.errors import InputError
        from xrdmap.pipeline import run
        try:
            run(load_config({str(cfg)!r}))
        except InputError as exc:
            print("InputError:", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("InputError: ") and str(bad) in proc.stdout and expected in proc.stdout
    assert_kept(out_path, before)


# --------------------------------------------------------------------------------------
# missing frames, frames of the wrong shape
# --------------------------------------------------------------------------------------


def _tiff_series(scan: Path, folder: Path, n: int = 6) -> list[Path]:
    from fabio.tifimage import TifImage

    folder.mkdir()
    frames = read_frames(scan)[:n].astype(np.int32)
    paths = []
    for i, frame in enumerate(frames):
        p = folder / f"frame_{i:03d}.tif"
        TifImage(data=frame).write(str(p))
        paths.append(p)
    return paths


def test_missing_frame_files_in_a_series(scan, tmp_path, out):
    out_path, before = out
    paths = _tiff_series(scan, tmp_path / "series")
    paths[3].unlink()
    with pytest.raises(InputError, match="1 of 6 frame files do not exist") as exc:
        open_scan([str(p) for p in paths])
    assert "frame_003.tif" in str(exc.value)

    proc = cli("integrate", *paths, "--poni", scan.with_suffix(".poni"), "-o", out_path)
    line = error_line(proc, 2)
    assert "1 of 6 frame files do not exist" in line and "frame_003.tif" in line
    assert_kept(out_path, before)

    data = run_config(scan, out_path, scan__source=[str(p) for p in paths], scan__positions="0,0.1")
    line = error_line(cli("run", write_yaml(tmp_path / "run.yaml", data)), 2)
    assert "frame_003.tif" in line and "do not exist" in line
    assert_kept(out_path, before)


def test_frame_file_removed_after_opening_is_named(scan, tmp_path):
    paths = _tiff_series(scan, tmp_path / "series")
    frames = open_scan([str(p) for p in paths], chunk_frames=2)
    paths[4].unlink()
    with pytest.raises(InputError, match="could not be read as an image") as exc:
        frames.compute()
    assert str(paths[4]) in str(exc.value)


def _scan_missing_last_frame(scan: Path, folder: Path) -> Path:
    bad = copy_scan(scan, folder)
    rewrite_frames(bad, read_frames(scan)[:-1])  # one frame lost; positions and monitor still 8
    return bad


def test_hdf5_with_fewer_frames_than_positions(scan, tmp_path, out):
    out_path, before = out
    bad = _scan_missing_last_frame(scan, tmp_path / "in")
    for key, path in (("position", "/entry/data/position"), ("monitor", "/entry/monitor/data")):
        with pytest.raises(InputError, match="8 values but the scan has 7 frames.*expected one") as exc:
            open_scan(bad, **{f"{key}s_path" if key == "position" else f"{key}_path": path})
        assert f"values from {bad}:/entry/" in str(exc.value)  # the first axis found of the wrong length

    proc = cli("integrate", bad, "--poni", bad.with_suffix(".poni"), "--monitor-path", "/entry/monitor/data",
               "-o", out_path)
    line = error_line(proc, 2)
    assert f"values from {bad}:/entry/" in line and "8 values but the scan has 7 frames" in line
    assert_kept(out_path, before)

    data = run_config(scan, out_path, scan__source=str(bad), scan__positions_path="/entry/data/position")
    line = error_line(cli("run", write_yaml(tmp_path / "run.yaml", data)), 2)
    assert f"values from {bad}:/entry/" in line and "8 values but the scan has 7 frames" in line
    assert_kept(out_path, before)


def test_hdf5_missing_a_frame_is_noticed_without_explicit_paths(scan, tmp_path):
    bad = _scan_missing_last_frame(scan, tmp_path / "in")
    with pytest.raises(InputError, match="8 values but the scan has 7 frames"):
        open_scan(bad)


def test_series_frame_of_the_wrong_shape(scan, tmp_path, out):
    from fabio.tifimage import TifImage

    out_path, before = out
    paths = _tiff_series(scan, tmp_path / "series")
    TifImage(data=np.zeros((SIZE, SIZE - 16), np.int32)).write(str(paths[5]))
    expected = r"frame_005.tif' has shape \(96, 80\) but '.*frame_000.tif' has \(96, 96\); expected all series"
    with pytest.raises(InputError, match=expected):
        open_scan([str(p) for p in paths], chunk_frames=2)

    proc = cli("integrate", *paths, "--poni", scan.with_suffix(".poni"), "--chunk-frames", 2, "-o", out_path)
    line = error_line(proc, 2)
    assert "frame_005.tif" in line and "(96, 80)" in line and "(96, 96)" in line
    assert_kept(out_path, before)


def test_frames_dataset_that_is_not_a_stack(scan, tmp_path, out):
    out_path, before = out
    dark = "/entry/instrument/detector/dark"
    with pytest.raises(InputError) as exc:
        open_scan(scan, frames_path=dark)
    assert dark in str(exc.value) and "(96, 96)" in str(exc.value) and "3-D" in str(exc.value)
    proc = cli("integrate", scan, "--frames-path", dark, "--poni", scan.with_suffix(".poni"), "-o", out_path)
    line = error_line(proc, 2)
    assert dark in line and "3-D" in line
    assert_kept(out_path, before)


def test_poni_for_another_detector(scan, tmp_path, out):
    out_path, _ = out
    poni = tmp_path / "pilatus.poni"
    poni.write_text(
        "poni_version: 2.1\nDetector: Pilatus1M\nDetector_config: {\"orientation\": 3}\n"
        "Distance: 0.35\nPoni1: 0.08\nPoni2: 0.08\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1.6e-11\n"
    )
    expected = (f"frames have shape (96, 96) but PONI file {str(poni)!r} is for detector Pilatus 1M, "
                "which expects (1043, 981); expected a PONI of the detector that recorded the frames")
    with pytest.raises(InputError) as exc:
        integrate_scan(open_scan(scan), poni)
    assert expected in str(exc.value)

    cfg = write_yaml(tmp_path / "run.yaml", run_config(scan, out_path, geometry__poni=str(poni)))
    assert_commands_fail(expected, out, ("integrate", scan, "--poni", poni, "-o", out_path), ("run", cfg))

    garbage = tmp_path / "garbage.poni"
    garbage.write_text("Distance: far\n")
    with pytest.raises(InputError, match=r"PONI file '.*garbage\.poni' could not be read as pyFAI geometry"):
        integrate_scan(open_scan(scan), garbage)


# --------------------------------------------------------------------------------------
# NaN/inf and saturated pixels
# --------------------------------------------------------------------------------------


def test_nan_and_inf_pixels_are_left_out_and_counted(nan_scan, scan):
    path, bad = nan_scan
    poni = path.with_suffix(".poni")
    mask = np.load(path.with_suffix(".mask.npy")).astype(bool)
    ds = integrate_scan(open_scan(path), poni, mask=mask, npt=400, q_range=(0.5, 20)).compute()
    expected = np.zeros(POINTS, int)
    for k, pixels in bad.items():
        expected[k] = pixels.size
    np.testing.assert_array_equal(ds["masked_pixels"].values, expected)
    assert np.isfinite(ds["iq"].values).all()
    # independent truth: the clean frame integrated with those pixels added to the static mask
    clean = read_frames(scan).astype(np.float32)
    monitor = open_scan(scan).coords["monitor"].values
    for k, pixels in bad.items():
        extra = mask.copy().reshape(-1)
        extra[pixels] = True
        one = xr.DataArray(clean[k:k + 1], dims=("point", "y", "x"),
                           coords={"monitor": ("point", monitor[k:k + 1])})
        ref = integrate_scan(one, poni, mask=extra.reshape(mask.shape), npt=400, q_range=(0.5, 20)).compute()
        np.testing.assert_allclose(ds["iq"].values[k], ref["iq"].values[0], rtol=1e-6)
        np.testing.assert_allclose(ds["iq_sigma"].values[k], ref["iq_sigma"].values[0], rtol=1e-6)


def test_nan_pixels_through_the_integrate_command(nan_scan, tmp_path):
    path, bad = nan_scan
    result = tmp_path / "nan.h5"
    proc = cli("integrate", path, "--poni", path.with_suffix(".poni"), "--mask", path.with_suffix(".mask.npy"),
               "--npt", 300, "-o", result)
    assert proc.returncode == 0, proc.stderr
    assert f"{sum(p.size for p in bad.values())} NaN/inf pixels left out" in proc.stderr
    ds = open_result(result)
    assert [int(v) for v in ds["masked_pixels"].values] == [bad.get(k, np.empty(0)).size for k in range(POINTS)]
    assert np.isfinite(ds["iq"].values).all()


def test_saturated_pixels_are_left_out_and_counted(scan):
    frames = np.minimum(read_frames(scan), 60000).astype(np.uint16)
    mask = np.load(scan.with_suffix(".mask.npy")).astype(bool)
    pixels = _bad_pixels(scan.with_suffix(".poni"), mask, 5, 3)
    frames[2].reshape(-1)[pixels] = np.iinfo(np.uint16).max
    scan_da = xr.DataArray(frames, dims=("point", "y", "x"))
    ds = integrate_scan(scan_da, scan.with_suffix(".poni"), mask=mask, npt=300).compute()
    assert int(ds["masked_pixels"][2]) == 5


# --------------------------------------------------------------------------------------
# monitor
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -5.0])
def test_zero_or_negative_monitor(scan, tmp_path, out, value):
    out_path, _ = out
    bad = copy_scan(scan, tmp_path / "in")
    with h5py.File(bad, "r+") as fh:
        mon = fh["entry/monitor/data"]
        values = mon[()]
        values[3] = value
        mon[...] = values
    expected = f"monitor from {bad}:/entry/monitor/data: 1 zero or negative values at points 3; expected positive counts"
    with pytest.raises(InputError) as exc:
        open_scan(bad)
    assert expected in str(exc.value)
    frames = open_scan(scan)
    monitor = frames.coords["monitor"].values.copy()
    monitor[5] = value
    with pytest.raises(InputError, match=f"monitor of point 5 is {value}: expected positive monitor counts"):
        integrate_scan(frames.assign_coords(monitor=("point", monitor)), scan.with_suffix(".poni"))

    cfg = write_yaml(tmp_path / "run.yaml", run_config(scan, out_path, scan__source=str(bad)))
    assert_commands_fail(expected, out, ("integrate", bad, "--poni", bad.with_suffix(".poni"), "-o", out_path),
                         ("run", cfg))


# --------------------------------------------------------------------------------------
# configuration: composition typos and schema errors
# --------------------------------------------------------------------------------------


def test_composition_typo_in_a_run_config_fails_before_integrating(scan, tmp_path, out):
    out_path, before = out
    data = run_config(scan, out_path, pdf__composition="Li3V2(PO4")
    with pytest.raises(ConfigError, match=r"pdf\.composition: .*'Li3V2\(PO4': .*unbalanced"):
        run(validate_config(data))
    assert not out_path.with_name("result.h5.checkpoint").exists()

    line = error_line(cli("run", write_yaml(tmp_path / "run.yaml", data)), 3)
    assert "pdf.composition" in line and "'Li3V2(PO4'" in line and "unbalanced" in line
    assert_kept(out_path, before)
    assert not out_path.with_name("result.h5.checkpoint").exists()


def test_composition_typo_is_rejected_by_config_validation(scan, tmp_path):
    data = run_config(scan, tmp_path / "r.h5", pdf__composition="Li3V2(PO4")
    with pytest.raises(ConfigError, match=r"pdf\.composition"):
        validate_config(data)


@pytest.mark.parametrize("composition, needle", [
    ("Li3V2(PO4", "'Li3V2(PO4': unbalanced '(' (expected a ')' after each '(')"),
    ("Xx2O3", "'Xx2O3': unknown element 'Xx' (expected a chemical symbol such as Li, V, P, O)"),
    ("0.6 LVP + 0.4 LATP", "'0.6 LVP + 0.4 LATP': mixture term 'LVP': unknown element 'L' (expected a chemical"),
])
def test_composition_typo_on_the_pdf_command(tmp_path, composition, needle):
    q = np.linspace(0.5, 20, 400)
    pattern = tmp_path / "sample.xy"
    np.savetxt(pattern, np.column_stack([q, 100 + 10 * np.sin(q)]))
    (tmp_path / "gr").mkdir()
    proc = cli("pdf", pattern, "--composition", composition, "--qmax", 18, "-o", tmp_path / "gr")
    line = error_line(proc, 2)
    assert "composition" in line and needle in line
    assert list((tmp_path / "gr").iterdir()) == []


@pytest.mark.parametrize("section, key, value, needle", [
    ("integration", "nbins", 2000, "integration.nbins: unknown key"),
    ("integration", "npt", "lots", "integration.npt: Input should be a valid integer"),
    ("integration", "npt", -3, "integration.npt: Input should be greater than or equal to 2 (got -3)"),
    ("pdf", "qmin", 30.0, "pdf.qmin (30.0) must be below pdf.qmax (18.0)"),
    ("compute", "workers", "two", "compute.workers: Input should be a valid integer"),
    ("output", "formats", ["png", "jpeg"], "output.formats.1: Input should be 'png', 'svg' or 'pdf'"),
])
def test_config_schema_errors(scan, tmp_path, out, section, key, value, needle):
    out_path, before = out
    data = run_config(scan, out_path)
    data[section][key] = value
    cfg = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert needle in str(exc.value) and str(cfg) in str(exc.value)
    line = error_line(cli("run", cfg), 3)
    assert needle in line and str(cfg) in line
    assert_kept(out_path, before)


def test_config_file_problems(tmp_path, out):
    out_path, before = out
    missing = tmp_path / "missing.yaml"
    line = error_line(cli("run", missing), 3)
    assert str(missing) in line and "does not exist" in line
    broken = tmp_path / "broken.yaml"
    broken.write_text("scan: {source: [unclosed\n")
    line = error_line(cli("run", broken), 3)
    assert str(broken) in line and "not valid YAML" in line
    top = tmp_path / "list.yaml"
    top.write_text("- scan\n- geometry\n")
    line = error_line(cli("run", top), 3)
    assert "expected a mapping of sections" in line
    minimal = tmp_path / "minimal.yaml"
    minimal.write_text("scan: {source: s.h5}\ngeometry: {poni: g.poni}\n")
    line = error_line(cli("run", minimal, "--set", "integration"), 3)
    assert "override 'integration': expected section.key=value" in line
    assert_kept(out_path, before)


# --------------------------------------------------------------------------------------
# output not writable, disk full
# --------------------------------------------------------------------------------------


def _unwritable_dirs(tmp_path: Path) -> list[Path]:
    """Directories that cannot take a new file, even for root."""
    afile = tmp_path / "a_file"
    afile.write_text("not a directory")
    places = [afile, Path("/proc")]
    if os.geteuid() != 0:  # chmod stops only non-root users
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o500)
        places.append(ro)
    return places


def test_output_not_writable(scan, tmp_path):
    ds = xr.Dataset({"iq": (("point", "q"), np.ones((2, 3)))})
    for folder in _unwritable_dirs(tmp_path):
        target = folder / "result.h5"
        with pytest.raises(OutputError) as exc:
            save_result(ds, target)
        assert str(target) in str(exc.value)
        proc = cli("integrate", scan, "--poni", scan.with_suffix(".poni"), "--npt", 200, "-o", target)
        line = error_line(proc, 4)
        assert str(target) in line
        data = run_config(scan, target)
        with pytest.raises(OutputError) as exc:
            run(validate_config(data))
        assert str(target) in str(exc.value)
        line = error_line(cli("run", write_yaml(tmp_path / "run.yaml", data)), 4)
        assert str(target) in line
    assert strays(tmp_path) == []


def test_output_path_that_is_a_directory(tmp_path):
    target = tmp_path / "result.h5"
    target.mkdir()
    with pytest.raises(OutputError, match="could not be written") as exc:
        save_result(xr.Dataset({"iq": ("q", np.ones(3))}), target)
    assert str(target) in str(exc.value)
    assert target.is_dir() and list(target.iterdir()) == []
    assert strays(tmp_path) == []


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_the_result(monkeypatch, out):
    from xrdmap import results

    out_path, before = out
    real = results._write_array
    calls = []

    def write_some_then_fail(group, name, values, *options):
        calls.append(name)
        if len(calls) == 3:  # the temporary file already holds a part of the result
            _enospc()
        return real(group, name, values, *options)

    monkeypatch.setattr(results, "_write_array", write_some_then_fail)
    ds = xr.Dataset({"iq": (("point", "q"), np.ones((4, 5))), "gr": (("point", "r"), np.ones((4, 6)))},
                    coords={"point": np.arange(4), "q": np.arange(5.0), "r": np.arange(6.0)})
    with pytest.raises(OutputError, match="No space left on device") as exc:
        save_result(ds, out_path)
    assert str(out_path) in str(exc.value)
    assert_kept(out_path, before)


def test_disk_full_when_renaming_the_result(monkeypatch, out):
    out_path, before = out
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(OutputError, match="No space left on device"):
        save_result(xr.Dataset({"iq": ("q", np.ones(3))}), out_path)
    monkeypatch.undo()
    assert_kept(out_path, before)


def test_disk_full_while_checkpointing_a_run(scan, tmp_path, out):
    """ENOSPC from the checkpoint writer (numpy.savez) inside `xrdmap run`: exit 4."""
    out_path, before = out
    cfg = write_yaml(tmp_path / "run.yaml", run_config(scan, out_path))
    script = textwrap.dedent(
        f"""
        import errno, os, sys
        import numpy as np
        real = np.savez
        calls = []
        def savez(path, **arrays):
            calls.append(path)
            if len(calls) == 2:
                with open(path, "wb") as fh:
                    fh.write(b"PK partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(path, **arrays)
        np.savez = savez
        sys.argv = ["xrdmap", "run", {str(cfg)!r}]
        from xrdmap.cli import main
        main()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    line = error_line(proc, 4)
    assert "result.h5.checkpoint/chunk_000001.npz" in line and "No space left on device" in line
    assert_kept(out_path, before)
    ckpt = out_path.with_name("result.h5.checkpoint")
    assert sorted(p.name for p in ckpt.iterdir()) == ["chunk_000000.npz", "engine", "key.json"]


def test_disk_full_while_writing_the_result_of_a_run(scan, tmp_path, out, monkeypatch):
    """ENOSPC at the very end of `xrdmap run` (saving the result): exit 4, checkpoints kept."""
    from xrdmap import results

    out_path, before = out
    data = run_config(scan, out_path, decompose__q_ranges=None, decompose__r_ranges=None,
                      pdf__enabled=False, phases__names=["LVP"])
    real = results._write_array

    def fail_on_iq(group, name, values, *options):
        if group.name.endswith("/iq"):
            _enospc()
        return real(group, name, values, *options)

    monkeypatch.setattr(results, "_write_array", fail_on_iq)
    with pytest.raises(OutputError, match="No space left on device") as exc:
        run(validate_config(data))
    assert str(out_path) in str(exc.value)
    assert_kept(out_path, before)
    ckpt = out_path.with_name("result.h5.checkpoint")
    assert len(list(ckpt.glob("chunk_*.npz"))) == POINTS // 2


# --------------------------------------------------------------------------------------
# a dask worker process killed mid-run
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_killed_mid_integration_gives_identical_numbers(scan, tmp_path):
    from xrdmap.cluster import dask_client

    reference_cfg = validate_config(run_config(scan, tmp_path / "a" / "r.h5", scan__chunk_frames=1))
    (tmp_path / "a").mkdir()
    reference = integrate_checkpointed(open_scan(scan, chunk_frames=1), reference_cfg)

    (tmp_path / "b").mkdir()
    cfg = validate_config(run_config(scan, tmp_path / "b" / "r.h5", scan__chunk_frames=1,
                                     compute__workers=2))
    killed = []
    with dask_client(workers=2) as client:
        before = set(client.scheduler_info()["workers"])

        def progress(done, total):
            if done == 1 and not killed:
                busy = [w for w, keys in client.processing().items() if keys] or sorted(before)
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                killed.append(busy[0])
                os.kill(pid, signal.SIGKILL)

        ds = integrate_checkpointed(open_scan(scan, chunk_frames=1), cfg, client=client, progress=progress)
        deadline = time.monotonic() + 60
        while killed[0] in client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert killed[0] not in client.scheduler_info()["workers"]
    for name in ("iq", "iq_sigma", "masked_pixels"):
        np.testing.assert_array_equal(ds[name].values, reference[name].values)


# --------------------------------------------------------------------------------------
# SIGINT, SIGTERM and SIGKILL during `xrdmap run`: keep the checkpoints, resume, same result
# --------------------------------------------------------------------------------------


# one frame per chunk; a lighter analysis (two reference phases, NMF in Q only)
RESUME = dict(scan__chunk_frames=1, phases__names=["LVP", "LATP"], decompose__r_ranges=None,
              decompose__max_components=3)
# integrated numbers come from the checkpoints and must be identical; what follows is
# floating-point work whose last bits may depend on memory alignment (BLAS)
EXACT = ("iq", "iq_sigma", "masked_pixels", "background")


@pytest.fixture(scope="module")
def uninterrupted(nan_scan, tmp_path_factory) -> tuple[Path, xr.Dataset]:
    """The NaN/inf scan run once without interruption (in-process, through the API)."""
    path, _ = nan_scan
    folder = tmp_path_factory.mktemp("reference")
    data = run_config(path, folder / "reference.h5", **RESUME)
    outputs = run(validate_config(data))
    return path, open_result(outputs.result)


def _wait_for_chunk(proc: subprocess.Popen, ckpt: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(ckpt.glob("chunk_*.npz")):
        assert proc.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, workers", [(signal.SIGINT, 130, 0), (signal.SIGKILL, -signal.SIGKILL, 0),
                                                (signal.SIGINT, 130, 2), (signal.SIGTERM, 143, 2)])
def test_interrupted_run_keeps_checkpoints_and_resumes(uninterrupted, tmp_path, out, sig, code, workers):
    import psutil

    path, reference = uninterrupted
    out_path, before = out
    cfg = write_yaml(tmp_path / "run.yaml", run_config(path, out_path, compute__workers=workers, **RESUME))
    ckpt = out_path.with_name("result.h5.checkpoint")
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.Popen([sys.executable, "-m", "xrdmap", "run", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_chunk(proc, ckpt)
        children = psutil.Process(proc.pid).children(recursive=True)  # dask scheduler/workers
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    if sig != signal.SIGKILL:  # caught: unwinds, cleans up, says so
        assert "Traceback" not in stderr
        if sig == signal.SIGTERM:
            assert error_line_of(stderr).startswith("error: terminated (SIGTERM)"), stderr[-3000:]
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], "worker processes outlived the interrupted run"
    kept = sorted(p.name for p in ckpt.glob("chunk_*.npz"))
    assert kept, "the finished chunks were not kept"
    assert_kept(out_path, before, checkpoints=sig != signal.SIGKILL)

    again = cli("run", cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming:" in again.stderr and f"of {POINTS} chunks already integrated" in again.stderr
    ds = open_result(out_path)
    assert set(ds.data_vars) == set(reference.data_vars)
    for name in reference.data_vars:
        got, want = ds[name].values, reference[name].values
        if name in EXACT or got.dtype.kind not in "fc":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-13, err_msg=name)
    np.testing.assert_array_equal(ds["masked_pixels"].values, reference["masked_pixels"].values)
    assert int(ds["masked_pixels"].sum()) == 10  # the NaN/inf pixels of frames 1 and 4
    assert not ckpt.exists()
    assert strays(out_path.parent) == []


# --------------------------------------------------------------------------------------
# property tests: PDFgetX3 .cfg parsing and the column readers
# --------------------------------------------------------------------------------------

_FLOAT = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)
_FORMULAS = ["Li3V2(PO4)3", "Ni", "CeO2", "Li1.3Al0.3Ti1.7(PO4)3", "LiVOPO4", "Li3PO4", "SiO2"]
_SAFE_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,()",
                     max_size=40)


@st.composite
def pdfgetx3_cfgs(draw):
    """Valid PDFgetX3 [DEFAULT] settings (values in the units PDFgetX3 uses)."""
    qmin = draw(st.floats(0.0, 2.0))
    qmax = qmin + draw(st.floats(5.0, 30.0))
    rmin = draw(st.floats(0.0, 2.0))
    values = {
        "dataformat": draw(st.sampled_from(["QA", "Qnm", "twotheta"])),
        "wavelength": draw(st.floats(0.05, 2.0)),
        "composition": draw(st.sampled_from(_FORMULAS)),
        "bgscale": draw(_FLOAT),
        "rpoly": draw(st.floats(0.5, 2.0)),
        "qmin": qmin,
        "qmax": qmax,
        "qmaxinst": qmax + draw(st.floats(0.0, 5.0)),
        "rmin": rmin,
        "rmax": rmin + draw(st.floats(5.0, 100.0)),
        "rstep": draw(st.sampled_from([0.01, 0.02, 0.005, 0.1])),
        "outputtype": draw(st.lists(st.sampled_from(["iq", "sq", "fq", "gr"]), min_size=1, max_size=4,
                                    unique=True)),
    }
    keys = draw(st.lists(st.sampled_from(sorted(values)), unique=True, min_size=1))
    chosen = {k: values[k] for k in keys}
    if chosen.get("dataformat") == "twotheta":
        chosen["wavelength"] = values["wavelength"]
    return chosen


def _cfg_text(settings_: dict, comments: list[str], blanks: int) -> str:
    lines = ["[DEFAULT]", ""]
    for i, (key, value) in enumerate(settings_.items()):
        if i < len(comments):
            lines.append(f"# {comments[i]}")
        text = ", ".join(value) if isinstance(value, list) else repr(value) if isinstance(value, float) else value
        lines.append(f"{key} = {text}")
        lines += [""] * (blanks if i % 2 else 0)
    return "\n".join(lines) + "\n"


def _read_cfg(path: Path) -> dict:
    import warnings

    from xrdmap.pdf import read_pdfgetx3_cfg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_pdfgetx3_cfg(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=pdfgetx3_cfgs(), comments=st.lists(_SAFE_TEXT, max_size=6), blanks=st.integers(0, 2))
def test_pdfgetx3_cfg_round_trips(tmp_path, values, comments, blanks):
    path = tmp_path / "pdfgetx3.cfg"
    path.write_text(_cfg_text(values, comments, blanks))
    read = _read_cfg(path)
    for key, value in values.items():
        assert read[key] == value, (key, read[key], value)


_GARBAGE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 _-.,()@!$%&*+/<>?|~", min_size=1,
                   max_size=30).filter(lambda s: s.strip() and s[0] not in " #;[")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=pdfgetx3_cfgs(), garbage=_GARBAGE, where=st.integers(0, 20))
def test_pdfgetx3_cfg_garbage_line_is_named(tmp_path, values, garbage, where):
    lines = _cfg_text(values, [], 0).splitlines()
    at = 1 + where % len(lines)  # after the [DEFAULT] header
    lines.insert(at, garbage)
    path = tmp_path / "pdfgetx3.cfg"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises((ConfigError, InputError)) as exc:
        _read_cfg(path)
    message = str(exc.value)
    assert path.name in message
    assert repr(garbage) in message or garbage in message or f"line {at + 1}" in message, message


def test_pdfgetx3_cfg_garbage_message_is_one_line(tmp_path):
    path = tmp_path / "x.cfg"
    path.write_text("[DEFAULT]\nqmax = 20\nhello world\n")
    with pytest.raises(ConfigError) as exc:
        _read_cfg(path)
    assert "hello world" in str(exc.value) and "\n" not in str(exc.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["qmin", "qmax", "rpoly", "rstep", "bgscale", "wavelength"]),
       value=st.text(alphabet="abcxyz!?/", min_size=1, max_size=10))
def test_pdfgetx3_cfg_non_numeric_value_names_the_key(tmp_path, key, value):
    path = tmp_path / "pdfgetx3.cfg"
    path.write_text(f"[DEFAULT]\ndataformat = QA\n{key} = {value}\n")
    with pytest.raises(ConfigError) as exc:
        _read_cfg(path)
    assert key in str(exc.value) and value in str(exc.value) and "expected a number" in str(exc.value)


_HEADER_LINE = st.one_of(
    _SAFE_TEXT.map(lambda s: "# " + s),
    # free text: always has a letter that no number contains, so never a row of numbers
    st.tuples(_SAFE_TEXT, st.sampled_from("gGhHkKLmMpPqQrRsStTuUvVwWyYzZ:=[]")).map(lambda t: t[1] + t[0]),
).filter(lambda s: "start data" not in s.lower())
_VALUE = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(_HEADER_LINE, max_size=15), ncol=st.integers(2, 4), nrow=st.integers(2, 40),
       data=st.data(), marker=st.booleans(), sep=st.sampled_from([" ", "\t", "  ", ", "]))
def test_column_reader_reads_back_exactly(tmp_path, header, ncol, nrow, data, marker, sep):
    from xrdmap.textio import read_columns, read_pattern

    values = np.array(data.draw(st.lists(st.lists(_VALUE, min_size=ncol, max_size=ncol),
                                         min_size=nrow, max_size=nrow)))
    lines = list(header) + (["#### start data"] if marker else [])
    lines += [sep.join(repr(float(v)) for v in row) for row in values]
    path = tmp_path / "pattern.xy"
    path.write_text("\n".join(lines) + "\n")
    np.testing.assert_array_equal(read_columns(path), values)
    pattern = read_pattern(path)
    order = np.argsort(values[:, 0], kind="stable")
    np.testing.assert_array_equal(pattern["q"].values, values[order, 0])
    np.testing.assert_array_equal(pattern.values, values[order, 1])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(_HEADER_LINE, max_size=10))
def test_column_reader_without_numbers_is_an_input_error(tmp_path, header):
    from xrdmap.textio import read_columns

    path = tmp_path / "empty.xy"
    path.write_text("\n".join(header) + "\n")
    with pytest.raises(InputError, match="no rows of numbers") as exc:
        read_columns(path)
    assert str(path) in str(exc.value)


def test_interrupt_swallowed_by_python_is_raised_again():
    """A Ctrl-C whose KeyboardInterrupt lands in a ``__del__`` is ignored by Python
    ("Exception ignored in ..."); the CLI's long commands still stop at their next step
    (CI saw `xrdmap run` finish with exit 0 after SIGINT that way)."""
    from xrdmap.cli import _app

    class Dies:
        def __del__(self):
            _app._on_signal(signal.SIGINT, None)

    _app._received.clear()
    try:
        Dies()  # the exception raised in __del__ is printed and dropped, not propagated
        with pytest.raises(KeyboardInterrupt):
            _app.raise_if_interrupted()
        _app._received[:] = [signal.SIGTERM]
        with pytest.raises(_app.Terminated):
            _app.raise_if_interrupted()
    finally:
        _app._received.clear()
    _app.raise_if_interrupted()  # nothing pending: no exception


def test_swallowed_interrupt_is_not_printed_but_other_unraisable_errors_are(capsys):
    # the CLI honours the swallowed interrupt itself (raise_if_interrupted), so Python's
    # "Exception ignored ... Traceback" would only bury its one-line message
    from xrdmap.cli import _app

    class Interrupts:
        def __del__(self):
            _app._on_signal(signal.SIGINT, None)

    class Fails:
        def __del__(self):
            raise ValueError("a real bug in a finaliser")

    previous, sys.unraisablehook = sys.unraisablehook, _app._unraisable
    _app._received.clear()
    try:
        Interrupts()
        assert capsys.readouterr().err == ""
        Fails()
        err = capsys.readouterr().err
        assert "Traceback" in err and "a real bug in a finaliser" in err
    finally:
        sys.unraisablehook = previous
        _app._received.clear()
