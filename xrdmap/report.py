"""One static HTML report of a result: numbers, tables and embedded figures.

The file has inline CSS and its figures embedded (base64 PNG or inline SVG), so it opens
from disk in any browser, can be mailed or archived next to the result, and needs no server
or network. Every piece of text taken from the dataset is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from xrdmap.errors import InputError
from xrdmap.results import atomic_output

__all__ = ["write_report", "render_report"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
  color:#1a1a1a;background:#fff;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:1.5rem 2rem 4rem}
h1{font-size:1.6rem;margin:.2rem 0 .3rem}h2{font-size:1.25rem;margin-top:2.2rem;
  border-bottom:2px solid #0072B2;padding-bottom:.2rem}h3{font-size:1.05rem;margin:1.4rem 0 .4rem}
nav{font-size:.9rem;margin:.6rem 0 1rem}nav a{margin-right:.9rem;color:#0072B2}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.92rem}
th,td{border:1px solid #d0d0d0;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f2f5f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.chosen td{background:#e8f3fb;font-weight:600}
.muted{color:#666;font-size:.9rem}.flag{color:#D55E00;font-weight:600}
.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.35em;border:1px solid #888;
  vertical-align:-.05em}
figure{margin:1rem 0;text-align:center}figure img,figure svg{max-width:100%;height:auto}
figcaption{font-size:.88rem;color:#444}
details{margin:.6rem 0}summary{cursor:pointer;font-weight:600}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.7rem;overflow-x:auto;font-size:.82rem}
code{font-size:.9em}
"""

_CAPTIONS = {
    "overview": "I(Q) across the scan (left) next to the phase weight fractions (right); dashed: zone boundaries.",
    "iq_map": "I(Q) along the scan, logarithmic colour scale.",
    "iq_contrast": "Relative deviation of each I(Q) from the scan's median pattern: where the phases change.",
    "gr_map": "G(r) along the scan; colours diverge from white at G = 0.",
    "weights_q": "Relative weights of the reciprocal-space NMF components.",
    "weights_r": "Relative weights of the real-space NMF components.",
    "components_q": "Reciprocal-space NMF components over their assigned reference patterns (dashed).",
    "components_r": "Real-space NMF components over their assigned reference G(r) (dashed).",
    "phase_fractions": "Phase weight fractions; hatched: unexplained signal (residual: amorphous or unknown).",
    "quality": "Coherence length and residual; shaded points are flagged amorphous.",
}
_SECTION_FIGURES = {
    "summary": ("overview", "iq_map", "iq_contrast"),
    "pdf": ("gr_map",),
    "nmf": ("weights_q", "components_q", "weights_r", "components_r"),
    "zones": ("phase_fractions",),
    "quality": ("quality",),
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = ".4g") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    return "–" if not np.isfinite(v) else format(v, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[bool] = (),
           row_class: Sequence[str] = ()) -> str:
    """An HTML table; cells are escaped unless given as ``_Raw``."""
    out = ["<table>"]
    if any(header):
        out += ["<thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead>"]
    out.append("<tbody>")
    for i, row in enumerate(rows):
        cls = row_class[i] if i < len(row_class) and row_class[i] else ""
        out.append(f'<tr class="{cls}">' if cls else "<tr>")
        for j, cell in enumerate(row):
            text = cell.html if isinstance(cell, _Raw) else _e(cell)
            attr = ' class="num"' if j < len(numeric) and numeric[j] else ""
            out.append(f"<td{attr}>{text}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _Raw:
    """Already-safe HTML for a table cell."""

    def __init__(self, html_text: str):
        self.html = html_text


def _configuration(ds: xr.Dataset) -> dict[str, Any]:
    """The run configuration from the attrs (``configuration`` dict or ``config`` JSON)."""
    for key in ("configuration", "config"):
        value = ds.attrs.get(key)
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, str) and value.strip():
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, Mapping):
                return dict(parsed)
    return {}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            rows += _flatten(v, key + ".")
        else:
            rows.append((key, json.dumps(v) if isinstance(v, (list, tuple, dict)) else v))
    return rows


