"""``xrdmap plot`` (figures of a result) and ``xrdmap report`` (one static HTML file)."""

from __future__ import annotations

from pathlib import Path

import typer

from xrdmap.cli._app import app
from xrdmap.errors import ConfigError

_WHAT = ("all", "iq", "gr", "weights", "components", "fractions", "quality")


@app.command("plot")
def plot(
    result: Path = typer.Argument(..., help="Result file written by `xrdmap run`/`decompose` (.h5)."),
    output: Path = typer.Option(Path("figures"), "--output", "-o", help="Directory for the figures."),
    formats: str = typer.Option("png,svg", "--format", "-f", help="Comma-separated: png, svg, pdf."),
    what: str = typer.Option(
        "all", "--what", "-w",
        help="Which figures, comma-separated: all, iq, gr, weights, components, fractions, quality.",
    ),
) -> None:
    """Write the figures of a result: I(Q)/G(r) maps, NMF weights and components, phase fractions."""
    from xrdmap.maps import save_figures
    from xrdmap.results import open_result

    selection = [w.strip() for w in what.split(",") if w.strip()]
    unknown = [w for w in selection if w not in _WHAT]
    if unknown or not selection:
        raise ConfigError(f"--what {what!r}: expected any of {', '.join(_WHAT)}")
    ds = open_result(result)
    written = save_figures(ds, output, formats=[f.strip() for f in formats.split(",") if f.strip()],
                           what="all" if "all" in selection else selection)
    if not written:
        typer.echo(f"{result}: no data for the selected figures ({what})", err=True)
    for path in written:
        typer.echo(str(path))


@app.command("report")
def report(
    result: Path = typer.Argument(..., help="Result file written by `xrdmap run`/`decompose` (.h5)."),
    output: Path = typer.Option(Path("report.html"), "--output", "-o", help="HTML file to write."),
    title: str = typer.Option(None, "--title", help="Report title (default: the result file name)."),
) -> None:
    """Write one self-contained HTML report (figures embedded; opens from disk)."""
    from xrdmap.report import write_report
    from xrdmap.results import open_result

    ds = open_result(result)
    ds.attrs.setdefault("result_file", str(result))
    path = write_report(ds, output, title=title or f"xrdmap report: {result.name}")
    typer.echo(str(path))
