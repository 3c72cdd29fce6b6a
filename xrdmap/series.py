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
    q = iq[dim].values
    step = float(np.median(np.diff(q)))
    n = max(3, int(round(window_A / step)) | 1)
    axis = iq.get_axis_num(dim)
    values = np.nan_to_num(np.asarray(iq.values, dtype=float))
    # morphological opening (rolling minimum, then rolling maximum) removes peaks
    # narrower than the window and keeps slopes and valleys; the smoothing then rounds it
    low = ndimage.minimum_filter1d(values, n, axis=axis, mode="nearest")
    opened = ndimage.maximum_filter1d(low, n, axis=axis, mode="nearest")
    base = ndimage.uniform_filter1d(opened, n, axis=axis, mode="nearest")
    smooth = ndimage.uniform_filter1d(values, 5, axis=axis, mode="nearest")
    return iq.copy(data=np.minimum(base, smooth))


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
    base = diffuse_baseline(sel, window_A=window_A, dim=dim)
    bragg = (sel - base).clip(min=0)
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


def lattice_scale(
    iq: xr.DataArray,
    phase: Any,
    *,
    q_range: tuple[float, float] = (1.0, 15.0),
    stretch_range: float = 0.02,
    step: float = 2e-4,
    fwhm_q: float | None = None,
    dim: str = "q",
) -> xr.DataArray:
    """Lattice scale (cell-length multiplier) of ``phase`` refined for every point.

    For each trial stretch on a grid of ``step`` over ``1 +- stretch_range``, the
    reference pattern plus a straight-line background is fitted to all points at once
    (one least-squares solve with many right-hand sides); the best stretch of each point
    is refined by a parabola through its three best grid values. The Bragg part of the
    data is used (the diffuse baseline removed), so amorphous scattering does not pull
    the fit.

    Returns a DataArray (point) with NaN where the phase is not seen (fit amplitude <= 0).
    """
    _check_q(iq, dim)
    data = iq.sel({dim: slice(*q_range)}).transpose(..., dim)
    if data.sizes[dim] < 20:
        raise InputError(f"lattice_scale q_range {q_range} holds fewer than 20 points of the pattern")
    bragg = (data - diffuse_baseline(data, dim=dim)).clip(min=0)
    q = data[dim].values
    y = np.asarray(bragg.values, dtype=float).reshape(-1, q.size).T  # (nq, npoints)
    y = np.nan_to_num(y)
    stretches = np.arange(1 - stretch_range, 1 + stretch_range + step / 2, step)
    design_bg = np.stack([np.ones_like(q), (q - q.mean()) / np.ptp(q)], axis=1)
    chi2 = np.empty((stretches.size, y.shape[1]))
    amp = np.empty_like(chi2)
    kwargs = {} if fwhm_q is None else {"fwhm_q": fwhm_q}
    for k, s in enumerate(stretches):
        ref = np.asarray(phase.simulate_iq(q, stretch=float(s), **kwargs), dtype=float)
        design = np.column_stack([ref / ref.max(), design_bg])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        resid = y - design @ coef
        chi2[k] = (resid**2).sum(0)
        amp[k] = coef[0]
    best = np.argmin(chi2, axis=0)
    inner = np.clip(best, 1, stretches.size - 2)
    cols = np.arange(y.shape[1])
    c_m, c_0, c_p = chi2[inner - 1, cols], chi2[inner, cols], chi2[inner + 1, cols]
    denom = c_m - 2 * c_0 + c_p
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(denom > 0, 0.5 * (c_m - c_p) / denom, 0.0)
    scale = stretches[inner] + np.clip(shift, -1, 1) * step
    scale = np.where(amp[best, cols] > 0, scale, np.nan)
    other = [d for d in data.dims if d != dim]
    out = xr.DataArray(
        scale.reshape([data.sizes[d] for d in other]),
        dims=other,
        coords={k: v for k, v in data.coords.items() if dim not in v.dims},
        name="lattice_scale",
        attrs={"long_name": f"lattice scale of {getattr(phase, 'name', 'phase')}", "units": "1",
               "phase": str(getattr(phase, "name", "phase")), "q_range": list(q_range)},
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
) -> xr.Dataset:
    """All series descriptors of a result dataset, with the events they show.

    Adds ``crystallinity`` (point), ``peak_*`` (point, peak) for ``peaks``,
    ``lattice_scale`` (point) for ``phase``, and the amorphous-interval events (from the
    coherence length when ``gr`` was computed, else the crystallinity) as attributes
    ``event_onset_point``, ``event_end_point``, ``event_onset_time``, ``event_end_time``,
    ``event_duration`` of the returned dataset.
    """
    out = xr.Dataset()
    out["crystallinity"] = crystallinity_index(ds["iq"], q_range=q_range)
    if peaks:
        out = out.merge(peak_descriptors(ds["iq"], peaks))
    if phase is not None:
        out["lattice_scale"] = lattice_scale(ds["iq"], phase, q_range=q_range)
    source = ds["coherence_length"] if "coherence_length" in ds else out["crystallinity"]
    events = detect_events(source)
    out.attrs["event_signal"] = str(source.name)
    for key, value in events.items():
        if value is not None and key not in ("reference", "floor", "threshold"):
            out.attrs[f"event_{key}"] = value
    return out