def _params_table(config: Mapping[str, Any], sections: Sequence[str], ds: xr.Dataset,
                  attr_prefixes: Sequence[str]) -> str:
    rows: list[tuple[str, Any]] = []
    for name in sections:
        if isinstance(config.get(name), Mapping):
            rows += _flatten(config[name], name + ".")
    for key, value in ds.attrs.items():
        if any(str(key).startswith(p) for p in attr_prefixes):
            rows.append((str(key), json.dumps(value) if isinstance(value, (list, dict)) else value))
    if not rows:
        return '<p class="muted">Not recorded in this result.</p>'
    return _table(["parameter", "value"], rows)


def _figure_html(name: str, fig: Figure | str | Path) -> str:
    caption = _CAPTIONS.get(name, name)
    if isinstance(fig, Figure):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        body = f'<img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
    else:
        path = Path(fig)
        if not path.is_file():
            raise InputError(f"report figure {str(path)!r} does not exist: expected a PNG or SVG file")
        if path.suffix.lower() == ".svg":
            text = path.read_text(encoding="utf-8")
            start = text.find("<svg")
            if start < 0:
                raise InputError(f"report figure {str(path)!r} is not an SVG document")
            body = text[start:]
        elif path.suffix.lower() == ".png":
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            body = f'<img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
        else:
            raise InputError(f"report figure {str(path)!r}: expected a .png or .svg file")
    return f'<figure id="fig-{_e(name)}">{body}<figcaption>{_e(caption)}</figcaption></figure>'


def _normalise_figures(ds: xr.Dataset, figures) -> dict[str, Figure | Path]:
    if figures is None:
        from xrdmap.maps import make_figures

        return dict(make_figures(ds))
    if isinstance(figures, Mapping):
        return dict(figures)
    out: dict[str, Figure | Path] = {}
    for i, item in enumerate(figures):
        if isinstance(item, Figure):
            out[f"figure_{i + 1}"] = item
        else:
            path = Path(item)
            # one embedded copy per figure: PNG and SVG of the same figure are the same
            if path.stem in out and Path(out[path.stem]).suffix.lower() == ".png":
                continue
            out[path.stem] = path
    return out


def _scan_summary(ds: xr.Dataset) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("scan points", ds.sizes.get("point", 0))]
    for name, unit in (("position", "mm"), ("time", "s")):
        if name in ds.coords and ds.coords[name].dims == ("point",) and ds.sizes.get("point"):
            v = np.asarray(ds.coords[name].values, dtype=float)
            step = np.median(np.abs(np.diff(np.sort(v)))) if v.size > 1 else float("nan")
            rows.append((f"{name} range ({unit})", f"{_num(np.nanmin(v))} – {_num(np.nanmax(v))} "
                                                   f"(step {_num(step)})"))
    for dim, unit, label in (("q", "Å⁻¹", "Q"), ("r", "Å", "r")):
        if dim in ds.coords and ds.sizes.get(dim):
            v = np.asarray(ds.coords[dim].values, dtype=float)
            rows.append((f"{label} grid ({unit})", f"{_num(v.min())} – {_num(v.max())}, {v.size} points"))
    return rows


