"""Scaled subtraction of a container, air or Kapton background from I(Q).

The background is measured separately (empty capillary, Kapton tape) on its own Q grid.
It is interpolated linearly onto the sample grid (never extrapolated), scaled and
subtracted, with the variances added: ``var = sigma_I^2 + scale^2 sigma_bg^2``.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from xrdmap.errors import ConfigError, InputError

__all__ = ["subtract_background", "auto_scale"]


def _interp_background(background: xr.DataArray, q: np.ndarray, q_dim: str) -> xr.DataArray:
    if not isinstance(background, xr.DataArray) or q_dim not in background.dims:
        raise InputError(
            f"background: expected an xarray.DataArray with a {q_dim!r} dimension (Q in A^-1)"
        )
    qb = np.asarray(background[q_dim].values, dtype=float)
    if qb.size < 2:
        raise InputError(f"background has {qb.size} Q values; expected a measured pattern")
    qlo, qhi = float(np.nanmin(qb)), float(np.nanmax(qb))
    dlo, dhi = float(np.nanmin(q)), float(np.nanmax(q))
    if qhi < dlo or qlo > dhi:
        raise InputError(
            f"background covers Q = {qlo:.4g}-{qhi:.4g} A^-1, none of the data range {dlo:.4g}-{dhi:.4g} A^-1; "
            "expected a background measured over the same Q range"
        )
    missing = []
    if qlo > dlo:
        missing.append(f"{dlo:.4g}-{qlo:.4g}")
    if qhi < dhi:
        missing.append(f"{qhi:.4g}-{dhi:.4g}")
    if missing:
        warnings.warn(
            f"background covers Q = {qlo:.4g}-{qhi:.4g} A^-1 only; the data at Q = {' and '.join(missing)} A^-1 "
            "have no background and are set to NaN",
            stacklevel=3,
        )
    bg = background.sortby(q_dim)
    return bg.interp({q_dim: q}, method="linear", kwargs={"fill_value": np.nan})


def auto_scale(
    iq: xr.DataArray,
    background: xr.DataArray,
    *,
    q_window: tuple[float, float] | None = None,
    q_dim: str = "q",
) -> xr.DataArray:
    """Largest background scale that keeps ``iq - scale * background >= 0`` in ``q_window``.

    That is ``min(iq / background)`` over the window (where the background is positive),
    per pattern. Choose a window where the container dominates and the sample scatters
    weakly (e.g. around the Kapton peak below the first sample peak); the default is the
    whole common Q range. Noise makes the minimum biased low: the scale is a lower bound.
    """
    q = np.asarray(iq[q_dim].values, dtype=float)
    bg = _interp_background(background, q, q_dim)
    lo, hi = q_window if q_window is not None else (-np.inf, np.inf)
    if not lo < hi:
        raise ConfigError(
            f"background scale window {q_window}: expected (qlo, qhi) with qlo < qhi (A^-1)"
        )
    sel = (q >= lo) & (q <= hi)
    ratio = (iq / bg).where((bg > 0) & xr.DataArray(sel, dims=q_dim, coords={q_dim: q}))
    if not bool(ratio.notnull().any()):
        raise InputError(
            f"background is not positive anywhere in the scale window Q = {lo}-{hi} A^-1"
        )
    return ratio.min(q_dim).clip(min=0.0).rename("bgscale")


def subtract_background(
    iq: xr.DataArray,
    background: xr.DataArray,
    *,
    scale: float | str = 1.0,
    iq_sigma: xr.DataArray | None = None,
    background_sigma: xr.DataArray | None = None,
    q_dim: str = "q",
    q_window: tuple[float, float] | None = None,
) -> xr.Dataset:
    """``iq - scale * background`` on the sample grid, with propagated uncertainties.

    Parameters
    ----------
    iq
        Sample intensities with dimension ``q_dim`` (A^-1), any other dims (e.g. ``point``).
    background
        Background intensities on their own Q grid; 1-D, or with the same extra dims.
    scale
        Background scale factor, or ``"auto"``: the largest scale keeping the difference
        non-negative in ``q_window`` (:func:`auto_scale`), per pattern.
    iq_sigma, background_sigma
        Standard deviations; the result's ``iq_sigma`` is
        ``sqrt(iq_sigma^2 + scale^2 background_sigma^2)``.

    Returns
    -------
    xarray.Dataset
        ``iq`` (background-subtracted), ``bgscale`` and, when any sigma is given,
        ``iq_sigma``. Data outside the background's Q range are NaN (with a warning).
    """
    if not isinstance(iq, xr.DataArray) or q_dim not in iq.dims:
        raise InputError(f"iq: expected an xarray.DataArray with a {q_dim!r} dimension (Q in A^-1)")
    q = np.asarray(iq[q_dim].values, dtype=float)
    bg = _interp_background(background, q, q_dim)
    if isinstance(scale, str):
        if scale != "auto":
            raise ConfigError(f"background scale {scale!r}: expected a number or 'auto'")
        s = auto_scale(iq, background, q_window=q_window, q_dim=q_dim)
    else:
        if not np.isfinite(scale) or scale < 0:
            raise ConfigError(f"background scale {scale}: expected a finite number >= 0")
        s = xr.DataArray(float(scale), name="bgscale")
    out = xr.Dataset({"iq": (iq - s * bg).transpose(*iq.dims), "bgscale": s})
    out["iq"].attrs.update(iq.attrs)
    if iq_sigma is not None or background_sigma is not None:
        var = xr.zeros_like(iq, dtype=float)
        if iq_sigma is not None:
            var = var + iq_sigma**2
        if background_sigma is not None:
            if not isinstance(background_sigma, xr.DataArray) or q_dim not in background_sigma.dims:
                raise InputError(
                    f"background_sigma: expected an xarray.DataArray with a {q_dim!r} dimension"
                )
            bgs = background_sigma.sortby(q_dim).interp({q_dim: q}, kwargs={"fill_value": np.nan})
            var = var + (s * bgs) ** 2
        out["iq_sigma"] = np.sqrt(var).transpose(*iq.dims)
    return out
