"""Phase maps: figures of a result dataset, zone boundaries and per-zone phase fractions.

Every ``plot_*`` function takes a result :class:`xarray.Dataset` (see ``docs/developers.md``)
and returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state, no
window), so it can be shown in a notebook, saved, or embedded in a report. Figures plot
what the dataset holds and raise :class:`~xrdmap.errors.InputError` when the variable they
need is missing.

The scan axis is ``position`` (mm) for a line scan, else ``time`` (s) for a series, else
the point index. Heatmaps put the scan axis vertically, as the published maps across a
pellet's thickness do (Q or r horizontally); profiles (weights, fractions, quality) put it
horizontally. Each phase keeps one colour (Okabe-Ito palette, safe for colour-blind
readers) in every figure.

In Jupyter, a returned figure shows as the cell's value once an inline backend is active
(``%matplotlib inline``, or after importing pyplot); ``fig.savefig(path)`` writes it.

>>> from xrdmap import maps, open_result
>>> ds = open_result("result.h5")                   # doctest: +SKIP
>>> fig = maps.plot_phase_fractions(ds)             # doctest: +SKIP
>>> maps.zone_table(ds)["mean_fraction"]            # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from xrdmap.errors import ConfigError, InputError, OutputError
from xrdmap.results import atomic_output

__all__ = [
    "OKABE_ITO",
    "FIGURES",
    "phase_colors",
    "scan_axis",
    "plot_iq_map",
    "plot_gr_map",
    "plot_weights",
    "plot_components",
    "plot_phase_fractions",
    "plot_quality",
    "plot_overview",
    "find_zone_boundaries",
    "warm_up",
    "zone_boundaries",
    "zone_table",
    "amorphous_points",
    "residual_baseline",
    "fraction_bands",
    "make_figures",
    "save_figures",
]

#: Okabe & Ito (2008) categorical palette without black, in the order used for phases.
OKABE_ITO = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#D55E00",  # vermillion
    "#F0E442",  # yellow
)
_UNASSIGNED_COLOR = "#7f7f7f"
_SHOWN = 0.01  # phases below this weight fraction everywhere are left out of the fraction plots
_RESIDUAL_COLOR = "#bdbdbd"
_EXTRA_COLORS = ("#332288", "#882255", "#117733", "#999933", "#44AA99", "#AA4499", "#DDCC77")

#: Figure names written by :func:`save_figures`, grouped by the ``what`` selector of the CLI.
FIGURES = {
    "iq": ("iq_map", "iq_contrast"),
    "gr": ("gr_map",),
    "weights": ("weights_q", "weights_r"),
    "components": ("components_q", "components_r"),
    "fractions": ("phase_fractions", "overview"),
    "quality": ("quality",),
}

_GREEK = {"alpha": r"\alpha", "beta": r"\beta", "gamma": r"\gamma", "delta": r"\delta",
          "epsilon": r"\varepsilon", "eps": r"\varepsilon"}


# --------------------------------------------------------------------------- helpers


def scan_axis(ds: xr.Dataset | xr.DataArray) -> tuple[np.ndarray, str, str]:
    """The scan coordinate of ``ds``: ``(values, name, axis label with unit)``.

    ``position`` (mm) when present, else ``time`` (s), else the point index.
    """
    if "point" not in ds.dims:
        raise InputError("result dataset has no 'point' dimension: expected a scan (point, ...)")
    for name, label in (("position", "position (mm)"), ("time", "time (s)")):
        if name in ds.coords and ds.coords[name].dims == ("point",):
            return np.asarray(ds.coords[name].values, dtype=float), name, label
    return np.arange(ds.sizes["point"], dtype=float), "point", "scan point"


def _along(ds: xr.Dataset) -> str:
    return "over time" if scan_axis(ds)[1] == "time" else "along the scan"


def _pretty(name: str) -> str:
    """Phase name for matplotlib: digits after an element or ')' as subscripts, Greek prefix."""
    text = str(name).replace("$", r"\$")
    m = re.match(r"^(alpha|beta|gamma|delta|epsilon|eps)(\d?)[-_ ]", text, flags=re.I)
    prefix = ""
    if m:
        prefix = f"${_GREEK[m.group(1).lower()]}" + (f"_{m.group(2)}" if m.group(2) else "") + "$-"
        text = text[m.end():]
    if re.fullmatch(r"[A-Za-z0-9().,·\- ]+", text):
        text = re.sub(r"(?<=[A-Za-z)])(\d+(?:\.\d+)?)", r"$_{\1}$", text)
        text = re.sub(r"(?<=[A-Z]|[a-z](?<=[A-Z][a-z]))([xyz])(?=[A-Z(])", r"$_{\1}$", text)
    return prefix + text


def _component_phase(ds: xr.Dataset, dim: str) -> list[str] | None:
    for name in (f"{dim}_component_phase", "component_phase"):
        if name in ds and ds[name].dims == ("component",):
            values = ds[name].values
            if len(values) == ds.sizes["component"]:
                return [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    return None


def _component_score(ds: xr.Dataset, dim: str) -> np.ndarray | None:
    for name in (f"{dim}_component_score", "component_score"):
        if name in ds and ds[name].dims == ("component",):
            return np.asarray(ds[name].values, dtype=float)
    return None


def phase_colors(ds: xr.Dataset | None = None, names: Iterable[str] = ()) -> dict[str, str]:
    """One colour per phase name, the same in every figure of ``ds``.

    Phases of the ``phase`` dimension come first, in order, then phase names used only by
    component assignments, then ``names``. ``"unassigned"`` is grey.
    """
    ordered: list[str] = []
    if ds is not None:
        if "phase" in ds.coords:
            names = [str(p) for p in ds.coords["phase"].values]
            present = names
            if "phase_fraction" in ds and "phase" in ds["phase_fraction"].dims:
                peak = ds["phase_fraction"].max([d for d in ds["phase_fraction"].dims if d != "phase"])
                present = [n for n, v in zip(names, np.asarray(peak.values), strict=True) if v >= _SHOWN]
            # phases actually found get the first (most distinct) colours
            ordered += present
            for dim in ("q", "r"):
                ordered += [p for p in (_component_phase(ds, dim) or []) if p]
            ordered += names
        else:
            for dim in ("q", "r"):
                ordered += [p for p in (_component_phase(ds, dim) or []) if p]
    ordered += [str(n) for n in names]
    colors: dict[str, str] = {}
    palette = list(OKABE_ITO) + list(_EXTRA_COLORS)
    for name in ordered:
        if name in colors:
            continue
        if name.lower() == "unassigned":
            colors[name] = _UNASSIGNED_COLOR
            continue
        used = sum(1 for n in colors if n.lower() != "unassigned")
        colors[name] = palette[used % len(palette)]
    return colors


def _component_styles(ds: xr.Dataset, dim: str) -> list[tuple[str, str, str]]:
    """Per component: (colour, line style, legend label) -- colour of its assigned phase."""
    n = ds.sizes["component"]
    phases = _component_phase(ds, dim)
    scores = _component_score(ds, dim)
    colors = phase_colors(ds)
    styles = []
    seen: dict[str, int] = {}
    spare = iter(_EXTRA_COLORS * 4)
    for i in range(n):
        cname = f"C{i + 1}"
        phase = (phases[i] or None) if phases else None
        if phase is None or phase.lower() == "unassigned":
            color = next(spare) if phase is None else _UNASSIGNED_COLOR
            label = cname if phase is None else f"{cname}: unassigned"
        else:
            color = colors[phase]
            label = f"{cname}: {_pretty(phase)}"
        if scores is not None and np.isfinite(scores[i]) and phase is not None:
            label += f" (score {scores[i]:.2f})"
        key = phase or cname
        k = seen.get(key, 0)
        seen[key] = k + 1
        styles.append((color, ("-", "--", ":", "-.")[k % 4], label))
    return styles


def nmf_ranges(ds: xr.Dataset, dim: str) -> list[tuple[float, float]]:
    """The x ranges (A^-1 or A) the NMF in ``dim`` was fitted on (``nmf_{dim}_x_ranges``)."""
    value = ds.attrs.get(f"nmf_{dim}_x_ranges")
    if value is None and f"nmf_{dim}_x_ranges" in ds.variables:
        value = ds[f"nmf_{dim}_x_ranges"].values
    if value is None:
        # the run configuration records the ranges even when the NMF attrs were not merged
        config = ds.attrs.get("configuration")
        if isinstance(config, str):
            import json

            try:
                config = json.loads(config)
            except json.JSONDecodeError:
                config = None
        decompose = config.get("decompose") if isinstance(config, Mapping) else None
        value = decompose.get(f"{dim}_ranges") if isinstance(decompose, Mapping) else None
    if value is None or np.size(value) == 0:
        return []
    vals = np.asarray(value, dtype=float).ravel()
    return [(float(a), float(b)) for a, b in zip(vals[::2], vals[1::2], strict=False)
            if np.isfinite(a) and np.isfinite(b) and b > a]


def _window(ds: xr.Dataset, dim: str, x_range) -> tuple[float, float] | None:
    """Explicit ``x_range``; for ``"auto"`` the span the NMF was fitted on, else everything."""
    if x_range is None:
        return None
    if isinstance(x_range, str):
        if x_range != "auto":
            raise ConfigError(f"{dim}_range {x_range!r}: expected 'auto', None or (min, max)")
        ranges = nmf_ranges(ds, dim)
        return (min(a for a, _ in ranges), max(b for _, b in ranges)) if ranges else None
    lo, hi = (float(v) for v in x_range)
    if not hi > lo:
        raise ConfigError(f"{dim}_range {x_range!r}: expected (min, max) with min < max")
    return lo, hi


def _require(ds: xr.Dataset, name: str, dims: tuple[str, ...]) -> xr.DataArray:
    if name not in ds:
        raise InputError(f"result dataset has no variable {name!r}: expected {name} {dims}")
    da = ds[name]
    if set(da.dims) != set(dims):
        raise InputError(f"result variable {name!r} has dims {da.dims}: expected {dims}")
    return da.transpose(*dims)


def _boundaries_of(ds: xr.Dataset, boundaries: Sequence[float] | str | None) -> list[float]:
    if boundaries is None:
        return []
    if isinstance(boundaries, str):
        if boundaries != "auto":
            raise ConfigError(f"boundaries {boundaries!r}: expected 'auto', None or a list of positions")
        return zone_boundaries(ds)
    return [float(b) for b in boundaries]


def _robust_limits(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(finite, [lo, hi])
    if vmax <= vmin:
        vmax = vmin + (abs(vmin) or 1.0)
    return float(vmin), float(vmax)


def _new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


# --------------------------------------------------------------------------- heatmaps


def _uniform(v: np.ndarray) -> bool:
    """Whether ``v`` (sorted) is an evenly spaced grid of at least two values."""
    if v.size < 2 or not np.all(np.isfinite(v)):
        return False
    step = np.diff(v)
    return bool(step[0] > 0 and np.allclose(step, step[0], rtol=1e-4, atol=0.0))


def _mesh(ax, x: np.ndarray, y: np.ndarray, z: np.ndarray, **kw):
    """``z`` (y, x) as a colour map: an image on even grids, a quad mesh otherwise.

    Both draw each value as a cell centred on its coordinates; the image is ~10x faster to
    render for a scan of hundreds of points x thousands of Q bins and gives the same
    picture (its cells are equal where the grid is even).
    """
    if _uniform(x) and _uniform(y):
        x, z = _bin_columns(x, z, _IMAGE_MAX_COLUMNS)
        dx, dy = x[1] - x[0], y[1] - y[0]
        extent = (x[0] - dx / 2, x[-1] + dx / 2, y[0] - dy / 2, y[-1] + dy / 2)
        return ax.imshow(z, extent=extent, origin="lower", aspect="auto", interpolation="antialiased", **kw)
    return ax.pcolormesh(x, y, z, shading="nearest", rasterized=True, **kw)


#: Columns of a heatmap image beyond which neighbours are averaged before drawing: about
#: twice the pixels of a 7-inch axes at 150 dpi (matplotlib averages them on screen anyway,
#: after colouring every value).
_IMAGE_MAX_COLUMNS = 1600


def _bin_columns(x: np.ndarray, z: np.ndarray, max_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """``z`` (rows, len(x)) with groups of ``f`` neighbouring columns averaged (f the
    smallest factor leaving at most ``max_columns``; a NaN makes its group NaN); the
    last ``len(x) % f`` columns are dropped. ``x`` evenly spaced; returns the new centres."""
    f = -(-len(x) // max_columns)
    if f <= 1:
        return x, z
    n = len(x) // f
    return x[: n * f].reshape(n, f).mean(axis=1), z[:, : n * f].reshape(z.shape[0], n, f).mean(axis=2)


def _heatmap(ds: xr.Dataset, da: xr.DataArray, xdim: str, xlabel: str, *, norm, cmap: str,
             cbar_label: str, title: str, boundaries: list[float]) -> Figure:
    scan, _, scan_label = scan_axis(ds)
    x = np.asarray(da.coords[xdim].values, dtype=float) if xdim in da.coords else np.arange(da.sizes[xdim])
    z = np.asarray(da.values, dtype=float)
    order = np.argsort(scan, kind="stable")
    fig = _new_figure(7.0, 5.0)
    ax = fig.add_subplot()
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#d9d9d9")
    mesh = _mesh(ax, x, scan[order], z[order], cmap=colormap, norm=norm)
    cbar = fig.colorbar(mesh, ax=ax, pad=0.02)
    cbar.set_label(cbar_label)
    for b in boundaries:
        ax.axhline(b, color="white", lw=1.2, ls="--")
        ax.axhline(b, color="black", lw=0.6, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(scan_label)
    ax.set_title(title)
    if scan_label.startswith("position"):
        ax.invert_yaxis()  # depth into the pellet grows downwards, as in a cross-section
    return fig


def plot_iq_map(ds: xr.Dataset, *, var: str = "iq", scale: str = "log",
                percentiles: tuple[float, float] = (1.0, 99.8),
                q_range: tuple[float, float] | str | None = "auto",
                boundaries: Sequence[float] | str | None = "auto", cmap: str = "viridis") -> Figure:
    """Heatmap of I(Q) along the scan: Q (A^-1) horizontally, scan axis vertically.

    Parameters
    ----------
    ds
        Result dataset with ``var`` (point, q).
    var
        ``"iq"`` (default), ``"sq"`` or ``"fq"``.
    scale
        ``"log"`` (logarithmic colours between robust percentiles of the positive values),
        ``"robust"`` (linear between percentiles), ``"linear"`` (full range) or
        ``"contrast"`` (relative deviation from the scan's median pattern, diverging
        colours: shows where the phases change even under a strong smooth background).
    percentiles
        Lower and upper percentile (%) that bound the colour scale (taken inside the
        plotted Q window).
    q_range
        (min, max) Q window in A^-1; ``"auto"`` (default) shows the range the NMF was
        fitted on when the result records it (where the Bragg peaks are), None everything.
    boundaries
        Zone boundaries (scan-axis units) drawn as dashed lines; ``"auto"`` uses
        :func:`zone_boundaries`, None draws none.
    cmap
        Matplotlib colour map (perceptually uniform by default).
    """
    da = _require(ds, var, ("point", "q"))
    window = _window(ds, "q", q_range)
    if window is not None:
        da = da.sel(q=slice(*window))
        if da.sizes["q"] < 2:
            raise ConfigError(f"q_range {window}: fewer than 2 Q points of {var!r} inside")
    z = np.asarray(da.values, dtype=float)
    if scale == "log":
        positive = np.where(z > 0, z, np.nan)
        vmin, vmax = _robust_limits(positive, *percentiles)
        vmin = max(vmin, vmax * 1e-6)
        # zero/negative intensities (over-subtracted background) take the lowest colour;
        # only missing data (NaN: masked, crack) is grey
        da = da.copy(data=np.where(np.isfinite(z), np.maximum(z, vmin), np.nan))
        norm = LogNorm(vmin=vmin, vmax=vmax, clip=True)
    elif scale == "robust":
        norm = Normalize(*_robust_limits(z, *percentiles), clip=True)
    elif scale == "linear":
        norm = Normalize(*_robust_limits(z, 0.0, 100.0))
    elif scale == "contrast":
        # relative deviation from the scan's median pattern: what changes between points
        ref = np.nanmedian(z, axis=0)
        z = np.divide(z, ref, out=np.full_like(z, np.nan), where=ref > 0) - 1.0
        da = da.copy(data=z)
        lim = _robust_limits(np.abs(z), 0.0, percentiles[1])[1]
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
        cmap = "RdBu_r" if cmap == "viridis" else cmap
    else:
        raise ConfigError(f"scale {scale!r}: expected 'log', 'robust', 'linear' or 'contrast'")
    labels = {"iq": ("I(Q) (arb. units)", "I(Q)"), "sq": ("S(Q)", "S(Q)"),
              "fq": ("F(Q) (Å$^{-1}$)", "F(Q)")}
    cbar_label, what = labels.get(var, (var, var))
    if scale == "log":
        cbar_label += ", log scale"
    elif scale == "contrast":
        cbar_label = f"{what} / median over the scan − 1"
    return _heatmap(ds, da, "q", "Q (Å$^{-1}$)", norm=norm, cmap=cmap, cbar_label=cbar_label,
                    title=f"{what} {_along(ds)}", boundaries=_boundaries_of(ds, boundaries))


def plot_gr_map(ds: xr.Dataset, *, percentile: float = 99.5,
                r_range: tuple[float, float] | str | None = None,
                boundaries: Sequence[float] | str | None = "auto", cmap: str = "RdBu_r") -> Figure:
    """Heatmap of G(r) along the scan: r (A) horizontally, scan axis vertically.

    G(r) oscillates about zero, so the colours diverge from white at G = 0 (ColorBrewer
    RdBu, safe for colour-blind readers) and are symmetric up to the ``percentile`` of |G|.
    ``r_range``: (min, max) in A, ``"auto"`` for the real-space NMF range, None for all.
    """
    da = _require(ds, "gr", ("point", "r"))
    window = _window(ds, "r", r_range)
    if window is not None:
        da = da.sel(r=slice(*window))
    z = np.abs(np.asarray(da.values, dtype=float))
    lim = _robust_limits(z, 0.0, percentile)[1]
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)
    return _heatmap(ds, da, "r", "r (Å)", norm=norm, cmap=cmap, cbar_label="G(r) (Å$^{-2}$)",
                    title=f"G(r) {_along(ds)}", boundaries=_boundaries_of(ds, boundaries))


# --------------------------------------------------------------------------- NMF


def plot_weights(ds: xr.Dataset, dim: str = "q", *, normalize: bool = True,
                 layout: str = "auto",
                 boundaries: Sequence[float] | str | None = "auto") -> Figure:
    """NMF component weights along the scan, coloured like their assigned phases.

    Parameters
    ----------
    dim
        ``"q"`` (reciprocal-space NMF) or ``"r"`` (real-space NMF).
    normalize
        Show each point's weights as fractions of their sum (relative weights, as the
        pdfitc NMF-mapping app does); otherwise the raw weights.
    layout
        ``"overlay"`` (one panel), ``"panels"`` (one panel per component, own y scale) or
        ``"auto"``: panels when the components' weight variations differ by more than a
        factor 5 (e.g. a background component near 1 beside phases of a few %), so that
        no profile is flattened against the axis.
    """
    if dim not in ("q", "r"):
        raise ConfigError(f"dim {dim!r}: expected 'q' or 'r'")
    w = np.asarray(_require(ds, f"nmf_{dim}_weights", ("point", "component")).values, dtype=float)
    if normalize:
        total = np.nansum(w, axis=1, keepdims=True)
        w = np.divide(w, total, out=np.full_like(w, np.nan), where=total > 0)
    if layout not in ("auto", "overlay", "panels"):
        raise ConfigError(f"layout {layout!r}: expected 'auto', 'overlay' or 'panels'")
    scan, _, scan_label = scan_axis(ds)
    order = np.argsort(scan, kind="stable")
    real = [i for i in range(w.shape[1]) if np.isfinite(w[:, i]).any()]  # NaN: padding
    spans = np.array([np.nanmax(w[:, i]) - np.nanmin(w[:, i]) for i in real])
    if layout == "auto":
        full = float(np.nanmax(w[:, real]) - min(0.0, float(np.nanmin(w[:, real])))) if real else 0.0
        flat = spans.size and spans.max() < 0.2 * full  # every profile squashed against the axis
        uneven = spans.size > 1 and spans.max() > 5 * max(spans.min(), 1e-12)
        layout = "panels" if flat or uneven else "overlay"
    styles = _component_styles(ds, dim)
    bounds = _boundaries_of(ds, boundaries)
    ylabel = "relative weight" if normalize else "weight (arb. units)"
    space = "reciprocal space, Q" if dim == "q" else "real space, r"
    if layout == "overlay":
        fig = _new_figure(7.0, 4.0)
        ax = fig.add_subplot()
        for i in real:
            color, ls, label = styles[i]
            ax.plot(scan[order], w[order, i], color=color, ls=ls, lw=1.8, marker="o", ms=2.5, label=label)
        for b in bounds:
            ax.axvline(b, color="0.3", lw=0.8, ls="--")
        ax.set_xlabel(scan_label)
        ax.set_ylabel(ylabel + (" (fraction)" if normalize else ""))
        if normalize:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"NMF component weights ({space})")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
        return fig
    fig = _new_figure(7.0, 0.9 + 1.35 * len(real))
    axes = fig.subplots(len(real), 1, sharex=True, squeeze=False)[:, 0]
    for ax, i in zip(axes, real, strict=True):
        color, ls, label = styles[i]
        ax.plot(scan[order], w[order, i], color=color, ls=ls, lw=1.8, marker="o", ms=2.5)
        for b in bounds:
            ax.axvline(b, color="0.3", lw=0.8, ls="--")
        ax.text(0.01, 0.95, label, transform=ax.transAxes, ha="left", va="top", fontsize="small",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5})
        ax.margins(y=0.25)
    axes[-1].set_xlabel(scan_label)
    fig.supylabel(ylabel + (" (fraction; own scale per panel)" if normalize else ", own scale per panel"),
                  fontsize="medium")
    axes[0].set_title(f"NMF component weights ({space})")
    return fig


def _scaled_reference(x: np.ndarray, comp: np.ndarray, ref: np.ndarray, inside: np.ndarray,
                      degree: int = 3) -> np.ndarray | None:
    """``a * ref + baseline`` fitted to ``comp`` by least squares (a > 0), the baseline a
    Legendre polynomial of ``degree`` over the fitted range: the overlay of a reference."""
    ok = np.isfinite(comp) & np.isfinite(ref) & inside
    if ok.sum() < degree + 3 or np.ptp(ref[ok]) == 0:
        return None
    lo, hi = x[ok].min(), x[ok].max()
    basis = np.polynomial.legendre.legvander((x - lo) / ((hi - lo) or 1.0) * 2 - 1, degree)
    design = np.column_stack([ref, basis])
    coef, *_ = np.linalg.lstsq(design[ok], comp[ok], rcond=None)
    if coef[0] <= 0:
        return None
    out = design @ coef
    out[~inside] = np.nan
    return out


def _references(ds: xr.Dataset, dim: str, x: np.ndarray, phases) -> list[np.ndarray | None]:
    """Reference pattern of each component's assigned phase on the grid ``x``.

    From ``reference_iq``/``reference_gr`` (phase, q|r) when the result holds them, else
    simulated from ``phases`` (name -> :class:`xrdmap.phases.Phase`; ``"auto"`` loads the
    shipped library) with the stretch and width the assignment found; mixtures ``"A + B"``
    are summed with ``{dim}_component_phase_fraction``. Simulated references are those the
    assignment scored (:func:`xrdmap.assign.reference_pattern`), so when NMF in Q ran on
    the Bragg part (attribute ``nmf_q_diffuse_window_A``) they get the same treatment.
    """
    names = _component_phase(ds, dim) or []
    n = ds.sizes.get("component", 0)
    out: list[np.ndarray | None] = [None] * n
    assigned = [i for i, p in enumerate(names) if p and p.lower() != "unassigned"]
    if not assigned:
        return out
    stored = ds.get("reference_iq" if dim == "q" else "reference_gr")
    if stored is not None and "phase" in stored.dims:
        labels = [str(p) for p in stored.coords["phase"].values]
        for i in assigned:
            if names[i] in labels:
                out[i] = np.asarray(stored.sel(phase=names[i]).transpose(dim).values, dtype=float)
        return out
    if phases is None:
        return out
    if isinstance(phases, str):
        from xrdmap.errors import XrdmapError
        from xrdmap.phases import load_library

        try:
            phases = load_library()
        except XrdmapError:
            return out
    library = {str(k).lower(): v for k, v in dict(phases).items()}
    from xrdmap.assign import reference_pattern

    window = ds.attrs.get("nmf_q_diffuse_window_A") if dim == "q" else None

    def values(name: str) -> np.ndarray | None:
        var = ds.get(f"{dim}_{name}")
        return None if var is None else np.asarray(var.values, dtype=float)

    def per_phase(name: str) -> tuple[list[str], np.ndarray] | None:
        var = ds.get(f"{dim}_{name}")
        if var is None or "phase" not in var.dims:
            return None
        return [str(p) for p in var.coords["phase"].values], var.transpose("component", "phase").values

    stretch, width = values("component_stretch"), values("component_width")
    mix = per_phase("component_phase_fraction")
    # each phase at the stretch and width it was scored with (results written before
    # these were stored: every phase of a mixture at the main phase's values)
    mix_stretch, mix_width = per_phase("component_mixture_stretch"), per_phase("component_mixture_width")

    def at(table, i: int, part: str, fallback):
        if table is not None and part in table[0]:
            v = float(table[1][i, table[0].index(part)])
            if np.isfinite(v):
                return v
        return fallback

    for i in assigned:
        parts = [p.strip() for p in names[i].split(" + ")]
        weights = [at(mix, i, p, 0.0) for p in parts] if len(parts) > 1 and mix is not None else [1.0] * len(parts)
        if any(p.lower() not in library for p in parts):
            continue
        s_i = stretch[i] if stretch is not None and np.isfinite(stretch[i]) else 1.0
        w_i = width[i] if width is not None and np.isfinite(width[i]) else None
        out[i] = sum(wt * reference_pattern(library[part.lower()], x, dim, stretch=at(mix_stretch, i, part, s_i),
                                            width=at(mix_width, i, part, w_i), diffuse_window_A=window)
                     for part, wt in zip(parts, weights, strict=True))
    return out


def plot_components(ds: xr.Dataset, dim: str = "q", *, phases: Mapping[str, Any] | str | None = "auto",
                    spacing: float = 1.15) -> Figure:
    """NMF components stacked with offsets, each with its assigned reference pattern.

    Each component is scaled to unit height inside the NMF range. The reference pattern of
    its phase (``reference_iq`` (phase, q) / ``reference_gr`` (phase, r) when the result
    holds them, else simulated from ``phases`` -- name -> Phase, ``"auto"`` for the shipped
    library, None for none -- with the fitted stretch and width) is drawn dashed in black
    after a least-squares fit ``a * reference + smooth baseline`` (cubic Legendre), as
    the assignment compares them. The legend names the phase and the assignment score.
    """
    if dim not in ("q", "r"):
        raise ConfigError(f"dim {dim!r}: expected 'q' or 'r'")
    comps = _require(ds, f"nmf_{dim}_components", ("component", dim))
    x = np.asarray(comps.coords[dim].values, dtype=float) if dim in comps.coords else np.arange(comps.sizes[dim])
    references = _references(ds, dim, x, phases)
    window = _window(ds, dim, "auto")
    inside = np.ones(x.size, dtype=bool) if window is None else (x >= window[0]) & (x <= window[1])
    fig = _new_figure(7.0, 1.2 + 1.3 * comps.sizes["component"])
    ax = fig.add_subplot()
    ref_drawn = False
    drawn = 0
    for i, (color, ls, label) in enumerate(_component_styles(ds, dim)):
        c = np.asarray(comps.values[i], dtype=float)
        if not np.isfinite(c).any():
            continue  # padding: this space chose fewer components
        seen = c[inside] if np.isfinite(c[inside]).any() else c
        lo, hi = np.nanmin(seen), np.nanmax(seen)
        height = (hi - lo) or 1.0
        offset = spacing * drawn
        drawn += 1
        ref = references[i]
        if ref is not None:
            fitted = _scaled_reference(x, c, ref, inside)
            if fitted is not None:
                ax.plot(x, (fitted - lo) / height + offset, color="black", lw=0.8, ls=(0, (3, 2)),
                        zorder=3, label=None if ref_drawn else "reference (scaled)")
                ref_drawn = True
        ax.plot(x, (c - lo) / height + offset, color=color, ls=ls, lw=1.5, label=label)
    ax.set_yticks([])
    if dim == "q":
        ax.set_xlabel("Q (Å$^{-1}$)")
        ax.set_ylabel("intensity (arb. units, offset)")
        ax.set_title("NMF components in Q" + (" (Bragg part)" if ds.attrs.get("nmf_q_diffuse_window_A") else "")
                     + " and references", loc="left")
    else:
        ax.set_xlabel("r (Å)")
        ax.set_ylabel("G(r) (arb. units, offset)")
        ax.set_title("NMF components in r and reference G(r)", loc="left")
    ranges = nmf_ranges(ds, dim)
    lo_x, hi_x = float(np.nanmin(x)), float(np.nanmax(x))
    if ranges:
        lo_x = max(lo_x, min(a for a, _ in ranges))
        hi_x = min(hi_x, max(b for _, b in ranges))
        edges = sorted(ranges)
        for (_, b0), (a1, _) in zip(edges[:-1], edges[1:], strict=True):
            if a1 > b0:  # gaps between fitted ranges were not seen by the NMF
                ax.axvspan(b0, a1, color="0.92", lw=0, zorder=0)
    ax.set_xlim(lo_x, hi_x)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False, fontsize="small")
    return fig


# --------------------------------------------------------------------------- phase fractions


def _fractions(ds: xr.Dataset) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    pf = _require(ds, "phase_fraction", ("point", "phase"))
    names = [str(p) for p in pf.coords["phase"].values] if "phase" in pf.coords else [f"phase {i}" for i in range(pf.sizes["phase"])]
    residual = None
    if "residual" in ds and ds["residual"].dims == ("point",):
        residual = np.clip(np.asarray(ds["residual"].values, dtype=float), 0.0, 1.0)
    return np.asarray(pf.values, dtype=float), names, residual


def fraction_bands(ds: xr.Dataset, residual: str = "excess") -> xr.Dataset:
    """The bands that :func:`plot_phase_fractions` stacks, as numbers.

    Returns ``fraction`` (point, phase): the crystalline weight fractions rescaled to share
    ``1 - unexplained``, and ``unexplained`` (point): the whole ``residual``
    (``residual="total"``), its excess over :func:`residual_baseline` (``"excess"``), or
    zero (``"none"``). Each point's bands sum to 1.
    """
    fractions, names, res = _fractions(ds)
    if residual not in ("excess", "total", "none"):
        raise ConfigError(f"residual {residual!r}: expected 'excess', 'total' or 'none'")
    f = np.nan_to_num(np.clip(fractions, 0, None))
    band = np.zeros(len(f))
    if res is not None and residual != "none":
        band = np.nan_to_num(res)
        if residual == "excess":
            band = np.clip(band - residual_baseline(ds), 0.0, 1.0)
    total = f.sum(axis=1, keepdims=True)
    f = np.divide(f, total, out=np.zeros_like(f), where=total > 0) * (1.0 - band)[:, None]
    coords = {k: v for k, v in ds.coords.items() if v.dims == ("point",)}
    return xr.Dataset(
        {"fraction": (("point", "phase"), f), "unexplained": ("point", band)},
        coords={**coords, "phase": names},
        attrs={"residual": residual},
    )


def _draw_fractions(ax, ds: xr.Dataset, boundaries: list[float], *, vertical: bool,
                    residual_mode: str = "excess") -> None:
    bands = fraction_bands(ds, residual_mode)
    names = [str(p) for p in bands["phase"].values]
    scan, _, scan_label = scan_axis(ds)
    order = np.argsort(scan, kind="stable")
    s = scan[order]
    f = bands["fraction"].values[order]
    band = bands["unexplained"].values[order] if "residual" in ds and residual_mode != "none" else None
    if band is not None:
        label = "unexplained signal\n(amorphous?)"
        if residual_mode == "excess":
            label = f"unexplained above the\nscan's {100 * residual_baseline(ds):.0f} % baseline\n(amorphous?)"
    colors = phase_colors(ds)
    bottom = np.zeros(len(s))
    fill = ax.fill_betweenx if vertical else ax.fill_between
    minor = np.zeros(len(s))
    for j, name in enumerate(names):
        if not np.any(f[:, j] >= _SHOWN):
            minor += f[:, j]
            continue
        top = bottom + f[:, j]
        fill(s, bottom, top, color=colors[name], lw=0, step="mid", label=_pretty(name))
        bottom = top
    if np.any(minor > 0):
        fill(s, bottom, bottom + minor, color="#e0e0e0", lw=0, step="mid",
             label=f"other phases (< {100 * _SHOWN:.0f} % each)")
        bottom = bottom + minor
    if band is not None:
        fill(s, bottom, bottom + band, facecolor="white", step="mid",
             edgecolor=_RESIDUAL_COLOR, hatch="///", lw=0, label=label)
    line = ax.axhline if vertical else ax.axvline
    for b in boundaries:
        line(b, color="black", lw=1.0, ls="--")
    half = float(np.median(np.diff(s))) / 2 if len(s) > 1 else 0.5
    lims = (s.min() - half, s.max() + half)  # each point drawn as a bin of one step
    if vertical:
        ax.set_xlim(0, 1)
        ax.set_ylim(*lims)
        ax.set_xlabel("weight fraction")
        ax.set_ylabel(scan_label)
        if scan_label.startswith("position"):
            ax.invert_yaxis()
    else:
        ax.set_ylim(0, 1)
        ax.set_xlim(*lims)
        ax.set_ylabel("weight fraction")
        ax.set_xlabel(scan_label)


def plot_phase_fractions(ds: xr.Dataset, *, residual: str = "excess",
                         boundaries: Sequence[float] | str | None = "auto") -> Figure:
    """Stacked weight fractions of the phases along the scan.

    The unexplained signal is its own hatched band on top and the crystalline fractions
    share the rest. ``residual="excess"`` (default) shows only what exceeds the scan's
    baseline residual (:func:`residual_baseline`): every point keeps some unexplained
    signal (smooth background, imperfect references), and a band of it everywhere would
    hide the crystalline fractions; a vitrified region stands out above it.
    ``"total"`` shows the whole ``residual``; ``"none"`` normalises the crystalline
    fractions to 1. Phases below 1 % everywhere are pooled in one grey band. Zone
    boundaries are dashed vertical lines labelled with their position.
    """
    fig = _new_figure(8.0, 4.2)
    ax = fig.add_subplot()
    bounds = _boundaries_of(ds, boundaries)
    _draw_fractions(ax, ds, bounds, vertical=False, residual_mode=residual)
    _, name, _ = scan_axis(ds)
    unit = {"position": " mm", "time": " s"}.get(name, "")
    for b in bounds:
        ax.annotate(f"{b:.3g}{unit}", (b, 1.0), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize="small")
    ax.set_title(f"Phase weight fractions {_along(ds)}", pad=14 if bounds else 6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    return fig


def plot_quality(ds: xr.Dataset, *, coherence_threshold_A: float = 10.0,
                 residual_threshold: float = 0.2,
                 boundaries: Sequence[float] | str | None = "auto") -> Figure:
    """Coherence length (A) and residual fraction along the scan, with flag thresholds.

    Points flagged by :func:`amorphous_points` are shaded in both panels.
    """
    panels = [n for n in ("coherence_length", "residual", "low_r_ripple")
              if n in ds and ds[n].dims == ("point",)]
    if not panels:
        raise InputError("result dataset has none of 'coherence_length', 'residual', 'low_r_ripple' (point)")
    scan, _, scan_label = scan_axis(ds)
    order = np.argsort(scan, kind="stable")
    flagged = amorphous_points(ds, coherence_threshold_A=coherence_threshold_A,
                               residual_threshold=residual_threshold).values[order]
    bounds = _boundaries_of(ds, boundaries)
    fig = _new_figure(7.0, 1.0 + 1.9 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    spec = {
        "coherence_length": ("coherence length (Å)", coherence_threshold_A, "#0072B2"),
        "residual": ("residual (fraction)", residual_threshold, "#D55E00"),
        "low_r_ripple": ("low-r ripple (arb. units)", None, "#009E73"),
    }
    step = np.median(np.diff(scan[order])) if len(scan) > 1 else 1.0
    for ax, name in zip(axes, panels, strict=True):
        label, threshold, color = spec[name]
        ax.plot(scan[order], np.asarray(ds[name].values, dtype=float)[order], color=color,
                marker="o", ms=2.5, lw=1.5)
        if threshold is not None:
            level = threshold
            text = f"flag below {threshold:g} Å"
            if name == "residual":
                level = residual_baseline(ds) + threshold
                text = f"flag above baseline + {threshold:g}"
            ax.axhline(level, color="0.3", lw=0.9, ls=":", label=text)
            ax.legend(loc="best", frameon=False, fontsize="small")
        for a, b in _runs(scan[order], flagged):
            ax.axvspan(a - step / 2, b + step / 2, color="0.85", lw=0, zorder=0)
        for b in bounds:
            ax.axvline(b, color="0.3", lw=0.8, ls="--")
        ax.set_ylabel(label)
    axes[-1].set_xlabel(scan_label)
    axes[0].set_title(f"Quality {_along(ds)} (shaded: flagged amorphous)")
    return fig


def _runs(scan: np.ndarray, flags: np.ndarray) -> list[tuple[float, float]]:
    """First and last scan coordinate of each run of consecutive flagged points."""
    idx = np.flatnonzero(flags)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return [(float(scan[a]), float(scan[b])) for a, b in zip(starts, ends, strict=True)]


def plot_overview(ds: xr.Dataset, *, boundaries: Sequence[float] | str | None = "auto") -> Figure:
    """Published-figure layout: I(Q) heatmap across the pellet next to the phase fractions.

    Both panels share the vertical scan axis, like Figs. 5, 9 and 10 of the EFS study.
    """
    da = _require(ds, "iq", ("point", "q"))
    bounds = _boundaries_of(ds, boundaries)
    has_fractions = "phase_fraction" in ds
    fig = _new_figure(9.5 if has_fractions else 6.5, 5.0)
    axes = fig.subplots(1, 2 if has_fractions else 1, sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": [2.2, 1] if has_fractions else [1]})[0]

    window = _window(ds, "q", "auto")
    if window is not None and da.sel(q=slice(*window)).sizes["q"] >= 2:
        da = da.sel(q=slice(*window))
    scan, _, scan_label = scan_axis(ds)
    order = np.argsort(scan, kind="stable")
    z = np.asarray(da.values, dtype=float)
    vmin, vmax = _robust_limits(np.where(z > 0, z, np.nan), 1.0, 99.8)
    vmin = max(vmin, vmax * 1e-6)
    z = np.where(np.isfinite(z), np.maximum(z, vmin), np.nan)
    q = np.asarray(da.coords["q"].values, dtype=float)
    mesh = _mesh(axes[0], q, scan[order], z[order],
                 cmap=matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9"),
                 norm=LogNorm(vmin=vmin, vmax=vmax, clip=True))
    for b in bounds:
        axes[0].axhline(b, color="white", lw=1.2, ls="--")
    axes[0].set_xlabel("Q (Å$^{-1}$)")
    axes[0].set_ylabel(scan_label)
    axes[0].set_title(f"I(Q) {_along(ds)}")
    if scan_label.startswith("position"):
        axes[0].invert_yaxis()
    if has_fractions:
        _draw_fractions(axes[1], ds, bounds, vertical=True)
        axes[1].set_ylabel("")
        axes[1].set_title("phase fractions")
        axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False,
                       fontsize="small", ncol=2)
    fig.colorbar(mesh, ax=axes[0], pad=0.01, label="I(Q) (arb. units, log scale)")
    return fig


# --------------------------------------------------------------------------- zones


def _segment_costs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative sums so that the squared error of any segment costs O(p)."""
    c1 = np.vstack([np.zeros(x.shape[1]), np.cumsum(x, axis=0)])
    c2 = np.concatenate([[0.0], np.cumsum((x * x).sum(axis=1))])
    return c1, c2


