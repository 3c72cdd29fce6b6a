"""Scan input: open a stack of detector frames lazily, with positions, times and monitor.

A scan is returned as an :class:`xarray.DataArray` named ``frames`` with dims
``(point, y, x)`` backed by dask. Opening reads only metadata: every dask chunk is a task
that opens the file(s) itself through a small picklable reader defined in this module, so
no h5py object travels in the graph and the client never holds the frame stack.

Sources
-------
- NeXus/HDF5 stacks (compressed with any filter of ``hdf5plugin`` too). The frames
  dataset is the ``data`` field of an ``NXdetector`` group, else the signal of an ``NXdata``
  group, else the only 3-D dataset; ``frames_path`` overrides the search.
- Series of single-frame images read by fabio (TIFF, EDF, CBF, ...): a glob pattern
  (naturally sorted, ``frame2`` before ``frame10``) or an explicit list of paths.

Corrupt compressed data
-----------------------
The bitshuffle filter (HDF5 filter 32008, with LZ4 or Zstd, as detectors and
``hdf5plugin.Bitshuffle`` write it) trusts the block sizes stored inside each chunk: a chunk
whose sizes are garbled makes the decoder read outside the chunk and kill the process with
SIGSEGV, with no message. Before h5py decodes such a dataset, every chunk a read touches is
fetched raw (``read_direct_chunk``) and its block structure checked against its length, so
that a corrupt chunk is an :class:`~xrdmap.errors.InputError` naming the file, dataset and
frames. The blocks themselves are then decoded with bounds-checked LZ4/Zstd calls, which
report a corrupt payload as a failed read. The sources of a virtual dataset are checked
the same way when each maps one block of frames (as detector writers lay them out).
Datasets with other filters, or with bitshuffle combined with another filter, are read by
h5py unchecked: hdf5plugin's LZ4, Blosc and Blosc2 filters fail the read of a garbled
chunk, but its Zstd filter can return wrong numbers without an error.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import itertools
import math
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters with HDF5 on import)
import numpy as np

from xrdmap.errors import ConfigError, InputError

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "open_scan",
    "read_image",
    "file_checksum",
    "default_chunk_frames",
    "natural_sort_key",
    "CHUNK_BYTES",
    "SERIES_CHUNK_FILES",
]

#: Target size of one dask chunk of frames (bytes).
CHUNK_BYTES = 64 * 2**20
#: Most image files per dask chunk of a series (each file is opened on its own).
SERIES_CHUNK_FILES = 256

_GLOB_CHARS = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"(\d+)")
_START_STEP = re.compile(r"\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*")
_MAX_LISTED = 8
# One representative file per distinct file size gets its header checked at open time;
# beyond this many sizes (compressed CBF: every size differs) the chunk readers check.
_MAX_HEADER_CHECKS = 64

_LENGTH_TO_MM = {
    "mm": 1.0,
    "millimeter": 1.0,
    "millimetre": 1.0,
    "m": 1e3,
    "meter": 1e3,
    "metre": 1e3,
    "cm": 10.0,
    "um": 1e-3,
    "µm": 1e-3,
    "μm": 1e-3,
    "micron": 1e-3,
    "microns": 1e-3,
    "micrometer": 1e-3,
    "micrometre": 1e-3,
    "nm": 1e-6,
}
_TIME_TO_S = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 1e-3,
    "millisecond": 1e-3,
    "milliseconds": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "microsecond": 1e-6,
    "microseconds": 1e-6,
    "ns": 1e-9,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
}
# Names of 1-D datasets that hold the time of each frame, best first (exposure-time fields
# such as NXdetector/count_time are not times of frames and are deliberately absent).
_TIME_NAMES = (
    ("time", "times", "elapsed_time", "relative_time", "time_s"),
    ("timestamp", "timestamps", "time_stamp", "epoch"),
)
_INDEX_NAMES = {
    "point",
    "points",
    "index",
    "frame",
    "frames",
    "frame_number",
    "image_number",
    "idx",
}
_FILTER_NAMES = {
    32001: "Blosc",
    32004: "LZ4",
    32008: "Bitshuffle",
    32015: "Zstandard",
    32026: "Blosc2",
    307: "bzip2",
}
# bitshuffle's HDF5 filter: cd_values[2] is the element size in bytes, cd_values[4] the
# compression applied after the bit transposition.
_BITSHUFFLE = 32008
_BITSHUFFLE_CODECS = {2: "LZ4", 3: "Zstd"}
_BITSHUFFLE_HEADER = struct.Struct(">QI")
_BITSHUFFLE_BLOCK = struct.Struct(">I")


# --------------------------------------------------------------------------- public API


def open_scan(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    frames_path: str | None = None,
    positions_path: str | None = None,
    times_path: str | None = None,
    monitor_path: str | None = None,
    positions: str | Sequence[float] | np.ndarray | None = None,
    times: str | Sequence[float] | np.ndarray | None = None,
    chunk_frames: int | None = None,
) -> xr.DataArray:
    """Open a scan lazily as a dask-backed DataArray of frames.

    Parameters
    ----------
    source
        An HDF5/NeXus file; a glob pattern of image files (``"scan/frame_*.tif"``,
        naturally sorted); or an explicit list of image paths (kept in the given order).
    frames_path
        HDF5 path of the frames dataset (or of an NXdata/NXdetector group holding it).
        Default: found from the NeXus classes, else the only 3-D dataset.
    positions_path, times_path, monitor_path
        Where the position (mm), time (s) or monitor of each frame is: an HDF5 dataset path
        in the scan file, ``"other.h5:/path"``, or ``"file.csv:column"``. Default: found
        from the NeXus layout when unambiguous (NXdata axes, NXpositioner, NXmonitor).
        Values with ``units`` attributes are converted to mm and s.
    positions, times
        Explicit values: ``"file.csv:column"`` (CSV with a header line),
        ``"start,step"`` (mm, or s for times) or an array of one value per frame.
        These take precedence over ``*_path`` and auto-detection.
    chunk_frames
        Frames per dask chunk. Default: :func:`default_chunk_frames` (about
        :data:`CHUNK_BYTES` per chunk, aligned on the HDF5 chunking; at most
        :data:`SERIES_CHUNK_FILES` files per chunk for an image series).

    Returns
    -------
    xarray.DataArray
        ``frames`` with dims ``(point, y, x)``; coords ``point`` (int), ``position`` (mm)
        and/or ``time`` (s) when known, ``monitor`` (ones when absent); attrs ``source``,
        ``format`` (``"hdf5"`` or ``"fabio"``) and ``frames_path``.

    Raises
    ------
    InputError
        A file is missing or unreadable, no frames stack is found, the stack is not 3-D,
        series frames differ in shape, or positions/times/monitor are of the wrong length,
        non-numeric, not finite, or (monitor) not positive.
    ConfigError
        Conflicting or malformed arguments.

    Notes
    -----
    Opening reads no frame data from an HDF5 file. For an image series it stats every
    file, reads the first image (shape, dtype) and one header per distinct file size;
    each chunk task checks the shape and dtype of every frame it reads and raises
    :class:`InputError` naming the file that differs.
    """
    import dask.array as da
    import xarray as xr  # noqa: F811  (imported here to keep `import xrdmap` light)

    if chunk_frames is not None and (
        isinstance(chunk_frames, bool)
        or not isinstance(chunk_frames, (int, np.integer))
        or chunk_frames < 1
    ):
        raise ConfigError(f"chunk_frames {chunk_frames!r}: expected a positive integer")
    for name, explicit, path in (
        ("positions", positions, positions_path),
        ("times", times, times_path),
    ):
        if explicit is not None and path is not None:
            raise ConfigError(f"{name} and {name}_path were both given: pass only one of them")

    kind, resolved = _classify_source(source)
    if kind == "hdf5":
        stack, found = _open_hdf5(resolved, frames_path, positions_path, times_path, monitor_path)
        source_attr = str(resolved.resolve())
        frames_attr = stack.path
        file_chunk = stack.file_chunk
    else:
        if frames_path is not None:
            raise ConfigError(
                f"frames_path {frames_path!r} applies only to HDF5 sources, not to an image series"
            )
        stack = _open_series(resolved)
        found = {}
        for name, spec in (
            ("position", positions_path),
            ("time", times_path),
            ("monitor", monitor_path),
        ):
            if spec is not None:
                found[name] = _read_external(spec, name, None)
        if isinstance(source, (str, os.PathLike)):
            source_attr = os.path.abspath(os.fspath(source))
        else:
            source_attr = _describe_list([os.path.abspath(q) for q in resolved])
        frames_attr = ""
        file_chunk = None

    n = stack.shape[0]
    coord_values: dict[str, tuple[np.ndarray, str]] = {}
    for name, explicit in (("position", positions), ("time", times)):
        if explicit is not None:
            coord_values[name] = _explicit_axis(explicit, name, n)
        elif name in found:
            coord_values[name] = found[name]
    if "monitor" in found:
        coord_values["monitor"] = found["monitor"]

    coords: dict[str, Any] = {"point": ("point", np.arange(n), {"long_name": "scan point"})}
    for name in ("position", "time", "monitor"):
        if name not in coord_values:
            continue
        values, origin = coord_values[name]
        values = _validate_axis(values, n, name, origin)
        units = {"position": "mm", "time": "s", "monitor": ""}[name]
        coords[name] = ("point", values, {"units": units, "source": origin})
    if "monitor" not in coords:
        coords["monitor"] = ("point", np.ones(n), {"units": "", "source": "none (ones)"})

    if chunk_frames is None:
        chunk_frames = default_chunk_frames(stack.shape[1:], stack.dtype, file_chunk=file_chunk)
        if kind == "fabio":  # one file open per frame: keep small-frame series parallel
            chunk_frames = min(chunk_frames, SERIES_CHUNK_FILES)
    chunk_frames = int(min(chunk_frames, n))
    data = da.from_array(
        stack,
        chunks=(chunk_frames, *stack.shape[1:]),
        asarray=False,
        lock=False,
        inline_array=False,
        meta=np.empty((0, 0, 0), dtype=stack.dtype),
        name="frames-" + _token(stack, chunk_frames),
    )
    attrs = {"source": source_attr, "format": kind, "frames_path": frames_attr}
    return xr.DataArray(data, dims=("point", "y", "x"), coords=coords, name="frames", attrs=attrs)


def default_chunk_frames(
    frame_shape: Sequence[int],
    dtype: Any,
    *,
    target_bytes: int = CHUNK_BYTES,
    file_chunk: int | None = None,
) -> int:
    """Frames per dask chunk so that one chunk holds about ``target_bytes`` bytes.

    With ``file_chunk`` (frames per HDF5 chunk) the result is a multiple of it, so that
    no compressed HDF5 chunk is decompressed by two tasks.
    """
    frame_bytes = max(1, int(np.prod(frame_shape)) * np.dtype(dtype).itemsize)
    frames = max(1, target_bytes // frame_bytes)
    if file_chunk and file_chunk > 1:
        frames = max(file_chunk, frames // file_chunk * file_chunk)
    return int(frames)


def read_image(path: str | os.PathLike, *, dataset: str | None = None) -> np.ndarray:
    """Read one 2-D image: EDF/TIFF/CBF (fabio), ``.npy``, or HDF5.

    For HDF5 give ``dataset``, or the file must hold a single 2-D dataset (a 3-D dataset
    with one frame counts as 2-D). Used for masks, darks, flats and calibrant images.

    Raises
    ------
    InputError
        The file is missing or unreadable, or holds no single 2-D image.
    """
    p = _existing_file(path, "image")
    if _is_hdf5(p):
        with _h5open(p, "image file") as f:
            if dataset is None:
                found = _find_datasets(
                    f, lambda ds: ds.ndim == 2 or (ds.ndim == 3 and ds.shape[0] == 1)
                )
                if len(found) != 1:
                    listing = ", ".join(f"{n} {s}" for n, s in found[:_MAX_LISTED]) or "none"
                    raise InputError(
                        f"image file {str(p)!r}: expected exactly one 2-D dataset or a dataset= path; "
                        f"2-D datasets found: {listing}"
                    )
                dataset = found[0][0]
            obj = f.get(dataset)
            if not isinstance(obj, h5py.Dataset):
                raise InputError(
                    f"image file {str(p)!r}: dataset {dataset} not found (expected a 2-D image dataset)"
                )
            try:
                _check_compressed_chunks(
                    obj,
                    (None,) * obj.ndim,
                    f"image file {str(p)!r}: dataset {dataset} could not be read",
                )
                data = obj[()]
            except OSError as exc:
                raise InputError(
                    f"image file {str(p)!r}: dataset {dataset} could not be read: {exc}"
                ) from None
        origin = f"image file {str(p)!r} dataset {dataset}"
    elif p.suffix.lower() == ".npy":
        try:
            data = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"image file {str(p)!r} could not be read as .npy: {exc}") from None
        origin = f"image file {str(p)!r}"
    else:
        import fabio

        try:
            img = fabio.open(str(p))
            nframes = getattr(img, "nframes", 1)
            data = img.data
        except Exception as exc:  # fabio raises assorted errors on unknown or garbled files
            raise InputError(
                f"image file {str(p)!r} could not be read as an image (EDF/TIFF/CBF/NPY/HDF5): {exc}"
            ) from None
        if nframes and nframes > 1:
            raise InputError(
                f"image file {str(p)!r} holds {nframes} frames; expected a single image"
            )
        origin = f"image file {str(p)!r}"
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise InputError(f"{origin} has shape {data.shape} but a 2-D image was expected")
    if data.dtype.kind not in "biuf":
        raise InputError(f"{origin} has dtype {data.dtype} but a numeric image was expected")
    return data


def file_checksum(path: str | os.PathLike, *, block_bytes: int = 2**20) -> str:
    """SHA-256 of a file's bytes as hex, read in blocks (constant memory)."""
    p = _existing_file(path, "input")
    digest = hashlib.sha256()
    try:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(block_bytes), b""):
                digest.update(block)
    except OSError as exc:
        raise InputError(
            f"input file {str(p)!r} could not be read: {exc.strerror or exc}"
        ) from None
    return digest.hexdigest()


