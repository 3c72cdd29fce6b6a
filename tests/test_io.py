"""Scan input: every format gives the frames that were written, lazily, with clear errors.

Truth: the numpy frames each test writes itself (HDF5 via h5py/hdf5plugin, images via fabio
and tifffile), analytic positions/times, and the SHA-256 test vector of FIPS 180-2.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct

import cloudpickle
import dask
import fabio
import h5py
import hdf5plugin
import numpy as np
import pytest
import tifffile
from fabio.cbfimage import CbfImage
from fabio.edfimage import EdfImage

from xrdmap import io
from xrdmap.errors import ConfigError, InputError

N, NY, NX = 12, 40, 32  # non-square frames catch transposes; 12 frames test natural sort


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    rng = np.random.default_rng(7)
    data = rng.poisson(200, (N, NY, NX)).astype(np.int32)
    data[:, 0, 0] = 1_000_000  # beyond 16 bits: CBF byte-offset escapes, no silent clipping
    data[:, 1, 2] = np.arange(N)  # each frame identifiable
    return data


def _nx(group: h5py.Group, cls: str) -> h5py.Group:
    group.attrs["NX_class"] = cls
    return group


def write_nexus(
    path, frames, *, filters=None, chunks=(2, NY, NX), monitor=None, z_um=None, time_s=None
):
    """NXentry/NXinstrument/NXdetector with an NXdata that links the frames (+ axes)."""
    n = frames.shape[0]
    with h5py.File(path, "w") as f:
        entry = _nx(f.create_group("entry"), "NXentry")
        det = _nx(entry.create_group("instrument/detector"), "NXdetector")
        _nx(entry["instrument"], "NXinstrument")
        det.create_dataset("data", data=frames, chunks=chunks, **(filters or {}))
        det["count_time"] = np.full(n, 0.1)
        data = _nx(entry.create_group("data"), "NXdata")
        data["data"] = det["data"]  # hard link, as NeXus writers do
        data.attrs["signal"] = "data"
        if z_um is not None:
            data["z"] = z_um
            data["z"].attrs["units"] = "um"
            data.attrs["axes"] = ["z", ".", "."]
        if time_s is not None:
            entry["time"] = time_s
            entry["time"].attrs["units"] = "s"
        if monitor is not None:
            mon = _nx(entry.create_group("monitor"), "NXmonitor")
            mon["data"] = monitor
    return path


def write_series(folder, frames, ext):
    folder.mkdir(exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        p = folder / f"frame{i}.{ext}"  # unpadded numbers: lexical order would be wrong
        if ext == "edf":
            EdfImage(data=frame).write(str(p))
        elif ext == "cbf":
            CbfImage(data=frame).write(str(p))
        else:
            tifffile.imwrite(p, frame)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "filters,filter_id",
    [
        (None, None),
        (hdf5plugin.Bitshuffle(cname="lz4"), 32008),
        (hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE), 32001),
    ],
    ids=["plain", "bitshuffle-lz4", "blosc-lz4"],
)
def test_hdf5_stacks_give_the_written_frames(tmp_path, frames, filters, filter_id):
    path = write_nexus(tmp_path / "scan.h5", frames, filters=filters)
    with h5py.File(path) as f:  # the filter really is applied
        plist = f["/entry/instrument/detector/data"].id.get_create_plist()
        ids = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    assert (filter_id in ids) if filter_id else not ids

    scan = io.open_scan(path)
    assert scan.name == "frames"
    assert scan.dims == ("point", "y", "x")
    assert scan.shape == frames.shape
    assert scan.dtype == np.int32
    assert scan.attrs["format"] == "hdf5"
    assert scan.attrs["frames_path"] == "/entry/instrument/detector/data"
    assert scan.attrs["source"] == str(path.resolve())
    np.testing.assert_array_equal(scan.point.values, np.arange(N))
    np.testing.assert_array_equal(scan.monitor.values, np.ones(N))
    np.testing.assert_array_equal(scan.compute().values, frames)
    # slices that cross dask chunks and HDF5 chunks, steps, fancy indices
    np.testing.assert_array_equal(scan[3:9, 5:30:3, -4:].values, frames[3:9, 5:30:3, -4:])
    np.testing.assert_array_equal(scan[[7, 1, 4]].values, frames[[7, 1, 4]])
    np.testing.assert_array_equal(scan[-1, 2].values, frames[-1, 2])


@pytest.mark.parametrize("ext", ["edf", "cbf", "tif"])
def test_image_series_give_the_written_frames(tmp_path, frames, ext):
    paths = write_series(tmp_path / ext, frames, ext)
    scan = io.open_scan(str(tmp_path / ext / f"frame*.{ext}"))
    assert scan.attrs["format"] == "fabio"
    assert scan.attrs["source"] == str(tmp_path / ext / f"frame*.{ext}")
    assert scan.attrs["frames_path"] == ""
    assert scan.dims == ("point", "y", "x")
    assert scan.dtype == np.int32
    np.testing.assert_array_equal(scan.compute().values, frames)  # natural order: 2 before 10

    order = [5, 0, 11, 2]
    listed = io.open_scan([str(paths[i]) for i in order])  # explicit list keeps its order
    np.testing.assert_array_equal(listed.compute().values, frames[order])
    np.testing.assert_array_equal(listed[2, 10:20, ::2].values, frames[11, 10:20, ::2])


def test_single_image_file_is_a_one_point_scan(tmp_path, frames):
    write_series(tmp_path, frames[:1], "edf")
    scan = io.open_scan(tmp_path / "frame0.edf")
    np.testing.assert_array_equal(scan.values, frames[:1])


def test_natural_sort_key():
    names = ["f10.tif", "f2.tif", "f1.tif", "f_b.tif", "f100.tif"]
    assert sorted(names, key=io.natural_sort_key)[:4] == ["f1.tif", "f2.tif", "f10.tif", "f100.tif"]


# ----------------------------------------------------------------------------- laziness


def test_opening_reads_no_frame_data_and_slices_read_only_their_frames(
    tmp_path, frames, monkeypatch
):
    path = write_nexus(tmp_path / "scan.h5", frames, chunks=(1, NY, NX))
    calls = []
    real = io._read_hdf5_frames

    def counting(filename, dpath, shape, idx, rest):
        calls.append(list(idx))
        return real(filename, dpath, shape, idx, rest)

    monkeypatch.setattr(io, "_read_hdf5_frames", counting)
    scan = io.open_scan(path, chunk_frames=6)
    assert calls == []
    assert scan.data.chunks[0] == (6, 6)
    np.testing.assert_array_equal(scan[8].values, frames[8])
    assert calls == [[8]]  # the slice reaches the reader: one frame read, not its chunk


def test_frames_are_read_at_compute_time_not_at_open(tmp_path, frames):
    path = write_nexus(tmp_path / "scan.h5", frames)
    scan = io.open_scan(path)
    with h5py.File(path, "r+") as f:
        f["/entry/instrument/detector/data"][...] = frames + 5
    np.testing.assert_array_equal(scan.values, frames + 5)


def test_series_open_reads_one_image_and_one_header(tmp_path, frames, monkeypatch):
    many = np.repeat(frames[:1], 300, axis=0)
    many[:, 1, 2] = np.arange(300)
    write_series(tmp_path / "s", many, "edf")
    counts = {"open": 0, "openheader": 0}
    real_open, real_header = fabio.open, fabio.openheader

    def fopen(*a, **k):
        counts["open"] += 1
        return real_open(*a, **k)

    def fheader(*a, **k):
        counts["openheader"] += 1
        return real_header(*a, **k)

    monkeypatch.setattr(fabio, "open", fopen)
    monkeypatch.setattr(fabio, "openheader", fheader)
    scan = io.open_scan(str(tmp_path / "s" / "*.edf"))
    assert counts == {"open": 1, "openheader": 1}  # first image, last header; the rest stat'ed
    assert scan.shape == many.shape
    assert scan.data.chunks[0] == (256, 44)  # at most SERIES_CHUNK_FILES files per task
    np.testing.assert_array_equal(scan[[0, 150, 299], 1, 2].values, [0, 150, 299])


def test_graph_is_picklable_small_and_runs_in_other_processes(tmp_path, frames):
    path = write_nexus(tmp_path / "scan.h5", frames, filters=hdf5plugin.Bitshuffle(cname="lz4"))
    scan = io.open_scan(path, chunk_frames=4)
    graph = dict(scan.data.__dask_graph__())
    raw = pickle.dumps(graph)  # plain pickle fails on any h5py object
    assert len(cloudpickle.dumps(graph)) < frames.nbytes / 10
    assert len(raw) < 4000
    (result,) = dask.compute(scan.data, scheduler="processes", num_workers=2)
    np.testing.assert_array_equal(result, frames)


def test_big_time_series_opens_without_per_frame_work(tmp_path, monkeypatch):
    n = 20_000
    path = tmp_path / "series.h5"
    with h5py.File(path, "w") as f:
        # 655 MB of float64 frames on paper; unwritten chunks take no space
        f.create_dataset("frames", shape=(n, 64, 64), dtype="f8", chunks=(1000, 64, 64))
    reads = []
    monkeypatch.setattr(io, "_read_hdf5_frames", lambda *a: reads.append(a))
    scan = io.open_scan(path, times="0,0.001")
    assert reads == []
    assert scan.sizes["point"] == n
    assert scan.time.values[-1] == pytest.approx(19.999)
    assert scan.time.attrs["units"] == "s"
    # default chunking: 64 MiB / 32 KiB frames = 2048, rounded down to whole HDF5 chunks
    assert scan.data.chunks[0] == (2000,) * 10
    assert len(pickle.dumps(dict(scan.data.__dask_graph__()))) < 20_000


def test_default_chunk_frames():
    assert io.default_chunk_frames((2880, 2880), np.int32) == 2  # 64 MiB / 33.2 MB
    assert io.default_chunk_frames((2880, 2880), np.int32, file_chunk=4) == 4
    assert io.default_chunk_frames((512, 512), np.float32) == 64
    assert io.default_chunk_frames((512, 512), np.float32, file_chunk=10) == 60
    assert io.default_chunk_frames((4096, 4096), np.float64) == 1


# ----------------------------------------------------------------------------- auto-detection


def test_nexus_detector_layout_finds_positions_time_and_monitor(tmp_path, frames):
    z_um = 250.0 + 10.0 * np.arange(N)
    monitor = np.linspace(0.9, 1.1, N)
    path = write_nexus(
        tmp_path / "scan.h5", frames, z_um=z_um, time_s=0.5 * np.arange(N), monitor=monitor
    )
    with h5py.File(path, "a") as f:  # a decoy stack not referenced by any NeXus class
        f["/entry/processing/background"] = np.zeros((3, 4, 5))
    scan = io.open_scan(path)
    assert scan.attrs["frames_path"] == "/entry/instrument/detector/data"
    np.testing.assert_allclose(scan.position.values, 0.25 + 0.01 * np.arange(N))  # um -> mm
    assert scan.position.attrs["units"] == "mm"
    np.testing.assert_allclose(scan.time.values, 0.5 * np.arange(N))
    np.testing.assert_allclose(scan.monitor.values, monitor)
    assert "/entry/monitor/data" in scan.monitor.attrs["source"]


@pytest.mark.parametrize("legacy", [False, True])
def test_nxdata_signal_layout(tmp_path, frames, legacy):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        entry = _nx(f.create_group("scan"), "NXentry")
        data = _nx(entry.create_group("measurement"), "NXdata")
        data["images"] = frames
        data["pos"] = np.linspace(1.0, 2.1, N)
        if legacy:
            data["images"].attrs["signal"] = 1
            data["images"].attrs["axes"] = "pos:y:x"
        else:
            data.attrs["signal"] = "images"
            data.attrs["pos_indices"] = 0
        f["/scan/dark_stack"] = np.zeros((2, NY, NX))  # second 3-D dataset: not the signal
    scan = io.open_scan(path)
    assert scan.attrs["frames_path"] == "/scan/measurement/images"
    np.testing.assert_array_equal(scan.values, frames)
    np.testing.assert_allclose(scan.position.values, np.linspace(1.0, 2.1, N))
    assert "time" not in scan.coords


def test_unique_3d_dataset_and_nxpositioner(tmp_path, frames):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["raw/stack"] = frames
        f["raw/mask"] = np.zeros((NY, NX), dtype=np.uint8)
        stage = _nx(f.create_group("raw/sample_z"), "NXpositioner")
        stage["value"] = np.arange(N) * 2e-3
        stage["value"].attrs["units"] = "m"
    scan = io.open_scan(path)
    assert scan.attrs["frames_path"] == "/raw/stack"
    np.testing.assert_allclose(scan.position.values, 2.0 * np.arange(N))  # m -> mm


def test_frames_behind_an_external_link(tmp_path, frames):
    """Detector master files link the frames from a data file; chunks read through the link."""
    (tmp_path / "data").mkdir()
    with h5py.File(tmp_path / "data" / "data_000001.h5", "w") as f:
        f.create_dataset("entry/data/data", data=frames, **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(tmp_path / "master.h5", "w") as f:
        det = _nx(f.create_group("entry/instrument/eiger"), "NXdetector")
        det["data"] = h5py.ExternalLink("data/data_000001.h5", "/entry/data/data")
    scan = io.open_scan(tmp_path / "master.h5", chunk_frames=5)
    assert scan.attrs["frames_path"] == "/entry/instrument/eiger/data"
    np.testing.assert_array_equal(scan.values, frames)


def test_ambiguous_stacks_need_frames_path(tmp_path, frames):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["a/stack"] = frames
        f["b/stack"] = frames[::-1]
    msg = _raises(r"2 candidate frame stacks.*pass frames_path", io.open_scan, path)
    assert "/a/stack (12, 40, 32)" in msg and "/b/stack (12, 40, 32)" in msg
    np.testing.assert_array_equal(io.open_scan(path, frames_path="/b/stack").values, frames[::-1])
    with h5py.File(path, "a") as f:
        g = _nx(f.create_group("c"), "NXdata")
        g["sig"] = frames[:, ::-1]
        g.attrs["signal"] = "sig"
    np.testing.assert_array_equal(io.open_scan(path).values, frames[:, ::-1])  # NXdata signal wins
    np.testing.assert_array_equal(io.open_scan(path, frames_path="/c").values, frames[:, ::-1])


# ----------------------------------------------------------------------------- coordinates


def test_positions_and_times_from_csv_and_start_step(tmp_path, frames):
    path = write_nexus(tmp_path / "scan.h5", frames)
    csv = tmp_path / "motors.csv"
    z = 3.0 - 0.05 * np.arange(N)
    t = 100.0 + 2.0 * np.arange(N)
    mon = 1e5 + np.arange(N)
    csv.write_text(
        "point,z_mm,t_s,I0\n"
        + "".join(f"{i},{float(z[i])!r},{float(t[i])!r},{float(mon[i])!r}\n" for i in range(N))
    )
    scan = io.open_scan(path, positions=f"{csv}:z_mm", times=f"{csv}:t_s", monitor_path=f"{csv}:I0")
    np.testing.assert_array_equal(scan.position.values, z)
    np.testing.assert_array_equal(scan.time.values, t)
    np.testing.assert_array_equal(scan.monitor.values, mon)

    scan = io.open_scan(path, positions="-1.5,0.025", times="10,0.1")
    np.testing.assert_allclose(scan.position.values, -1.5 + 0.025 * np.arange(N))
    np.testing.assert_allclose(scan.time.values, 10 + 0.1 * np.arange(N))

    series = write_series(tmp_path / "img", frames, "tif")
    scan = io.open_scan(series, positions=f"{csv}:z_mm", times=np.arange(N) * 3.0)
    np.testing.assert_array_equal(scan.position.values, z)
    np.testing.assert_array_equal(scan.time.values, 3.0 * np.arange(N))


def test_paths_in_the_scan_file_with_units(tmp_path, frames):
    path = write_nexus(tmp_path / "scan.h5", frames)
    with h5py.File(path, "a") as f:
        f["/entry/motors/y"] = np.arange(N) * 100.0
        f["/entry/motors/y"].attrs["units"] = "um"
        f["/entry/clock/t"] = np.arange(N) * 40.0
        f["/entry/clock/t"].attrs["units"] = "ms"
        f["/entry/diode/i0"] = np.full(N, 7.0)
    scan = io.open_scan(
        path,
        positions_path="/entry/motors/y",
        times_path="/entry/clock/t",
        monitor_path="/entry/diode/i0",
    )
    np.testing.assert_allclose(scan.position.values, 0.1 * np.arange(N))
    np.testing.assert_allclose(scan.time.values, 0.04 * np.arange(N))
    np.testing.assert_array_equal(scan.monitor.values, np.full(N, 7.0))


# ----------------------------------------------------------------------------- errors


def _raises(match, func, *args, **kwargs) -> str:
    with pytest.raises(InputError, match=match) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_and_non_hdf5_and_truncated_files(tmp_path, frames):
    _raises("nope.h5.*does not exist", io.open_scan, tmp_path / "nope.h5")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    _raises("notes.h5.*not an HDF5 file", io.open_scan, text)
    other = tmp_path / "notes.dat"
    other.write_text("neither an image")
    _raises("notes.dat.*could not be read as an image", io.open_scan, other)

    path = write_nexus(tmp_path / "cut.h5", frames)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    _raises(r"cut\.h5.*could not be opened as HDF5.*truncated", io.open_scan, path)
    _raises("is a directory", io.open_scan, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path, frames):
    path = write_nexus(tmp_path / "locked.h5", frames)
    path.chmod(0)
    _raises("locked.h5.*not readable", io.open_scan, path)


def test_dataset_errors_name_the_dataset(tmp_path, frames):
    path = tmp_path / "scan.h5"
    with h5py.File(path, "w") as f:
        f["entry/data/data"] = np.zeros((10, 512))
        f["entry/other/stack"] = frames
    msg = _raises(r"/entry/nothing not found", io.open_scan, path, frames_path="/entry/nothing")
    assert "/entry/other/stack (12, 40, 32)" in msg  # candidates listed
    _raises(
        r"frames dataset /entry/data/data has shape \(10, 512\) but a 3-D stack \(point, y, x\) was expected",
        io.open_scan,
        path,
        frames_path="/entry/data/data",
    )
    two_d = tmp_path / "image.h5"
    with h5py.File(two_d, "w") as f:
        d = _nx(f.create_group("entry/data"), "NXdata")
        d["data"] = np.zeros((10, 512))
        d.attrs["signal"] = "data"
    _raises(
        r"image\.h5.*/entry/data/data has shape \(10, 512\) but a 3-D stack", io.open_scan, two_d
    )
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f["x"] = np.zeros(3)
    _raises(r"empty\.h5.*no frames stack found", io.open_scan, empty)
    _raises(
        r"monitor dataset /entry/i0 not found",
        io.open_scan,
        path,
        frames_path="/entry/other/stack",
        monitor_path="/entry/i0",
    )


def test_series_errors(tmp_path, frames):
    _raises(
        r"glob '.*nothing\*\.tif' matched no files", io.open_scan, str(tmp_path / "nothing*.tif")
    )

    paths = write_series(tmp_path / "s", frames[:4], "edf")
    missing = [
        str(paths[0]),
        str(tmp_path / "s" / "gone1.edf"),
        str(paths[1]),
        str(tmp_path / "s" / "gone2.edf"),
    ]
    msg = _raises(r"2 of 4 frame files do not exist", io.open_scan, missing)
    assert "gone1.edf" in msg and "gone2.edf" in msg

    EdfImage(data=np.zeros((NY, NX + 1), np.int32)).write(str(tmp_path / "s" / "frame2.edf"))
    _raises(
        r"frame2\.edf.*shape \(40, 33\).*frame0\.edf.*\(40, 32\)",
        io.open_scan,
        str(tmp_path / "s" / "*.edf"),
    )


def test_series_frame_of_other_shape_but_same_size_is_caught_when_read(tmp_path, frames):
    write_series(tmp_path / "s", frames[:4], "edf")
    EdfImage(data=np.zeros((NX, NY), np.int32)).write(
        str(tmp_path / "s" / "frame1.edf")
    )  # transposed
    scan = io.open_scan(str(tmp_path / "s" / "*.edf"))  # same byte count: not caught at open
    np.testing.assert_array_equal(scan[2:].values, frames[2:4])
    with pytest.raises(InputError, match=r"frame1\.edf.*has shape \(32, 40\).*\(40, 32\)"):
        scan.compute()


def test_series_frame_of_wider_dtype_is_caught_when_read(tmp_path, frames):
    write_series(tmp_path / "s", frames[:3], "edf")
    EdfImage(data=frames[2].astype(np.float32) + 0.5).write(str(tmp_path / "s" / "frame2.edf"))
    scan = io.open_scan(str(tmp_path / "s" / "*.edf"))
    assert scan.dtype == np.int32
    with pytest.raises(
        InputError, match=r"frame2\.edf.*dtype float32 but the series frames are int32"
    ):
        scan.compute()


def test_coordinate_errors(tmp_path, frames):
    path = write_nexus(tmp_path / "scan.h5", frames)
    short = tmp_path / "short.csv"
    short.write_text("z\n" + "\n".join(str(i) for i in range(N - 1)) + "\n")
    _raises(
        rf"position values from .*short\.csv:z.*{N - 1} values but the scan has {N} frames",
        io.open_scan,
        path,
        positions=f"{short}:z",
    )
    _raises(
        r"positions argument: 3 values but the scan has 12",
        io.open_scan,
        path,
        positions=[1.0, 2.0, 3.0],
    )

    bad = tmp_path / "bad.csv"
    bad.write_text("z,t\n" + "\n".join(f"{i},{'abc' if i == 4 else i}" for i in range(N)) + "\n")
    _raises(
        r"bad\.csv.*column 't' line 6 value 'abc' is not a number",
        io.open_scan,
        path,
        times=f"{bad}:t",
    )
    _raises(
        r"bad\.csv.*no column 'x'; columns are \['z', 't'\]",
        io.open_scan,
        path,
        positions=f"{bad}:x",
    )

    nan = np.arange(N, dtype=float)
    nan[[2, 9]] = np.nan
    _raises(r"position values .*2 not finite .* points 2, 9", io.open_scan, path, positions=nan)
    _raises(r"positions 'z=3': expected 'file.csv:column'", io.open_scan, path, positions="z=3")

    with h5py.File(path, "a") as f:
        mon = np.ones(N)
        mon[[3, 7]] = [0.0, -2.0]
        f["/entry/mon_bad"] = mon
        f["/entry/names"] = np.array([b"a"] * N)
    _raises(
        rf"monitor from {re.escape(str(path))}:/entry/mon_bad: 2 zero or negative values at points 3, 7",
        io.open_scan,
        path,
        monitor_path="/entry/mon_bad",
    )
    _raises(
        rf"position values from {re.escape(str(path))}:/entry/names.*have dtype \|S1; expected numbers",
        io.open_scan,
        path,
        positions_path="/entry/names",
    )


def test_configuration_errors(tmp_path, frames):
    path = write_nexus(tmp_path / "scan.h5", frames)
    with pytest.raises(ConfigError, match="chunk_frames"):
        io.open_scan(path, chunk_frames=0)
    with pytest.raises(ConfigError, match="positions and positions_path"):
        io.open_scan(path, positions="0,1", positions_path="/x")


def test_monitor_from_nxmonitor_is_validated(tmp_path, frames):
    monitor = np.ones(N)
    monitor[5] = 0.0
    path = write_nexus(tmp_path / "scan.h5", frames, monitor=monitor)
    _raises(
        rf"monitor from {re.escape(str(path))}:/entry/monitor/data: 1 zero or negative values at points 5",
        io.open_scan,
        path,
    )


# ----------------------------------------------------------------------------- single images


def test_read_image_formats(tmp_path, frames):
    image = frames[3]
    EdfImage(data=image).write(str(tmp_path / "a.edf"))
    CbfImage(data=image).write(str(tmp_path / "a.cbf"))
    tifffile.imwrite(tmp_path / "a.tif", image)
    np.save(tmp_path / "a.npy", image)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["entry/mask"] = image
        f["entry/stack"] = frames
        f["entry/one"] = image[None]
    with h5py.File(tmp_path / "single.h5", "w") as f:
        f.create_dataset("m", data=image, **hdf5plugin.Blosc())
    for name in ("a.edf", "a.cbf", "a.tif", "a.npy", "single.h5"):
        got = io.read_image(tmp_path / name)
        assert got.shape == (NY, NX), name
        np.testing.assert_array_equal(got, image)
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.h5", dataset="/entry/mask"), image)
    np.testing.assert_array_equal(io.read_image(tmp_path / "a.h5", dataset="/entry/one"), image)
    _raises(r"a\.h5.*expected exactly one 2-D dataset", io.read_image, tmp_path / "a.h5")
    _raises(
        r"/entry/stack has shape \(12, 40, 32\) but a 2-D image",
        io.read_image,
        tmp_path / "a.h5",
        dataset="/entry/stack",
    )
    _raises(r"/entry/none not found", io.read_image, tmp_path / "a.h5", dataset="/entry/none")
    _raises(r"missing\.edf.*does not exist", io.read_image, tmp_path / "missing.edf")
    (tmp_path / "junk.edf").write_bytes(b"\x00\x01junk")
    _raises(r"junk\.edf.*could not be read", io.read_image, tmp_path / "junk.edf")


def test_file_checksum(tmp_path):
    p = tmp_path / "abc.txt"
    p.write_bytes(b"abc")  # FIPS 180-2 test vector
    assert io.file_checksum(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    blob = np.random.default_rng(0).bytes(300_001)
    q = tmp_path / "blob.bin"
    q.write_bytes(blob)
    assert io.file_checksum(q, block_bytes=4096) == hashlib.sha256(blob).hexdigest()
    _raises(r"nothing\.bin.*does not exist", io.file_checksum, tmp_path / "nothing.bin")


# ----------------------------------------------------------------------------- corrupt chunks
#
# bitshuffle's decoder (inside hdf5plugin) trusts the block sizes stored in a chunk: a garbled
# one can kill the reading process with SIGSEGV. Reads that could crash run in a child
# process, so that a regression fails the test instead of ending the test session.

BITSHUFFLE_LAYOUTS = {
    # one frame per chunk; 1073 elements: no full block, a last block of 1072, 1 raw element
    "frame-chunks": ("float32", (5, 37, 29), (1, 37, 29), hdf5plugin.Bitshuffle(cname="lz4")),
    # one full 2048-element block, a last block of 200, 2 raw elements
    "raw-tail": ("uint32", (3, 50, 45), (1, 50, 45), hdf5plugin.Bitshuffle(cname="lz4")),
    # several frames per chunk and partial edge chunks
    "tiles": ("uint16", (6, 40, 33), (4, 16, 16), hdf5plugin.Bitshuffle(cname="lz4")),
    # a small block size: 20 blocks per chunk
    "small-blocks": (
        "int32",
        (4, 40, 32),
        (2, 40, 32),
        hdf5plugin.Bitshuffle(nelems=64, cname="lz4"),
    ),
    "zstd": ("float64", (3, 24, 20), (1, 24, 20), hdf5plugin.Bitshuffle(cname="zstd")),
}


def _bitshuffle_scan(path, layout: str) -> np.ndarray:
    dtype, shape, chunks, filters = BITSHUFFLE_LAYOUTS[layout]
    rng = np.random.default_rng(3)
    if np.dtype(dtype).kind == "f":
        data = rng.normal(100, 30, shape).astype(dtype)
    else:
        data = rng.poisson(300, shape).astype(dtype)
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/data/data", data=data, chunks=chunks, **filters)
        f.create_dataset("entry/dark", data=data[0], chunks=chunks[1:], **filters)
    return data


def _edit_chunk(path, dataset: str, offset: tuple, edit) -> None:
    """Replace one stored chunk by ``edit(bytearray of its stored bytes)``."""
    with h5py.File(path, "r+") as f:
        ds = f[dataset]
        mask, raw = ds.id.read_direct_chunk(offset)
        ds.id.write_direct_chunk(offset, bytes(edit(bytearray(raw))), filter_mask=mask)


_READ_IN_CHILD = """
import json, sys
from xrdmap import io
from xrdmap.errors import InputError
got = []
for path, dataset in json.loads(sys.argv[1]):
    try:
        if dataset.endswith("/dark"):
            io.read_image(path, dataset=dataset)
        else:
            io.open_scan(path, frames_path=dataset).values
        got.append("read")
    except InputError as exc:
        got.append(str(exc))
