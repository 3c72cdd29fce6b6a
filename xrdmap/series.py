"""Descriptors of in-situ and operando series, and the events they show.

All functions work on a whole series at once (dimension ``point``, coordinate ``time``
in s or ``position`` in mm) and are vectorised over points:

- :func:`crystallinity_index`: Bragg share of the scattered intensity,
- :func:`peak_descriptors`: position, width and area of chosen Bragg peaks,
- :func:`lattice_scale`: lattice stretch of a reference phase refined per point,
- :func:`detect_events`: onset and end of an amorphous interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage

from xrdmap.errors import InputError

__all__ = [
    "crystallinity_index",
    "diffuse_baseline",
    "bragg_part",
    "peak_descriptors",
    "lattice_scale",
    "detect_events",
    "describe_series",
]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def _check_q(iq: xr.DataArray, dim: str = "q") -> None:
    if dim not in iq.dims:
        raise InputError(f"pattern array has dims {iq.dims}; expected a {dim!r} dimension")


def diffuse_baseline(iq: xr.DataArray, *, window_A: float = 0.4, dim: str = "q") -> xr.DataArray:
    """Smooth diffuse part under the Bragg peaks: a morphological opening, smoothed.

    ``window_A`` (A^-1) must be wider than the Bragg peaks and narrower than the diffuse
    features; 0.4 A^-1 suits Bragg peaks of ~0.03-0.1 A^-1 FWHM over diffuse humps
    of ~1 A^-1 (glasses with no order beyond ~7 A).
    """
    _check_q(iq, dim)
    step = float(np.median(np.diff(iq[dim].values)))
    return iq.copy(data=baseline_values(iq.values, step, window_A, axis=iq.get_axis_num(dim)))


def baseline_values(values: np.ndarray, step: float, window_A: float, axis: int = -1) -> np.ndarray:
    """:func:`diffuse_baseline` of plain arrays sampled every ``step`` A^-1 along ``axis``."""
    n = max(3, int(round(window_A / step)) | 1)
    values = np.nan_to_num(np.asarray(values, dtype=float))
    # morphological opening (rolling minimum, then rolling maximum) removes peaks
    # narrower than the window and keeps slopes and valleys; the smoothing then rounds it
    low = ndimage.minimum_filter1d(values, n, axis=axis, mode="nearest")
    opened = ndimage.maximum_filter1d(low, n, axis=axis, mode="nearest")
    base = ndimage.uniform_filter1d(opened, n, axis=axis, mode="nearest")
    smooth = ndimage.uniform_filter1d(values, 5, axis=axis, mode="nearest")
    return np.minimum(base, smooth)


def bragg_part(iq: xr.DataArray, *, window_A: float = 1.0, dim: str = "q") -> xr.DataArray:
    """``iq`` minus its :func:`diffuse_baseline`, clipped at zero: the Bragg peaks alone.

    What NMF in Q decomposes by default (``decompose.q_diffuse: subtract``): the smooth
    diffuse, self and Compton scattering common to every point would otherwise become a
    component of its own. References are compared after the same treatment
    (:func:`xrdmap.assign.assign_components` ``diffuse_window_A``).
    """
    _check_q(iq, dim)
    step = float(np.median(np.diff(iq[dim].values)))
    return iq.copy(data=bragg_values(iq.values, step, window_A, axis=iq.get_axis_num(dim)))


def bragg_values(values: np.ndarray, step: float, window_A: float = 1.0, axis: int = -1) -> np.ndarray:
    """:func:`bragg_part` of plain arrays sampled every ``step`` A^-1 along ``axis``."""
    values = np.asarray(values, dtype=float)
    return np.clip(values - baseline_values(values, step, window_A, axis), 0.0, None)


def crystallinity_index(
    iq: xr.DataArray, *, q_range: tuple[float, float] = (1.0, 15.0), window_A: float = 0.4, dim: str = "q"
) -> xr.DataArray:
    """Bragg intensity over total intensity in ``q_range``: 0 for a glass, ~1 for sharp Bragg.

    The Bragg part is the intensity above :func:`diffuse_baseline`. The index compares
    states of one sample along a series; its absolute value depends on the window.
    """
    _check_q(iq, dim)
    sel = iq.sel({dim: slice(*q_range)})
    if sel.sizes[dim] < 5:
        raise InputError(f"crystallinity q_range {q_range} holds fewer than 5 points of the pattern")
    bragg = bragg_part(sel, window_A=window_A, dim=dim)
    total = sel.clip(min=0).integrate(dim)
    out = bragg.integrate(dim) / total.where(total > 0)
    out.name = "crystallinity"
    out.attrs.update(long_name="crystallinity index", units="1", q_range=list(q_range))
    return out


def peak_descriptors(
    iq: xr.DataArray, peaks: Sequence[tuple[float, float]], *, dim: str = "q"
) -> xr.Dataset:
    """Position, FWHM and area of Bragg peaks, each in its own Q window, for every point.

    In each window a straight line through the window's end points is removed and the
    peak is described by its moments: the centroid (position), ``2.3548 * sqrt(variance)``
    (FWHM, exact for a Gaussian) and the integral (area). Windows should hold one peak
    and reach about 3 FWHM on each side of it.
    """
    _check_q(iq, dim)
    if not peaks:
        raise InputError("peaks: expected at least one (q_low, q_high) window")
    pos, fwhm, area = [], [], []
    for lo, hi in peaks:
        if not lo < hi:
            raise InputError(f"peak window ({lo}, {hi}): expected q_low < q_high")
        win = iq.sel({dim: slice(lo, hi)}).transpose(..., dim)
        if win.sizes[dim] < 5:
            raise InputError(f"peak window ({lo}, {hi}) A^-1 holds fewer than 5 points of the pattern")
        q = win[dim].values
        y = np.asarray(win.values, dtype=float)
        edge = max(1, len(q) // 20)
        y0 = y[..., :edge].mean(-1, keepdims=True)
        y1 = y[..., -edge:].mean(-1, keepdims=True)
        q0, q1 = q[:edge].mean(), q[-edge:].mean()
        line = y0 + (y1 - y0) * (q - q0) / (q1 - q0)
        net = np.clip(y - line, 0, None)
        a = np.trapezoid(net, q, axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.trapezoid(net * q, q, axis=-1) / a
            var = np.trapezoid(net * (q - c[..., None]) ** 2, q, axis=-1) / a
        pos.append(c)
        fwhm.append(FWHM_PER_SIGMA * np.sqrt(var))
        area.append(a)
    other = [d for d in iq.dims if d != dim]
    coords = {k: v for k, v in iq.coords.items() if dim not in v.dims}
    centre = [0.5 * (lo + hi) for lo, hi in peaks]
    ds = xr.Dataset(
        {
            "peak_position": ((*other, "peak"), np.stack(pos, -1), {"units": "1/angstrom"}),
            "peak_fwhm": ((*other, "peak"), np.stack(fwhm, -1), {"units": "1/angstrom"}),
            "peak_area": ((*other, "peak"), np.stack(area, -1), {"units": "intensity * 1/angstrom"}),
        },
        coords={**coords, "peak": centre},
    )
    ds["peak"].attrs.update(long_name="peak window centre", units="1/angstrom")
    return ds


def _bspline_basis(q: np.ndarray, spacing: float) -> np.ndarray:
    """Cubic B-spline basis (nq, nb) on ``q`` with knots every ~``spacing`` A^-1."""
    from scipy.interpolate import BSpline

    lo, hi = float(q.min()), float(q.max())
    n = max(1, int(np.ceil((hi - lo) / spacing)))
    t = np.r_[[lo] * 3, np.linspace(lo, hi, n + 1), [hi] * 3]
    nb = t.size - 4
    basis = BSpline(t, np.eye(nb), 3, extrapolate=False)(q)
    return np.nan_to_num(basis)


def _scan_stretches(q, y, wgt, phase, stretches, background, fwhm, eta):
    """chi^2 and Bragg amplitude of every point for every trial stretch."""
    chi2 = np.empty((stretches.size, y.shape[1]))
    amp = np.empty_like(chi2)
    yw = y * wgt[:, None]
    for k, s in enumerate(stretches):
        kwargs = {} if eta is None else {"eta": eta}
        ref = np.asarray(phase.simulate_iq(q, stretch=float(s), fwhm_q=fwhm, **kwargs), dtype=float)
        design = np.column_stack([ref / ref.max(), background]) * wgt[:, None]
        coef, *_ = np.linalg.lstsq(design, yw, rcond=None)
        chi2[k] = ((yw - design @ coef) ** 2).sum(0)
        amp[k] = coef[0]
    return chi2, amp


def _parabola_min(chi2: np.ndarray, stretches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    best = np.argmin(chi2, axis=0)
    inner = np.clip(best, 1, stretches.size - 2)
    cols = np.arange(chi2.shape[1])
    c_m, c_0, c_p = chi2[inner - 1, cols], chi2[inner, cols], chi2[inner + 1, cols]
    denom = c_m - 2 * c_0 + c_p
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(denom > 0, 0.5 * (c_m - c_p) / denom, 0.0)
    step = stretches[1] - stretches[0]
    return stretches[inner] + np.clip(shift, -1, 1) * step, best


def lattice_scale(
    iq: xr.DataArray,
    phase: Any,
    *,
    q_range: tuple[float, float] = (1.0, 15.0),
    stretch_range: float = 0.02,
    step: float = 2e-4,
    fwhm_q: float | None = None,
    eta: float | None = None,
    background_spacing: float = 0.8,
    iq_sigma: xr.DataArray | None = None,
    dim: str = "q",
) -> xr.DataArray:
    """Lattice scale (cell-length multiplier) of ``phase`` refined for every point.

    Model of each pattern in ``q_range``: ``a * phase.simulate_iq(q, stretch, fwhm_q, eta)``
    plus a smooth background, a cubic B-spline with knots every ``background_spacing``
    A^-1 (it takes up thermal-diffuse, Compton, container and amorphous scattering, whose
    features are broader than the Bragg peaks). For each trial stretch on a grid of
    ``step`` over ``1 +- stretch_range`` the linear model is solved for all points at
    once (one weighted least-squares solve with many right-hand sides), first in steps of
    ``5 * step``, then in steps of ``step`` around the coarse minima; the best stretch of
    each point is refined by a parabola through its three best grid values.

    ``fwhm_q`` (A^-1) is the FWHM of the measured peaks (instrument + integration). With
    None it is fitted: the FWHM minimising chi^2 of the mean pattern of the series (a
    coarse, then a fine search), stored in the attribute ``fwhm_q``. When amorphous
    scattering with features at low Q overlaps the Bragg peaks (in-situ flash frames),
    a range starting above those features (e.g. 4-16 A^-1) refines more accurately.

    Parameters
    ----------
    iq : patterns (..., q), Q in A^-1.
    phase : object with ``simulate_iq(q, *, stretch, fwhm_q, eta)`` and ``name``.
    q_range : Q range (A^-1) used.
    stretch_range, step : searched stretches ``1 +- stretch_range`` in steps of ``step``.
    fwhm_q : peak FWHM (A^-1), or None to fit it.
    eta : pseudo-Voigt Lorentzian fraction of the reference peaks (None: the phase's default).
    background_spacing : knot spacing (A^-1) of the spline background.
    iq_sigma : uncertainties of ``iq``; their rms over points weights each Q bin.

    Returns
    -------
    xarray.DataArray
        Lattice scale (1) per point, NaN where the phase is not seen (fit amplitude <= 0);
        attributes ``phase``, ``q_range``, ``fwhm_q`` (A^-1).
    """
    _check_q(iq, dim)
    if background_spacing <= 0:
        raise InputError(f"background_spacing {background_spacing}: expected a knot spacing > 0 A^-1")
    data = iq.sel({dim: slice(*q_range)}).transpose(..., dim)
    if data.sizes[dim] < 20:
        raise InputError(f"lattice_scale q_range {q_range} holds fewer than 20 points of the pattern")
    q = data[dim].values
    y = np.nan_to_num(np.asarray(data.values, dtype=float).reshape(-1, q.size).T)  # (nq, npoints)
    if iq_sigma is not None:
        sig = iq_sigma.sel({dim: slice(*q_range)}).transpose(..., dim)
        sig = np.asarray(sig.values, dtype=float).reshape(-1, q.size)
        rms = np.sqrt(np.nanmean(sig**2, axis=0))
        ok = np.isfinite(rms) & (rms > 0)
        wgt = np.where(ok, 1.0 / np.where(ok, rms, 1.0), 0.0)
        wgt /= wgt[ok].mean() if ok.any() else 1.0
    else:
        wgt = np.ones_like(q)
    background = _bspline_basis(q, background_spacing)
    if fwhm_q is None:
        mean = y.mean(axis=1, keepdims=True)
        coarse = np.arange(1 - stretch_range, 1 + stretch_range + 1e-3, 2e-3)

        def cost(width: float) -> float:
            chi2, _ = _scan_stretches(q, mean, wgt, phase, coarse, background, width, eta)
            return float(chi2.min())

        dq = float(np.median(np.diff(q)))
        widths = np.geomspace(max(2 * dq, 0.03), 0.8, 9)
        costs = [cost(w) for w in widths]
        k = int(np.argmin(costs))
        lo, hi = widths[max(k - 1, 0)], widths[min(k + 1, widths.size - 1)]
        fine = np.linspace(lo, hi, 7)
        fwhm_q = float(fine[int(np.argmin([cost(w) for w in fine]))])
    # coarse scan (steps of 5 * step) over the whole range, then a fine scan of ``step``
    # spanning the coarse minima of all points (wide peaks make each pattern costly)
    coarse = np.arange(1 - stretch_range, 1 + stretch_range + 2.5 * step, 5 * step)
    chi2, _ = _scan_stretches(q, y, wgt, phase, coarse, background, float(fwhm_q), eta)
    best = coarse[np.argmin(chi2, axis=0)]
    lo = max(1 - stretch_range, float(best.min()) - 10 * step)
    hi = min(1 + stretch_range, float(best.max()) + 10 * step)
    stretches = np.arange(lo, hi + step / 2, step)
    chi2, amp = _scan_stretches(q, y, wgt, phase, stretches, background, float(fwhm_q), eta)
    scale, best = _parabola_min(chi2, stretches)
    scale = np.where(amp[best, np.arange(y.shape[1])] > 0, scale, np.nan)
    other = [d for d in data.dims if d != dim]
    out = xr.DataArray(
        scale.reshape([data.sizes[d] for d in other]),
        dims=other,
        coords={k: v for k, v in data.coords.items() if dim not in v.dims},
        name="lattice_scale",
        attrs={"long_name": f"lattice scale of {getattr(phase, 'name', 'phase')}", "units": "1",
               "phase": str(getattr(phase, "name", "phase")), "q_range": list(q_range),
               "fwhm_q": float(fwhm_q)},
    )
    return out


def detect_events(
    signal: xr.DataArray,
    *,
    baseline_points: int = 5,
    drop: float = 0.5,
    smooth: int = 3,
) -> dict[str, float | int | None]:
    """Onset and end of an interval in which ``signal`` drops (e.g. an amorphous interval).

    The reference level is the median of the first ``baseline_points`` points, the
    floor the minimum of the (median-filtered) series; the threshold lies ``drop`` of the
    way from the reference down to the floor. The onset is the first point below the
    threshold, the end the first point after it back above the threshold.

    Returns ``onset_point``, ``end_point`` (indices, or None) and, when the series has a
    ``time`` coordinate, ``onset_time``, ``end_time`` and ``duration`` (s).
    """
    if signal.ndim != 1:
        raise InputError(f"detect_events expects a 1-D series over points, got dims {signal.dims}")
    v = np.asarray(signal.values, dtype=float)
    if v.size < baseline_points + 2:
        raise InputError(f"detect_events: a series of {v.size} points is too short")
    v = np.where(np.isfinite(v), v, np.nanmedian(v))
    if smooth > 1:
        v = ndimage.median_filter(v, size=smooth, mode="nearest")
    ref = float(np.median(v[:baseline_points]))
    floor = float(v.min())
    result: dict[str, float | int | None] = {"onset_point": None, "end_point": None,
                                             "reference": ref, "floor": floor}
    if ref - floor <= 1e-12 * max(abs(ref), 1.0):
        return result
    threshold = ref - drop * (ref - floor)
    below = np.flatnonzero(v < threshold)
    if below.size == 0:
        return result
    onset = int(below[0])
    after = np.flatnonzero(v[onset:] >= threshold)
    end = int(onset + after[0]) if after.size else None
    result.update(onset_point=onset, end_point=end, threshold=threshold)
    dim = signal.dims[0]
    if "time" in signal.coords and signal["time"].dims == (dim,):
        t = signal["time"].values
        result["onset_time"] = float(t[onset])
        result["end_time"] = float(t[end]) if end is not None else None
        result["duration"] = float(t[end] - t[onset]) if end is not None else None
    return result


def describe_series(
    ds: xr.Dataset,
    *,
    phase: Any = None,
    peaks: Sequence[tuple[float, float]] | None = None,
    q_range: tuple[float, float] = (1.0, 15.0),
    lattice_q_range: tuple[float, float] | None = None,
) -> xr.Dataset:
    """All series descriptors of a result dataset, with the events they show.

    Adds ``crystallinity`` (point), ``peak_*`` (point, peak) for ``peaks``,
    ``lattice_scale`` (point) for ``phase``, and the amorphous-interval events (from the
    coherence length when ``gr`` was computed, else the crystallinity) as attributes
    ``event_onset_point``, ``event_end_point``, ``event_onset_time``, ``event_end_time``,
    ``event_duration`` of the returned dataset. ``lattice_q_range`` (A^-1, default
    ``q_range``) is the range of the lattice fit (:func:`lattice_scale`); the
    uncertainties ``iq_sigma`` weight it when present.
    """
    out = xr.Dataset()
    out["crystallinity"] = crystallinity_index(ds["iq"], q_range=q_range)
    if peaks:
        out = out.merge(peak_descriptors(ds["iq"], peaks), compat="no_conflicts")
    if phase is not None:
        out["lattice_scale"] = lattice_scale(ds["iq"], phase, q_range=lattice_q_range or q_range,
                                             iq_sigma=ds.get("iq_sigma"))
    source = ds["coherence_length"] if "coherence_length" in ds else out["crystallinity"]
    events = detect_events(source)
    out.attrs["event_signal"] = str(source.name)
    for key, value in events.items():
        if value is not None and key not in ("reference", "floor", "threshold"):
            out.attrs[f"event_{key}"] = value
    return out