def natural_sort_key(text: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``frame2`` before ``frame10``."""
    # re.split with a group alternates text (even places) and digits (odd places).
    return tuple(int(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(text)))


# --------------------------------------------------------------------------- lazy stacks


def _normalize_key(key: Any, ndim: int) -> tuple | None:
    """Key as a tuple of ``ndim`` entries, or None when it needs numpy's full treatment."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is None for k in key):
        return None
    ell = [i for i, k in enumerate(key) if k is Ellipsis]
    if len(ell) > 1:
        return None
    if ell:
        i = ell[0]
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1 :]
    return key + (slice(None),) * (ndim - len(key))


def _simple_rest(rest: tuple, shape: Sequence[int]) -> tuple | None:
    """The (y, x) part of a key as h5py-friendly ints and positive-step slices, else None."""
    out = []
    for k, size in zip(rest, shape, strict=True):
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            k = int(k)
            if not -size <= k < size:
                return None
            out.append(k % size)
        elif isinstance(k, slice):
            start, stop, step = k.indices(size)
            if step < 1:
                return None
            out.append(slice(start, max(start, stop), step))
        else:
            return None
    return tuple(out)


class _FrameStack:
    """Array-like base: shape, dtype, and numpy-style indexing over frame reads."""

    shape: tuple[int, int, int]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        norm = _normalize_key(key, 3)
        if norm is None:
            return self[:, :, :][key]
        k0, rest = norm[0], norm[1:]
        idx = np.arange(self.shape[0])[k0]
        flat = np.atleast_1d(idx).ravel()
        simple = _simple_rest(rest, self.shape[1:])
        if flat.size == 0:
            empty = np.broadcast_to(np.zeros((), self.dtype), (1, *self.shape[1:]))
            block = np.array(empty[(slice(0, 0), *rest)])
        else:
            block = self._read(flat, simple if simple is not None else (slice(None), slice(None)))
        if isinstance(k0, slice):
            k0b: Any = slice(None)
        elif np.ndim(idx) == 0:
            k0b = 0
        else:
            k0b = np.arange(flat.size).reshape(np.shape(idx))
        if simple is not None:
            return block if isinstance(k0b, slice) else block[k0b]
        return block[(k0b, *rest)]

    def _read(self, frames: np.ndarray, rest: tuple) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class _HDF5Stack(_FrameStack):
    """Frames of one HDF5 dataset; each read opens the file (picklable, no h5py state)."""

    def __init__(
        self, filename: str, path: str, shape, dtype, file_chunk: int | None, stamp: tuple
    ):
        self.filename = filename
        self.path = path
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.file_chunk = file_chunk
        self.stamp = stamp

    def __dask_tokenize__(self):
        return (
            "xrdmap.io._HDF5Stack",
            self.filename,
            self.path,
            self.shape,
            self.dtype.str,
            self.stamp,
        )

    def _read(self, frames: np.ndarray, rest: tuple) -> np.ndarray:
        return _read_hdf5_frames(self.filename, self.path, self.shape, frames, rest)


