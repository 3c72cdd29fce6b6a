"""``xrdmap decompose``: NMF of a folder/list of patterns or of a result file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from xrdmap.cli._app import app, parse_range
from xrdmap.errors import ConfigError, InputError

#: Pattern files read from a folder, and the x dimension each holds.
_SUFFIX_DIM = {".gr": "r", ".xy": "q", ".xye": "q", ".chi": "q", ".iq": "q", ".dat": "q"}


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.stem)]


def _pattern_files(sources: list[Path]) -> list[Path]:
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            found = [p for p in src.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIX_DIM]
            if not found:
                raise InputError(
                    f"folder {str(src)!r} has no pattern files: expected {', '.join(sorted(_SUFFIX_DIM))}"
                )
            files += sorted(found, key=_natural_key)
        elif src.is_file():
            files.append(src)
        else:
            raise InputError(f"input {str(src)!r} does not exist: expected pattern files, a folder or a result .h5")
    return files


def _read_patterns(files: list[Path], dim: str | None):
    """Stack column files onto the first file's x grid (as the NMF-mapping app does)."""
    import numpy as np
    import xarray as xr

    from xrdmap.textio import read_columns

    dims = {_SUFFIX_DIM.get(f.suffix.lower(), "q") for f in files}
    if dim is None:
        if len(dims) > 1:
            raise InputError("pattern files mix .gr (r) and I(Q) files: expected one kind, or give --dim")
        dim = dims.pop()
    first = read_columns(files[0])
    x = first[:, 0]
    rows = []
    for f in files:
        data = first if f is files[0] else read_columns(f)
        xi, yi = data[:, 0], data[:, 1]
        if xi.shape == x.shape and np.array_equal(xi, x):
            rows.append(yi)
            continue
        order = np.argsort(xi)
        xi, yi = xi[order], yi[order]
        if xi[0] > x[0] + 1e-9 or xi[-1] < x[-1] - 1e-9:
            raise InputError(
                f"{str(f)!r} covers {dim} = {xi[0]:g}..{xi[-1]:g}: expected at least the first "
                f"file's range {x[0]:g}..{x[-1]:g} (patterns are interpolated onto its grid)"
            )
        rows.append(np.interp(x, xi, yi))
    names = np.array([f.stem for f in files])
    return xr.DataArray(
        np.array(rows), dims=("point", dim),
        coords={"point": np.arange(len(files)), dim: x, "file": ("point", names)},
        name="gr" if dim == "r" else "iq",
    ), dim