def _provenance_rows(ds: xr.Dataset, config: Mapping[str, Any]) -> list[tuple[str, Any]]:
    from xrdmap import __version__

    rows: list[tuple[str, Any]] = []
    scan_cfg = config.get("scan") if isinstance(config.get("scan"), Mapping) else {}
    source = ds.attrs.get("source") or scan_cfg.get("source")
    if source:
        rows.append(("source", source if isinstance(source, str) else json.dumps(source)))
    if ds.attrs.get("result_file"):
        rows.append(("result file", ds.attrs["result_file"]))
    checksums = ds.attrs.get("input_checksums")
    if isinstance(checksums, str):
        try:
            checksums = json.loads(checksums)
        except json.JSONDecodeError:
            checksums = {"input": checksums}
    if isinstance(checksums, Mapping):
        for path, digest in checksums.items():
            rows.append((f"sha256 {path}", digest))
    versions = ds.attrs.get("software_versions")
    if isinstance(versions, Mapping):
        if "xrdmap" in versions:
            rows.append(("xrdmap version (result)", versions["xrdmap"]))
        others = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "xrdmap")
        if others:
            rows.append(("software", others))
    elif ds.attrs.get("xrdmap_version"):
        rows.append(("xrdmap version (result)", ds.attrs["xrdmap_version"]))
    if ds.attrs.get("created"):
        rows.append(("result created", ds.attrs["created"]))
    rows.append(("report written by", f"xrdmap {__version__}"))
    return rows


def _component_names(ds: xr.Dataset, dim: str) -> list[str] | None:
    for name in (f"{dim}_component_phase", "component_phase"):
        if name in ds and ds[name].dims == ("component",):
            return [v.decode() if isinstance(v, bytes) else str(v) for v in ds[name].values]
    return None


def _n_components(ds: xr.Dataset, dim: str) -> int | None:
    for source in (ds.variables, ds.attrs):
        value = source.get(f"nmf_{dim}_n_components")
        if value is not None:
            value = np.asarray(value.values if hasattr(value, "values") else value)
            if value.ndim == 0:
                return int(value)
    comps = ds.get(f"nmf_{dim}_components")
    if comps is None:
        return None
    return int(np.sum(np.isfinite(np.asarray(comps.values, dtype=float)).any(axis=1)))


def _nmf_section(ds: xr.Dataset, dim: str) -> str:
    space = "reciprocal space (Q)" if dim == "q" else "real space (r)"
    k = _n_components(ds, dim)
    if k is None:
        return ""
    parts = [f"<h3>NMF in {space}</h3>",
             f'<p>Components chosen: <strong id="nmf-{dim}-k">{k}</strong></p>']
    extra = []
    for key, label in ((f"nmf_{dim}_criterion", "criterion"), (f"nmf_{dim}_x_ranges", "fitted ranges")):
        if key in ds.attrs:
            value = ds.attrs[key]
            if label == "fitted ranges":
                vals = np.asarray(value, dtype=float).ravel()
                unit = "Å⁻¹" if dim == "q" else "Å"
                value = ", ".join(f"{a:g}–{b:g} {unit}" for a, b in zip(vals[::2], vals[1::2], strict=False))
            extra.append((label, value))
    if extra:
        parts.append(_table(["", ""], extra))
    err = ds.get(f"nmf_{dim}_reconstruction_error")
    if err is not None and err.ndim == 1:
        ks = np.asarray(err.coords[err.dims[0]].values) if err.dims[0] in err.coords else np.arange(1, err.size + 1)
        imp = ds.get(f"nmf_{dim}_relative_improvement")
        imp_vals = np.asarray(imp.values, dtype=float) if imp is not None and imp.shape == err.shape else None
        svd = ds.get(f"nmf_{dim}_svd_error")
        svd_vals = np.asarray(svd.values, dtype=float) if svd is not None and svd.shape == err.shape else None
        rows, classes = [], []
        for i, kk in enumerate(ks):
            row = [int(kk)]
            if svd_vals is not None:
                row.append(_num(svd_vals[i], ".5g"))
            row.append(_num(err.values[i], ".5g"))
            if imp_vals is not None:
                row.append(_num(imp_vals[i], ".3g"))
            rows.append(row)
            classes.append("chosen" if int(kk) == k else "")
        header = ["components k"]
        if svd_vals is not None:
            header.append("best rank-k error (SVD)")
        header.append("NMF reconstruction error")
        if imp_vals is not None:
            header.append("relative improvement")
        parts.append(_table(header, rows, numeric=[True] * len(header), row_class=classes))
    return "".join(parts)


