"""Figures of series descriptors against time (or position), with the detected events.

:func:`plot_series` draws one panel per descriptor present in a dataset
(``crystallinity``, ``coherence_length``, ``lattice_scale``, ``peak_position``,
``peak_fwhm``, ``peak_area``) against the scan axis, shading the amorphous interval
stored in the attributes ``event_onset_*`` / ``event_end_*``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

__all__ = ["plot_series", "SERIES_VARIABLES"]

SERIES_VARIABLES = {
    "crystallinity": "crystallinity index",
    "coherence_length": "coherence length (Å)",
    "lattice_scale": "lattice scale",
    "peak_position": "peak position (Å⁻¹)",
    "peak_fwhm": "peak FWHM (Å⁻¹)",
    "peak_area": "peak area (arb. units)",
}


def _axis(ds: xr.Dataset) -> tuple[np.ndarray, str, str]:
    for name, label in (("time", "time (s)"), ("position", "position (mm)")):
        if name in ds.coords and ds[name].dims == ("point",):
            return np.asarray(ds[name].values, dtype=float), label, name
    return np.arange(ds.sizes["point"], dtype=float), "point", "point"


def plot_series(ds: xr.Dataset, *, title: str | None = None) -> Any:
    """Descriptors of a series against time, the amorphous interval shaded.

    Parameters
    ----------
    ds : dataset with any of :data:`SERIES_VARIABLES` on ``point`` (``peak_*`` on
        ``(point, peak)``) and optionally the event attributes of
        :func:`xrdmap.series.describe_series`.
    title : figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    from xrdmap.errors import InputError

    names = [n for n in SERIES_VARIABLES if n in ds and "point" in ds[n].dims]
    if not names:
        raise InputError(f"no series descriptors ({', '.join(SERIES_VARIABLES)}) in the dataset")
    x, xlabel, xname = _axis(ds)
    fig, axes = plt.subplots(len(names), 1, figsize=(7.5, 1.9 * len(names) + 0.8), sharex=True, squeeze=False)
    onset = ds.attrs.get("event_onset_point")
    end = ds.attrs.get("event_end_point")
    for ax, name in zip(axes[:, 0], names):
        var = ds[name]
        if var.ndim == 2:
            other = [d for d in var.dims if d != "point"][0]
            for k in range(var.sizes[other]):
                label = f"{float(var[other][k]):.3g} Å⁻¹" if other == "peak" else str(k)
                ax.plot(x, var.isel({other: k}).values, ".-", ms=3, lw=1, label=label)
            ax.legend(fontsize=7, title="window centre" if other == "peak" else None, title_fontsize=7)
        else:
            ax.plot(x, var.values, ".-", ms=3, lw=1, color="C0")
        ax.set_ylabel(SERIES_VARIABLES[name], fontsize=8)
        if onset is not None:
            x0 = x[int(onset)]
            ax.axvline(x0, color="C3", lw=0.8, ls="--")
            if end is not None:
                x1 = x[int(end)]
                ax.axvline(x1, color="C2", lw=0.8, ls="--")
                ax.axvspan(x0, x1, color="C3", alpha=0.12, lw=0)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel(xlabel)
    if onset is not None:
        text = f"amorphous interval from {xname} {x[int(onset)]:.4g}"
        text += f" to {x[int(end)]:.4g}" if end is not None else " (no recrystallisation seen)"
        text += f" ({ds.attrs.get('event_signal', '')})"
        axes[0, 0].set_title(text, fontsize=8)
    fig.suptitle(title or "series descriptors", fontsize=10)
    fig.tight_layout()
    return fig
