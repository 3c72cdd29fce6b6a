"""``xrdmap calibrate`` (geometry from a calibrant image) and ``xrdmap mask`` (static mask)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from xrdmap.cli._app import app
from xrdmap.errors import ConfigError, InputError

console = Console()


def _pair(text: str | None, name: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{name} {text!r}: expected two numbers 'x,y' (column, row in pixels)") from None
    return x, y


@app.command()
def calibrate(
    image: Path = typer.Argument(..., help="Calibrant image (EDF/TIFF/CBF/NPY/HDF5), as read from the file."),
    output: Path = typer.Option(..., "-o", "--output", help="PONI file to write."),
    calibrant: str = typer.Option("CeO2", help="pyFAI calibrant name (CeO2 = NIST SRM 674b)."),
    energy_kev: float | None = typer.Option(None, "--energy-keV", help="Photon energy (keV)."),
    wavelength_a: float | None = typer.Option(None, "--wavelength-A", help="Wavelength (A)."),
    detector: str = typer.Option("Pilatus1M", help="pyFAI detector name, e.g. Pilatus1M, perkinelmer_xrd4343ct."),
    guess_distance_mm: float | None = typer.Option(None, help="Sample-detector distance guess (mm)."),
    guess_center: str | None = typer.Option(None, help="Beam centre guess 'x,y' (column,row in pixels)."),
    fix: str | None = typer.Option(None, help="Parameters to keep fixed, e.g. 'rot3' or 'rot1,rot2,rot3'."),
    mask: Path | None = typer.Option(None, help="Mask file (nonzero = masked)."),
    orientation: str | None = typer.Option(
        None, help="pyFAI detector orientation 1-4 (2 for images calibrated in Dioptas; see calibration/README.md)."
    ),
    max_rings: int | None = typer.Option(None, help="Use at most this many rings."),
    report: Path | None = typer.Option(None, help="Report PNG (default: OUTPUT with .png)."),
) -> None:
    """Refine the detector geometry on a calibrant image and write a PONI file + report PNG."""
    from xrdmap.calibrate import calibrate as run_calibration
    from xrdmap.calibrate import plot_calibration
    from xrdmap.mask import _read_array

    if (energy_kev is None) == (wavelength_a is None):
        raise ConfigError("give exactly one of --energy-keV and --wavelength-A")
    if not output.parent.is_dir():
        raise InputError(f"output {str(output)!r}: directory {str(output.parent)!r} does not exist")
    center = _pair(guess_center, "--guess-center")
    fixed = tuple(f.strip() for f in fix.split(",") if f.strip()) if fix else ()
    img = _read_array(image, "calibrant image")
    mask_arr = _read_array(mask, "mask") if mask is not None else None
    result = run_calibration(
        img, calibrant=calibrant, wavelength_A=wavelength_a, energy_keV=energy_kev, detector=detector,
        guess_distance_mm=guess_distance_mm, guess_center_px=center, fix=fixed, mask=mask_arr,
        orientation=orientation, max_rings=max_rings,
    )
    result.save_poni(output)
    report_path = report or output.with_suffix(".png")
    plot_calibration(result, img, report_path)

    p, u = result.poni, result.uncertainties
    table = Table(title=f"{calibrant} calibration of {image.name}: {len(result.control_points)} points, "
                        f"RMS {result.rms_deg * 1e3:.2f} mdeg 2theta")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    table.add_column("± 1 sigma", justify="right")
    table.add_column("unit")
    for name in ("dist", "poni1", "poni2"):
        table.add_row(name, f"{p[name] * 1e3:.4f}", f"± {u[name] * 1e3:.4f}", "mm")
    for name in ("rot1", "rot2", "rot3"):
        note = " (fixed)" if name in result.fixed else ""
        table.add_row(name + note, f"{np.rad2deg(p[name]):.5f}", f"± {np.rad2deg(u[name]):.5f}", "deg")
    x, y = result.poni_px
    table.add_row("PONI x, y", f"{x:.2f}, {y:.2f}", "", "px (as read)")
    table.add_row("orientation", str(p.get("detector_config", {}).get("orientation", "")), "", "pyFAI")
    table.add_row("wavelength", f"{p['wavelength'] * 1e10:.6f}", "fixed", "A")
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"wrote {output} and {report_path}")


@app.command("mask")
def mask_cmd(
    output: Path = typer.Option(..., "-o", "--output", help="Mask file to write (.edf, .edf.gz or .npy; 1 = masked)."),
    detector: str = typer.Option(..., help="pyFAI detector name (its gaps are masked)."),
    image: Path | None = typer.Option(None, help="Image for the beamstop search (a calibrant or sample frame)."),
    dark: list[Path] | None = typer.Option(None, help="Dark frame(s) for hot pixels (repeat the option)."),
    flat: list[Path] | None = typer.Option(None, help="Flat-field frame(s) for dead/hot pixels (repeat)."),
    beamstop: str | None = typer.Option(None, help="'auto' (from --image) or polygon 'x1,y1,x2,y2,...' in pixels."),
    hot_sigma: float = typer.Option(6.0, help="Robust standard deviations for hot/dead pixels."),
) -> None:
    """Build a static mask: detector gaps, beamstop, hot/dead pixels; print counts per category."""
    from xrdmap.calibrate import make_detector
    from xrdmap.mask import (
        _read_array,
        beamstop_polygon,
        combine_masks,
        detector_gaps,
        find_beamstop,
        hot_dead_pixels,
        mask_format,
        save_mask,
    )

    mask_format(output)
    det = make_detector(detector)
    img = _read_array(image, "image") if image is not None else None
    shape = tuple(det.shape) if det.shape is not None else (img.shape if img is not None else None)
    if img is not None and shape != img.shape:
        raise InputError(f"image {str(image)!r} has shape {img.shape} but detector {detector!r} expects {shape}")
    if shape is None:
        raise InputError(f"detector {detector!r} has no fixed shape: give --image")
    parts: dict[str, np.ndarray] = {"detector gaps": detector_gaps(det, shape)}
    if beamstop:
        if beamstop.strip().lower() == "auto":
            if img is None:
                raise InputError("--beamstop auto needs --image to find the beamstop's shadow")
            parts["beamstop"] = find_beamstop(img, invalid=parts["detector gaps"])
        else:
            try:
                v = [float(t) for t in beamstop.split(",")]
            except ValueError:
                raise InputError(f"--beamstop {beamstop!r}: expected 'auto' or 'x1,y1,x2,y2,...'") from None
            if len(v) % 2 or len(v) < 6:
                raise InputError(f"--beamstop {beamstop!r}: expected at least 3 'x,y' vertex pairs")
            parts["beamstop"] = beamstop_polygon(shape, list(zip(v[::2], v[1::2], strict=True)))
    for what, files in (("hot pixels (darks)", dark), ("hot/dead pixels (flats)", flat)):
        if files:
            frames = [_read_array(f, what.split()[-1].strip("()")[:-1]) for f in files]
            for f, a in zip(files, frames, strict=True):
                if a.shape != shape:
                    raise InputError(f"{str(f)!r} has shape {a.shape} but detector {detector!r} expects {shape}")
            kw = {"darks": frames} if "darks" in what else {"flats": frames}
            parts[what] = hot_dead_pixels(**kw, n_sigma=hot_sigma)
    total = combine_masks(*parts.values())
    save_mask(total, output)
    table = Table(title=f"mask {output.name} ({shape[0]} x {shape[1]})")
    table.add_column("category")
    table.add_column("pixels", justify="right")
    for name, m in parts.items():
        table.add_row(name, f"{int(m.sum()):,}")
    table.add_row("total masked", f"{int(total.sum()):,} ({100 * total.mean():.2f} %)")
    console.print(table)