print(json.dumps(got))
"""


def _read_in_child(cases: list[tuple[str, str]]) -> list[str]:
    """Read each (file, dataset) in one child process: "read", or the InputError message."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _READ_IN_CHILD, json.dumps([[str(p), d] for p, d in cases])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"the reading process died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    )
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("layout", list(BITSHUFFLE_LAYOUTS))
def test_intact_bitshuffle_chunks_pass_the_check_and_read_bit_identical(tmp_path, layout):
    path = tmp_path / "scan.h5"
    data = _bitshuffle_scan(path, layout)
    with h5py.File(path) as f:
        ds = f["entry/data/data"]
        codec, elem_size = io._bitshuffle_filter(ds)
        assert (codec, elem_size) == ("Zstd" if layout == "zstd" else "LZ4", data.itemsize)
        nbytes = int(np.prod(ds.chunks)) * data.itemsize
        for i in range(ds.id.get_num_chunks()):  # every chunk as hdf5plugin wrote it
            offset = ds.id.get_chunk_info(i).chunk_offset
            assert (
                io._bitshuffle_problem(ds.id.read_direct_chunk(offset)[1], nbytes, elem_size)
                is None
            )
    scan = io.open_scan(path)
    assert scan.values.tobytes() == data.tobytes()  # bit for bit
    assert scan[1:3, 5:30:4, -7:].values.tobytes() == data[1:3, 5:30:4, -7:].tobytes()
    assert io.read_image(path, dataset="/entry/dark").tobytes() == data[0].tobytes()