def _optimal_segmentation(x: np.ndarray, max_segments: int, min_size: int) -> list[list[int]]:
    """Exact least-squares piecewise-constant segmentation (dynamic programming).

    Returns, for k = 1..max_segments, the segment start indices (excluding 0).
    """
    n = len(x)
    c1, c2 = _segment_costs(x)

    def cost(i: np.ndarray | int, j: int) -> np.ndarray:
        # squared deviation from the mean of rows i..j-1, vectorised over i
        s = c1[j] - c1[i]
        m = j - np.asarray(i)
        return (c2[j] - c2[i]) - (s * s).sum(axis=-1) / m

    inf = np.inf
    # every segment's cost once (segment i..j-1 at [i, j]; inf where shorter than min_size)
    costs = np.full((n + 1, n + 1), inf)
    for j in range(min_size, n + 1):
        i = np.arange(j - min_size + 1)
        costs[i, j] = cost(i, j)
    best = np.full((max_segments + 1, n + 1), inf)
    back = np.zeros((max_segments + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    start = np.arange(n + 1)[:, None]
    for k in range(1, max_segments + 1):
        # the k-th segment ends at j and starts at i, (k - 1) min_size <= i <= j - min_size;
        # for every j at once (the first of equal totals, as a loop over i would take)
        total = np.where(start >= (k - 1) * min_size, best[k - 1][:, None] + costs, inf)
        j = np.arange(k * min_size, n + 1)
        t = np.argmin(total[:, j], axis=0)
        best[k, j] = total[t, j]
        back[k, j] = t
    result = []
    for k in range(1, max_segments + 1):
        if not np.isfinite(best[k, n]):
            break
        starts, j = [], n
        for kk in range(k, 0, -1):
            j = back[kk, j]
            starts.append(j)
        result.append(sorted(starts)[1:])
    return result


def _trend(seg: np.ndarray, m0: np.ndarray, m1: np.ndarray) -> float:
    """Change across ``seg`` of its linear trend from ``m0`` towards ``m1`` (fraction of the step)."""
    d = m1 - m0
    t = (seg - m0) @ d / max(float(d @ d), 1e-300)
    if len(t) < 2:
        return 0.0
    i = np.arange(len(t))
    return float(abs(np.polyfit(i, t, 1)[0]) * (len(t) - 1))


def _dissolve_transitions(x: np.ndarray, starts: list[int], min_plateau: int, tol: float) -> list[int]:
    """Replace short segments that only step along a gradual transition by one boundary.

    A segment whose mean lies (within ``tol``, for every phase) between the means of its
    neighbours and which is shorter than ``min_plateau`` points, or along which the
    composition moves by more than a third of the way between them, is a piece of a ramp,
    not a zone: its two
    edges become one boundary where the profile crosses halfway between the neighbours.
    """
    n = len(x)
    while True:
        edges = [0, *starts, n]
        segs = list(zip(edges[:-1], edges[1:], strict=True))
        means = [x[a:b].mean(axis=0) for a, b in segs]
        for k in range(1, len(segs) - 1):
            lo = np.minimum(means[k - 1], means[k + 1]) - tol
            hi = np.maximum(means[k - 1], means[k + 1]) + tol
            if np.all((means[k] >= lo) & (means[k] <= hi)) and (
                    segs[k][1] - segs[k][0] < min_plateau
                    or _trend(x[segs[k][0]:segs[k][1]], means[k - 1], means[k + 1]) > 1 / 3):
                break
        else:
            return starts
        a, b = segs[k - 1][0], segs[k + 1][1]
        d = means[k + 1] - means[k - 1]
        t = (x[a:b] - means[k - 1]) @ d / max(float(d @ d), 1e-300)
        above = np.flatnonzero(t >= 0.5)
        new = a + (int(above[0]) if above.size else (b - a) // 2)
        new = min(max(new, a + 1), b - 1)
        starts = [*starts[: k - 1], new, *starts[k + 1:]]


def find_zone_boundaries(phase_fraction: xr.DataArray, *, n_zones: int | None = None,
                         max_zones: int = 8, min_size: int = 2, min_change: float = 0.05,
                         min_plateau: int = 3, penalty: float | None = None,
                         max_points: int = 1000) -> list[float]:
    """Scan positions where the phase composition changes (change points).

    The fraction profiles of all phases are fitted together by a piecewise-constant
    function (exact least-squares segmentation by dynamic programming). Without
    ``n_zones``, the number of zones minimises ``SSE + penalty * (zones - 1)`` with, by
    default, ``penalty = 2 p sigma^2 ln(n)`` (``sigma`` estimated from point-to-point
    differences, ``p`` phases, ``n`` points; a BIC-like criterion), floored so that a step
    of ``min_change`` over ``min_size`` points is needed. Adjacent zones whose mean
    fractions differ by less than ``min_change`` (largest change over the phases) are then
    merged, and segments that only step along a gradual transition between two zones
    (short, or sloping by more than a third of the step, with a composition between the
    neighbours') become one boundary where the composition is halfway between them. A zone
    is thus a plateau of composition; an intermediate zone whose composition is not
    between its neighbours' (a phase that appears only there) is kept however narrow.

    Parameters
    ----------
    phase_fraction
        Weight fractions with dims (point, phase) (or (point, component) weights); points
        with NaN are ignored.
    n_zones
        Fix the number of zones instead of choosing it.
    max_zones
        Largest number of zones tried.
    min_size
        Fewest points in a zone.
    min_change
        Smallest change of any phase's mean fraction between adjacent zones.
    min_plateau
        Fewest points of a zone whose composition lies between its neighbours'. 3 keeps
        a 3-point plateau (the simulated composite's 0.3 mm intermediate zone at a 0.094
        mm step, which 4 merges into one transition); shorter pieces of a ramp are still
        dissolved, and longer ones by the trend test. Measured on logistic ramps (0.05-0.5
        mm wide, 0.05/0.1 mm steps, noise 0.02): 6 of 100 split into more than one
        boundary with 3, 3 of 100 with 4; a 3-point plateau was kept in 10 of 10 with 3,
        0 of 10 with 4. Raise it for finely sampled graded samples.
    penalty
        Cost of one more boundary, in squared fraction units (overrides the default).
    max_points
        Longer scans are averaged in blocks down to about this many points first (the
        exact segmentation costs O(zones * n^2)); boundaries are then located within one
        block.

    Returns
    -------
    list of float
        Boundary positions in scan-axis units (mm, s or point index), each midway between
        the last point of one zone and the first point of the next, in increasing order.
    """
    if not isinstance(phase_fraction, xr.DataArray) or "point" not in phase_fraction.dims:
        raise InputError("phase_fraction: expected a DataArray with a 'point' dimension")
    other = [d for d in phase_fraction.dims if d != "point"]
    if len(other) > 1:
        raise InputError(f"phase_fraction has dims {phase_fraction.dims}: expected (point, phase)")
    da = phase_fraction.transpose("point", *other)
    scan, _, _ = scan_axis(da)
    x = np.asarray(da.values, dtype=float).reshape(da.sizes["point"], -1)
    order = np.argsort(scan, kind="stable")
    scan, x = scan[order], x[order]
    ok = np.all(np.isfinite(x), axis=1)
    scan, x = scan[ok], x[ok]
    if len(x) > max_points:
        # long series: segment block means (boundaries then within one block)
        m = int(np.ceil(len(x) / max_points))
        nb = len(x) // m
        x = x[: nb * m].reshape(nb, m, -1).mean(axis=1)
        scan = scan[: nb * m].reshape(nb, m).mean(axis=1)
    n, p = x.shape
    if n < 2 * min_size:
        return []
    if n_zones is not None and n_zones < 1:
        raise ConfigError(f"n_zones {n_zones}: expected a positive number of zones")
    kmax = min(n // min_size, n_zones if n_zones is not None else max_zones)
    candidates = _optimal_segmentation(x, kmax, min_size)
    if n_zones is not None:
        starts = candidates[min(n_zones, len(candidates)) - 1]
    else:
        if penalty is None:
            sigma2 = float(np.mean((np.median(np.abs(np.diff(x, axis=0)), axis=0) / 0.6745) ** 2 / 2))
            penalty = max(3.0 * p * sigma2 * np.log(n), 0.5 * min_size * min_change**2)
        c1, c2 = _segment_costs(x)

        def sse(starts: list[int]) -> float:
            edges = [0, *starts, n]
            total = 0.0
            for a, b in zip(edges[:-1], edges[1:], strict=True):
                s = c1[b] - c1[a]
                total += (c2[b] - c2[a]) - float((s * s).sum()) / (b - a)
            return total

        scores = [sse(s) + penalty * len(s) for s in candidates]
        starts = candidates[int(np.argmin(scores))]
    starts = _dissolve_transitions(x, list(starts), min_plateau, min_change / 2)
    while starts:
        edges = [0, *starts, n]
        means = [x[a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        jumps = [float(np.max(np.abs(m1 - m0))) for m0, m1 in zip(means[:-1], means[1:], strict=True)]
        k = int(np.argmin(jumps))
        if jumps[k] >= min_change or n_zones is not None:
            break
        starts.pop(k)
    return [float((scan[s - 1] + scan[s]) / 2) for s in starts]


def zone_boundaries(ds: xr.Dataset, **kwargs: Any) -> list[float]:
    """Zone boundaries of a result: stored ones (``zone_boundaries`` attr or variable) if
    present, else :func:`find_zone_boundaries` on ``phase_fraction`` (or, without it, on
    the Q-space NMF weights, each component scaled to its own 0-1 range); [] when neither
    exists."""
    stored = ds["zone_boundaries"].values if "zone_boundaries" in ds.variables else ds.attrs.get("zone_boundaries")
    if stored is not None:
        return sorted(float(b) for b in np.atleast_1d(np.asarray(stored, dtype=float)) if np.isfinite(b))
    for name in ("phase_fraction", "nmf_q_weights", "nmf_r_weights"):
        if name in ds and "point" in ds[name].dims and ds[name].ndim == 2:
            da = ds[name]
            if name.startswith("nmf"):
                # each component on its own 0-1 scale: a background component near 1 must
                # not hide phases of a few per cent
                da = da.dropna("component", how="all")
                lo, hi = da.min("point"), da.max("point")
                da = (da - lo) / (hi - lo).where(hi > lo)
                da = da.fillna(0.0)
            return find_zone_boundaries(da, **kwargs)
    return []


def zone_table(ds: xr.Dataset, boundaries: Sequence[float] | None = None) -> xr.Dataset:
    """Mean phase weight fractions in each zone between boundaries.

    Parameters
    ----------
    ds
        Result dataset with ``phase_fraction`` (point, phase) (and optionally ``residual``).
    boundaries
        Zone boundaries in scan-axis units; default :func:`zone_boundaries`.

    Returns
    -------
    xarray.Dataset
        dims (zone, phase): ``mean_fraction``, ``std_fraction``; dims (zone): ``start``,
        ``end`` (first and last scan coordinate in the zone), ``n_points`` and, when the
        result has one, ``mean_residual``.
    """
    fractions, names, residual = _fractions(ds)
    scan, name, _ = scan_axis(ds)
    bounds = sorted(zone_boundaries(ds) if boundaries is None else [float(b) for b in boundaries])
    zone_of = np.searchsorted(np.asarray(bounds), scan, side="right")
    nz = len(bounds) + 1
    mean = np.full((nz, len(names)), np.nan)
    std = np.full((nz, len(names)), np.nan)
    start = np.full(nz, np.nan)
    end = np.full(nz, np.nan)
    count = np.zeros(nz, dtype=int)
    mres = np.full(nz, np.nan)
    for z in range(nz):
        sel = zone_of == z
        count[z] = int(sel.sum())
        if not count[z]:
            continue
        mean[z] = np.nanmean(fractions[sel], axis=0)
        std[z] = np.nanstd(fractions[sel], axis=0)
        start[z], end[z] = scan[sel].min(), scan[sel].max()
        if residual is not None:
            mres[z] = np.nanmean(residual[sel])
    unit = {"position": "mm", "time": "s"}.get(name, "")
    out = xr.Dataset(
        {
            "mean_fraction": (("zone", "phase"), mean, {"units": "weight fraction"}),
            "std_fraction": (("zone", "phase"), std, {"units": "weight fraction"}),
            "start": ("zone", start, {"units": unit}),
            "end": ("zone", end, {"units": unit}),
            "n_points": ("zone", count),
        },
        coords={"zone": np.arange(1, nz + 1), "phase": names},
        attrs={"boundaries": bounds, "scan_axis": name},
    )
    if residual is not None:
        out["mean_residual"] = ("zone", mres, {"units": "fraction of signal"})
    return out


def residual_baseline(ds: xr.Dataset) -> float:
    """The residual every point of the scan has (10th percentile of ``residual``)."""
    res = np.asarray(ds["residual"].values, dtype=float)
    return float(np.nanpercentile(res, 10)) if np.isfinite(res).any() else 0.0


def amorphous_points(ds: xr.Dataset, *, coherence_threshold_A: float = 10.0,
                     residual_threshold: float = 0.2) -> xr.DataArray:
    """Points flagged amorphous: coherence length below ``coherence_threshold_A`` (A), or
    residual (unexplained fraction) exceeding the scan's baseline residual (its 10th
    percentile) by more than ``residual_threshold``.

    Glassy regions have no G(r) correlations beyond ~7 A, hence the 10 A default. The
    residual is compared with its own baseline because every point keeps some unexplained
    signal (smooth background, imperfect references); a vitrified band raises it above
    that level.
    """
    flag = np.zeros(ds.sizes["point"], dtype=bool)
    if "coherence_length" in ds:
        flag |= np.asarray(ds["coherence_length"].values, dtype=float) < coherence_threshold_A
    if "residual" in ds:
        res = np.asarray(ds["residual"].values, dtype=float)
        if np.isfinite(res).any():
            flag |= res > residual_baseline(ds) + residual_threshold
    return xr.DataArray(flag, dims=("point",), coords={k: v for k, v in ds.coords.items() if v.dims == ("point",)},
                        name="amorphous")


# --------------------------------------------------------------------------- output


def make_figures(ds: xr.Dataset, what: str | Iterable[str] = "all", *,
                 phases: Mapping[str, Any] | str | None = "auto") -> dict[str, Figure]:
    """Every figure the dataset has data for, by name (see :data:`FIGURES`).

    Parameters
    ----------
    what
        ``"all"`` or one or more of the groups ``iq, gr, weights, components, fractions,
        quality`` and the figure names of :data:`FIGURES` (e.g. ``weights_q``).
    phases
        Reference phases drawn with the components (:func:`plot_components`).
    """
    selection = list(FIGURES) if what == "all" else ([what] if isinstance(what, str) else list(what))
    all_names = [name for names in FIGURES.values() for name in names]  # in FIGURES order
    unknown = [g for g in selection if g not in FIGURES and g not in all_names]
    if unknown:
        raise ConfigError(f"figure selection {unknown}: expected 'all' or any of {', '.join(FIGURES)} "
                          f"or of the figure names {', '.join(all_names)}")
    wanted = {name for g in selection for name in FIGURES.get(g, (g,))}
    bounds = zone_boundaries(ds)
    makers = {
        "iq_map": ("iq", lambda: plot_iq_map(ds, boundaries=bounds)),
        "iq_contrast": ("iq", lambda: plot_iq_map(ds, scale="contrast", boundaries=bounds)),
        "gr_map": ("gr", lambda: plot_gr_map(ds, boundaries=bounds)),
        "weights_q": ("nmf_q_weights", lambda: plot_weights(ds, "q", boundaries=bounds)),
        "weights_r": ("nmf_r_weights", lambda: plot_weights(ds, "r", boundaries=bounds)),
        "components_q": ("nmf_q_components", lambda: plot_components(ds, "q", phases=phases)),
        "components_r": ("nmf_r_components", lambda: plot_components(ds, "r", phases=phases)),
        "phase_fractions": ("phase_fraction", lambda: plot_phase_fractions(ds, boundaries=bounds)),
        "overview": ("iq", lambda: plot_overview(ds, boundaries=bounds)),
        "quality": (None, lambda: plot_quality(ds, boundaries=bounds)),
    }
    figures: dict[str, Figure] = {}
    for name in (n for n in all_names if n in wanted):
        needs, make = makers[name]
        if name == "overview" and "phase_fraction" not in ds:
            continue
        if name == "quality":
            if not any(n in ds for n in ("coherence_length", "residual", "low_r_ripple")):
                continue
        elif needs not in ds:
            continue
        figures[name] = make()
    return figures


def warm_up(formats: Sequence[str] = ("png",), dpi: int = 150) -> None:
    """Draw a small throwaway figure to memory in each of ``formats``.

    It has what this module's figures have (constrained layout, an image with a colour
    bar, lines, a legend, a hatched fill, mathtext), so the fonts, the mathtext parser and
    the renderers are set up by this call, in a background thread for example, instead of
    when the first real figure is drawn (~0.2-0.3 s after the last frame of a run).
    """
    import io

    fig = _new_figure(3.0, 2.0)
    ax = fig.add_subplot()
    image = ax.imshow(np.arange(12.0).reshape(3, 4), aspect="auto", interpolation="antialiased")
    fig.colorbar(image, ax=ax, label="G(r) (Å$^{-2}$)")
    ax.plot([0.0, 3.0], [0.0, 2.0], lw=1.5, marker="o", ms=2.5, label="line")
    ax.fill_between([0.0, 3.0], 0.0, 1.0, hatch="///", lw=0, alpha=0.3, label="fill")
    ax.legend(fontsize="small")
    ax.set_xlabel("Q (Å$^{-1}$)")
    ax.set_title("warm-up")
    for fmt in formats:
        fig.savefig(io.BytesIO(), format=fmt, dpi=dpi, **_format_options(fmt))


def _format_options(fmt: str) -> dict[str, Any]:
    """``savefig`` options of a format: PNG at zlib level 1 (these images are mostly flat
    colour; higher levels cost CPU for a few per cent of size)."""
    return {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}


def save_figures(ds: xr.Dataset, outdir: str | Path, formats: Sequence[str] = ("png", "svg"),
                 *, what: str | Iterable[str] = "all", dpi: int = 150,
                 phases: Mapping[str, Any] | str | None = "auto") -> list[Path]:
    """Write every figure of :func:`make_figures` as ``outdir/<name>.<format>``, atomically.

    Returns the paths written. ``formats``: any of ``png``, ``svg``, ``pdf``; ``what``
    and ``phases`` as in :func:`make_figures`.
    """
    out = Path(outdir)
    formats = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise ConfigError(f"figure formats {list(formats)}: expected one or more of png, svg, pdf")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"figure directory {str(out)!r} cannot be created: {exc.strerror}") from None
    written = []
    for name, fig in make_figures(ds, what, phases=phases).items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            with atomic_output(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata=_metadata(ds, fmt), **_format_options(fmt))
            written.append(path)
    return written


def _metadata(ds: xr.Dataset, fmt: str) -> Mapping[str, Any] | None:
    from xrdmap import __version__

    creator = f"xrdmap {__version__}"
    if fmt == "png":
        return {"Software": creator}
    if fmt == "svg":
        return {"Creator": creator, "Date": None}
    return {"Creator": creator}
