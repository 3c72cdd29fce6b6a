"""`xrdmap run`, `xrdmap config` and `xrdmap demo`: the whole pipeline from one config."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from xrdmap.cli._app import app, raise_if_interrupted
from xrdmap.errors import OutputError

console = Console(stderr=True)
config_app = typer.Typer(help="Write or check a run configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _run_with_progress(cfg):
    from xrdmap.pipeline import run

    with Progress(
        TextColumn("[bold]integrating[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as bar:
        task = bar.add_task("chunks", total=None)

        def progress(done: int, total: int) -> None:
            raise_if_interrupted()
            bar.update(task, completed=done, total=total)

        def log(message: str) -> None:
            raise_if_interrupted()  # between stages: a Ctrl-C that Python swallowed stops here
            bar.console.print(message, highlight=False)

        return run(cfg, log=log, progress=progress)


@app.command("run")
def run_command(
    config: Path = typer.Argument(..., help="YAML configuration (see `xrdmap config init`)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a key: --set integration.npt=2000 (repeatable; value parsed as YAML)."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Result file (overrides output.path)."),
    workers: int | None = typer.Option(None, "--workers", help="Local dask worker processes; 0 = in-process."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Address of a running dask scheduler."),
) -> None:
    """Run the whole pipeline: frames -> I(Q) -> G(r) -> NMF -> phases -> maps and report.

    Finished integration chunks are checkpointed next to the output: after an
    interruption, run the same command again to resume.
    """
    from xrdmap.config import load_config

    overrides = list(set_)
    if output is not None:
        overrides.append(f"output.path={output.resolve()}")
    if workers is not None:
        overrides.append(f"compute.workers={workers}")
    if scheduler is not None:
        overrides.append(f"compute.scheduler={scheduler}")
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    outputs = _run_with_progress(cfg)
    console.print(f"[green]done[/] in {time.perf_counter() - t0:.1f} s: {outputs.result}")
    if outputs.report:
        console.print(f"open the report: {outputs.report}")


@config_app.command("init")
def config_init(
    path: Path = typer.Argument(Path("xrdmap.yaml"), help="Where to write the template."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented configuration template to edit."""
    from xrdmap.config import TEMPLATE
    from xrdmap.results import atomic_output

    if path.exists() and not force:
        raise OutputError(f"{str(path)!r} exists; use --force to overwrite it")
    with atomic_output(path) as tmp:
        tmp.write_text(TEMPLATE)
    console.print(f"wrote {path}: edit scan.source, geometry.poni and pdf.composition, then `xrdmap run {path}`")


@config_app.command("check")
def config_check(
    config: Path = typer.Argument(..., help="YAML configuration to validate."),
    set_: list[str] = typer.Option([], "--set", help="Overrides, as for `xrdmap run`."),
) -> None:
    """Validate a configuration and print it with every default filled in."""
    import yaml

    from xrdmap.config import load_config

    cfg = load_config(config, list(set_))
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command("demo")
def demo_command(
    output: Path = typer.Option(Path("demo-output"), "--output", "-o", help="Folder for the demo's files."),
    layout: str = typer.Option("multilayer", help="Simulated sample layout (see `xrdmap simulate --help`)."),
    points: int = typer.Option(40, help="Scan points."),
    size: int = typer.Option(384, help="Detector frame size in pixels."),
    workers: int = typer.Option(2, help="Local dask worker processes; 0 = in-process."),
    seed: int = typer.Option(0, help="Random seed of the simulation."),
) -> None:
    """Simulate a scan of a multilayer pellet and run the whole pipeline on it."""
    from xrdmap.pipeline import demo_config
    from xrdmap.simulate import simulate_scan

    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scan = output / f"{layout}_scan.h5"
    console.print(f"simulating a {layout} scan: {points} points, {size} x {size} px frames ...")
    simulate_scan(layout, scan, points=points, size=size, seed=seed)
    cfg = demo_config(scan, output, workers=workers)
    outputs = _run_with_progress(cfg)
    console.print(f"[green]demo finished[/] in {time.perf_counter() - t0:.0f} s")
    console.print(f"  result  : {outputs.result}")
    console.print(f"  figures : {outputs.figures[0].parent if outputs.figures else '-'}")
    console.print(f"  report  : {outputs.report}  (open it in a browser)")
