"""``xrdmap integrate``: detector frames of a scan -> I(Q), sigma(Q) per point (NeXus)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from xrdmap.cli._app import app, parse_range
from xrdmap.errors import ComputeError, InputError, OutputError

console = Console(stderr=True)


@app.command()
def integrate(
    scan: list[str] = typer.Argument(
        ..., help="Scan: an HDF5/NeXus file, a quoted glob of images ('scan/*.tif'), or image files."
    ),
    poni: Path = typer.Option(..., "--poni", help="pyFAI PONI geometry file."),
    mask: Path | None = typer.Option(None, "--mask", help="Mask image (non-zero = excluded pixel)."),
    dark: Path | None = typer.Option(None, "--dark", help="Dark image (counts), subtracted."),
    flat: Path | None = typer.Option(None, "--flat", help="Flat-field image (divides, pyFAI convention)."),
    npt: int = typer.Option(2000, "--npt", help="Number of Q bins."),
    q_range: str | None = typer.Option(None, "--q-range", help="Q range 'min,max' in 1/A (default: all)."),
    polarization: float = typer.Option(0.99, "--polarization", help="pyFAI polarization factor (-1..1)."),
    no_polarization: bool = typer.Option(False, "--no-polarization", help="No polarization correction."),
    frames_path: str | None = typer.Option(None, "--frames-path", help="HDF5 path of the frames."),
    positions: str | None = typer.Option(
        None, "--positions", help="Positions (mm): 'file.csv:column' or 'start,step'."
    ),
    monitor_path: str | None = typer.Option(
        None, "--monitor-path", help="Monitor counts: HDF5 path in the scan file or 'file.csv:column'."
    ),
    chunk_frames: int | None = typer.Option(None, "--chunk-frames", help="Frames per dask task."),
    output: Path = typer.Option(..., "--output", "-o", help="Result file (NeXus/HDF5) to write."),
    workers: int = typer.Option(0, "--workers", help="Local dask worker processes; 0 = in this process."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Address of a running dask scheduler."),
    sigma_clip: float | None = typer.Option(
        None, "--sigma-clip", help="Reject pixels beyond N sigma of their ring, frame by frame "
        "(spotty or textured frames; slower). The rejected share is stored per point."
    ),
    saturation: str = typer.Option(
        "auto", "--saturation", help="Counts at which pixels saturate (left out of their frame and "
        "counted); 'auto': the maximum of unsigned-integer frames (65535 for 16-bit); 'none': off."
    ),
    export_dir: Path | None = typer.Option(
        None, "--export-dir", help="Also write each point's I(Q) as a .xy text file into this folder."
    ),
) -> None:
    """Azimuthally integrate every frame of a scan into I(Q) and sigma(Q) (pyFAI bbox/CSR).

    I and sigma are corrected for solid angle, polarization and flat field, with the dark
    subtracted, and divided by the monitor of each point when the scan has one. Pixels
    that are NaN/inf in a frame are left out of that frame and counted in
    masked_pixels. The result file is written only once everything succeeded.
    """
    from xrdmap._checksums import InputChecksums
    from xrdmap.integrate import integrate_scan
    from xrdmap.io import open_scan
    from xrdmap.results import provenance, save_result

    out_dir = output.parent if str(output.parent) else Path(".")
    if not out_dir.is_dir():
        raise OutputError(f"output {str(output)!r}: directory {str(out_dir)!r} does not exist")
    if export_dir is not None and not export_dir.is_dir():
        raise OutputError(f"--export-dir {str(export_dir)!r} is not an existing directory")
    if workers < 0:
        raise InputError(f"--workers {workers}: expected 0 (in this process) or a positive number")
    q = parse_range(q_range, "--q-range")
    for name, path in (("--poni", poni), ("--mask", mask), ("--dark", dark), ("--flat", flat)):
        if path is not None and not path.is_file():
            raise InputError(f"{name} {str(path)!r} does not exist (expected an image or PONI file)")
    source = scan[0] if len(scan) == 1 else scan
    frames = open_scan(source, frames_path=frames_path, positions=positions,
                       monitor_path=monitor_path, chunk_frames=chunk_frames)
    pol = None if no_polarization else polarization
    lazy = integrate_scan(frames, poni, mask=mask, dark=dark, flat=flat, npt=npt, q_range=q,
                          polarization_factor=pol, outlier_sigma=sigma_clip,
                          saturation=None if saturation.lower() == "none" else saturation)
    t0 = time.perf_counter()
    inputs = [str(p) for p in (*scan, poni, mask, dark, flat) if p is not None and Path(p).is_file()]
    # the inputs are hashed by a low-priority child process while the frames are integrated
    with InputChecksums(list(dict.fromkeys(inputs))) as checksums:
        ds = _compute_with_progress(lazy, workers=workers, scheduler=scheduler,
                                    source=str(frames.attrs.get("source", source)))
        sums = checksums.result()
    config = {
        "command": "integrate", "scan": scan, "poni": str(poni), "mask": mask, "dark": dark,
        "flat": flat, "npt": npt, "q_range": list(q) if q else None, "polarization_factor": pol, "outlier_sigma": sigma_clip,
        "frames_path": frames_path, "positions": positions, "monitor_path": monitor_path,
    }
    ds.attrs.update(provenance({k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()},
                               checksums=sums))
    save_result(ds, output)
    if export_dir is not None:
        from xrdmap.results import export_columns

        files = export_columns(ds, export_dir, kind="xy")
        console.print(f"wrote {len(files)} .xy files to {export_dir}")
    n_bad = int(ds["masked_pixels"].sum())
    note = f"; {n_bad} NaN/inf pixels left out" if n_bad else ""
    console.print(f"[green]integrated[/] {ds.sizes['point']} frames x {ds.sizes['q']} Q bins in "
                  f"{time.perf_counter() - t0:.1f} s -> {output}{note}", highlight=False)


def _compute_with_progress(lazy, *, workers: int, scheduler: str | None, source: str = "the scan"):
    """Compute the lazy dataset in this process or on dask workers, with a progress bar."""
    columns = (TextColumn("[bold]integrating[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    n_tasks = len(lazy["iq"].data.chunks[0])
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("chunks", total=n_tasks)
        if workers == 0 and not scheduler:
            from dask.callbacks import Callback

            class _Tick(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):
                    name = key[0] if isinstance(key, tuple) else key
                    if str(name).startswith("integrate-"):
                        bar.advance(task)

            with _Tick():
                return lazy.compute(scheduler="threads")
        from distributed import KilledWorker, as_completed, futures_of

        from xrdmap.cluster import dask_client

        with dask_client(workers=max(workers, 1), scheduler=scheduler) as client:
            persisted = client.persist(lazy)
            try:
                # one future per chunk of frames: done when that chunk is integrated
                for fut in as_completed(futures_of(persisted["iq"])):
                    fut.result()
                    bar.advance(task)
                return persisted.compute()
            except KilledWorker as exc:
                raise ComputeError(
                    f"integration of {source} failed: the dask workers "
                    f"reading it died repeatedly ({exc}); expected readable frames (a worker crash "
                    "usually means corrupt compressed data)"
                ) from None