class _ImageSeries(_FrameStack):
    """Frames of a series of single-image files read with fabio."""

    def __init__(self, root: str, names: tuple[str, ...], shape, dtype, stamp: tuple):
        self.root = root
        self.names = names
        self.shape = (len(names), *(int(s) for s in shape))
        self.dtype = np.dtype(dtype)
        self.stamp = stamp

    def __dask_tokenize__(self):
        return (
            "xrdmap.io._ImageSeries",
            self.root,
            self.names,
            self.shape,
            self.dtype.str,
            self.stamp,
        )

    def _read(self, frames: np.ndarray, rest: tuple) -> np.ndarray:
        paths = [os.path.join(self.root, self.names[i]) for i in frames]
        return _read_image_frames(paths, self.shape[1:], self.dtype, rest)


def _read_hdf5_frames(
    filename: str, path: str, shape: tuple, frames: np.ndarray, rest: tuple
) -> np.ndarray:
    """Read frames (sorted or not) of an HDF5 dataset, opening the file for this call."""
    lo, hi = int(frames[0]), int(frames[-1])
    what = f"scan file {filename!r}: frames {lo}..{hi} of {path}"
    try:
        with h5py.File(filename, "r", locking=False) as f:
            ds = f[path]
            if tuple(ds.shape) != tuple(shape):
                raise InputError(
                    f"{what}: dataset now has shape {ds.shape}, not {tuple(shape)}; the file changed"
                )
            _check_compressed_chunks(ds, (frames, *rest), f"{what} could not be read")
            steps = np.diff(frames)
            if frames.size == 1:
                return ds[(slice(lo, lo + 1), *rest)]
            if steps[0] >= 1 and np.all(steps == steps[0]):
                return ds[(slice(lo, hi + 1, int(steps[0])), *rest)]
            return np.stack([ds[(int(i), *rest)] for i in frames])
    except InputError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise InputError(f"{what} could not be read: {exc}") from None


def _check_compressed_chunks(ds: h5py.Dataset, selection: Sequence[Any], what: str) -> None:
    """Check the bitshuffle chunks that reading ``selection`` of ``ds`` would decode.

    ``selection`` holds, per axis, an int, a slice or an array of indices (``None``: the
    whole dataset). Does nothing unless bitshuffle with compression is the dataset's only
    filter (see the module notes: its decoder trusts the block sizes stored in a chunk).
    For a virtual dataset the source datasets are checked, where each source maps one
    block of the virtual dataset onto one block of the source (as detector writers lay
    them out); sources mapped otherwise are read unchecked.

    Raises
    ------
    InputError
        A chunk's block structure does not fit its stored length; the message starts with
        ``what`` and names the chunk (its frames for a 3-D stack).
    """
    if ds.is_virtual:
        _check_virtual_sources(ds, selection, what)
        return
    found = _bitshuffle_filter(ds)
    if found is None:
        return
    codec, elem_size = found
    chunks = ds.chunks
    nbytes = math.prod(chunks) * ds.dtype.itemsize
    cells = [
        _chunk_indices(index, size, chunk)
        for index, size, chunk in zip(selection, ds.shape, chunks, strict=True)
    ]
    for cell in itertools.product(*cells):
        offset = tuple(int(i) * c for i, c in zip(cell, chunks, strict=True))
        try:
            filter_mask, raw = ds.id.read_direct_chunk(offset)
        except (OSError, RuntimeError, ValueError, KeyError):
            continue  # not allocated (reads as the fill value), or unreadable: h5py reports it
        if filter_mask & 1:
            continue  # this chunk was stored without the filter
        problem = _bitshuffle_problem(raw, nbytes, elem_size)
        if problem is not None:
            if ds.ndim == 3:
                first, last = offset[0], min(offset[0] + chunks[0], ds.shape[0]) - 1
                where = f"frame {first}" if first == last else f"frames {first}..{last}"
                where += f" (HDF5 chunk at {offset})"
            else:
                where = f"the HDF5 chunk at {offset}"
            raise InputError(
                f"{what}: {where} is a corrupt bitshuffle-{codec} chunk ({problem}); "
                "expected intact compressed data"
            )