def _assignment_section(ds: xr.Dataset, dim: str, colors: Mapping[str, str]) -> str:
    names = _component_names(ds, dim)
    if names is None:
        return ""
    k = _n_components(ds, dim) or len(names)
    score = next((ds[v] for v in (f"{dim}_component_score", "component_score")
                  if v in ds and ds[v].dims == ("component",)), None)
    matrix = next((ds[v] for v in ds.data_vars
                   if v.startswith(f"{dim}_") and "score" in v and set(ds[v].dims) == {"component", "phase"}),
                  None)
    if matrix is None:
        matrix = next((ds[v] for v in ds.data_vars
                       if "score" in v and not v.startswith(("q_", "r_")) and set(ds[v].dims) == {"component", "phase"}),
                      None)
    runner_vars = [v for v in ds.data_vars if "runner" in v and v.startswith((f"{dim}_", "runner", "component"))
                   and "component" in ds[v].dims]
    rows = []
    for i in range(min(k, len(names))):
        phase = names[i] or "unassigned"
        swatch = colors.get(phase)
        cell = _Raw((f'<span class="swatch" style="background:{swatch}"></span>' if swatch else "") + _e(phase))
        row: list[Any] = [f"C{i + 1}", cell, _num(score.values[i], ".3f") if score is not None else "–"]
        runners = ""
        if matrix is not None:
            m = matrix.transpose("component", "phase")
            vals = np.asarray(m.values[i], dtype=float)
            labels = [str(p) for p in m.coords["phase"].values]
            order = [j for j in np.argsort(-np.nan_to_num(vals, nan=-np.inf)) if labels[j] != phase]
            runners = ", ".join(f"{labels[j]} ({vals[j]:.3f})" for j in order[:3] if np.isfinite(vals[j]))
        elif runner_vars:
            bits = []
            for v in runner_vars:
                val = ds[v].transpose("component", ...).values[i]
                bits.append(", ".join(str(x) for x in np.atleast_1d(val) if str(x)))
            runners = "; ".join(b for b in bits if b)
        row.append(runners or "–")
        rows.append(row)
    space = "Q" if dim == "q" else "r"
    return (f"<h3>Components in {space}</h3>"
            + _table(["component", "phase", "score", "runners-up or best candidates (score)"], rows, numeric=[False, False, True]))


def _zone_section(ds: xr.Dataset, colors: Mapping[str, str]) -> str:
    from xrdmap.maps import scan_axis, zone_boundaries, zone_table

    if "phase_fraction" not in ds:
        return '<p class="muted">No phase fractions in this result.</p>'
    bounds = zone_boundaries(ds)
    table = zone_table(ds, bounds)
    _, axis, _ = scan_axis(ds)
    unit = {"position": "mm", "time": "s"}.get(axis, "")
    shown = [j for j, p in enumerate(table["phase"].values)
             if np.nanmax(np.nan_to_num(table["mean_fraction"].values[:, j])) >= 0.005]
    phases = [str(table["phase"].values[j]) for j in shown]
    header = ["zone", f"{axis} range ({unit})".replace(" ()", ""), "points"]
    header += [f"{p} (wt%)" for p in phases]
    has_res = "mean_residual" in table
    if has_res:
        header.append("residual (%)")
    rows = []
    for z in range(table.sizes["zone"]):
        row: list[Any] = [int(table["zone"].values[z]),
                          f"{_num(table['start'].values[z])} – {_num(table['end'].values[z])}",
                          int(table["n_points"].values[z])]
        for j in shown:
            mean = table["mean_fraction"].values[z, j] * 100
            std = table["std_fraction"].values[z, j] * 100
            row.append(_Raw(f'{_num(mean, ".1f")} <span class="muted">± {_num(std, ".1f")}</span>'))
        if has_res:
            row.append(_num(table["mean_residual"].values[z] * 100, ".1f"))
        rows.append(row)
    where = ", ".join(f"{b:.4g} {unit}" for b in bounds) or "none found"
    source = ("stored in the result" if ("zone_boundaries" in ds.variables or "zone_boundaries" in ds.attrs)
              else "change points of the phase-fraction profiles (xrdmap.maps.find_zone_boundaries)")
    legend = " ".join(f'<span class="swatch" style="background:{colors.get(p, "#ccc")}"></span>{_e(p)}'
                      for p in phases)
    return (f"<p>Zone boundaries: <strong>{_e(where)}</strong> <span class=\"muted\">({_e(source)})</span></p>"
            + _table(header, rows, numeric=[True, False, True] + [True] * (len(header) - 3))
            + '<p class="muted">Mean ± standard deviation over the points of each zone, as stored in '
              "<code>phase_fraction</code>; the residual is the share of the signal that no reference "
              f"phase explains (amorphous or unknown). {legend}</p>")


