"""``xrdmap simulate``: write a synthetic scan with ground truth."""

from __future__ import annotations

from pathlib import Path

import typer

from xrdmap.cli._app import app


@app.command()
def simulate(
    layout: str = typer.Argument(
        ..., help="Sample layout: hotspot, composite, multilayer, vitreous or flash."
    ),
    output: Path = typer.Option(
        Path("scan.h5"), "--output", "-o", help="NeXus/HDF5 scan file to write."
    ),
    points: int = typer.Option(40, "--points", help="Scan points (frames)."),
    size: int = typer.Option(
        256, "--size", help="Frame side in pixels (the panel is scaled to it)."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Random seed: the same seed gives identical frames."
    ),
    energy_kev: float = typer.Option(76.69, "--energy-keV", help="Photon energy in keV."),
    distance_mm: float = typer.Option(
        350.0, "--distance-mm", help="Sample-detector distance in mm."
    ),
    counts: float = typer.Option(2.0e4, "--counts", help="Mean sample counts per unmasked pixel."),
    kapton: bool = typer.Option(
        True, "--kapton/--no-kapton", help="Add Kapton tape + air background."
    ),
    noise: bool = typer.Option(True, "--noise/--no-noise", help="Poisson counting noise."),
) -> None:
    """Simulate a line scan (or a flash time series) of a sintered pellet with ground truth.

    Writes OUTPUT (frames, positions or times, monitor, Kapton background frame and the
    true phase fractions under /entry/truth), and beside it .poni (geometry), .mask.npy
    (gaps, beamstop, hot pixels) and .dark.npy (dark image).
    """
    from xrdmap.errors import ConfigError
    from xrdmap.simulate import LAYOUTS, simulate_scan

    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    path = simulate_scan(
        layout,
        output,
        points=points,
        size=size,
        seed=seed,
        energy_keV=energy_kev,
        distance_mm=distance_mm,
        counts=counts,
        kapton=kapton,
        noise=noise,
    )
    poni, mask, dark = (path.with_suffix(ext) for ext in (".poni", ".mask.npy", ".dark.npy"))
    typer.echo(
        f"wrote {path} ({points} frames of {size} x {size} px, layout {layout}, seed {seed})"
    )
    typer.echo(f"wrote {poni}, {mask} and {dark}; ground truth under /entry/truth of {path.name}")
    result = path.with_name(path.stem + "_iq.h5")
    typer.echo(
        f"next: xrdmap integrate {path} --poni {poni} --mask {mask} --dark {dark} -o {result}"
    )
