"""``xrdmap series``: descriptors of a time series and its amorphous interval."""

from __future__ import annotations

from pathlib import Path

import typer

from xrdmap.cli._app import app, parse_range


@app.command("series")
def series(
    result: Path = typer.Argument(..., help="Result file with iq (point, q), e.g. from `xrdmap run`."),
    phase: str = typer.Option(None, "--phase", help="Refine the lattice scale of this phase per point, e.g. LATP."),
    peak: list[str] = typer.Option([], "--peak", help="Q window 'a,b' (A^-1) of a Bragg peak to follow; repeatable."),
    q_range: str = typer.Option("1,15", "--q-range", help="Q range 'a,b' (A^-1) of the crystallinity index."),
    lattice_q_range: str = typer.Option(None, "--lattice-q-range",
                                        help="Q range 'a,b' (A^-1) of the lattice fit (default: --q-range)."),
    output: Path = typer.Option(None, "--output", "-o", help="Figure of the descriptors against time (.png/.svg/.pdf)."),
    save: Path = typer.Option(None, "--save", help="Write the result with the descriptors added to this file."),
) -> None:
    """Crystallinity, coherence length, peaks and lattice scale per point; events printed."""
    import numpy as np

    from xrdmap.errors import InputError
    from xrdmap.results import atomic_output, open_result, save_result
    from xrdmap.series import describe_series

    ds = open_result(result)
    if "iq" not in ds:
        raise InputError(f"{result}: no 'iq' (point, q) variable; expected an integrated result")
    ph = None
    if phase:
        from xrdmap.phases import load_library

        lib = load_library()
        key = {k.lower(): k for k in lib}.get(phase.lower())
        if key is None:
            raise InputError(f"--phase {phase!r}: unknown phase; available: {', '.join(sorted(lib))}")
        ph = lib[key]
    peaks = [parse_range(p, "--peak") for p in peak]
    desc = describe_series(ds, phase=ph, peaks=peaks or None, q_range=parse_range(q_range, "--q-range"),
                           lattice_q_range=parse_range(lattice_q_range, "--lattice-q-range"))
    merged = ds.drop_vars([v for v in desc.data_vars if v in ds]).merge(desc, compat="override", combine_attrs="override")
    merged.attrs.update({k: v for k, v in ds.attrs.items() if not k.startswith("event_")})
    merged.attrs.update(desc.attrs)
    axis = "time" if "time" in ds.coords else None
    cols = [c for c in ("crystallinity", "coherence_length", "lattice_scale") if c in merged]
    typer.echo("\t".join(["point", *([axis] if axis else []), *cols]))
    for i in range(merged.sizes["point"]):
        row = [str(i)] + ([f"{float(merged[axis][i]):.6g}"] if axis else [])
        row += [f"{float(merged[c][i]):.6g}" if np.isfinite(merged[c][i]) else "nan" for c in cols]
        typer.echo("\t".join(row))
    for key in ("event_signal", "event_onset_point", "event_end_point", "event_onset_time", "event_end_time",
                "event_duration"):
        if key in merged.attrs:
            typer.echo(f"# {key}: {merged.attrs[key]}")
    if output is not None:
        from xrdmap.series_plots import plot_series

        fig = plot_series(merged, title=f"{result.name}: series descriptors")
        with atomic_output(output) as tmp:
            fig.savefig(tmp, dpi=120, format=output.suffix.lstrip(".") or "png")
        typer.echo(f"figure: {output}")
    if save is not None:
        save_result(merged, save)
        typer.echo(f"result: {save}")