def _ranges(values: np.ndarray, step: float) -> list[str]:
    """Group sorted scan positions into contiguous ranges ("a – b")."""
    if values.size == 0:
        return []
    groups, start, prev = [], values[0], values[0]
    for v in values[1:]:
        if v - prev > 1.5 * step:
            groups.append((start, prev))
            start = v
        prev = v
    groups.append((start, prev))
    return [f"{a:.4g}" if a == b else f"{a:.4g} – {b:.4g}" for a, b in groups]


def _quality_section(ds: xr.Dataset, coherence_threshold_A: float, residual_threshold: float) -> str:
    from xrdmap.maps import amorphous_points, residual_baseline, scan_axis

    metrics = [n for n in ("coherence_length", "residual", "low_r_ripple") if n in ds and ds[n].dims == ("point",)]
    if not metrics:
        return '<p class="muted">No quality metrics in this result.</p>'
    flags = np.asarray(amorphous_points(ds, coherence_threshold_A=coherence_threshold_A,
                                        residual_threshold=residual_threshold).values)
    scan, axis, label = scan_axis(ds)
    unit = {"position": "mm", "time": "s"}.get(axis, "")
    step = float(np.median(np.diff(np.sort(scan)))) if scan.size > 1 else 1.0
    where = _ranges(np.sort(scan[flags]), step)
    criteria = []
    if "coherence_length" in ds:
        criteria.append(f"coherence length &lt; {coherence_threshold_A:g} Å")
    if "residual" in ds:
        criteria.append(f"residual above the scan's baseline ({residual_baseline(ds):.3g}, its 10th "
                        f"percentile) by more than {residual_threshold:g}")
    out = [f'<p>Points flagged amorphous ({" or ".join(criteria)}): '
           f'<strong class="{"flag" if flags.any() else ""}" id="n-flagged">{int(flags.sum())}</strong>'
           f" of {flags.size}"
           + (f" at {_e(axis)} {_e(', '.join(where))} {_e(unit)}" if where else "") + ".</p>"]
    rows = []
    units = {"coherence_length": "Å", "residual": "fraction", "low_r_ripple": "arb. units"}
    for n in metrics:
        v = np.asarray(ds[n].values, dtype=float)
        rows.append([n.replace("_", " "), units[n], _num(np.nanmin(v)), _num(np.nanmedian(v)), _num(np.nanmax(v))])
    out.append(_table(["metric", "unit", "min", "median", "max"], rows, numeric=[False, False, True, True, True]))
    return "".join(out)


