"""``xrdmap pdf``: S(Q), F(Q), G(r) from column files or a result file, PDFgetX3-style."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from xrdmap.cli._app import app
from xrdmap.errors import ConfigError, InputError

_KINDS = ("iq", "sq", "fq", "gr")


def _output_types(text: str | None, cfg: dict[str, Any]) -> list[str]:
    if text is None:
        return list(cfg.get("outputtype") or ["gr"])
    kinds = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown or not kinds:
        raise ConfigError(
            f"--output-type {text!r}: expected a comma-separated subset of iq,sq,fq,gr"
        )
    return kinds


def _resolve(path: str | None, base: Path | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute() and base is not None and not p.exists():
        p = base / p
    return p


def _run_text(
    inputs: list[Path],
    params: dict[str, Any],
    background: Path | None,
    kinds: list[str],
    output: Path | None,
) -> list[Path]:
    from xrdmap.textio import read_pattern, write_columns

    fmt = dict(
        dataformat=params["dataformat"],
        wavelength_A=params["wavelength"],
        twothetazero_deg=params["twothetazero"] or 0.0,
    )
    bg = read_pattern(background, **fmt) if background is not None else None
    single_file = (
        output is not None and len(inputs) == 1 and len(kinds) == 1 and output.suffix != ""
    )
    out_dir = None if single_file else (output or Path("."))
    if out_dir is not None and not out_dir.is_dir():
        raise InputError(f"output directory {str(out_dir)!r} does not exist")
    written: list[Path] = []
    pending: list[tuple] = []
    for path in inputs:
        iq = read_pattern(path, **fmt)
        sigma = iq["sigma"].drop_vars("sigma") if "sigma" in iq.coords else None
        iq = iq.drop_vars("sigma", errors="ignore")
        if bg is not None and "sigma" in bg.coords:
            bg = bg.drop_vars("sigma")
        ds = _transform(iq, params, bg, sigma)
        header = {
            "dataformat": params["dataformat"],
            "inputfile": path.name,
            "backgroundfile": background.name if background is not None else None,
            "mode": "xray",
            "wavelength": params["wavelength"],
            "twothetazero": params["twothetazero"],
            "composition": params["composition"],
            "bgscale": params["bgscale"],
            "rpoly": params["rpoly"],
            "qmaxinst": ds.attrs["qmaxinst"],
            "qmin": params["qmin"],
            "qmax": ds.attrs["qmax"],
            "rmin": params["rmin"],
            "rmax": ds.attrs["rmax"],
            "rstep": params["rstep"],
            "lorch": bool(params["lorch"]),
            "pdf_scale": float(ds["pdf_scale"]),
        }
        columns = {
            "iq": (iq["q"].values, iq.values, None),
            "sq": (
                ds["q"].values,
                ds["sq"].values,
                ds["sq_sigma"].values if "sq_sigma" in ds else None,
            ),
            "fq": (
                ds["q"].values,
                ds["fq"].values,
                ds["fq_sigma"].values if "fq_sigma" in ds else None,
            ),
            "gr": (
                ds["r"].values,
                ds["gr"].values,
                ds["gr_sigma"].values if "gr_sigma" in ds else None,
            ),
        }
        if "iq" in kinds and bg is not None:
            from xrdmap.background import subtract_background

            sub = subtract_background(iq, bg, scale=params["bgscale"])
            columns["iq"] = (sub["q"].values, sub["iq"].values, None)
        for kind in kinds:
            target = output if single_file else out_dir / f"{path.stem}.{kind}"
            pending.append((target, kind, header, *columns[kind]))
    # everything is computed before anything is written: bad input leaves no output
    for target, kind, header, x, y, dy in pending:
        written.append(write_columns(target, x, y, kind=kind, params=header, dy=dy))
    return written


def _run_result(
    path: Path, params: dict[str, Any], background: Path | None, output: Path | None
) -> Path:
    from xrdmap import results
    from xrdmap.textio import read_pattern

    if not hasattr(results, "open_result"):
        raise InputError(
            "result files need xrdmap.results.open_result, which this installation lacks"
        )
    ds = results.open_result(path)
    if "iq" not in ds:
        raise InputError(
            f"result file {str(path)!r} has no 'iq' variable; run 'xrdmap integrate' first"
        )
    bg = None
    if background is not None:
        bg = read_pattern(
            background,
            dataformat=params["dataformat"],
            wavelength_A=params["wavelength"],
            twothetazero_deg=params["twothetazero"] or 0.0,
        ).drop_vars("sigma", errors="ignore")
    out = _transform(ds["iq"], params, bg, ds["iq_sigma"] if "iq_sigma" in ds else None)
    merged = ds.drop_vars([v for v in out.data_vars if v in ds.data_vars]).drop_dims(
        "r", errors="ignore"
    )
    merged = merged.merge(out, compat="override")
    merged.attrs.update({f"pdf_{k}": v for k, v in out.attrs.items()})
    target = output or path
    return results.save_result(merged, target)


@app.command()
def pdf(
    inputs: list[Path] = typer.Argument(
        ..., help="I(Q) or I(2theta) column files (.chi/.xy/.iq), or one result .h5."
    ),
    config: Path | None = typer.Option(
        None, "-c", "--config", help="PDFgetX3 configuration file (pdfgetx3.cfg)."
    ),
    background: Path | None = typer.Option(
        None, "-b", "--background", help="Background column file."
    ),
    composition: str | None = typer.Option(None, help="Sample composition, e.g. 'Li3V2(PO4)3'."),
    dataformat: str | None = typer.Option(
        None, help="First column: twotheta (deg), QA (A^-1) or Qnm (nm^-1)."
    ),
    wavelength: float | None = typer.Option(None, help="Wavelength (A), for dataformat twotheta."),
    bgscale: str | None = typer.Option(None, help="Background scale factor or 'auto'."),
    qmin: float | None = typer.Option(None, help="Lower Q of the Fourier transform (A^-1)."),
    qmax: float | None = typer.Option(None, help="Upper Q of the Fourier transform (A^-1)."),
    qmaxinst: float | None = typer.Option(
        None, help="Upper Q of the polynomial correction (A^-1)."
    ),
    rpoly: float | None = typer.Option(None, help="r limit of the correction polynomial (A)."),
    rmin: float | None = typer.Option(None, help="Smallest r (A)."),
    rmax: float | None = typer.Option(None, help="Largest r (A)."),
    rstep: float | None = typer.Option(None, help="r step (A)."),
    lorch: bool = typer.Option(False, "--lorch", help="Apply the Lorch modification function."),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Output directory (or file for one input and one type; .h5 for results).",
    ),
    output_type: str | None = typer.Option(
        None, "-t", "--output-type", help="Comma-separated: iq,sq,fq,gr."
    ),
) -> None:
    """Compute S(Q), F(Q) and G(r) by PDFgetX3's ad hoc method; options override the config."""
    from xrdmap.pdf import _CFG_DEFAULTS, read_pdfgetx3_cfg

    cfg = read_pdfgetx3_cfg(config) if config is not None else dict(_CFG_DEFAULTS)
    base = config.parent if config is not None else None
    overrides = {
        "composition": composition,
        "dataformat": dataformat,
        "wavelength": wavelength,
        "qmin": qmin,
        "qmax": qmax,
        "qmaxinst": qmaxinst,
        "rpoly": rpoly,
        "rmin": rmin,
        "rmax": rmax,
        "rstep": rstep,
    }
    params = {**cfg, **{k: v for k, v in overrides.items() if v is not None}}
    params["lorch"] = lorch or bool(cfg.get("lorch"))
    if bgscale is not None:
        if bgscale == "auto":
            params["bgscale"] = "auto"
        else:
            try:
                params["bgscale"] = float(bgscale)
            except ValueError:
                raise ConfigError(f"--bgscale {bgscale!r}: expected a number or 'auto'") from None
    if params.get("composition") is None:
        raise ConfigError("no composition: give --composition or set 'composition' in the config")
    if params["dataformat"] not in ("twotheta", "QA", "Qnm"):
        raise ConfigError(f"dataformat {params['dataformat']!r}: expected twotheta, QA or Qnm")
    if params["dataformat"] == "twotheta" and not (params.get("wavelength") or 0) > 0:
        raise ConfigError("dataformat twotheta needs a positive --wavelength (A)")
    bg_path = background if background is not None else _resolve(cfg.get("backgroundfile"), base)
    if bg_path is not None and not bg_path.is_file():
        raise InputError(f"background file {str(bg_path)!r} does not exist")
    for p in inputs:
        if not p.is_file():
            raise InputError(f"input file {str(p)!r} does not exist")
    if len(inputs) == 1 and inputs[0].suffix.lower() in (".h5", ".hdf5", ".nxs"):
        target = _run_result(inputs[0], params, bg_path, output)
        typer.echo(f"wrote {target}")
        return
    kinds = _output_types(output_type, cfg)
    for target in _run_text(inputs, params, bg_path, kinds, output):
        typer.echo(f"wrote {target}")


def _transform(iq, params: dict, background, sigma):
    """xrdmap.pdf.transform with the command's parameters (qmax defaults to the data's)."""
    from xrdmap.pdf import transform

    qmax = params["qmax"] if params["qmax"] is not None else float(iq["q"].max())
    return transform(
        iq, composition=params["composition"], qmin=params["qmin"], qmax=qmax,
        qmaxinst=params["qmaxinst"], rpoly=params["rpoly"], rmin=params["rmin"],
        rmax=params["rmax"], rstep=params["rstep"], lorch=params["lorch"],
        background=background, bgscale=params["bgscale"], iq_sigma=sigma,
    )
