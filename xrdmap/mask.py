"""Static detector masks and per-frame outlier rejection.

A mask is a 2-D array, nonzero (True) = pixel excluded, in the orientation of the frames as
they are read from the file. Categories: detector gaps (pyFAI's detector definition),
beamstop (a polygon, or found from its shadow), hot/dead pixels (from dark and flat
statistics). :func:`save_mask` writes EDF (fabio, optionally gzipped) or NPY, as uint8 0/1.

:func:`sigma_clip_profile` rejects outlier pixels frame by frame (single-crystal spots,
texture, zingers) with pyFAI's ``sigma_clip_ng``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xrdmap.errors import ConfigError, InputError, OutputError

__all__ = [
    "detector_gaps",
    "beamstop_polygon",
    "find_beamstop",
    "hot_dead_pixels",
    "combine_masks",
    "save_mask",
    "mask_format",
    "load_mask",
    "sigma_clip_profile",
]


def _read_array(path: str | Path, what: str = "image") -> np.ndarray:
    """Read one 2-D image with :func:`xrdmap.io.read_image`, naming ``what`` in errors."""
    from xrdmap.io import read_image

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {str(p)!r} does not exist (expected an image file: EDF, TIFF, CBF, NPY, HDF5)")
    arr = np.asarray(read_image(p))
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InputError(f"{what} {str(p)!r} has shape {arr.shape} but a 2-D image was expected")
    return arr


def load_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask file (nonzero = masked) as a boolean array, checking its shape."""
    m = _read_array(path, "mask") != 0
    if shape is not None and m.shape != tuple(shape):
        raise InputError(f"mask {str(path)!r} has shape {m.shape} but the frames have shape {tuple(shape)}")
    return m