def render_report(ds: xr.Dataset, *, figures=None, title: str | None = None,
                  coherence_threshold_A: float = 10.0, residual_threshold: float = 0.2) -> str:
    """The report of :func:`write_report` as an HTML string."""
    from xrdmap.maps import phase_colors

    if not isinstance(ds, xr.Dataset):
        raise InputError(f"report expected an xarray.Dataset result, got {type(ds).__name__}")
    config = _configuration(ds)
    figs = _normalise_figures(ds, figures)
    colors = phase_colors(ds)
    placed: set[str] = set()

    def figures_for(section: str) -> str:
        html_parts = []
        for name in _SECTION_FIGURES[section]:
            if name in figs and name not in placed:
                placed.add(name)
                html_parts.append(_figure_html(name, figs[name]))
        return "".join(html_parts)

    title = title or "xrdmap report"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sections: list[tuple[str, str, str]] = []
    sections.append(("summary", "Summary", _table(["", ""], _scan_summary(ds) + _provenance_rows(ds, config))
                     + figures_for("summary")))
    sections.append(("integration", "Integration parameters",
                     _params_table(config, ("geometry", "integration", "integrate", "background"), ds,
                                   ("integration", "pyfai", "poni", "method", "background"))))
    sections.append(("pdf", "PDF parameters",
                     _params_table(config, ("pdf",), ds, ("pdf",)) + figures_for("pdf")))
    nmf = _nmf_section(ds, "q") + _nmf_section(ds, "r")
    sections.append(("nmf", "NMF decomposition",
                     (nmf or '<p class="muted">No NMF decomposition in this result.</p>') + figures_for("nmf")))
    assign = _assignment_section(ds, "q", colors) + _assignment_section(ds, "r", colors)
    sections.append(("assignment", "Assignment of components to phases",
                     assign or '<p class="muted">No component assignment in this result.</p>'))
    sections.append(("zones", "Phase fractions per zone", _zone_section(ds, colors) + figures_for("zones")))
    sections.append(("quality", "Quality", _quality_section(ds, coherence_threshold_A, residual_threshold)
                     + figures_for("quality")))
    rest = [n for n in figs if n not in placed]
    if rest:
        sections.append(("figures", "Other figures", "".join(_figure_html(n, figs[n]) for n in rest)))
    attrs = {k: v for k, v in ds.attrs.items() if k not in ("configuration", "config")}
    config_text = json.dumps(config, indent=2, sort_keys=True, default=str) if config else "(not recorded)"
    attrs_text = json.dumps(attrs, indent=2, sort_keys=True, default=_json_default)
    sections.append(("configuration", "Full configuration",
                     f"<details><summary>Run configuration (JSON)</summary><pre>{_e(config_text)}</pre></details>"
                     f"<details><summary>All result attributes</summary><pre>{_e(attrs_text)}</pre></details>"))
    nav = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(name)}</h2>{content}</section>' for sid, name, content in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><main><h1>{_e(title)}</h1>"
            f'<p class="muted">Written {_e(now)}</p><nav>{nav}</nav>{body}</main></body></html>\n')


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_report(ds: xr.Dataset, path: str | Path, *, figures=None, title: str | None = None,
                 coherence_threshold_A: float = 10.0, residual_threshold: float = 0.2) -> Path:
    """Write one self-contained HTML report of a result, atomically.

    Sections: summary (scan, source and checksums, versions), integration parameters, PDF
    parameters, NMF (components chosen, reconstruction error for each k), assignment
    (component -> phase, score, runners-up), phase fractions per zone, quality (points
    flagged amorphous), full configuration (collapsed).

    Parameters
    ----------
    ds
        Result dataset (any variable may be missing; its section then says so).
    path
        HTML file to write.
    figures
        None (make every figure of :func:`xrdmap.maps.make_figures`), a mapping
        name -> matplotlib Figure or PNG/SVG path, or a sequence of those. Figures are
        embedded (PNG as base64, SVG inline).
    title
        Page title.
    coherence_threshold_A, residual_threshold
        Flag a point amorphous when its coherence length (A) is below the first, or its
        residual fraction exceeds the scan's baseline residual by more than the second
        (see :func:`xrdmap.maps.amorphous_points`).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    text = render_report(ds, figures=figures, title=title, coherence_threshold_A=coherence_threshold_A,
                         residual_threshold=residual_threshold)
    target = Path(path)
    with atomic_output(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target

