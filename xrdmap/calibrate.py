"""Detector geometry from a calibrant image, without a GUI.

:func:`calibrate` refines a pyFAI geometry (distance, PONI, three rotations; the wavelength
is fixed) on an image of a powder calibrant such as CeO2 (NIST SRM 674b), starting from a
rough guess of distance and beam centre:

1. the beam centre is located by maximising how much of the image's intensity variance
   is explained by the radius from the centre (rings are sharpest around the true centre);
2. the distance is the one that puts the calibrant's rings (``r = D tan 2theta``) on the
   peaks of the radial profile;
3. control points are picked along each ring (half-maximum centroid of the ring across
   azimuthal sectors of an annulus around the predicted 2theta), outliers rejected, and the
   six geometry parameters refined by least squares on pyFAI's own 2theta of the points
   (:class:`pyFAI.geometryRefinement.GeometryRefinement`), adding rings as the geometry
   improves. Uncertainties come from the covariance of that least-squares fit.

Detector orientation
--------------------
pyFAI's native convention (orientation 3, "BottomRight") puts array row 0 at the *bottom*
of the detector as seen from the sample. A plain TIFF/EDF/CBF reader returns row 0 as the
*top* line of the picture. Dioptas reads images with ``fabio.open(f).data[::-1]`` (an
up-down flip, so that its bottom-left-origin image view shows the picture upright) and
calibrates on that flipped array; a PONI made by Dioptas (or by pyFAI on such an array)
therefore only fits an image read by fabio/tifffile after flipping it up-down. pyFAI >= 2024
describes this with the detector's ``orientation`` (PONI version 2.1): orientation 2
("TopRight") reverses the slow axis, so the *unflipped* array with orientation 2 and the same
PONI numbers is exactly the flipped array with orientation 3. Pass ``orientation=2`` for
Dioptas-made geometries; the orientation is written into the PONI file so that every later
stage reads frames as they come from the file, with no user-side flipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdmap.errors import ComputeError, ConfigError, InputError

__all__ = [
    "CalibrationResult",
    "calibrate",
    "calibrant_names",
    "make_detector",
    "ring_positions",
    "plot_calibration",
]

GEOMETRY_PARAMS = ("dist", "poni1", "poni2", "rot1", "rot2", "rot3")
ORIENTATIONS = {"topleft": 1, "topright": 2, "bottomright": 3, "bottomleft": 4}
_X_SCALE = np.array([1e-3, 1e-4, 1e-4, 1e-3, 1e-3, 1e-3])
_CONVERGED = np.array([1e-6, 1e-6, 1e-6, 1e-5, 1e-5, 1e-5])  # m, m, m, rad, rad, rad
_ROT3_DETERMINED = 0.01  # rad: a larger rot3 uncertainty means the rings cannot fix it


@dataclass
class CalibrationResult:
    """A refined detector geometry and how well it fits the calibrant.

    Attributes
    ----------
    poni : dict
        pyFAI geometry configuration (``dist``, ``poni1``, ``poni2`` in m, ``rot1..3`` in rad,
        ``wavelength`` in m, ``detector``, ``detector_config`` with the ``orientation``);
        accepted by :func:`xrdmap.geometry.write_poni` and :func:`~xrdmap.geometry.make_integrator`.
    uncertainties : dict
        One standard deviation of each refined parameter (m or rad), from the covariance of
        the least-squares fit; 0 for fixed parameters.
    control_points : numpy.ndarray
        ``(n, 3)``: row (d1) and column (d2) in pixels of the array as given, ring index.
    ring_residuals : list of dict
        Per ring used: ``ring`` (index into the calibrant's distinct 2theta values),
        ``tth_deg`` (calibrant 2theta), ``d_A``, ``n_points``, ``mean_deg``, ``rms_deg``
        (2theta of the points minus the ring's, degrees) and ``rms_px`` (the same as a
        radial distance on the detector, pixels).
    rms_deg : float
        RMS 2theta residual of all control points, degrees.
    calibrant : str
    fixed : tuple of str
        Parameters that were not refined.
    notes : list of str
        What the refinement decided on its own (e.g. rot3 kept at 0).
    """

    poni: dict[str, Any]
    uncertainties: dict[str, float]
    control_points: np.ndarray
    ring_residuals: list[dict[str, float]]
    rms_deg: float
    calibrant: str
    fixed: tuple[str, ...] = field(default_factory=tuple)
    notes: list[str] = field(default_factory=list)

    def integrator(self):
        """A fresh pyFAI ``AzimuthalIntegrator`` with the refined geometry."""
        from xrdmap.geometry import make_integrator

        return make_integrator(self.poni)

    def save_poni(self, path: str | Path) -> Path:
        """Write the refined geometry to a PONI file (atomically)."""
        from xrdmap.geometry import write_poni

        return write_poni(self.poni, path)

    @property
    def poni_px(self) -> tuple[float, float]:
        """Point of normal incidence (PONI) as (column x, row y) in pixels of the array as given.

        With tilted detectors this differs from where the direct beam hits the detector.
        """
        return _poni_to_pixel(make_detector(self.poni["detector"], self.poni.get("detector_config")),
                              self.poni["poni1"], self.poni["poni2"])


def calibrant_names() -> list[str]:
    """Names of the calibrants pyFAI knows (``CeO2``, ``LaB6``, ``Si``, ``Ni``, ...)."""
    from pyFAI.calibrant import names

    return sorted(names())


def _get_calibrant(name: str, wavelength_m: float):
    from pyFAI.calibrant import CALIBRANT_FACTORY

    if name not in CALIBRANT_FACTORY:
        raise InputError(f"calibrant {name!r} is not known to pyFAI (expected one of e.g. CeO2, LaB6, Si, Ni, Cr2O3)")
    cal = CALIBRANT_FACTORY(name)
    cal.wavelength = wavelength_m
    return cal


def _parse_orientation(orientation: int | str | None) -> int | None:
    if orientation is None:
        return None
    if isinstance(orientation, str):
        key = orientation.strip().lower().replace("_", "").replace("-", "")
        if key.isdigit():
            orientation = int(key)
        elif key in ORIENTATIONS:
            return ORIENTATIONS[key]
        else:
            raise ConfigError(f"orientation {orientation!r}: expected 1-4 or TopLeft/TopRight/BottomRight/BottomLeft")
    if int(orientation) not in (1, 2, 3, 4):
        raise ConfigError(f"orientation {orientation!r}: expected 1-4 (pyFAI detector orientation)")
    return int(orientation)


def make_detector(name: str | Any, config: Mapping[str, Any] | None = None, *, orientation: int | str | None = None):
    """A pyFAI detector by name (``"Pilatus1M"``, ``"perkinelmer_xrd4343ct"``, ...).

    ``orientation`` (1-4 or a pyFAI name such as ``"TopRight"``) overrides the detector's
    default (3 for pyFAI's own classes); see the module docstring.
    """
    import pyFAI.detectors

    import xrdmap.geometry  # noqa: F401  (registers the PerkinElmer XRD 4343 CT)

    if not isinstance(name, str):
        if orientation is not None and _parse_orientation(orientation) != int(name.orientation or 3):
            raise ConfigError(f"orientation {orientation!r} given with a detector object of orientation "
                              f"{int(name.orientation or 3)}: set it when building the detector")
        return name
    cfg = dict(config or {})
    ori = _parse_orientation(orientation)
    if ori is not None:
        cfg["orientation"] = ori
    key = name.lower()
    known = (os.path.isfile(name) or hasattr(pyFAI.detectors, name)
             or key in pyFAI.detectors.Detector.registry or key.replace(" ", "_") in pyFAI.detectors.Detector.registry)
    if not known:
        raise InputError(f"detector {name!r} is not known to pyFAI (expected a name such as Pilatus1M, "
                         "Eiger2_4M, perkinelmer_xrd4343ct)")
    try:
        return pyFAI.detectors.detector_factory(name, cfg or None)
    except Exception:
        raise InputError(f"detector {name!r} is not known to pyFAI (expected a name such as Pilatus1M, "
                         "Eiger2_4M, perkinelmer_xrd4343ct)") from None


def _read_image(image: Any, what: str = "image") -> np.ndarray:
    if isinstance(image, (str, Path)):
        from xrdmap.mask import _read_array

        return _read_array(image, what)
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise InputError(f"{what} has shape {arr.shape} but a 2-D image was expected")
    return arr


def _wavelength_m(wavelength_A: float | None, energy_keV: float | None) -> float:
    from xrdmap.geometry import wavelength_from_energy

    if (wavelength_A is None) == (energy_keV is None):
        raise ConfigError("give exactly one of wavelength_A and energy_keV")
    if wavelength_A is not None:
        if not wavelength_A > 0:
            raise ConfigError(f"wavelength {wavelength_A} A: expected a positive wavelength")
        return float(wavelength_A) / 1e10
    return wavelength_from_energy(float(energy_keV)) / 1e10


def _pixel_to_poni(det, x: float, y: float) -> tuple[float, float]:
    p1, p2, _ = det.calc_cartesian_positions(d1=np.array([float(y)]), d2=np.array([float(x)]))
    return float(np.ravel(p1)[0]), float(np.ravel(p2)[0])


def _poni_to_pixel(det, poni1: float, poni2: float) -> tuple[float, float]:
    """Inverse of :func:`_pixel_to_poni` for a flat detector with regular pixels."""
    a1, a2 = _pixel_to_poni(det, 0.0, 0.0)
    b1, b2 = _pixel_to_poni(det, 1.0, 1.0)
    return (poni2 - a2) / (b2 - a2), (poni1 - a1) / (b1 - a1)


def ring_positions(calibrant: str, wavelength_A: float, tth_max_deg: float = 180.0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct 2theta (degrees) and d-spacings (A) of a calibrant's rings, ascending in 2theta."""
    cal = _get_calibrant(calibrant, wavelength_A * 1e-10)
    d = np.array(cal.dspacing, dtype=float)
    s = wavelength_A / (2 * d)
    ok = s < 1
    tth = np.rad2deg(2 * np.arcsin(s[ok]))
    d = d[ok]
    tth, idx = np.unique(np.round(tth, 10), return_index=True)
    keep = tth <= tth_max_deg
    return tth[keep], d[idx][keep]


class _Problem:
    """Image, valid-pixel mask and pixel positions shared by the calibration steps."""

    def __init__(self, image, det, wavelength_m, tth_rings_rad, d_rings, valid):
        self.image = image
        self.det = det
        self.wavelength = wavelength_m
        self.tth_rings = tth_rings_rad
        self.d_rings = d_rings
        self.valid = valid
        p1, p2, _ = det.calc_cartesian_positions()
        self.p1 = np.asarray(p1, dtype=float)
        self.p2 = np.asarray(p2, dtype=float)
        self.valid_index = np.flatnonzero(valid.ravel())
        self.pixel = float(np.sqrt(det.pixel1 * det.pixel2))

    def geometry(self, param):
        # a plain pyFAI Geometry: the same 2theta model as GeometryRefinement, without the
        # integrator engines that make building one costly
        from pyFAI.geometry import Geometry

        d, p1, p2, r1, r2, r3 = (float(v) for v in param)
        return Geometry(dist=d, poni1=p1, poni2=p2, rot1=r1, rot2=r2, rot3=r3,
                        detector=self.det, wavelength=self.wavelength)


def _sample(prob: _Problem, max_pixels: int = 200_000):
    idx = np.flatnonzero(prob.valid.ravel())
    step = max(1, idx.size // max_pixels)
    idx = idx[::step]
    img = prob.image.ravel()[idx].astype(float)
    hi = np.percentile(img, 99.9)
    return idx, np.minimum(img, hi)


def _explained_variance(r_px, img, total_ss, nbins):
    b = r_px.astype(np.int64)
    cnt = np.bincount(b, minlength=nbins)
    s = np.bincount(b, weights=img, minlength=nbins)
    nz = cnt > 0
    return float(np.sum(s[nz] ** 2 / cnt[nz])) / total_ss


def _find_center(prob: _Problem, poni1, poni2, search_px, free1, free2):
    """Grid search (coarse to fine) for the PONI maximising the radially explained variance."""
    idx, img = _sample(prob)
    img = img - img.mean()
    total = float(np.sum(img**2)) or 1.0
    q1 = prob.p1.ravel()[idx]
    q2 = prob.p2.ravel()[idx]
    pix = prob.pixel
    best = (poni1, poni2)
    step = max(1.0, search_px / 6.0)
    half = search_px
    while True:
        n = int(round(half / step))
        offs = np.arange(-n, n + 1) * step
        o1 = offs if free1 else np.array([0.0])
        o2 = offs if free2 else np.array([0.0])
        scores = np.empty((o1.size, o2.size))
        binw = max(1.0, step / 2.0)
        for i, a in enumerate(o1):
            d1sq = (q1 - (best[0] + a * pix)) ** 2
            for j, b in enumerate(o2):
                r = np.sqrt(d1sq + (q2 - (best[1] + b * pix)) ** 2) / (pix * binw)
                scores[i, j] = _explained_variance(r, img, total, int(r.max()) + 2)
        i, j = np.unravel_index(np.argmax(scores), scores.shape)
        best = (best[0] + o1[i] * pix, best[1] + o2[j] * pix)
        if step <= 1.0:
            return best
        half = 2 * step
        step = max(1.0, step / 3.0)


def _find_distance(prob: _Problem, poni1, poni2, dist, dist_range):
    """Distance putting the calibrant rings (r = D tan 2theta) on the radial profile's peaks."""
    from scipy.ndimage import median_filter

    idx, img = _sample(prob, 2_000_000)
    r = np.hypot(prob.p1.ravel()[idx] - poni1, prob.p2.ravel()[idx] - poni2)
    binw = prob.pixel / 2
    b = (r / binw).astype(np.int64)
    cnt = np.bincount(b)
    s = np.bincount(b, weights=img, minlength=cnt.size)
    prof = np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)
    good = cnt > 20
    radii = (np.arange(cnt.size) + 0.5) * binw
    prof = np.interp(radii, radii[good], prof[good])
    peaks = prof - median_filter(prof, size=41, mode="nearest")
    noise = 1.4826 * np.median(np.abs(peaks - np.median(peaks))) or 1.0
    peaks = np.clip(peaks / noise, 0, 50)
    peaks[~good] = 0
    rmax = radii[good].max()
    lo, hi = dist_range
    n = int(np.ceil(np.log(hi / lo) / (0.25 * prob.pixel / rmax))) + 1
    cands = np.geomspace(lo, hi, min(n, 20000))
    tan = np.tan(prob.tth_rings[prob.tth_rings < np.pi / 2])
    rk = cands[:, None] * tan[None, :]
    inside = rk < rmax
    vals = np.where(inside, np.interp(np.where(inside, rk, 0), radii, peaks), 0.0)
    # significance of the comb against rings falling at random radii: a plain sum would
    # favour short distances, which put more rings on the detector
    n_in = inside.sum(axis=1)
    mean, var = peaks[good].mean(), peaks[good].var() or 1.0
    score = (vals.sum(axis=1) - n_in * mean) / np.sqrt(np.maximum(n_in, 1) * var)
    score[n_in < 2] = -np.inf
    return float(cands[np.argmax(score)])


def _extract_points(prob: _Problem, geo, rings: Sequence[int], halfwidth_px: float, n_sigma: float = 4.0):
    """Control points along rings: half-maximum centroids in azimuthal sectors of an annulus."""
    from pyFAI import units

    vidx = prob.valid_index
    tth = geo.center_array(unit=units.TTH_RAD, scale=False).ravel()[vidx]
    chi_all = geo.center_array(unit=units.CHI_RAD, scale=False).ravel()
    # valid pixels sorted by 2theta: each annulus is then one contiguous slice
    order = np.argsort(tth, kind="stable")
    tth_sorted = tth[order]
    pix_sorted = vidx[order]
    dist = geo.dist
    ncol = prob.image.shape[1]
    image = prob.image.ravel()
    out = []
    all_tth = prob.tth_rings
    for k in rings:
        t0 = all_tth[k]
        # angular size of a pixel at this ring (radial direction)
        px_ang = prob.pixel * np.cos(t0) ** 2 / dist
        gaps = np.abs(np.delete(all_tth, k) - t0)
        half = min(halfwidth_px * px_ang, 0.45 * gaps.min())
        if half < 2.0 * px_ang:
            continue
        lo, hi = np.searchsorted(tth_sorted, [t0 - half, t0 + half])
        if hi - lo < 20:
            continue
        pix = pix_sorted[lo:hi]
        dt = (tth_sorted[lo:hi] - t0) / half
        img = image[pix].astype(np.float64)
        d1 = (pix // ncol).astype(np.float64)
        d2 = (pix % ncol).astype(np.float64)
        chi = chi_all[pix]
        radius_px = dist * np.tan(t0) / prob.pixel
        nsec = int(np.clip(2 * np.pi * radius_px / 4.0, 36, 360))
        sec = ((chi + np.pi) / (2 * np.pi) * nsec).astype(np.int64) % nsec
        edge = np.abs(dt) > 0.6
        ne = np.bincount(sec, weights=edge, minlength=nsec)
        bg = np.bincount(sec, weights=img * edge, minlength=nsec) / np.maximum(ne, 1)
        bg2 = np.bincount(sec, weights=img**2 * edge, minlength=nsec) / np.maximum(ne, 1)
        noise = np.sqrt(np.maximum(bg2 - bg**2, 0) + np.maximum(bg, 1.0))
        order = np.lexsort((img, sec))
        last = np.r_[np.flatnonzero(np.diff(sec[order])), order.size - 1]
        smax = np.full(nsec, -np.inf)
        smax[sec[order][last]] = img[order][last]
        central = np.zeros(nsec, bool)
        central[sec[order][last]] = np.abs(dt[order][last]) < 0.6
        amp = smax - bg
        ok = (ne >= 3) & central & (amp > n_sigma * noise)
        level = bg + 0.5 * amp
        w = np.clip(img - level[sec], 0, None) * ok[sec] * (np.abs(dt) < 0.8)
        sw = np.bincount(sec, weights=w, minlength=nsec)
        use = ok & (sw > 0)
        c1 = np.bincount(sec, weights=w * d1, minlength=nsec)[use] / sw[use]
        c2 = np.bincount(sec, weights=w * d2, minlength=nsec)[use] / sw[use]
        out.append(np.column_stack([c1, c2, np.full(c1.size, k, dtype=float)]))
    if not out:
        return np.empty((0, 3))
    return np.concatenate(out)


def _refine(prob: _Problem, param, points, free, loss="linear"):
    from scipy.optimize import least_squares

    gr = prob.geometry(param)
    d1, d2 = points[:, 0], points[:, 1]
    target = prob.tth_rings[points[:, 2].astype(int)]
    param = np.asarray(param, dtype=float)
    free_idx = [GEOMETRY_PARAMS.index(n) for n in free]

    def full(x):
        p = param.copy()
        p[free_idx] = x
        return p

    def resid(x):
        return gr.tth(d1, d2, full(x)) - target

    f_scale = prob.pixel / param[0]
    res = least_squares(resid, param[free_idx], x_scale=_X_SCALE[free_idx], loss=loss,
                        f_scale=f_scale, method="trf", diff_step=1e-7)
    return full(res.x), res


def _fit_with_rejection(prob, param, pts, free):
    """Robust fit, drop points beyond 5 robust sigma (or half a pixel), refit by least squares."""
    param, res = _refine(prob, param, pts, free, loss="soft_l1")
    r = res.fun
    sig = 1.4826 * np.median(np.abs(r - np.median(r)))
    keep = np.abs(r) < max(5 * sig, 0.5 * prob.pixel / param[0])
    points = pts[keep]
    param, res = _refine(prob, param, points, free)
    return param, points, res


def _covariance(res, npts):
    j = res.jac
    dof = max(npts - j.shape[1], 1)
    s2 = float(np.sum(res.fun**2)) / dof
    try:
        return np.linalg.inv(j.T @ j) * s2
    except np.linalg.LinAlgError:
        return np.full((j.shape[1], j.shape[1]), np.nan)


def calibrate(
    image: np.ndarray | str | Path,
    *,
    calibrant: str = "CeO2",
    wavelength_A: float | None = None,
    energy_keV: float | None = None,
    detector: str | Any = "Pilatus1M",
    guess_distance_mm: float | None = None,
    guess_center_px: tuple[float, float] | None = None,
    fix: Iterable[str] = (),
    mask: np.ndarray | str | Path | None = None,
    orientation: int | str | None = None,
    max_rings: int | None = None,
    search_px: float | None = None,
) -> CalibrationResult:
    """Refine the detector geometry on a calibrant image.

    Parameters
    ----------
    image : array or path
        2-D calibrant image, exactly as read from the file (no flipping: see ``orientation``).
    calibrant : str
        pyFAI calibrant name (``"CeO2"`` is NIST SRM 674b, a = 5.411651 A).
    wavelength_A, energy_keV : float
        Photon wavelength (A) or energy (keV); exactly one. The wavelength is not refined.
    detector : str or pyFAI detector
        pyFAI detector name; the image shape must match it.
    guess_distance_mm : float, optional
        Sample-detector distance guess (mm). Without it, 50-3000 mm are searched.
    guess_center_px : (x, y), optional
        Beam centre guess: column and row (pixels) of the array as given. Default: the
        middle of the detector (and a wider search).
    fix : iterable of str
        Parameters kept at their guess: any of ``dist, poni1, poni2, rot1, rot2, rot3``.
    mask : array or path, optional
        Extra mask (nonzero = masked) added to the detector's own gaps and dummy pixels.
    orientation : int or str, optional
        pyFAI detector orientation (1-4 or ``"TopLeft"`` ... ``"BottomLeft"``); default the
        detector's own (3 for pyFAI detectors). Use 2 for geometries made with Dioptas
        (which flips images up-down on reading); see the module docstring.
    max_rings : int, optional
        Use at most this many (lowest-angle) rings.
    search_px : float, optional
        Half-width (pixels) of the beam-centre search around the guess; default 50 with a
        guess, a quarter of the detector without.

    Returns
    -------
    CalibrationResult
    """
    wl = _wavelength_m(wavelength_A, energy_keV)
    fix = tuple(fix)
    bad = [f for f in fix if f not in GEOMETRY_PARAMS]
    if bad:
        raise ConfigError(f"fix {bad}: expected parameter names among {', '.join(GEOMETRY_PARAMS)}")
    free = [p for p in GEOMETRY_PARAMS if p not in fix]
    det = make_detector(detector, orientation=orientation)
    img = _read_image(image, "calibrant image")
    if det.shape is not None and tuple(img.shape) != tuple(det.shape):
        raise InputError(f"calibrant image has shape {img.shape} but detector {det.name!r} expects "
                         f"{tuple(det.shape)} (rows, columns)")
    det.shape = img.shape
    valid = np.isfinite(img)
    dyn = det.dynamic_mask(img)
    if dyn is not None:
        valid &= dyn == 0
    valid &= img >= 0
    if mask is not None:
        m = _read_image(mask, "mask")
        if m.shape != img.shape:
            raise InputError(f"mask has shape {m.shape} but the calibrant image has shape {img.shape}")
        valid &= m == 0
    if valid.sum() < 1000:
        raise InputError("calibrant image has fewer than 1000 valid pixels")
    img = np.where(valid, img, 0).astype(np.float64)

    tth_deg, d_A = ring_positions(calibrant, wl * 1e10)
    prob = _Problem(img, det, wl, np.deg2rad(tth_deg), d_A, valid)
    nrow, ncol = img.shape
    if guess_center_px is None:
        x0, y0 = (ncol - 1) / 2.0, (nrow - 1) / 2.0
        search = search_px or max(nrow, ncol) / 4.0
    else:
        x0, y0 = (float(v) for v in guess_center_px)
        search = search_px or 50.0
    poni1, poni2 = _pixel_to_poni(det, x0, y0)
    if "poni1" not in fix or "poni2" not in fix:
        poni1, poni2 = _find_center(prob, poni1, poni2, search, "poni1" not in fix, "poni2" not in fix)
    if guess_distance_mm is not None:
        if not guess_distance_mm > 0:
            raise ConfigError(f"guess distance {guess_distance_mm} mm: expected a positive distance")
        dist = guess_distance_mm * 1e-3
        drange = (dist * 0.75, dist * 1.25)
    else:
        dist, drange = 0.3, (0.05, 3.0)
    if "dist" not in fix:
        dist = _find_distance(prob, poni1, poni2, dist, drange)

    geo0 = prob.geometry([dist, poni1, poni2, 0, 0, 0])
    tth_img_max = float(geo0.center_array(unit="2th_rad", scale=False)[valid].max())
    n_avail = int(np.sum(prob.tth_rings < tth_img_max))
    if max_rings is not None:
        n_avail = min(n_avail, int(max_rings))
    if n_avail < 1:
        raise ComputeError("no calibrant ring falls on the detector with the guessed geometry")

    param = np.array([dist, poni1, poni2, 0.0, 0.0, 0.0])
    n_rings = min(n_avail, 4)
    halfwidth = 8.0
    previous = None
    # rot3 is refined only at the end: with small tilts, powder rings fix the tilt's size
    # and direction but hardly the third rotation, which would otherwise wander
    loop_free = [p for p in free if p != "rot3"]
    notes: list[str] = []
    for _ in range(12):
        geo = prob.geometry(param)
        pts = _extract_points(prob, geo, range(n_rings), halfwidth)
        if len(pts) < 2 * len(free) + 2:
            if n_rings < n_avail:
                n_rings = min(n_avail, n_rings * 2)
                continue
            raise ComputeError(f"only {len(pts)} control points found on the {calibrant} rings: "
                               "check the guess, the wavelength and the detector")
        # free the tilts only once several rings constrain them
        step_free = [p for p in loop_free if not (p.startswith("rot") and len({*pts[:, 2]}) < 3)]
        param, points, res = _fit_with_rejection(prob, param, pts, step_free)
        rms_px = float(np.sqrt(np.mean(res.fun**2)) * param[0] / prob.pixel)
        halfwidth = float(np.clip(6 * rms_px + 3, 4.0, 8.0))
        converged = previous is not None and np.all(np.abs(param - previous) < _CONVERGED)
        if n_rings == n_avail and converged and step_free == loop_free:
            break
        previous = param.copy()
        n_rings = min(n_avail, n_rings * 2)
    if "rot3" in free:
        p3, pts3, res3 = _fit_with_rejection(prob, param, points, free)
        cov3 = _covariance(res3, len(pts3))
        if np.sqrt(cov3[-1, -1]) < _ROT3_DETERMINED:
            param, points, res, step_free = p3, pts3, res3, free
        else:
            fix = (*fix, "rot3")
            notes.append(f"rot3 is not determined by the rings (sigma {np.sqrt(cov3[-1, -1]):.2g} rad): "
                         "kept at 0, as the tilt is described by rot1 and rot2")
    cov = _covariance(res, len(points))
    unc = dict.fromkeys(GEOMETRY_PARAMS, 0.0)
    for i, name in enumerate(step_free):
        unc[name] = float(np.sqrt(cov[i, i]))
    gr = prob.geometry(param)
    resid = res.fun
    ring_idx = points[:, 2].astype(int)
    per_ring = []
    for k in np.unique(ring_idx):
        rk = resid[ring_idx == k]
        t0 = prob.tth_rings[k]
        to_px = param[0] / (np.cos(t0) ** 2 * prob.pixel)
        per_ring.append({
            "ring": int(k),
            "tth_deg": float(np.rad2deg(t0)),
            "d_A": float(prob.d_rings[k]),
            "n_points": int(rk.size),
            "mean_deg": float(np.rad2deg(rk.mean())),
            "rms_deg": float(np.rad2deg(np.sqrt(np.mean(rk**2)))),
            "rms_px": float(np.sqrt(np.mean(rk**2)) * to_px),
        })
    cfg = gr.get_config()
    cfg["detector_config"] = {k: (int(v) if k == "orientation" else v) for k, v in (cfg.get("detector_config") or {}).items()}
    return CalibrationResult(
        poni=dict(cfg),
        uncertainties=unc,
        control_points=points,
        ring_residuals=per_ring,
        rms_deg=float(np.rad2deg(np.sqrt(np.mean(resid**2)))),
        calibrant=calibrant,
        fixed=fix,
        notes=notes,
    )


def plot_calibration(result: CalibrationResult, image: np.ndarray | str | Path, path: str | Path) -> Path:
    """Report figure: the image on a log scale with the refined rings and control points,
    and the 2theta residual of the control points per ring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xrdmap.results import atomic_output

    img = _read_image(image, "calibrant image").astype(float)
    ai = result.integrator()
    tth = np.rad2deg(ai.center_array(img.shape, unit="2th_rad", scale=False))
    wl_A = result.poni["wavelength"] * 1e10
    rings, _ = ring_positions(result.calibrant, wl_A, float(np.nanmax(tth)))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1.1, 1]})
    pos = img[np.isfinite(img) & (img > 0)]
    vmin, vmax = (np.percentile(pos, [5, 99.8]) if pos.size else (1, 10))
    ax0.imshow(np.log10(np.clip(img, max(vmin, 1e-3), None)), cmap="gray_r", origin="upper",
               vmin=np.log10(max(vmin, 1e-3)), vmax=np.log10(max(vmax, 2 * max(vmin, 1e-3))), interpolation="nearest")
    ax0.contour(tth, levels=np.sort(rings), colors="tab:red", linewidths=0.6)
    cp = result.control_points
    ax0.plot(cp[:, 1], cp[:, 0], ".", ms=1.5, color="tab:cyan")
    ax0.set_title(f"{result.calibrant}: refined rings (red), control points (cyan); log intensity")
    ax0.set_xlabel("column x (px)")
    ax0.set_ylabel("row y (px, as read)")
    rr = result.ring_residuals
    t = [r["tth_deg"] for r in rr]
    ax1.errorbar(t, [r["mean_deg"] * 1e3 for r in rr], yerr=[r["rms_deg"] * 1e3 for r in rr], fmt="o", capsize=3)
    ax1.axhline(0, color="k", lw=0.5)
    for r in rr:
        ax1.annotate(f"{r['rms_px']:.2f} px", (r["tth_deg"], r["mean_deg"] * 1e3 + r["rms_deg"] * 1e3),
                     fontsize=7, ha="center", va="bottom")
    ax1.set_xlabel("ring 2theta (deg)")
    ax1.set_ylabel("control-point residual, mean +- rms (mdeg 2theta)")
    ax1.set_title(f"RMS {result.rms_deg * 1e3:.2f} mdeg over {len(cp)} points")
    fig.tight_layout()
    p = Path(path)
    with atomic_output(p) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return p