def test_malformed_bitshuffle_chunks_are_described():
    rng = np.random.default_rng(1)
    block = 2048
    n = 3 * block + 13  # 3 full blocks, a last block of 8, 5 raw elements (4 bytes each)
    sizes = [700, 650, 900, 40]
    raw = bytearray(struct.pack(">QI", 4 * n, 4 * block))
    for size in sizes:
        raw += struct.pack(">I", size) + rng.bytes(size)
    raw += rng.bytes(5 * 4)
    assert io._bitshuffle_problem(bytes(raw), 4 * n, 4) is None  # the layout as documented

    def overwrite(pos: int, new: bytes) -> bytearray:
        return raw[:pos] + new + raw[pos + len(new) :]

    cases = {
        "14 bytes end inside block 1 of 4": raw[:14],
        "block 4 of 4 gives 40 compressed bytes, more than the 39 bytes left": raw[:-1],
        "1 bytes more than its 4 blocks hold": raw + b"\0",
        "header gives 99 uncompressed bytes, expected": overwrite(0, struct.pack(">Q", 99)),
        "header gives blocks of 36 bytes, expected a multiple of 32": overwrite(
            8, struct.pack(">I", 36)
        ),
        "block 2 of 4 gives 4294967295 compressed bytes": overwrite(16 + 700, b"\xff" * 4),
        "shorter than the 12-byte header": raw[:11],
    }
    for needle, bad in cases.items():
        assert needle in io._bitshuffle_problem(bytes(bad), 4 * n, 4)


