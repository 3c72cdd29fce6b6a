"""Azimuthal integration of whole scans: frames (point, y, x) -> I(Q), sigma(Q) (point, q).

The integration is pyFAI's bounding-box pixel splitting (method ``("bbox", "csr",
"cython")``), re-organised for scans: the sparse integration matrix is built **once** per
process from pyFAI's geometry (or once per run, saved and memory-mapped by every process,
with ``engine_dir``), the frame-independent corrections (solid angle, polarization, flat
field, static mask) are folded into it, and batches of frames are reduced by one sparse x
dense product instead of one pyFAI call per frame.

For every q bin ``i`` and frame ``f`` (pixel values ``x_j``, pyFAI's bbox coefficients
``c_ij``, normalisation ``n_j = flat_j * polarization_j * solid_angle_j``) the result is
what pyFAI's ``integrate1d(..., method=("bbox", "csr", "cython"), error_model="poisson")``
returns, divided by the point's monitor ``m``::

    I_i     = sum_j c_ij (x_j - dark_j) / sum_j c_ij n_j / m
    sigma_i = sqrt(sum_j c_ij^2 max(x_j, 1)) / sum_j c_ij n_j / m

The Poisson variance of a pixel is its raw count ``max(x_j, 1)`` (which already holds the
dark counts); the noise of the dark frame itself is not added. This is what pyFAI's
cython CSR engine does (checked against pyFAI 2026.9 in the tests), even though pyFAI's
pure-Python ``preproc`` documents ``max(x, 1) + dark``.

The sums run over valid pixels: not masked, finite normalisation, and -- per frame --
finite pixel values (pixels that are NaN/inf, or equal to the detector's pyFAI ``dummy``
value, are left out of that frame only and counted in ``masked_pixels``).

Pixel values are handled in float32, as pyFAI does; sums run in float32 within blocks of
32768 pixels and in float64 across blocks; results are float64 (agreement with pyFAI is
~1e-7 relative on a 2048 x 2048 frame).

Why CSC column blocks rather than one CSR product: frames arrive frame-major (k, npix),
and scipy's sparse x dense kernels want the dense operand pixel-major (npix, k). Each
block of pixels of a batch of frames is transposed into a small buffer that stays in
cache, and the block's columns of the matrix (CSC, sorted indices, restricted to the q
rows it touches) consume it twice: once for I and once for the variance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import xarray as xr

from xrdmap.errors import InputError
from xrdmap.results import json_default

__all__ = [
    "PYFAI_METHOD",
    "ArraySource",
    "IntegrationSpec",
    "IntegrationEngine",
    "IntegratedFrames",
    "make_spec",
    "get_engine",
    "integrate_frames",
    "integrate_scan",
]

PYFAI_METHOD = ("bbox", "csr", "cython")
UNIT = "q_A^-1"
ERROR_MODELS = ("poisson", None)
# Frames reduced together: the transposed pixel block (block_pixels x batch) float32 stays
# in cache while both the intensity and the variance matrices consume it.
BATCH_FRAMES = 32
BLOCK_PIXELS = 32768
# Version of the saved engine layout (IntegrationEngine.save); part of the folder name.
ENGINE_FORMAT = 1
# Chunk size used when integrate_scan gets an in-memory stack (bytes of frames per task).
CHUNK_BYTES = 128 * 2**20


# --------------------------------------------------------------------------------------
# The small, picklable description of an integration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ArraySource:
    """A detector-sized array (mask, dark, flat) carried by value or by file path.

    By value the array travels as zlib-compressed bytes (masks are bit-packed first, so
    a 2880 x 2880 mask is a few kB); by path only the path and the file's sha256 travel
    and each worker reads the file itself.
    """

    name: str
    digest: str
    shape: tuple[int, int]
    dtype: str
    path: str | None = None
    payload: bytes | None = None

    @classmethod
    def from_array(cls, name: str, array: Any) -> ArraySource:
        """Carry ``array`` by value (``name`` is what error messages call it)."""
        arr = np.asarray(array)
        if arr.ndim != 2:
            raise InputError(f"{name} has shape {arr.shape} but a 2-D detector image was expected")
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{name} has dtype {arr.dtype} but a numeric image was expected")
        if name == "mask":
            arr = arr.astype(bool)
            raw = np.packbits(arr, axis=None).tobytes()
        else:
            arr = np.ascontiguousarray(arr)
            raw = arr.tobytes()
        h = hashlib.sha256(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(raw)
        return cls(name, h.hexdigest(), tuple(int(s) for s in arr.shape), arr.dtype.str,
                   payload=zlib.compress(raw, 1))

    @classmethod
    def from_path(cls, name: str, path: str | Path) -> ArraySource:
        """Carry ``path`` (read here once to check it; workers re-read and verify it)."""
        from xrdmap.io import file_checksum, read_image

        p = Path(path)
        arr = read_image(p)
        if arr.ndim != 2:
            raise InputError(f"{name} file {str(p)!r} holds shape {arr.shape} but a 2-D image was expected")
        return cls(name, file_checksum(p), tuple(int(s) for s in arr.shape), arr.dtype.str,
                   path=str(p.resolve()))

    def load(self) -> np.ndarray:
        """The array (bool for a mask, the stored dtype otherwise)."""
        if self.payload is not None:
            raw = zlib.decompress(self.payload)
            if self.name == "mask":
                n = self.shape[0] * self.shape[1]
                return np.unpackbits(np.frombuffer(raw, np.uint8), count=n).astype(bool).reshape(self.shape)
            return np.frombuffer(raw, dtype=np.dtype(self.dtype)).reshape(self.shape)
        from xrdmap.io import file_checksum, read_image

        if file_checksum(self.path) != self.digest:
            raise InputError(f"{self.name} file {self.path!r} changed after the integration was set up")
        arr = read_image(self.path)
        return arr.astype(bool) if self.name == "mask" else arr

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArraySource) and other.digest == self.digest


@dataclass(frozen=True, eq=False)
class IntegrationSpec:
    """Everything that defines an integration, small enough to ship in a dask graph.

    Build it with :func:`make_spec` (which validates it). Engines are built from a spec
    where they run (:func:`get_engine`); specs compare and hash by :attr:`digest`.

    Attributes
    ----------
    poni_json
        The PONI geometry (pyFAI ``get_config()`` dictionary) as canonical JSON.
    shape
        Frame shape (y, x) in pixels.
    npt
        Number of q bins.
    q_range
        (min, max) of the q bins in A^-1, or ``None`` for the full reach of the detector.
    polarization_factor
        pyFAI polarization factor (-1..1), ``None`` for no polarization correction.
    error_model
        ``"poisson"`` (variance = max(raw counts, 1)) or ``None`` (no sigma).
    mask, dark, flat
        :class:`ArraySource` or ``None``. Mask: non-zero = excluded pixel.
    outlier_sigma
        ``None``, or the threshold (in standard deviations) of per-frame sigma clipping
        along each ring (pyFAI ``sigma_clip_ng``) for spotty or textured frames.
    saturation
        Counts at or above which a pixel is saturated and left out of its frame;
        ``"auto"``: the largest value of an unsigned-integer frame type (65535 for the
        16-bit PerkinElmer panel), nothing for float frames; ``None``: never.
    engine_dir
        Folder where the first process that needs the engine stores its arrays and every
        other process maps them (see :func:`get_engine`); ``None``: each process builds
        its own. Not part of the digest: it changes where the engine lives, not its numbers.
    """

    poni_json: str
    shape: tuple[int, int]
    npt: int = 2000
    q_range: tuple[float, float] | None = None
    polarization_factor: float | None = 0.99
    error_model: str | None = "poisson"
    mask: ArraySource | None = None
    dark: ArraySource | None = None
    flat: ArraySource | None = None
    outlier_sigma: float | None = None
    saturation: float | str | None = "auto"
    engine_dir: str | None = field(default=None, compare=False)
    digest: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parts = [self.poni_json, repr(self.shape), repr(self.npt), repr(self.q_range),
                 repr(self.polarization_factor), repr(self.error_model)]
        if self.outlier_sigma is not None:
            parts.append(f"clip{self.outlier_sigma!r}")
        if self.saturation != "auto":
            parts.append(f"sat{self.saturation!r}")
        parts += [a.digest if a is not None else "-" for a in (self.mask, self.dark, self.flat)]
        object.__setattr__(self, "digest", hashlib.sha256("|".join(parts).encode()).hexdigest())

    @property
    def poni(self) -> dict[str, Any]:
        """The PONI geometry as a dictionary."""
        return json.loads(self.poni_json)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntegrationSpec) and other.digest == self.digest

    def __dask_tokenize__(self) -> str:
        return self.digest


def _poni_dict(poni: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    from xrdmap.geometry import read_poni

    if isinstance(poni, (str, Path)):
        return read_poni(poni)
    if not isinstance(poni, Mapping):
        raise InputError(f"poni {type(poni).__name__}: expected a PONI file path or a PONI dictionary")
    missing = [k for k in ("dist", "poni1", "poni2", "wavelength", "detector") if k not in poni]
    if missing:
        raise InputError(f"poni dictionary lacks {', '.join(missing)} (expected pyFAI get_config() keys)")
    return dict(poni)


def _array_source(name: str, value: Any) -> ArraySource | None:
    if value is None or isinstance(value, ArraySource):
        return value
    if isinstance(value, (str, Path)):
        return ArraySource.from_path(name, value)
    return ArraySource.from_array(name, value)


def make_spec(
    poni: Mapping[str, Any] | str | Path,
    shape: tuple[int, int] | None = None,
    *,
    mask: Any = None,
    dark: Any = None,
    flat: Any = None,
    npt: int = 2000,
    q_range: tuple[float, float] | None = None,
    polarization_factor: float | None = 0.99,
    error_model: str | None = "poisson",
    outlier_sigma: float | None = None,
    saturation: float | str | None = "auto",
    engine_dir: str | Path | None = None,
) -> IntegrationSpec:
    """Validate the integration parameters and bundle them into an :class:`IntegrationSpec`.

    Parameters
    ----------
    poni
        PONI file path or dictionary (as :func:`xrdmap.geometry.read_poni` returns).
    shape
        Frame shape (y, x); default: the PONI detector's shape.
    mask, dark, flat
        Arrays, image file paths, or ``None``. Mask: non-zero pixels are excluded (the
        detector's own mask, e.g. module gaps, is always added). Dark is subtracted
        (counts); the flat divides, as pyFAI's ``flat``.
    npt
        Number of q bins (>= 2).
    q_range
        (min, max) in A^-1; must lie within the detector's reach.
    polarization_factor
        pyFAI polarization factor in [-1, 1]; ``None`` for no correction.
    error_model
        ``"poisson"`` or ``None``.
    outlier_sigma
        Reject, frame by frame, pixels further than this many standard deviations from
        their ring's mean (pyFAI ``sigma_clip_ng``, up to 5 iterations); ``None``: no
        rejection (the fast sparse-matrix path).
    saturation
        Saturation level in counts (pixels at or above it are left out of their frame and
        counted in ``masked_pixels``), ``"auto"`` (the maximum of an unsigned-integer frame
        type) or ``None``.
    engine_dir
        Folder shared by the processes that integrate (e.g. next to the run's checkpoints):
        the engine is built once, by the first process that needs it, saved there and
        memory-mapped by the others. ``None``: every process builds its own.
    """
    from xrdmap.geometry import make_integrator

    cfg = _poni_dict(poni)
    try:
        poni_json = json.dumps(cfg, sort_keys=True, default=json_default)
    except TypeError as exc:
        raise InputError(f"poni dictionary: {exc}") from None
    ai = make_integrator(cfg)
    det = ai.detector
    det_shape = tuple(int(s) for s in det.shape) if det.shape is not None else None
    label = f"PONI file {str(poni)!r}" if isinstance(poni, (str, Path)) else "the PONI dictionary"
    if shape is None:
        if det_shape is None:
            raise InputError(f"{label}: detector {det.name} has no fixed shape; expected the frame shape to be given")
        shape = det_shape
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise InputError(f"frame shape {shape}: expected 2 dimensions (y, x)")
    if det_shape is not None and shape != det_shape:
        raise InputError(f"frames have shape {shape} but {label} is for detector {det.name}, which expects "
                         f"{det_shape}; expected a PONI of the detector that recorded the frames")
    if isinstance(npt, bool) or not isinstance(npt, (int, np.integer)) or npt < 2:
        raise InputError(f"npt {npt!r}: expected an integer number of q bins >= 2")
    if error_model is not None and str(error_model).lower() == "none":
        error_model = None
    if error_model is not None:
        error_model = str(error_model).lower()
    if error_model not in ERROR_MODELS:
        raise InputError(f"error_model {error_model!r}: expected 'poisson' or None")
    if polarization_factor is not None:
        polarization_factor = float(polarization_factor)
        if not -1.0 <= polarization_factor <= 1.0:
            raise InputError(f"polarization_factor {polarization_factor}: expected a value in [-1, 1] or None")
    sources = {name: _array_source(name, value) for name, value in (("mask", mask), ("dark", dark), ("flat", flat))}
    for name, src in sources.items():
        if src is not None and src.shape != shape:
            where = f" file {src.path!r}" if src.path else ""
            raise InputError(f"{name}{where} has shape {src.shape} but the frames have shape {shape}")
    if q_range is not None:
        q_range = _check_q_range(q_range, ai, shape, npt)
    if outlier_sigma is not None:
        outlier_sigma = float(outlier_sigma)
        if not outlier_sigma > 0:
            raise InputError(f"outlier_sigma {outlier_sigma}: expected a positive number of standard deviations")
        if error_model != "poisson":
            raise InputError("outlier_sigma needs error_model='poisson' (the clipping compares pixels with sigma)")
    if saturation is not None and saturation != "auto":
        try:
            saturation = float(saturation)
        except (TypeError, ValueError):
            raise InputError(f"saturation {saturation!r}: expected a number of counts, 'auto' or None") from None
        if not saturation > 0:
            raise InputError(f"saturation {saturation}: expected a positive number of counts")
    return IntegrationSpec(poni_json, shape, int(npt), q_range, polarization_factor, error_model,
                           sources["mask"], sources["dark"], sources["flat"], outlier_sigma, saturation,
                           None if engine_dir is None else str(Path(engine_dir).resolve()))


def _check_q_range(q_range, ai, shape, npt) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in q_range)
    except (TypeError, ValueError):
        raise InputError(f"q_range {q_range!r}: expected two numbers (min, max) in A^-1") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo < hi):
        raise InputError(f"q_range {q_range!r}: expected 0 <= min < max in A^-1")
    q = ai.array_from_unit(shape, "center", UNIT, scale=True)
    qmin, qmax = float(np.nanmin(q)), float(np.nanmax(q))
    width = (hi - lo) / npt  # one bin of slack at either end
    if lo < qmin - width or hi > qmax + width:
        raise InputError(
            f"q_range ({lo:g}, {hi:g}) A^-1 is outside the geometry's reach "
            f"({qmin:.4g}-{qmax:.4g} A^-1 on this detector)"
        )
    return lo, hi


# --------------------------------------------------------------------------------------
# The engine: one per process, built from the spec where it runs
# --------------------------------------------------------------------------------------


class IntegratedFrames(NamedTuple):
    """Result of integrating a stack of frames (numpy arrays).

    ``q`` (npt,) in A^-1; ``iq`` and ``sigma`` (n, npt) float64, divided by the monitor
    (``sigma`` is ``None`` without an error model); ``masked_pixels`` (n,) int: pixels
    of the integrated region excluded in that frame only (NaN/inf or the dummy value);
    ``rejected_fraction`` (n,): share of valid pixels removed by sigma clipping (``None``
    without it).
    """

    q: np.ndarray
    iq: np.ndarray
    sigma: np.ndarray | None
    masked_pixels: np.ndarray
    rejected_fraction: np.ndarray | None = None


class _Block(NamedTuple):
    j0: int  # pixel range [j0, j1) of the flattened frame
    j1: int
    r0: int  # q-bin rows [r0, r1) the block touches
    r1: int
    w: sp.csc_matrix  # c_ij / D_i            (r1 - r0, j1 - j0) float32
    w2: sp.csc_matrix | None  # (c_ij / D_i)^2
    dark: np.ndarray | None  # dark_j, float32 (j1 - j0, 1)


def _build_arrays(spec: IntegrationSpec, block_pixels: int) -> dict[str, np.ndarray]:
    """Build the folded integration matrix of ``spec`` from pyFAI, as flat arrays.

    Returns ``q``, ``empty_bins``, ``norm``, ``used``, ``static_mask`` [, ``dark``] and the
    matrix ``W = c_ij / D_i`` in CSC column blocks of ``block_pixels`` pixels, packed:
    ``data`` (float32; ``data2`` its squares for the variance), ``indices`` (int32 q rows
    relative to the block's first row), ``indptr`` (int32, each block's column pointers
    one after the other) and ``blocks`` (int64 rows ``j0, j1, r0, r1, n0, p0``: pixel
    range, q-row range, offset in ``data``/``indices`` and in ``indptr``).
    """
    from pyFAI.units import to_unit

    from xrdmap.geometry import make_integrator

    shape = spec.shape
    npix = shape[0] * shape[1]
    ai = make_integrator(spec.poni)
    det = ai.detector
    mask = np.zeros(shape, bool)
    if det.mask is not None and tuple(det.mask.shape) == shape:
        mask |= det.mask.astype(bool)
    if spec.mask is not None:
        mask |= spec.mask.load()
    # the normalisation first, then pyFAI's geometry caches are dropped: its CSR set-up
    # caches detector-sized arrays of its own, and the two sets together made the peak
    norm = ai.solidAngleArray(shape, True).astype(np.float64)
    if spec.polarization_factor is not None:
        norm *= ai.polarization(shape, spec.polarization_factor)
    ai.reset()
    unit = to_unit(UNIT)
    pos0_range = None if spec.q_range is None else tuple(v / unit.scale for v in spec.q_range)
    csr = ai.setup_sparse_integrator(
        shape, spec.npt, mask=mask.astype(np.int8), pos0_range=pos0_range,
        mask_checksum=spec.mask.digest if spec.mask is not None else "none",
        unit=unit, split=PYFAI_METHOD[0], algo=PYFAI_METHOD[1], empty=0.0, scale=False,
    )
    q = np.asarray(csr.bin_centers, dtype=np.float64) * unit.scale
    data, indices, indptr = (np.array(v) for v in csr.lut)
    del csr, ai
    a = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(spec.npt, npix))
    del data, indices, indptr
    dark = None
    if spec.flat is not None:
        norm = norm * spec.flat.load()
    valid = ~mask & np.isfinite(norm) & (norm != 0)
    if spec.dark is not None:
        dark = np.asarray(spec.dark.load(), np.float32)
        valid &= np.isfinite(dark)
    valid = valid.ravel()
    norm = np.where(valid, norm.ravel(), 0.0)
    a.data *= valid[a.indices]  # statically invalid pixels drop out of every bin
    denom = a @ norm
    empty_bins = denom <= 0
    scale = np.divide(1.0, denom, out=np.zeros_like(denom), where=~empty_bins)
    a.data *= np.repeat(scale, np.diff(a.indptr))  # row i divided by its normalisation
    a.eliminate_zeros()
    w = a.tocsc()
    del a
    w.sort_indices()
    out = {"q": q, "empty_bins": empty_bins, "norm": norm.astype(np.float32),
           "used": np.diff(w.indptr) > 0,  # pixels that feed at least one bin
           "static_mask": mask}
    if dark is not None:
        out["dark"] = np.where(valid, dark.ravel(), 0.0).astype(np.float32)
    data32 = w.data.astype(np.float32)
    indices = np.empty(w.nnz, np.int32)
    ptrs, blocks = [], []
    p0 = 0
    for j0 in range(0, npix, block_pixels):
        j1 = min(j0 + block_pixels, npix)
        n0, n1 = int(w.indptr[j0]), int(w.indptr[j1])
        if n0 == n1:
            continue
        rows = w.indices[n0:n1]
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        indices[n0:n1] = rows - r0
        ptrs.append((w.indptr[j0:j1 + 1] - n0).astype(np.int32))
        blocks.append((j0, j1, r0, r1, n0, p0))
        p0 += j1 - j0 + 1
    out.update(data=data32, indices=indices,
               indptr=np.concatenate(ptrs) if ptrs else np.zeros(0, np.int32),
               blocks=np.array(blocks, np.int64).reshape(-1, 6))
    if spec.error_model == "poisson":
        out["data2"] = data32 * data32
    return out


class IntegrationEngine:
    """Integration matrix of one :class:`IntegrationSpec`, with corrections folded in.

    Built from pyFAI's bbox CSR integrator, or mapped from the arrays an earlier build
    saved (:meth:`save`, :meth:`load`). Do not pickle it (it is large and refuses); ship
    the spec and call :func:`get_engine` where the frames are.
    """

    def __init__(self, spec: IntegrationSpec, *, block_pixels: int = BLOCK_PIXELS,
                 batch_frames: int = BATCH_FRAMES, arrays: Mapping[str, np.ndarray] | None = None) -> None:
        from xrdmap.geometry import make_integrator

        self.spec = spec
        self._clip_ai = None  # pyFAI integrator of the sigma-clipping path, built on first use
        self.batch_frames = int(batch_frames)
        self.block_pixels = int(block_pixels)
        if arrays is None:
            arrays = _build_arrays(spec, self.block_pixels)
        self.arrays = dict(arrays)
        det = make_integrator(spec.poni).detector
        self._dummy = (det.dummy, det.delta_dummy, det)
        self.q = np.asarray(arrays["q"], np.float64)
        self.empty_bins = np.asarray(arrays["empty_bins"], bool)
        self.norm = arrays["norm"]
        self.used = arrays["used"]
        self.static_mask = arrays["static_mask"]
        self.dark = arrays.get("dark")
        self.nnz = int(arrays["data"].size)
        self.blocks = self._blocks(arrays)

    def _blocks(self, arrays: Mapping[str, np.ndarray]) -> list[_Block]:
        """Views of the packed arrays as one CSC matrix per block of pixels (no copies)."""
        data, data2, indices, indptr = (arrays.get(k) for k in ("data", "data2", "indices", "indptr"))
        variance = self.spec.error_model == "poisson"
        blocks = []
        for j0, j1, r0, r1, n0, p0 in np.asarray(arrays["blocks"]).tolist():
            n1 = n0 + int(indptr[p0 + j1 - j0])
            shape = (r1 - r0, j1 - j0)
            parts = (indices[n0:n1], indptr[p0:p0 + j1 - j0 + 1])
            wb = sp.csc_matrix((data[n0:n1], *parts), shape=shape, copy=False)
            w2b = sp.csc_matrix((data2[n0:n1], *parts), shape=shape, copy=False) if variance else None
            for m in (wb, w2b):
                if m is not None:
                    m.has_sorted_indices = True  # sorted when built; never re-sorted in place
            dark = None if self.dark is None else self.dark[j0:j1, None]
            blocks.append(_Block(j0, j1, r0, r1, wb, w2b, dark))
        return blocks

    def save(self, folder: str | Path) -> None:
        """Write the engine's arrays as ``.npy`` files (plus ``engine.json``) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in self.arrays.items():
            np.save(folder / f"{name}.npy", np.asarray(arr), allow_pickle=False)
        meta = {"digest": self.spec.digest, "block_pixels": self.block_pixels, "format": ENGINE_FORMAT,
                "arrays": sorted(self.arrays)}
        (folder / "engine.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, spec: IntegrationSpec, folder: str | Path, *, mmap: bool = True,
             batch_frames: int = BATCH_FRAMES) -> IntegrationEngine:
        """The engine :meth:`save` wrote for ``spec`` into ``folder``, its arrays memory-mapped
        (read-only; processes that map the same files share their pages)."""
        folder = Path(folder)
        meta = json.loads((folder / "engine.json").read_text())
        if meta.get("digest") != spec.digest or meta.get("format") != ENGINE_FORMAT:
            raise InputError(f"integration engine in {str(folder)!r} belongs to another integration")
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
                  for name in meta["arrays"]}
        return cls(spec, block_pixels=int(meta["block_pixels"]), batch_frames=batch_frames, arrays=arrays)

    def __reduce__(self):
        raise TypeError("IntegrationEngine must not be pickled: ship its IntegrationSpec and call get_engine()")

    # ---- products ---------------------------------------------------------------------

    def _reduce(self, x: np.ndarray, *, variance: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """W @ (x - dark) and W^2 @ max(x, 1) for a batch x (k, npix): (npt, k) float64.

        Each block of pixels is transposed into a small float32 buffer (pixel-major, in
        cache) that both the intensity and the variance matrices consume, so the frames
        are read once and scipy's CSC x dense kernel streams over contiguous rows.
        """
        k = x.shape[0]
        npt = self.spec.npt
        out = np.zeros((npt, k))
        var = np.zeros((npt, k)) if variance else None
        buf = np.empty((self.block_pixels, k), np.float32)
        buf2 = np.empty((self.block_pixels, k), np.float32) if variance else None
        for blk in self.blocks:
            n = blk.j1 - blk.j0
            xt = x[:, blk.j0:blk.j1].T
            b = buf[:n]
            np.copyto(b, xt, casting="unsafe")  # the one strided pass over the frames
            if variance:
                b2 = buf2[:n]
                np.maximum(b, 1.0, out=b2)  # raw counts, before the dark is taken off
            if blk.dark is not None:
                b -= blk.dark  # float32, in cache
            out[blk.r0:blk.r1] += blk.w @ b
            if variance:
                var[blk.r0:blk.r1] += blk.w2 @ b2
        return out, var

    def _apply(self, x: np.ndarray, squared: bool) -> np.ndarray:
        """W @ x.T (or W^2 @ x.T) for x (k, npix) already prepared: (npt, k) float64."""
        k = x.shape[0]
        out = np.zeros((self.spec.npt, k))
        buf = np.empty((self.block_pixels, k), np.float32)
        for blk in self.blocks:
            b = buf[: blk.j1 - blk.j0]
            np.copyto(b, x[:, blk.j0:blk.j1].T, casting="unsafe")
            out[blk.r0:blk.r1] += (blk.w2 if squared else blk.w) @ b
        return out

    def _saturation(self, dtype: np.dtype) -> float | None:
        """Saturation level for frames of ``dtype`` (see :class:`IntegrationSpec`)."""
        sat = self.spec.saturation
        if sat == "auto":
            return float(np.iinfo(dtype).max) if np.dtype(dtype).kind == "u" else None
        return sat

    def _bad_pixels(self, frame: np.ndarray) -> np.ndarray:
        """Pixels of the integrated region to drop from this frame (flattened bool)."""
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(frame)
            sat = self._saturation(frame.dtype)
            if sat is not None:
                bad |= frame >= sat
            dummy, delta, det = self._dummy
            if dummy is not None:
                d, dd = det.get_dummies(frame.dtype)
                bad |= np.abs(frame.astype(np.float32) - d) <= dd
        return bad & self.used

    def _integrate_one_masked(self, frame: np.ndarray, bad: np.ndarray, variance: bool):
        """One frame whose ``bad`` pixels are excluded: renormalise with the valid pixels."""
        ok = ~bad
        f = np.where(ok, frame.astype(np.float32), np.float32(0))
        sig = f if self.dark is None else np.where(ok, f - self.dark, np.float32(0))
        num, den = self._apply(np.stack([sig, np.where(ok, self.norm, 0)]), squared=False).T
        with np.errstate(invalid="ignore", divide="ignore"):
            empty = den <= 1e-12
            iq = np.where(empty, np.nan, num / den)
            sigma = None
            if variance:
                v = np.where(ok, np.maximum(f, np.float32(1)), np.float32(0))
                var = self._apply(v[None], squared=True)[:, 0]
                sigma = np.where(empty, np.nan, np.sqrt(var) / den)
        return iq, sigma

    def integrate(self, frames: np.ndarray, monitor: np.ndarray | None = None) -> IntegratedFrames:
        """Integrate frames (n, y, x) or (y, x); I and sigma are divided by ``monitor`` (n,)."""
        frames = np.asarray(frames)
        single = frames.ndim == 2
        if single:
            frames = frames[None]
        if frames.ndim != 3 or tuple(frames.shape[1:]) != self.spec.shape:
            raise InputError(f"frames have shape {frames.shape} but (n, {self.spec.shape[0]}, "
                             f"{self.spec.shape[1]}) was expected")
        n = frames.shape[0]
        mon = np.ones(n) if monitor is None else np.asarray(monitor, np.float64).reshape(-1)
        if mon.shape != (n,):
            raise InputError(f"monitor has {mon.size} values but there are {n} frames")
        if self.spec.outlier_sigma is not None:
            res = self._integrate_clipped(frames, mon)
            if single:
                res = IntegratedFrames(res.q, res.iq[0], res.sigma[0], res.masked_pixels[0],
                                       res.rejected_fraction[0])
            return res
        variance = self.spec.error_model == "poisson"
        npt = self.spec.npt
        iq = np.empty((n, npt))
        sigma = np.empty((n, npt)) if variance else None
        masked = np.zeros(n, np.int64)
        flat = frames.reshape(n, -1)
        check_dummy = self._dummy[0] is not None
        sat = self._saturation(frames.dtype)
        for s in range(0, n, self.batch_frames):
            x = flat[s:s + self.batch_frames]
            num, var = self._reduce(x, variance=variance)
            if variance:
                np.sqrt(var, out=var)
            # A non-finite pixel anywhere in the integrated region makes its bins non-finite.
            suspect = ~np.isfinite(num[~self.empty_bins]).all(axis=0)
            if sat is not None:
                suspect |= x.max(axis=1) >= sat  # one vectorised pass, no boolean frame
            for k in range(x.shape[0]):
                bad = None
                if suspect[k] or check_dummy:
                    bad = self._bad_pixels(x[k])
                    masked[s + k] = int(bad.sum())
                if bad is not None and masked[s + k]:
                    iq[s + k], sg = self._integrate_one_masked(x[k], bad, variance)
                    if variance:
                        sigma[s + k] = sg
                else:
                    iq[s + k] = num[:, k]
                    if variance:
                        sigma[s + k] = var[:, k]
        iq[:, self.empty_bins] = np.nan
        iq /= mon[:, None]
        if variance:
            sigma[:, self.empty_bins] = np.nan
            sigma /= mon[:, None]
        if single:
            iq, masked = iq[0], masked[0]
            sigma = None if sigma is None else sigma[0]
        return IntegratedFrames(self.q.copy(), iq, sigma, masked)


    def _integrate_clipped(self, frames: np.ndarray, mon: np.ndarray) -> IntegratedFrames:
        """Per-frame sigma clipping along rings (pyFAI ``sigma_clip_ng``): the slow path."""
        from xrdmap.mask import sigma_clip_profile

        if self._clip_ai is None:
            from xrdmap.geometry import make_integrator

            self._clip_ai = make_integrator(self.spec.poni)
        spec = self.spec
        n = frames.shape[0]
        iq = np.empty((n, spec.npt))
        sigma = np.empty((n, spec.npt))
        masked = np.zeros(n, np.int64)
        rejected = np.zeros(n)
        dark = None if spec.dark is None else spec.dark.load()
        flat = None if spec.flat is None else spec.flat.load()
        for k in range(n):
            raw = np.asarray(frames[k])
            masked[k] = int(self._bad_pixels(raw.ravel()).sum())
            frame = raw.astype(np.float64)
            bad = ~np.isfinite(frame)
            sat = self._saturation(raw.dtype)
            if sat is not None:
                bad |= raw >= sat
            q, iq[k], sigma[k], rejected[k] = sigma_clip_profile(
                self._clip_ai, np.where(bad, 0.0, frame), npt=spec.npt, q_range=spec.q_range,
                thres=spec.outlier_sigma, mask=self.static_mask | bad,
                polarization_factor=spec.polarization_factor, dark=dark, flat=flat,
            )
        iq[:, self.empty_bins] = np.nan
        sigma[:, self.empty_bins] = np.nan
        return IntegratedFrames(self.q.copy(), iq / mon[:, None], sigma / mon[:, None], masked, rejected)


_ENGINES: OrderedDict[str, IntegrationEngine] = OrderedDict()
_ENGINES_LOCK = threading.Lock()
_MAX_ENGINES = 2


def get_engine(spec: IntegrationSpec) -> IntegrationEngine:
    """The engine of ``spec``, built on first use and cached in this process.

    At most two engines are kept (e.g. a sample and its background geometry); threads of
    one process share them. With ``spec.engine_dir`` the processes share one build: the
    first one builds the engine (the others wait on a file lock), saves its arrays there
    (temporary folder + rename) and every process memory-maps them, so the build's
    memory peak happens once and the matrix pages are shared through the page cache.
    """
    with _ENGINES_LOCK:
        engine = _ENGINES.get(spec.digest)
        if engine is None:
            engine = _shared_engine(spec) if spec.engine_dir else IntegrationEngine(spec)
            _ENGINES[spec.digest] = engine
            while len(_ENGINES) > _MAX_ENGINES:
                _ENGINES.popitem(last=False)
        else:
            _ENGINES.move_to_end(spec.digest)
        return engine


def release_engines() -> None:
    """Drop this process's cached engines and give its freed heap back to the system.

    Run on the dask workers (``client.run``) once a scan is integrated: a worker's RSS
    falls from ~0.5-0.7 GB to ~0.25 GB (measured after 200 frames of 2048 x 2048 px), so
    that workers shutting down slowly beside the analysis do not hold that memory.
    """
    import gc

    with _ENGINES_LOCK:
        _ENGINES.clear()
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl): nothing to give back
            ctypes.CDLL("libc.so.6").malloc_trim(0)


_LOAD_ERRORS = (OSError, ValueError, KeyError, EOFError, InputError)


def _engine_folder(spec: IntegrationSpec) -> Path:
    import pyFAI

    key = f"{spec.digest}|{pyFAI.version}|{ENGINE_FORMAT}|{BLOCK_PIXELS}"
    return Path(spec.engine_dir) / f"engine-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


@contextlib.contextmanager
def _exclusive(fh: Any) -> Iterator[None]:
    """Hold an exclusive lock on the open file ``fh`` (between processes; none without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows): concurrent builds, one rename wins
        yield
        return
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)


def _shared_engine(spec: IntegrationSpec) -> IntegrationEngine:
    """Map the engine saved in ``spec.engine_dir``; build and save it first if absent."""
    folder = _engine_folder(spec)
    try:
        return IntegrationEngine.load(spec, folder)
    except _LOAD_ERRORS:
        pass
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(folder.with_name(folder.name + ".lock"), "a")
    except OSError:  # the folder cannot be written: build for this process only
        return IntegrationEngine(spec)
    with lock_file, _exclusive(lock_file):
        try:
            return IntegrationEngine.load(spec, folder)  # built by another process meanwhile
        except _LOAD_ERRORS:
            shutil.rmtree(folder, ignore_errors=True)  # absent, or left damaged
        built = IntegrationEngine(spec)
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        try:
            built.save(tmp)
            os.replace(tmp, folder)
            return IntegrationEngine.load(spec, folder)
        except _LOAD_ERRORS:
            shutil.rmtree(tmp, ignore_errors=True)
            return built


def integrate_frames(frames: np.ndarray, spec: IntegrationSpec, monitor: np.ndarray | None = None) -> IntegratedFrames:
    """Integrate in-memory frames (n, y, x) or one frame (y, x) with ``spec`` (no dask)."""
    return get_engine(spec).integrate(frames, monitor)


# --------------------------------------------------------------------------------------
# Whole scans, lazily
# --------------------------------------------------------------------------------------


def _integrate_block(frames: Any, monitor: np.ndarray, spec: IntegrationSpec) -> np.ndarray:
    """dask task: one chunk of frames -> (k, npt [+ npt] + 1) packed iq | sigma | masked.

    ``frames`` arrives as dask's nested list over the contracted (y, x) chunks; there is
    exactly one of each (integrate_scan rechunks so), and unwrapping it instead of letting
    dask concatenate saves a copy of the chunk.
    """
    while isinstance(frames, list):
        (frames,) = frames
    res = get_engine(spec).integrate(frames, monitor)
    parts = [res.iq] + ([res.sigma] if res.sigma is not None else []) + [res.masked_pixels[:, None]]
    if res.rejected_fraction is not None:
        parts.append(res.rejected_fraction[:, None])
    return np.concatenate(parts, axis=1)


def integrate_scan(
    scan: xr.DataArray,
    poni: Mapping[str, Any] | str | Path,
    *,
    mask: Any = None,
    dark: Any = None,
    flat: Any = None,
    npt: int = 2000,
    q_range: tuple[float, float] | None = None,
    polarization_factor: float | None = 0.99,
    error_model: str | None = "poisson",
    chunk_frames: int | None = None,
    outlier_sigma: float | None = None,
    saturation: float | str | None = "auto",
    engine_dir: str | Path | None = None,
) -> xr.Dataset:
    """Azimuthally integrate every frame of a scan, lazily (one dask task per frame chunk).

    Parameters
    ----------
    scan
        Frames with dims (point, y, x), numpy- or dask-backed (as :func:`xrdmap.open_scan`
        returns). A ``monitor`` coordinate on ``point``, if present, divides I and sigma.
    poni
        PONI file path or dictionary.
    mask, dark, flat
        Arrays or image file paths (mask: non-zero = excluded). See :func:`make_spec`.
    npt
        Number of q bins.
    q_range
        (min, max) of the q axis in A^-1; default the detector's full reach.
    polarization_factor
        pyFAI polarization factor; ``None`` for no correction.
    error_model
        ``"poisson"`` (gives ``iq_sigma``) or ``None``.
    chunk_frames
        Frames per task; default: the scan's own chunks (about 128 MB of frames per task
        for an in-memory stack).
    outlier_sigma
        Per-frame sigma clipping along rings for spotty or textured frames (see
        :func:`make_spec`); adds ``rejected_fraction`` (point). Much slower than the
        default sparse-matrix path.
    saturation
        Saturation level in counts, ``"auto"`` (the maximum of unsigned-integer frames) or
        ``None``; saturated pixels are left out of their frame and counted in
        ``masked_pixels``.
    engine_dir
        Folder shared by the worker processes: the integration engine is built once,
        saved there and memory-mapped by every worker (see :func:`get_engine`); ``None``:
        each worker process builds its own.

    Returns
    -------
    xarray.Dataset
        ``iq`` and ``iq_sigma`` (point, q) float64 in detector counts per monitor count,
        bbox-split and corrected for solid angle, polarization and flat (pyFAI's
        normalisation); ``q`` in A^-1; ``masked_pixels`` (point) int64; the scan's
        ``point`` coordinates; attrs ``integration_method`` (pyFAI method triple),
        ``npt``, ``polarization_factor``, ``error_model``, ``pyfai_version``,
        ``integration_spec`` (its digest). Dask-backed: compute the variables together
        (``ds.compute()``), since they come from the same tasks.
    """
    import dask.array as da
    import pyFAI

    if not isinstance(scan, xr.DataArray) or scan.ndim != 3:
        got = type(scan).__name__ if not isinstance(scan, xr.DataArray) else f"dims {scan.dims}"
        raise InputError(f"scan: expected a DataArray of frames with dims (point, y, x), got {got}")
    if scan.dims[0] != "point":
        raise InputError(f"scan has dims {scan.dims} but (point, y, x) was expected")
    if scan.dtype.kind not in "biuf":
        raise InputError(f"scan frames have dtype {scan.dtype} but numeric frames were expected")
    spec = make_spec(poni, tuple(scan.shape[1:]), mask=mask, dark=dark, flat=flat, npt=npt,
                     q_range=q_range, polarization_factor=polarization_factor, error_model=error_model,
                     outlier_sigma=outlier_sigma, saturation=saturation, engine_dir=engine_dir)
    n = scan.shape[0]
    if chunk_frames is not None and (int(chunk_frames) < 1):
        raise InputError(f"chunk_frames {chunk_frames}: expected a positive number of frames")
    data = scan.data
    if isinstance(data, da.Array):
        point_chunks = int(chunk_frames) if chunk_frames else data.chunks[0]
        data = data.rechunk({0: point_chunks, 1: -1, 2: -1})
    else:
        frame_bytes = max(1, scan.shape[1] * scan.shape[2] * scan.dtype.itemsize)
        k = int(chunk_frames) if chunk_frames else max(1, min(n, CHUNK_BYTES // frame_bytes))
        data = da.from_array(np.asarray(data), chunks=(k, -1, -1))
    if "monitor" in scan.coords:
        monitor = np.asarray(scan.coords["monitor"].values, np.float64)
        bad = np.flatnonzero(~(np.isfinite(monitor) & (monitor > 0)))
        if bad.size:
            raise InputError(f"monitor of point {int(bad[0])} is {monitor[bad[0]]}: expected positive monitor counts")
    else:
        monitor = np.ones(n)
    mon = da.from_array(monitor, chunks=(data.chunks[0],))
    has_sigma = spec.error_model is not None
    clipped = spec.outlier_sigma is not None
    width = spec.npt * (2 if has_sigma else 1) + 1 + int(clipped)
    # The spec is one graph key: each worker receives it once, builds its engine once.
    from dask import delayed

    spec_key = delayed(spec, pure=True)
    packed = da.blockwise(_integrate_block, "pk", data, "pyx", mon, "p", spec_key, None,
                          new_axes={"k": width}, dtype=np.float64, concatenate=False,
                          name=f"integrate-{spec.digest[:12]}")
    q = _q_axis(spec)
    coords = {name: c.variable for name, c in scan.coords.items() if c.dims == ("point",)}
    if "point" not in coords:
        coords["point"] = ("point", np.arange(n))
    coords["q"] = ("q", q, {"units": "1/angstrom", "long_name": "Q"})
    npt = spec.npt
    data_vars = {
        "iq": (("point", "q"), packed[:, :npt],
               {"long_name": "I(Q)", "units": "counts per monitor count",
                "integration_method": ",".join(PYFAI_METHOD)}),
        "masked_pixels": ("point", packed[:, width - 1 - int(clipped)].astype(np.int64),
                          {"long_name": "pixels excluded in this frame only (NaN/inf/dummy/saturated)"}),
    }
    if clipped:
        data_vars["rejected_fraction"] = ("point", packed[:, width - 1],
                                          {"long_name": "fraction of pixels rejected by sigma clipping",
                                           "threshold_sigma": spec.outlier_sigma})
    if has_sigma:
        data_vars["iq_sigma"] = (("point", "q"), packed[:, npt:2 * npt],
                                 {"long_name": "sigma of I(Q)", "units": "counts per monitor count",
                                  "error_model": spec.error_model})
    attrs = {
        "integration_method": list(PYFAI_METHOD),
        "integration_unit": UNIT,
        "npt": npt,
        "q_range": list(spec.q_range) if spec.q_range else "full",
        "polarization_factor": spec.polarization_factor if spec.polarization_factor is not None else "none",
        "error_model": spec.error_model or "none",
        "monitor_normalised": "monitor" in scan.coords,
        "pyfai_version": pyFAI.version,
        "integration_spec": spec.digest,
        "outlier_sigma": spec.outlier_sigma if clipped else "none",
        "saturation": spec.saturation if spec.saturation is not None else "none",
        "mask": _describe(spec.mask), "dark": _describe(spec.dark), "flat": _describe(spec.flat),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _describe(src: ArraySource | None) -> str:
    if src is None:
        return "none"
    return f"{src.path} sha256:{src.digest}" if src.path else f"array sha256:{src.digest}"


_Q_AXES: dict[str, np.ndarray] = {}


def _q_axis(spec: IntegrationSpec) -> np.ndarray:
    """Bin centres (A^-1) exactly as pyFAI places them, without building the matrix.

    pyFAI's bbox binning spans [min(q - dq), max(q + dq)] over unmasked pixels, or the
    requested range. For a requested range the pixels do not matter: pyFAI's binning
    class gets one pixel in the middle of it. Otherwise it gets the two extreme pixels,
    which gives the same bins at a fraction of the memory a full engine needs in the
    client process. Cached per spec in this process.
    """
    engine = _ENGINES.get(spec.digest)
    if engine is not None:
        return engine.q.copy()
    if spec.digest not in _Q_AXES:
        if len(_Q_AXES) >= 8:
            _Q_AXES.clear()
        _Q_AXES[spec.digest] = _compute_q_axis(spec)
    return _Q_AXES[spec.digest].copy()


def _compute_q_axis(spec: IntegrationSpec) -> np.ndarray:
    from pyFAI.ext.splitBBoxCSR import HistoBBox1d
    from pyFAI.units import to_unit

    from xrdmap.geometry import make_integrator

    unit = to_unit(UNIT)
    if spec.q_range is not None:
        pos0_range = tuple(v / unit.scale for v in spec.q_range)
        middle = np.array([0.5 * (pos0_range[0] + pos0_range[1])])
        bins = HistoBBox1d(middle, np.zeros(1), bins=spec.npt, pos0_range=pos0_range,
                           allow_pos0_neg=not unit.positive, unit=unit, empty=0.0)
        return np.asarray(bins.bin_centers, np.float64) * unit.scale
    ai = make_integrator(spec.poni)
    pos0 = ai.array_from_unit(spec.shape, "center", unit, scale=False).ravel()
    dpos0 = ai.array_from_unit(spec.shape, "delta", unit, scale=False).ravel()
    valid = np.ones(pos0.size, bool)
    if ai.detector.mask is not None and tuple(ai.detector.mask.shape) == spec.shape:
        valid &= ~ai.detector.mask.astype(bool).ravel()
    if spec.mask is not None:
        valid &= ~spec.mask.load().ravel()
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        raise InputError("mask excludes every pixel of the detector")
    ends = idx[[np.argmin((pos0 - dpos0)[idx]), np.argmax((pos0 + dpos0)[idx])]]
    bins = HistoBBox1d(pos0[ends], dpos0[ends], bins=spec.npt, pos0_range=None,
                       allow_pos0_neg=not unit.positive, unit=unit, empty=0.0)
    return np.asarray(bins.bin_centers, np.float64) * unit.scale