def _bitshuffle_filter(ds: h5py.Dataset) -> tuple[str, int] | None:
    """(codec, element bytes) when bitshuffle with LZ4/Zstd is the dataset's only filter."""
    if ds.chunks is None:
        return None
    try:
        plist = ds.id.get_create_plist()
        if plist.get_nfilters() != 1:
            return None
        code, _flags, values, _name = plist.get_filter(0)
    except (AttributeError, RuntimeError, ValueError):
        return None
    if code != _BITSHUFFLE or len(values) < 5 or values[4] not in _BITSHUFFLE_CODECS:
        return None
    return _BITSHUFFLE_CODECS[values[4]], int(values[2]) or ds.dtype.itemsize


def _chunk_indices(index: Any, size: int, chunk: int) -> np.ndarray:
    """Chunk numbers along one axis that an int, slice, index array or None touches."""
    if index is None:
        return np.arange(-(-size // chunk))
    return np.unique(_axis_indices(index, size) // chunk)


def _axis_indices(index: Any, size: int) -> np.ndarray:
    """Sorted distinct indices along one axis that an int, slice, index array or None picks."""
    if index is None:
        return np.arange(size)
    if isinstance(index, slice):
        return np.arange(*index.indices(size))
    return np.unique(np.asarray(index, dtype=np.int64).reshape(-1) % size)


def _check_virtual_sources(ds: h5py.Dataset, selection: Sequence[Any], what: str) -> None:
    """:func:`_check_compressed_chunks` on the sources that a read of virtual ``ds`` touches."""
    wanted = [_axis_indices(index, size) for index, size in zip(selection, ds.shape, strict=True)]
    folder = os.path.dirname(os.path.abspath(ds.file.filename))
    try:
        mappings = ds.virtual_sources()
    except (OSError, RuntimeError, ValueError):
        return
    boxes = [(_selected_box(vmap.vspace, ds.shape), vmap) for vmap in mappings]
    # in the order of the virtual dataset: an error names its first corrupt frames
    for vbox, vmap in sorted((b for b in boxes if b[0] is not None), key=lambda b: b[0]):
        parts = [
            idx[(idx >= lo) & (idx <= hi)] - lo for idx, (lo, hi) in zip(wanted, vbox, strict=True)
        ]
        if any(p.size == 0 for p in parts):
            continue
        if vmap.file_name == ".":
            _check_virtual_source(ds.file, ds.file.filename, vmap, vbox, parts, what)
            continue
        path = os.path.join(folder, vmap.file_name)  # HDF5 looks beside the virtual file too
        try:
            source = h5py.File(path, "r", locking=False)
        except OSError:
            continue  # h5py reads a missing source as the fill value
        with source:
            _check_virtual_source(source, path, vmap, vbox, parts, what)


def _check_virtual_source(f: h5py.File, path: str, vmap, vbox, parts, what: str) -> None:
    src = _child(f, vmap.dset_name)
    if not isinstance(src, h5py.Dataset) or src.ndim != len(vbox):
        return
    sbox = _selected_box(vmap.src_space, src.shape)
    if sbox is None or [b - a for a, b in sbox] != [b - a for a, b in vbox]:
        return
    shifted = [p + lo for p, (lo, _) in zip(parts, sbox, strict=True)]
    _check_compressed_chunks(src, shifted, f"{what}: source file {path!r} dataset {src.name}")


def _selected_box(space: Any, shape: Sequence[int]) -> list[tuple[int, int]] | None:
    """(first, last) per axis when a dataspace selection is one whole box, else None."""
    try:
        kind = space.get_select_type()
        if kind == h5py.h5s.SEL_ALL:
            return [(0, int(n) - 1) for n in shape]
        if kind != h5py.h5s.SEL_HYPERSLABS:
            return None
        first, last = space.get_select_bounds()
        if space.get_select_npoints() != math.prod(b - a + 1 for a, b in zip(first, last)):
            return None  # strided or several blocks
    except (OSError, RuntimeError, ValueError):
        return None  # e.g. an unlimited selection of a growing virtual dataset
    if len(first) != len(shape):
        return None
    return [(int(a), int(b)) for a, b in zip(first, last)]


def _bitshuffle_problem(raw: bytes, nbytes: int, elem_size: int) -> str | None:
    """Why ``raw`` is not a well-formed bitshuffle chunk of ``nbytes`` bytes; None if it is.

    The layout, as bitshuffle's HDF5 filter writes it: a 12-byte header (big-endian uint64
    uncompressed bytes, uint32 bytes per block), then per block a big-endian uint32
    compressed size and that many compressed bytes. The blocks hold the elements in runs of
    the header's block size, then one shorter block of the remaining elements rounded down
    to a multiple of 8; the last (elements mod 8) elements follow uncompressed.
    """
    if len(raw) < _BITSHUFFLE_HEADER.size:
        return f"{len(raw)} bytes, shorter than the {_BITSHUFFLE_HEADER.size}-byte header"
    total, block_bytes = _BITSHUFFLE_HEADER.unpack_from(raw)
    if total != nbytes:
        return f"header gives {total} uncompressed bytes, expected {nbytes}"
    if nbytes % elem_size:
        return f"{nbytes} bytes is not a whole number of {elem_size}-byte elements"
    block = block_bytes // elem_size
    if block == 0 or block % 8 or block_bytes % elem_size:
        return f"header gives blocks of {block_bytes} bytes, expected a multiple of {8 * elem_size}"
    n = nbytes // elem_size
    n_blocks = n // block + (n % block >= 8)
    end = len(raw) - n % 8 * elem_size
    pos = _BITSHUFFLE_HEADER.size
    unpack = _BITSHUFFLE_BLOCK.unpack_from
    for i in range(n_blocks):
        if pos + _BITSHUFFLE_BLOCK.size > end:
            return f"{len(raw)} bytes end inside block {i + 1} of {n_blocks}"
        (size,) = unpack(raw, pos)
        pos += _BITSHUFFLE_BLOCK.size + size
        if pos > end:
            return (
                f"block {i + 1} of {n_blocks} gives {size} compressed bytes, "
                f"more than the {end - pos + size} bytes left"
            )
    if pos != end:
        return f"{end - pos} bytes more than its {n_blocks} blocks hold"
    return None


def _read_image_frames(
    paths: list[str], frame_shape: tuple, dtype: np.dtype, rest: tuple
) -> np.ndarray:
    """Read image files with fabio into one array, checking every frame's shape."""
    import fabio

    template = np.broadcast_to(np.zeros((), dtype), (1, *frame_shape))[(slice(None), *rest)]
    out = np.empty((len(paths), *template.shape[1:]), dtype=dtype)
    for j, p in enumerate(paths):
        try:
            data = fabio.open(p).data
        except Exception as exc:  # fabio raises assorted errors on garbled files
            raise InputError(f"frame file {p!r} could not be read as an image: {exc}") from None
        if data is None or tuple(data.shape) != tuple(frame_shape):
            got = None if data is None else tuple(data.shape)
            raise InputError(
                f"frame file {p!r} has shape {got} but the series frames have shape {tuple(frame_shape)}"
            )
        if data.dtype != dtype and not np.can_cast(data.dtype, dtype, casting="safe"):
            raise InputError(
                f"frame file {p!r} has dtype {data.dtype} but the series frames are {dtype}"
            )
        out[j] = data[rest]
    return out


def _token(stack: _FrameStack, chunk_frames: int) -> str:
    from dask.base import tokenize

    return tokenize(stack, chunk_frames)


# --------------------------------------------------------------------------- sources


def _classify_source(source: Any) -> tuple[str, Any]:
    """("hdf5", Path) or ("fabio", list of paths)."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        p = Path(text)
        if p.is_dir():
            raise InputError(
                f"scan source {text!r} is a directory; expected an HDF5/NeXus file, a glob such as "
                f"'{text.rstrip('/')}/*.tif', or a list of image files"
            )
        if p.is_file():
            if not os.access(p, os.R_OK):
                raise InputError(f"scan file {text!r} is not readable (permission denied)")
            if _is_hdf5(p):
                return "hdf5", p
            if p.suffix.lower() in {".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nx", ".he5"}:
                raise InputError(
                    f"scan file {text!r} is not an HDF5 file (no HDF5 signature); expected HDF5/NeXus"
                )
            return "fabio", [text]
        if _GLOB_CHARS.search(text):
            matches = [m for m in _glob.glob(text, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise InputError(
                    f"glob {text!r} matched no files; expected frame images (TIFF/EDF/CBF)"
                )
            return "fabio", sorted(matches, key=natural_sort_key)
        raise InputError(
            f"scan source {text!r} does not exist; expected an HDF5/NeXus file, a glob of images or a list of images"
        )
    if isinstance(source, Sequence) or isinstance(source, np.ndarray):
        paths = [os.fspath(s) for s in source]
        if not paths:
            raise InputError("scan source is an empty list; expected image file paths")
        return "fabio", paths
    raise InputError(
        f"scan source {source!r}: expected a file path, a glob string or a list of image paths"
    )


def _is_hdf5(p: Path) -> bool:
    try:
        return bool(h5py.is_hdf5(str(p)))
    except OSError:
        return False


def _existing_file(path: Any, what: str) -> Path:
    p = Path(os.fspath(path))
    if not p.exists():
        raise InputError(f"{what} file {str(p)!r} does not exist")
    if not p.is_file():
        raise InputError(f"{what} file {str(p)!r} is not a regular file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} file {str(p)!r} is not readable (permission denied)")
    return p


class _h5open:
    """Open an HDF5 file read-only, turning failures into InputError."""

    def __init__(self, path: Path, what: str):
        self.path = path
        self.what = what

    def __enter__(self) -> h5py.File:
        try:
            self.file = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            reason = str(exc).split("(", 1)[-1].rstrip(")") if "(" in str(exc) else str(exc)
            raise InputError(
                f"{self.what} {str(self.path)!r} could not be opened as HDF5 ({reason}); "
                "expected a complete, readable HDF5/NeXus file"
            ) from None
        return self.file

    def __exit__(self, *exc) -> None:
        self.file.close()


def _stamp(p: Path) -> tuple:
    st = p.stat()
    return (st.st_size, st.st_mtime_ns)


def _describe_list(paths: list[str]) -> str:
    if len(paths) == 1:
        return paths[0]
    return f"{paths[0]} ... {paths[-1]} ({len(paths)} files)"


# --------------------------------------------------------------------------- HDF5 scans


def _attr_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        return _attr_str(value.reshape(-1)[0])
    if isinstance(value, (str, np.str_)):
        return str(value)
    return None


def _attr_list(value: Any) -> list[str]:
    """An ``axes``-like attribute as a list of names (array, or ':'/','-separated string)."""
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.size > 1:
        return [_attr_str(v) or "" for v in value.reshape(-1)]
    text = _attr_str(value)
    if not text:
        return []
    return [t.strip() for t in re.split(r"[:,]", text.strip("[]"))]


def _nx_class(obj: Any) -> str | None:
    try:
        return _attr_str(obj.attrs.get("NX_class"))
    except (OSError, KeyError, RuntimeError):
        return None


def _find_datasets(f: h5py.File, accept) -> list[tuple[str, tuple]]:
    found: list[tuple[str, tuple]] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "biuf" and accept(obj):
            found.append(("/" + name, obj.shape))

    f.visititems(visit)
    return found


class _Layout:
    """NeXus classes and candidate datasets of an HDF5 file, collected in one walk."""

    def __init__(self, f: h5py.File):
        self.detectors: list[h5py.Group] = []
        self.nxdata: list[h5py.Group] = []
        self.monitors: list[h5py.Group] = []
        self.positioners: list[h5py.Group] = []
        self.stacks: list[h5py.Dataset] = []
        self.timed: list[h5py.Dataset] = []
        time_names = {n for names in _TIME_NAMES for n in names}

        def visit(name, obj):
            if isinstance(obj, h5py.Group):
                cls = _nx_class(obj)
                bucket = {
                    "NXdetector": self.detectors,
                    "NXdata": self.nxdata,
                    "NXmonitor": self.monitors,
                    "NXpositioner": self.positioners,
                }.get(cls or "")
                if bucket is not None:
                    bucket.append(obj)
            elif isinstance(obj, h5py.Dataset):
                if obj.ndim == 3 and obj.dtype.kind in "biuf":
                    self.stacks.append(obj)
                elif obj.ndim == 1 and name.rsplit("/", 1)[-1].lower() in time_names:
                    self.timed.append(obj)

        f.visititems(visit)


def _child(group: h5py.Group, name: str | None) -> Any:
    if not name:
        return None
    try:
        return group.get(name)
    except (OSError, KeyError, RuntimeError, ValueError):
        return None


def _nxdata_signal_key(group: h5py.Group) -> str | None:
    """Name of an NXdata group's signal: its ``signal`` attribute, else a legacy ``signal=1`` field."""
    key = _attr_str(group.attrs.get("signal"))
    if isinstance(_child(group, key), h5py.Dataset):
        return key
    for key in group:
        item = _child(group, key)
        if isinstance(item, h5py.Dataset):
            flag = item.attrs.get("signal")
            if flag is not None and (
                _attr_str(flag) == "1" or (not isinstance(flag, (str, bytes)) and flag == 1)
            ):
                return key
    return None


def _nxdata_signal(group: h5py.Group) -> h5py.Dataset | None:
    return _child(group, _nxdata_signal_key(group))


def _member(group: h5py.Group, key: str | None) -> tuple[str, h5py.Dataset] | None:
    """(path through ``group``, dataset): the path stays valid when the member is an external link."""
    obj = _child(group, key)
    if not isinstance(obj, h5py.Dataset):
        return None
    return f"{group.name.rstrip('/')}/{key}", obj


def _unique(objs: list) -> list:
    out: list = []
    for o in objs:
        if o is not None and not any(o == u for u in out):
            out.append(o)
    return out


def _listing(datasets: list) -> str:
    items = [f"{d.name} {d.shape}" for d in datasets[:_MAX_LISTED]]
    if len(datasets) > _MAX_LISTED:
        items.append(f"... ({len(datasets)} in all)")
    return ", ".join(items) or "none"


def _locate_frames(
    f: h5py.File, p: Path, layout: _Layout, frames_path: str | None
) -> tuple[str, h5py.Dataset]:
    """(path in the scan file, dataset) of the frames stack."""
    label = f"scan file {str(p)!r}"
    if frames_path is not None:
        obj = _child(f, frames_path)
        if obj is None:
            raise InputError(
                f"{label}: frames dataset {frames_path} not found; 3-D datasets in the file: {_listing(layout.stacks)}"
            )
        if isinstance(obj, h5py.Group):
            cls = _nx_class(obj)
            key = (
                "data"
                if cls == "NXdetector"
                else _nxdata_signal_key(obj)
                if cls == "NXdata"
                else None
            )
            inner = _member(obj, key)
            if inner is None:
                raise InputError(
                    f"{label}: {frames_path} is a group, not a frames dataset; "
                    f"3-D datasets in the file: {_listing(layout.stacks)}"
                )
            return inner
        return "/" + frames_path.lstrip("/"), obj

    tiers = [
        ("NXdetector data", [_member(g, "data") for g in layout.detectors]),
        ("NXdata signal", [_member(g, _nxdata_signal_key(g)) for g in layout.nxdata]),
        ("3-D dataset", [(d.name, d) for d in layout.stacks]),
    ]
    fallback = None
    for what, members in tiers:
        found: list[tuple[str, h5py.Dataset]] = []
        for m in members:
            if m is not None and not any(m[1] == u[1] for u in found):
                found.append(m)
        stacks = [m for m in found if m[1].ndim == 3]
        if len(stacks) == 1:
            return stacks[0]
        if len(stacks) > 1:
            raise InputError(
                f"{label}: {len(stacks)} candidate frame stacks ({what}): "
                f"{_listing([m[1] for m in stacks])}; pass frames_path to choose one"
            )
        if found and fallback is None:
            fallback = found[0]
    if fallback is not None:
        return fallback  # wrong dimensionality: reported with its shape by the caller
    raise InputError(
        f"{label}: no frames stack found (expected an NXdetector 'data' field, an NXdata signal or a 3-D "
        "dataset); pass frames_path"
    )


def _check_filters(ds: h5py.Dataset, name: str, label: str) -> None:
    try:
        plist = ds.id.get_create_plist()
        for i in range(plist.get_nfilters()):
            code = plist.get_filter(i)[0]
            if not h5py.h5z.filter_avail(code):
                raise InputError(
                    f"{label}: frames dataset {name} is compressed with HDF5 filter {code} "
                    f"({_FILTER_NAMES.get(code, 'unknown')}), "
                    "which is not available; expected a filter from hdf5plugin"
                )
    except (AttributeError, RuntimeError):
        return


def _open_hdf5(p: Path, frames_path, positions_path, times_path, monitor_path):
    label = f"scan file {str(p)!r}"
    with _h5open(p, "scan file") as f:
        layout = _Layout(f)
        name, ds = _locate_frames(f, p, layout, frames_path)
        if ds.ndim != 3:
            raise InputError(
                f"{label}: frames dataset {name} has shape {ds.shape} but a 3-D stack (point, y, x) was expected"
            )
        if ds.dtype.kind not in "biuf":
            raise InputError(
                f"{label}: frames dataset {name} has dtype {ds.dtype}; expected numbers"
            )
        if ds.shape[0] == 0 or ds.shape[1] == 0 or ds.shape[2] == 0:
            raise InputError(
                f"{label}: frames dataset {name} has shape {ds.shape}; expected at least one frame"
            )
        _check_filters(ds, name, label)
        n = ds.shape[0]
        file_chunk = ds.chunks[0] if ds.chunks else None

        found: dict[str, tuple[np.ndarray, str]] = {}
        auto = _auto_axes(layout, ds, n)
        for key, spec in (
            ("position", positions_path),
            ("time", times_path),
            ("monitor", monitor_path),
        ):
            if spec is not None:
                found[key] = _read_external(spec, key, f)
            elif key in auto:
                found[key] = auto[key]
        stack = _HDF5Stack(str(p.resolve()), name, ds.shape, ds.dtype, file_chunk, _stamp(p))
    return stack, found


def _scaled(ds: h5py.Dataset, key: str) -> tuple[np.ndarray, str] | None:
    """Read a 1-D axis dataset, converted to mm (position) or s (time); None if units don't fit."""
    units = (_attr_str(ds.attrs.get("units")) or "").strip()
    table = _LENGTH_TO_MM if key == "position" else _TIME_TO_S if key == "time" else None
    values = _read_small(ds, key)
    if table is None:
        return values, _origin(ds)
    if not units:
        return values, f"{_origin(ds)} (no units: taken as {'mm' if key == 'position' else 's'})"
    scale = table.get(units) or table.get(units.lower())
    if scale is None:
        return None
    if values.dtype.kind in "biuf":
        values = values.astype(float) * scale
    return values, f"{_origin(ds)} ({units})"


def _origin(ds: h5py.Dataset) -> str:
    """``file.h5:/path`` of a dataset (the ``*_path`` syntax): where coordinate values came from."""
    return f"{ds.file.filename}:{ds.name}"


def _read_small(ds: h5py.Dataset, key: str) -> np.ndarray:
    what = f"{key} dataset {ds.name} in {ds.file.filename!r} could not be read"
    _check_compressed_chunks(ds, (None,) * ds.ndim, what)
    try:
        return np.asarray(ds[()])
    except (OSError, TypeError, ValueError) as exc:
        raise InputError(f"{what}: {exc}") from None


def _axis_kind(ds: h5py.Dataset) -> str | None:
    units = (_attr_str(ds.attrs.get("units")) or "").strip()
    base = ds.name.rsplit("/", 1)[-1].lower()
    if units:
        if units in _TIME_TO_S or units.lower() in _TIME_TO_S:
            return "time"
        if units in _LENGTH_TO_MM or units.lower() in _LENGTH_TO_MM:
            return "position"
        return None
    if any(base in names for names in _TIME_NAMES):
        return "time"
    if base in _INDEX_NAMES:
        return None
    return "position"


def _point_axes(group: h5py.Group, signal: h5py.Dataset, n: int) -> list[h5py.Dataset]:
    """1-D datasets of an NXdata group that label the first (point) dimension of its signal."""
    names = []
    axes = _attr_list(group.attrs.get("axes"))
    if axes and axes[0] not in (".", ""):
        names.append(axes[0])
    for key in group.attrs:
        if key.endswith("_indices"):
            try:
                first = int(np.asarray(group.attrs[key]).reshape(-1)[0])
            except (TypeError, ValueError, IndexError):
                continue
            if first == 0:
                names.append(key[: -len("_indices")])
    legacy = _attr_list(signal.attrs.get("axes"))
    if legacy and legacy[0] not in (".", ""):
        names.append(legacy[0])
    for key in group:
        item = _child(group, key)
        if isinstance(item, h5py.Dataset) and item.attrs.get("axis") is not None:
            try:
                if int(np.asarray(item.attrs["axis"]).reshape(-1)[0]) == 1:
                    names.append(key)
            except (TypeError, ValueError):
                continue
    out = []
    for name in dict.fromkeys(names):
        item = _child(group, name)
        if isinstance(item, h5py.Dataset) and item.ndim == 1:
            if item.shape[0] != n:
                # declared as the scan axis of these frames: a length mismatch means frames or
                # positions are missing, which must not pass silently
                kind = _axis_kind(item) or "axis"
                raise InputError(
                    f"{kind} values from {_origin(item)}: {item.shape[0]} values but the scan has {n} frames "
                    "(expected one value per frame; a frame or a position is missing)"
                )
            out.append(item)
    return out


def _auto_axes(layout: _Layout, frames: h5py.Dataset, n: int) -> dict[str, tuple[np.ndarray, str]]:
    """Positions, times and monitor found unambiguously in the NeXus layout."""
    found: dict[str, tuple[np.ndarray, str]] = {}
    for group in layout.nxdata:
        signal = _nxdata_signal(group)
        if signal is None or signal != frames:
            continue
        for axis in _point_axes(group, signal, n):
            kind = _axis_kind(axis)
            if kind and kind not in found:
                got = _scaled(axis, kind)
                if got is not None:
                    found[kind] = got

    if "position" not in found:
        values = []
        for g in layout.positioners:
            v = _child(g, "value")
            if (
                isinstance(v, h5py.Dataset)
                and v.ndim == 1
                and v.shape[0] == n
                and _axis_kind(v) != "time"
            ):
                values.append(v)
        values = _unique(values)
        if len(values) > 1:
            values = [v for v in values if np.ptp(_read_small(v, "position").astype(float)) > 0]
        if len(values) == 1:
            got = _scaled(values[0], "position")
            if got is not None:
                found["position"] = got

    if "time" not in found:
        for names in _TIME_NAMES:
            cands = _unique(
                [
                    d
                    for d in layout.timed
                    if d.shape[0] == n and d.name.rsplit("/", 1)[-1].lower() in names
                ]
            )
            if len(cands) == 1:
                got = _scaled(cands[0], "time")
                if got is not None:
                    found["time"] = got
                break

    mons = _unique([_child(g, "data") for g in layout.monitors])
    mons = [m for m in mons if isinstance(m, h5py.Dataset) and m.ndim == 1]
    if len(mons) == 1 and mons[0].shape[0] != n and mons[0].shape[0] > 1:
        raise InputError(
            f"monitor values from {_origin(mons[0])}: {mons[0].shape[0]} values but the scan has {n} frames "
            "(expected one value per frame)"
        )
    mons = [m for m in mons if m.shape[0] == n]
    if len(mons) == 1:
        found["monitor"] = (_read_small(mons[0], "monitor"), _origin(mons[0]))
    return found


# --------------------------------------------------------------------------- coordinates


def _split_file_spec(spec: str) -> tuple[Path, str | None] | None:
    """``"file:column"`` (or just ``"file"``) when the file part exists, else None."""
    if os.path.isfile(spec):
        return Path(spec), None
    if ":" in spec:
        left, right = spec.rsplit(":", 1)
        if left and os.path.isfile(left):
            return Path(left), right
    return None


def _read_external(spec: Any, key: str, f: h5py.File | None) -> tuple[np.ndarray, str]:
    """Values of ``*_path``: a dataset of the open scan file, ``other.h5:/path`` or ``file.csv:column``."""
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"{key}_path {spec!r}: expected a dataset path or 'file.csv:column'")
    spec = os.fspath(spec)
    file_spec = _split_file_spec(spec)
    if file_spec is not None:
        path, inner = file_spec
        if _is_hdf5(path):
            if not inner:
                raise InputError(f"{key} source {spec!r}: expected 'file.h5:/dataset/path'")
            with _h5open(path, f"{key} file") as g:
                return _dataset_axis(g, inner, key, f"{key} file {str(path)!r}")
        return _read_csv_column(path, inner, key)
    if f is None:
        raise InputError(
            f"{key} source {spec!r}: expected 'file.csv:column' with an existing CSV file"
        )
    return _dataset_axis(f, spec, key, f"scan file {f.filename!r}")


def _dataset_axis(f: h5py.File, path: str, key: str, label: str) -> tuple[np.ndarray, str]:
    obj = _child(f, path)
    if isinstance(obj, h5py.Group):
        cls = _nx_class(obj)
        obj = _child(obj, "value" if cls == "NXpositioner" else "data")
    if not isinstance(obj, h5py.Dataset):
        listing = _listing(_find_datasets_1d(f))
        raise InputError(
            f"{label}: {key} dataset {path} not found; 1-D datasets in the file: {listing}"
        )
    got = _scaled(obj, key)
    if got is None:
        units = _attr_str(obj.attrs.get("units"))
        expected = "a length (mm, um, m)" if key == "position" else "a time (s, ms, us)"
        raise InputError(
            f"{label}: {key} dataset {obj.name} has units {units!r}; expected {expected}"
        )
    return got


def _find_datasets_1d(f: h5py.File) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim == 1:
            found.append(obj)

    f.visititems(visit)
    return found


def _read_csv_column(path: Path, column: str | None, key: str) -> tuple[np.ndarray, str]:
    label = f"{key} file {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{label} could not be read as CSV text: {exc}") from None
    rows = [
        (i + 1, line)
        for i, line in enumerate(text.splitlines())
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(rows) < 2:
        raise InputError(f"{label}: expected a header line and one row per frame")
    header = rows[0][1]
    delim = next((d for d in (",", "\t", ";") if d in header), None)

    def split(line: str) -> list[str]:
        cells = line.split(delim) if delim else line.split()
        return [c.strip().strip("\"'") for c in cells]

    names = split(header)
    if column is None:
        if len(names) != 1:
            raise InputError(f"{label}: {len(names)} columns {names}; expected 'file.csv:column'")
        idx = 0
    elif column in names:
        idx = names.index(column)
    elif column.isdigit() and int(column) < len(names):
        idx = int(column)
    else:
        raise InputError(f"{label}: no column {column!r}; columns are {names}")
    values = np.empty(len(rows) - 1)
    for j, (lineno, line) in enumerate(rows[1:]):
        cells = split(line)
        cell = cells[idx] if idx < len(cells) else ""
        try:
            values[j] = float(cell)
        except ValueError:
            raise InputError(
                f"{label}: column {names[idx]!r} line {lineno} value {cell!r} is not a number"
            ) from None
    return values, f"{path}:{names[idx]}"


def _explicit_axis(spec: Any, key: str, n: int) -> tuple[np.ndarray, str]:
    """``positions=``/``times=``: ``"file.csv:column"``, ``"start,step"`` or an array."""
    arg = "positions" if key == "position" else "times"
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        file_spec = _split_file_spec(text)
        if file_spec is not None:
            path, column = file_spec
            return _read_csv_column(path, column, key)
        m = _START_STEP.fullmatch(text)
        if m:
            try:
                start, step = float(m.group(1)), float(m.group(2))
            except ValueError:
                m = None
            else:
                if not (math.isfinite(start) and math.isfinite(step)):
                    raise InputError(f"{arg} {text!r}: start and step must be finite numbers")
                return start + step * np.arange(n), f"start,step {start:g},{step:g}"
        unit = "mm" if key == "position" else "s"
        raise InputError(
            f"{arg} {text!r}: expected 'file.csv:column' (existing CSV file with a header) or 'start,step' ({unit})"
        )
    try:
        values = np.asarray(spec)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{arg}: expected one number per frame ({exc})") from None
    return values, f"{arg} argument"


def _validate_axis(values: np.ndarray, n: int, key: str, origin: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise InputError(f"{key} values from {origin} have dtype {values.dtype}; expected numbers")
    values = values.astype(float)
    if values.ndim > 1 and sum(s > 1 for s in values.shape) <= 1:
        values = values.reshape(-1)
    if values.ndim != 1 or values.shape[0] != n:
        raise InputError(
            f"{key} values from {origin}: {values.shape[0] if values.ndim == 1 else values.shape} "
            f"values but the scan has {n} frames; expected one per frame"
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise InputError(
            f"{key} values from {origin}: {bad.size} not finite (NaN/inf) at points {_points(bad)}; expected numbers"
        )
    if key == "monitor":
        bad = np.flatnonzero(values <= 0)
        if bad.size:
            raise InputError(
                f"monitor from {origin}: {bad.size} zero or negative values at points {_points(bad)}; "
                "expected positive counts"
            )
    return values


def _points(idx: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:_MAX_LISTED])
    return shown + (f", ... ({idx.size} in all)" if idx.size > _MAX_LISTED else "")


# --------------------------------------------------------------------------- image series


def _open_series(paths: list[str]) -> _ImageSeries:
    import fabio

    sizes = np.empty(len(paths), dtype=np.int64)
    missing = []
    for i, p in enumerate(paths):
        try:
            sizes[i] = os.stat(p).st_size
        except OSError:
            missing.append(p)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:_MAX_LISTED])
        more = f", ... ({len(missing)} in all)" if len(missing) > _MAX_LISTED else ""
        raise InputError(f"{len(missing)} of {len(paths)} frame files do not exist: {shown}{more}")
    first = paths[0]
    if _is_hdf5(Path(first)):
        raise InputError(
            f"frame file {first!r} is HDF5: pass the HDF5 file itself as the scan source, not a list"
        )
    try:
        img = fabio.open(first)
        data = img.data
        nframes = getattr(img, "nframes", 1)
    except Exception as exc:  # fabio raises assorted errors on unknown or garbled files
        raise InputError(
            f"frame file {first!r} could not be read as an image; expected TIFF/EDF/CBF or another fabio format "
            f"(or an HDF5 file): {exc}"
        ) from None
    if data is None or data.ndim != 2:
        raise InputError(
            f"frame file {first!r} holds shape {getattr(data, 'shape', None)}; expected a 2-D image"
        )
    if nframes and nframes > 1:
        raise InputError(
            f"frame file {first!r} holds {nframes} frames; expected one image per file (multi-frame files: "
            "convert to an HDF5 stack)"
        )
    shape = tuple(data.shape)
    dtype = data.dtype
    # Same format + same byte count implies the same frame shape in practice; read one header
    # per other size. Chunk readers check every frame's shape anyway.
    _, reps = np.unique(sizes, return_index=True)
    checks = [i for i in sorted(reps) if sizes[i] != sizes[0]][:_MAX_HEADER_CHECKS] + [
        len(paths) - 1
    ]
    for i in dict.fromkeys(checks):
        if i == 0:
            continue
        try:
            hdr_shape = tuple(fabio.openheader(paths[i]).shape)
        except Exception as exc:  # fabio raises assorted errors on unknown or garbled files
            raise InputError(
                f"frame file {paths[i]!r} could not be read as an image: {exc}"
            ) from None
        if hdr_shape != shape:
            raise InputError(
                f"frame file {paths[i]!r} has shape {hdr_shape} but {first!r} has {shape}; "
                "expected all series frames of one shape"
            )
    # Store one folder and bare names when the files share a folder: a small graph.
    folder = os.path.dirname(paths[0])
    if all(os.path.dirname(q) == folder for q in paths):
        root, names = os.path.abspath(folder), tuple(os.path.basename(q) for q in paths)
    else:
        root, names = "", tuple(os.path.abspath(q) for q in paths)
    stamp = (int(sizes.sum()), os.stat(first).st_mtime_ns, os.stat(paths[-1]).st_mtime_ns)
    return _ImageSeries(root, names, shape, dtype, stamp)