def detector_gaps(detector_name: str | Any, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels that pyFAI's detector definition masks (module gaps, dead stripes).

    Parameters
    ----------
    detector_name : str or pyFAI detector
    shape : (rows, columns), optional
        Image shape; must equal the detector's (unbinned or binned) shape when given.

    Returns
    -------
    numpy.ndarray of bool
    """
    from xrdmap.calibrate import make_detector

    det = make_detector(detector_name)
    if shape is not None and det.shape is not None and tuple(shape) != tuple(det.shape):
        if not det.guess_binning(np.empty(shape, dtype=np.int8)):
            raise InputError(f"image shape {tuple(shape)} does not match detector {det.name!r} "
                             f"shape {tuple(det.shape)}")
    m = det.mask
    if m is None:
        m = det.calc_mask()
    if m is None:
        full = shape or det.shape
        if full is None:
            raise InputError(f"detector {det.name!r} has no fixed shape: give the image shape")
        return np.zeros(full, dtype=bool)
    return np.asarray(m) != 0


def beamstop_polygon(shape: tuple[int, int], vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Pixels whose centre lies inside a polygon of (x=column, y=row) vertices in pixels."""
    from matplotlib.path import Path as MplPath

    v = np.asarray(vertices, dtype=float)
    if v.ndim != 2 or v.shape[1] != 2 or len(v) < 3:
        raise InputError(f"beamstop polygon {vertices!r}: expected at least 3 (x, y) vertices")
    rows, cols = np.indices(shape)
    inside = MplPath(v).contains_points(np.column_stack([cols.ravel(), rows.ravel()]), radius=1e-9)
    return inside.reshape(shape)


def find_beamstop(
    image: np.ndarray,
    *,
    center: tuple[float, float] | None = None,
    invalid: np.ndarray | None = None,
    fraction: float = 0.3,
    smooth_px: int = 5,
    grow_px: int = 3,
    bridge_px: int = 10,
) -> np.ndarray:
    """The beamstop's shadow: the connected low-intensity region at or nearest the beam centre.

    Parameters
    ----------
    image : 2-D array
        A frame with scattering all around the beam centre (a calibrant or sample image).
    center : (x, y), optional
        Beam centre (column, row) in pixels; default: the centroid of the low region
        nearest the middle of the image.
    invalid : bool array, optional
        Pixels to ignore (detector gaps, dummy values): never part of the shadow.
    fraction : float
        A pixel is in shadow when its median-smoothed intensity is below ``fraction`` times
        the median of the valid pixels.
    smooth_px, grow_px : int
        Median-filter size and dilation (pixels) applied to the shadow.
    bridge_px : int
        The shadow is followed across invalid pixels (module gaps) up to this many pixels
        from its edge.

    Notes
    -----
    Only the opaque part of the shadow is found; a semi-transparent beamstop arm that
    dims the scattering by less than ``1 - fraction`` needs a polygon
    (:func:`beamstop_polygon`). Invalid pixels are never included.

    Returns
    -------
    numpy.ndarray of bool
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=float)
    if img.ndim != 2:
        raise InputError(f"image has shape {img.shape} but a 2-D image was expected")
    bad = ~np.isfinite(img) | (img < 0)
    if invalid is not None:
        bad |= np.asarray(invalid, dtype=bool)
    level = fraction * np.median(img[~bad])
    filled = np.where(bad, np.inf, img)
    sm = ndimage.median_filter(filled, size=smooth_px, mode="nearest")
    low = (sm < level) & ~bad
    # let the shadow continue across detector gaps (a few pixels wide) without joining
    # distant low regions through the gap grid
    bridge = bad & ndimage.binary_dilation(low, iterations=bridge_px)
    labels, n = ndimage.label(low | bridge)
    if n == 0:
        return np.zeros(img.shape, dtype=bool)
    rows, cols = img.shape
    cx, cy = center if center is not None else ((cols - 1) / 2, (rows - 1) / 2)
    iy, ix = int(round(cy)), int(round(cx))
    if 0 <= iy < rows and 0 <= ix < cols and labels[iy, ix] > 0:
        lab = labels[iy, ix]
    else:
        # nearest shadow pixel to the centre, among sizeable regions
        sizes = np.bincount(labels.ravel())
        big = sizes >= max(20, smooth_px**2)
        big[0] = False
        cand = big[labels] & low
        if not cand.any():
            return np.zeros(img.shape, dtype=bool)
        yy, xx = np.nonzero(cand)
        k = np.argmin((yy - cy) ** 2 + (xx - cx) ** 2)
        lab = labels[yy[k], xx[k]]
    shadow = ndimage.binary_fill_holes(labels == lab)
    if grow_px > 0:
        shadow = ndimage.binary_dilation(shadow, iterations=int(grow_px))
    return shadow & ~bad


def _robust_z(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    med = np.median(values[finite])
    mad = 1.4826 * np.median(np.abs(values[finite] - med))
    if mad == 0:
        mad = float(np.std(values[finite])) or 1.0
    return (values - med) / mad


def _stack(frames, what):
    if isinstance(frames, (str, Path)):
        frames = [frames]
    if isinstance(frames, (list, tuple)):
        frames = [(_read_array(f, what) if isinstance(f, (str, Path)) else np.asarray(f)) for f in frames]
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            raise InputError(f"{what} frames have different shapes {sorted(shapes)}")
        frames = np.stack(frames)
    a = np.asarray(frames, dtype=float)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise InputError(f"{what} has shape {a.shape} but a 2-D image or a (n, y, x) stack was expected")
    return a


def hot_dead_pixels(darks=None, flats=None, n_sigma: float = 6.0) -> np.ndarray:
    """Hot pixels from darks and hot/dead pixels from flats, by robust (median + MAD) statistics.

    Parameters
    ----------
    darks, flats : array (y, x) or (n, y, x), or list of arrays/paths, optional
        Dark frames (no beam) and flat-field frames (uniform illumination). Frames are
        averaged per pixel first.
    n_sigma : float
        A pixel is flagged when its mean dark is more than ``n_sigma`` robust standard
        deviations (1.4826 MAD) above the median, or its mean flat is that far from the
        median either way (or not positive).

    Returns
    -------
    numpy.ndarray of bool
    """
    if not n_sigma > 0:
        raise ConfigError(f"n_sigma {n_sigma}: expected a positive number of standard deviations")
    if darks is None and flats is None:
        raise InputError("hot_dead_pixels needs dark and/or flat frames")
    out = None
    if darks is not None:
        d = _stack(darks, "dark").mean(axis=0)
        out = ~np.isfinite(d) | (_robust_z(d) > n_sigma)
    if flats is not None:
        f = _stack(flats, "flat").mean(axis=0)
        z = _robust_z(f)
        m = ~np.isfinite(f) | (f <= 0) | (np.abs(z) > n_sigma)
        if out is not None and out.shape != m.shape:
            raise InputError(f"darks have shape {out.shape} but flats have shape {m.shape}")
        out = m if out is None else out | m
    return out


def combine_masks(*masks: np.ndarray | None) -> np.ndarray:
    """Union of masks (nonzero = masked); ``None`` entries are skipped."""
    arrs = [np.asarray(m) != 0 for m in masks if m is not None]
    if not arrs:
        raise InputError("combine_masks: no mask given")
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise InputError(f"masks have different shapes {sorted(shapes)}: expected one detector shape")
    return np.logical_or.reduce(arrs)


MASK_SUFFIXES = (".edf", ".edf.gz", ".npy")


def mask_format(path: str | Path) -> str:
    """The mask file format of ``path`` from its name: ``.edf``, ``.edf.gz`` or ``.npy``."""
    name = Path(path).name.lower()
    for suffix in sorted(MASK_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise OutputError(f"mask output {str(path)!r}: expected a .edf, .edf.gz or .npy file name")


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    """Write a mask as uint8 0/1 (1 = masked), atomically.

    The format follows the name: ``.edf`` (fabio; what pyFAI and Dioptas read), ``.edf.gz``
    (the same, gzip-compressed: a mostly empty 2880 x 2880 mask shrinks from 8 MB to a few
    kB; fabio reads it transparently) or ``.npy``.
    """
    import gzip

    from xrdmap.results import atomic_output

    p = Path(path)
    fmt = mask_format(p)
    m = (np.asarray(mask) != 0).astype(np.uint8)
    if m.ndim != 2:
        raise InputError(f"mask has shape {m.shape} but a 2-D array was expected")
    with atomic_output(p) as tmp:
        if fmt == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, m)
        else:
            import fabio.edfimage

            edf = fabio.edfimage.EdfImage(data=m, header={"Title": "xrdmap mask (1 = masked)"})
            edf.write(str(tmp))
            if fmt == ".edf.gz":
                raw = tmp.read_bytes()
                with gzip.open(tmp, "wb", compresslevel=9) as fh:
                    fh.write(raw)
    return p


def sigma_clip_profile(
    ai_or_engine: Any,
    frame: np.ndarray,
    *,
    npt: int = 2000,
    q_range: tuple[float, float] | None = None,
    thres: float = 5.0,
    max_iter: int = 5,
    mask: np.ndarray | None = None,
    error_model: str = "poisson",
    polarization_factor: float | None = 0.99,
    dark: np.ndarray | None = None,
    flat: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Azimuthal average of one frame with iterative outlier rejection (pyFAI ``sigma_clip_ng``).

    In each Q bin, pixels further than ``thres`` standard deviations from the bin's mean are
    discarded and the mean recomputed, up to ``max_iter`` times: Bragg spots of large
    crystallites and zingers are removed from spotty or textured frames while the powder
    average is kept.

    Parameters
    ----------
    ai_or_engine : pyFAI AzimuthalIntegrator, PONI dict/path, or object with an ``ai`` attribute
    frame : 2-D array
    npt : int
        Number of Q bins.
    q_range : (qmin, qmax), optional
        Q range in A^-1.
    thres, max_iter : float, int
        Clipping threshold (standard deviations) and number of iterations.
    mask : bool array, optional
        Static mask (nonzero = masked).
    error_model : str
        ``"poisson"`` (variance = counts) or ``"azimuthal"`` (spread within the bin).

    Returns
    -------
    q : numpy.ndarray
        Bin centres, A^-1.
    intensity, sigma : numpy.ndarray
        Clipped mean intensity and its standard error per bin.
    rejected_fraction : float
        Fraction of the valid pixels in the Q range that the clipping discarded.
    """
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    from xrdmap.geometry import make_integrator

    ai = ai_or_engine
    if isinstance(ai, (str, Path, dict)):
        ai = make_integrator(ai)
    elif not isinstance(ai, AzimuthalIntegrator) and hasattr(ai, "ai"):
        ai = ai.ai
    if not isinstance(ai, AzimuthalIntegrator):
        raise InputError(f"sigma_clip_profile: expected a pyFAI AzimuthalIntegrator or PONI, got {type(ai_or_engine).__name__}")
    frame = np.asarray(frame, dtype=np.float64)
    if frame.ndim != 2:
        raise InputError(f"frame has shape {frame.shape} but a 2-D image was expected")
    if ai.detector.shape is not None and frame.shape != tuple(ai.detector.shape):
        raise InputError(f"frame has shape {frame.shape} but the detector has shape {tuple(ai.detector.shape)}")
    if error_model not in ("poisson", "azimuthal"):
        raise ConfigError(f"error_model {error_model!r}: expected 'poisson' or 'azimuthal'")
    kw = dict(unit="q_A^-1", error_model=error_model, radial_range=q_range, mask=mask,
              polarization_factor=polarization_factor, dark=dark, flat=flat)
    clipped = ai.sigma_clip_ng(frame, npt, thres=thres, max_iter=max_iter, **kw)
    full = ai.sigma_clip_ng(frame, npt, thres=thres, max_iter=0, **kw)
    n_all = float(np.nansum(full.count))
    n_kept = float(np.nansum(clipped.count))
    frac = 1.0 - n_kept / n_all if n_all > 0 else 0.0
    return (np.asarray(clipped.radial), np.asarray(clipped.intensity), np.asarray(clipped.sigma), frac)