def test_corrupt_bitshuffle_chunks_are_input_errors_naming_file_dataset_and_frames(tmp_path):
    def garble_first_block_size(raw):
        raw[12:16] = b"\x7f\xff\xff\xff"
        return raw

    def cut(raw):
        return raw[:-3]

    def garbage_payload(raw):  # block sizes intact: the bounds-checked LZ4/Zstd call fails
        size = struct.unpack(">I", raw[12:16])[0]
        raw[16 : 16 + size] = np.random.default_rng(5).bytes(size)
        return raw

    cases, expected = [], []
    for layout, (_, shape, chunks, _) in BITSHUFFLE_LAYOUTS.items():
        for edit in (garble_first_block_size, cut, garbage_payload):
            path = tmp_path / f"{layout}-{edit.__name__}.h5"
            _bitshuffle_scan(path, layout)
            c0 = chunks[0]
            _edit_chunk(path, "entry/data/data", (c0, 0, 0), edit)
            frames = f"frame {c0}" if c0 == 1 else f"frames {c0}..{min(2 * c0, shape[0]) - 1}"
            cases.append((path, "/entry/data/data"))
            expected.append((path, "/entry/data/data", frames, edit))
    dark = tmp_path / "dark.h5"
    _bitshuffle_scan(dark, "tiles")
    _edit_chunk(dark, "entry/dark", (16, 16), garble_first_block_size)
    cases.append((dark, "/entry/dark"))

    got = _read_in_child(cases)
    for message, (path, dataset, frames, edit) in zip(got, expected, strict=False):
        assert str(path) in message and dataset in message, message
        if edit is garbage_payload:
            assert "could not be read" in message and "filter returned failure" in message, message
        else:
            codec = "Zstd" if "zstd" in path.name else "LZ4"
            assert f"{frames} (HDF5 chunk at " in message, message
            assert f"is a corrupt bitshuffle-{codec} chunk" in message, message
    assert str(dark) in got[-1] and "dataset /entry/dark could not be read" in got[-1]
    assert "the HDF5 chunk at (16, 16) is a corrupt bitshuffle-LZ4 chunk" in got[-1]