def _write_weights(ds, dim: str, out: Path) -> list[Path]:
    import numpy as np

    from xrdmap.results import atomic_output

    w = ds[f"nmf_{dim}_weights"]
    labels = ds["file"].values if "file" in ds.coords else ds["point"].values
    comps = [int(c) for c in w["component"].values]
    csv_path = out.with_name(f"{out.stem}_{dim}_weights.csv")
    json_path = out.with_name(f"{out.stem}_{dim}_weights.json")
    with atomic_output(csv_path) as tmp:
        lines = ["point," + ",".join(f"component_{c}" for c in comps)]
        for label, row in zip(labels, np.asarray(w.values), strict=True):
            lines.append(f"{label}," + ",".join(f"{v:.8g}" for v in row))
        tmp.write_text("\n".join(lines) + "\n")
    payload = {
        "dim": dim,
        "n_components": int(ds.attrs[f"nmf_{dim}_n_components"]),
        # NMF errors of the counts that were factorised (all with criterion "nmf", the
        # chosen one with "svd"), and the best rank-k (SVD) error of every count tried
        "reconstruction_error": {
            str(int(k)): float(e)
            for k, e in zip(ds[f"nmf_{dim}_k"].values, ds[f"nmf_{dim}_reconstruction_error"].values, strict=True)
            if np.isfinite(e)
        },
        "svd_error": {
            str(int(k)): float(e) for k, e in zip(ds[f"nmf_{dim}_k"].values, ds[f"nmf_{dim}_svd_error"].values, strict=True)
        },
        "points": [str(v) for v in labels],
        "weights": {f"component_{c}": [float(v) for v in w.sel(component=c).values] for c in comps},
    }
    if f"{dim}_component_phase" in ds:
        payload["component_phase"] = [str(v) for v in ds[f"{dim}_component_phase"].values]
    with atomic_output(json_path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
    return [csv_path, json_path]


@app.command("decompose")
def decompose_command(
    inputs: list[Path] = typer.Argument(
        ..., help="Pattern files (.gr, .xy, .xye, .chi, .iq, .dat), folders of them, or one result .h5."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Result file to write (.h5)."),
    x_range: list[str] = typer.Option(
        None, "--x-range", "-x",
        help="Active x range 'lo,hi' (A^-1 for Q, A for r); repeat for several. "
        "Default 1,15 in Q and 1,20 in r.",
    ),
    components: str = typer.Option("auto", "--components", "-k", help="Number of components, or 'auto'."),
    min_components: int = typer.Option(2, "--min-components", help="Smallest count tried with 'auto'."),
    max_components: int = typer.Option(5, "--max-components", help="Largest count tried with 'auto'."),
    dim: str = typer.Option(
        None, "--dim", help="x dimension: 'q' or 'r'. Default: from the file suffix (.gr -> r), "
        "or every one of iq/gr found in a result file.",
    ),
    smoothness: float = typer.Option(0.0, "--smoothness", help="Gaussian smoothing of the weights (scan points)."),
    random_state: int = typer.Option(0, "--seed", help="Seed of the random restarts."),
    init: str = typer.Option(
        "auto", "--init", help="NMF start: 'spa' (the most distinct patterns: end-member components), "
        "'nndsvd' (the NMF-mapping app's), 'nndsvda' or 'random'. 'auto': spa in Q, nndsvd in r, as `xrdmap run`.",
    ),
    solver: str = typer.Option(
        "anls", "--solver", help="NMF solver: 'anls' (alternating exact non-negative least squares with "
        "extrapolation: converges in tens of rounds; as `xrdmap run`) or 'cd' (coordinate descent stopped after "
        "1000 iterations: the NMF-mapping app's, for its weights).",
    ),
    q_diffuse: str = typer.Option(
        "subtract", "--q-diffuse", help="In Q: 'subtract' the smooth diffuse scattering first (NMF of the "
        "Bragg part, as `xrdmap run`) or 'keep' it.",
    ),
    q_diffuse_window: float = typer.Option(
        1.0, "--q-diffuse-window", help="Width (A^-1) of that diffuse baseline: wider than the Bragg peaks.",
    ),
    assign: bool = typer.Option(
        False, "--assign", help="Name the components after reference phases. In Q, as `xrdmap run`: "
        "the phases come from a joint fit of every pattern, whose per-point phase fractions are saved too.",
    ),
    phase: list[str] = typer.Option(
        None, "--phase", "-p", help="Reference phase for --assign (library name or NAME=file.cif); "
        "repeat. Default: the whole library.",
    ),
) -> None:
    """Non-negative matrix factorisation of a scan; number of components chosen from the data.

    Writes OUTPUT (.h5 result) plus OUTPUT_STEM_{q,r}_weights.csv and .json.
    """
    import xarray as xr

    from xrdmap.decompose import decompose
    from xrdmap.results import open_result, save_result

    if dim not in (None, "q", "r"):
        raise ConfigError(f"--dim {dim!r}: expected 'q' or 'r'")
    if init not in ("auto", "spa", "nndsvd", "nndsvda", "random"):
        raise ConfigError(f"--init {init!r}: expected auto, spa, nndsvd, nndsvda or random")
    if solver not in ("anls", "cd"):
        raise ConfigError(f"--solver {solver!r}: expected anls or cd")
    if q_diffuse not in ("subtract", "keep"):
        raise ConfigError(f"--q-diffuse {q_diffuse!r}: expected 'subtract' or 'keep'")
    if not q_diffuse_window > 0:
        raise ConfigError(f"--q-diffuse-window {q_diffuse_window!r}: expected a width > 0 (A^-1)")
    if components != "auto":
        try:
            n_comp: int | str = int(components)
        except ValueError:
            raise ConfigError(f"--components {components!r}: expected an integer or 'auto'") from None
        if n_comp < 1:
            raise ConfigError(f"--components {components!r}: expected an integer >= 1 or 'auto'")
    else:
        n_comp = "auto"
    ranges = [parse_range(r, "--x-range") for r in (x_range or [])] or None

    if len(inputs) == 1 and inputs[0].suffix.lower() in (".h5", ".hdf5", ".nxs"):
        source = open_result(inputs[0])
        wanted = [dim] if dim else [d for d, v in (("q", "iq"), ("r", "gr")) if v in source]
        data = {}
        for d in wanted:
            name = "iq" if d == "q" else "gr"
            if name not in source:
                raise InputError(f"result {str(inputs[0])!r} has no {name!r}: expected (point, {d}) data")
            data[d] = source[name]
        if not data:
            raise InputError(f"result {str(inputs[0])!r} has neither 'iq' nor 'gr': nothing to decompose")
    else:
        da, d = _read_patterns(_pattern_files(list(inputs)), dim)
        data = {d: da}

    phases = None
    if assign:
        from xrdmap.phases import load_library, resolve_phases

        phases = resolve_phases(phase) if phase else load_library()

    results = []
    for d, da in data.items():
        res = decompose(
            da, d, bragg_window_A=q_diffuse_window if q_diffuse == "subtract" and d == "q" else None,
            n_components=n_comp,
            min_components=min_components, max_components=max_components, x_ranges=ranges,
            smoothness=smoothness, random_state=random_state,
            init=init if init != "auto" else ("spa" if d == "q" else "nndsvd"),
            solver=solver,
        )
        if "file" in da.coords:
            res = res.assign_coords(file=("point", da["file"].values))
        if phases is not None:
            from xrdmap.assign import assign_components, scan_phase_fractions
            from xrdmap.pipeline import MAX_PHASES_PER_COMPONENT

            scan_fit = None
            if d == "q":
                scan_fit = scan_phase_fractions(da, phases, select=not phase)
                res = res.merge(scan_fit, compat="override", combine_attrs="override")
            assigned = assign_components(
                res[f"nmf_{d}_components"], phases, dim=d, scan_fit=scan_fit,
                diffuse_window_A=res.attrs.get("nmf_q_diffuse_window_A"),
                max_phases_per_component=MAX_PHASES_PER_COMPONENT,
            )
            res = res.merge(assigned.rename({v: f"{d}_{v}" for v in assigned.data_vars}))
        results.append((d, res))

    if len(results) == 1:
        ds = results[0][1]
    else:
        # Q and r may have different numbers of components: pad to one component axis
        # (NaN / ""); the attrs nmf_{q,r}_n_components say how many are real.
        k = max(r.sizes["component"] for _, r in results)
        padded = [
            r.reindex(component=range(k), fill_value={
                v: ("" if r[v].dtype.kind in "OUS" else float("nan")) for v in r.data_vars if "component" in r[v].dims
            })
            for _, r in results
        ]
        ds = xr.merge(padded, compat="override", combine_attrs="no_conflicts")
    save_result(ds, output)
    written = [output]
    for d, res in results:
        written += _write_weights(res, d, output)
        typer.echo(
            f"NMF in {d}: {res.attrs[f'nmf_{d}_n_components']} components "
            f"({res.sizes['point']} patterns)"
            + (": " + ", ".join(str(p) for p in res[f"{d}_component_phase"].values)
               if f"{d}_component_phase" in res else "")
        )
    for p in written:
        typer.echo(str(p))