def _virtual_scan(folder, data: np.ndarray) -> str:
    """A virtual frames dataset over three bitshuffle sources: frames 0-1 in the same file
    (mapped as "."), 2-4 and 5-6 in two other files, which hold one spare frame first."""
    filters = hdf5plugin.Bitshuffle(cname="lz4")
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    for name, lo, hi in (("part1.h5", 2, 5), ("part2.h5", 5, 7)):
        with h5py.File(folder / name, "w") as f:
            spare = np.zeros((1, *data.shape[1:]), data.dtype)
            f.create_dataset(
                "data",
                data=np.concatenate([spare, data[lo:hi]]),
                chunks=(1, *data.shape[1:]),
                **filters,
            )
        layout[lo:hi] = h5py.VirtualSource(name, "data", shape=(hi - lo + 1, *data.shape[1:]))[1:]
    layout[0:2] = h5py.VirtualSource(".", "/entry/raw/part0", shape=(2, *data.shape[1:]))
    path = folder / "master.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/raw/part0", data=data[:2], chunks=(1, *data.shape[1:]), **filters)
        f.create_virtual_dataset("entry/data/data", layout)
    return path


def test_virtual_dataset_sources_are_checked(tmp_path):
    data = np.random.default_rng(4).poisson(300, (7, 48, 48)).astype(np.uint32)  # 2 blocks a frame
    path = _virtual_scan(tmp_path, data)
    scan = io.open_scan(path, frames_path="/entry/data/data", chunk_frames=3)
    assert scan.values.tobytes() == data.tobytes()
    assert scan[[6, 0, 3]].values.tobytes() == data[[6, 0, 3]].tobytes()

    def garble(raw):
        raw[12:16] = b"\x7f\xff\xff\xff"
        return raw

    _edit_chunk(tmp_path / "part2.h5", "data", (2, 0, 0), garble)  # virtual frame 6
    _edit_chunk(path, "entry/raw/part0", (1, 0, 0), garble)  # virtual frame 1
    (first,) = _read_in_child([(path, "/entry/data/data")])  # names the first corrupt frame
    assert first.startswith(
        f"scan file {str(path)!r}: frames 0..6 of /entry/data/data could not be read: "
    )
    assert (
        f"source file {str(path)!r} dataset /entry/raw/part0: frame 1 (HDF5 chunk at (1, 0, 0)) "
        in first
    )
    assert "is a corrupt bitshuffle-LZ4 chunk" in first
    with h5py.File(path, "r+") as f:  # repair frame 1; frame 6 stays garbled
        f["entry/raw/part0"][1] = data[1]
    (message,) = _read_in_child([(path, "/entry/data/data")])
    part2 = str(tmp_path / "part2.h5")
    assert (
        f"source file {part2!r} dataset /data: frame 2 (HDF5 chunk at (2, 0, 0)) is a corrupt"
        in message
    )
