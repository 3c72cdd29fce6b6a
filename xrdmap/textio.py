"""Column text files: ``.chi``/``.xy`` (I(Q) or I(2theta)), ``.iq``, ``.sq``, ``.fq``, ``.gr``.

Reading skips any header: PDFgetX3's ``[DEFAULT]`` configuration block and ``#`` comments,
``#### start data`` markers, FIT2D ``.chi`` headers (title, axis names and a point-count
line) and free text. Data are the rows of two or more numbers; when a ``start data``
marker is present only rows after it count.

Writing produces PDFgetX3's layout, which PDFgui and PDFgetX3 read back: an INI-style
``[DEFAULT]`` block recording every parameter, ``# End of config``, ``#### start data``,
``#S 1``, a ``#L`` line naming the columns, then the columns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from xrdmap.errors import InputError, OutputError
from xrdmap.results import atomic_output

__all__ = ["read_columns", "read_pattern", "write_columns", "COLUMN_LABELS"]

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(nan|inf)$", re.IGNORECASE)

#: ``#L`` labels PDFgetX3 writes for each output kind (x, y[, dy]).
COLUMN_LABELS = {
    "iq": ("Q(Å$^{-1}$)", "I(a.u.)", "dI(a.u.)"),
    "sq": ("Q(Å$^{-1}$)", "S", "dS"),
    "fq": ("Q(Å$^{-1}$)", "F(Å$^{-1}$)", "dF(Å$^{-1}$)"),
    "gr": ("r(Å)", "G(Å$^{-2}$)", "dG(Å$^{-2}$)"),
    "chi": ("2θ(deg)", "I(a.u.)", "dI(a.u.)"),
    "xy": ("Q(Å$^{-1}$)", "I(a.u.)", "dI(a.u.)"),
}


def _numeric_row(line: str) -> list[float] | None:
    parts = line.replace(",", " ").split()
    if len(parts) < 2 or not all(_NUMBER.match(p) for p in parts):
        return None
    return [float(p) for p in parts]


def read_columns(path: str | Path) -> np.ndarray:
    """All data rows of a column text file as an ``(n, ncol)`` float array (``ncol >= 2``).

    Rows with a different number of columns than the majority are treated as header.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {str(p)!r} does not exist")
    try:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise InputError(f"data file {str(p)!r} cannot be read: {exc.strerror}") from None
    start = 0
    for i, line in enumerate(lines):
        if "start data" in line.lower():
            start = i + 1
    rows = [
        row
        for line in lines[start:]
        if not line.lstrip().startswith("#") and (row := _numeric_row(line))
    ]
    if not rows:
        raise InputError(
            f"data file {str(p)!r} has no rows of numbers; expected two or more columns (x, y[, dy])"
        )
    widths = np.bincount([len(r) for r in rows])
    ncol = int(np.argmax(widths))
    data = np.array([r for r in rows if len(r) == ncol], dtype=float)
    if data.shape[0] < 2:
        raise InputError(f"data file {str(p)!r} has {data.shape[0]} data row; expected a pattern")
    return data


def read_pattern(
    path: str | Path,
    *,
    dataformat: str = "QA",
    wavelength_A: float | None = None,
    twothetazero_deg: float = 0.0,
    name: str = "iq",
) -> xr.DataArray:
    """A 1-D pattern ``iq`` on Q (A^-1), sorted by Q.

    ``dataformat`` says what the first column is: ``"QA"`` (Q in A^-1), ``"Qnm"`` (Q in
    nm^-1) or ``"twotheta"`` (degrees; needs ``wavelength_A``, with the zero offset
    ``twothetazero_deg`` subtracted). A third column, if any, becomes the coordinate
    ``sigma`` (standard deviations) along ``q``.
    """
    from xrdmap.geometry import q_from_twotheta

    data = read_columns(path)
    x, y = data[:, 0], data[:, 1]
    if dataformat == "QA":
        q = x
    elif dataformat == "Qnm":
        q = x / 10.0
    elif dataformat == "twotheta":
        if wavelength_A is None:
            raise InputError(f"{Path(path).name}: dataformat 'twotheta' needs a wavelength (A)")
        q = q_from_twotheta(x - twothetazero_deg, wavelength_A)
    else:
        raise InputError(f"dataformat {dataformat!r}: expected 'QA', 'Qnm' or 'twotheta'")
    order = np.argsort(q, kind="stable")
    da = xr.DataArray(y[order], dims="q", coords={"q": q[order]}, name=name)
    da["q"].attrs.update(units="1/angstrom", long_name="Q")
    da.attrs["source"] = str(path)
    if data.shape[1] >= 3:
        da = da.assign_coords(sigma=("q", data[order, 2]))
    return da


def _format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.12g}"
    return str(value)


def write_columns(
    path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    *,
    kind: str,
    params: Mapping[str, Any] | None = None,
    dy: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write ``x, y[, dy]`` columns with a PDFgetX3-style header, atomically.

    Parameters
    ----------
    kind
        ``"iq"``, ``"sq"``, ``"fq"``, ``"gr"``, ``"chi"`` or ``"xy"``: selects the column
        labels and is recorded as ``outputtype``.
    params
        Every processing parameter (``composition``, ``qmin``, ``qmax``, ...); written as
        ``key = value`` lines of the ``[DEFAULT]`` block, the form PDFgetX3 and PDFgui parse.
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape or (dy is not None and np.shape(dy) != x.shape):
        raise OutputError(
            f"output {str(path)!r}: columns of different lengths {x.shape}, {y.shape}"
        )
    if kind not in COLUMN_LABELS:
        raise OutputError(
            f"output {str(path)!r}: kind {kind!r}; expected one of {', '.join(COLUMN_LABELS)}"
        )
    from xrdmap import __version__

    params = dict(params or {})
    head = ["[DEFAULT]", "", f"version = xrdmap-{__version__}", ""]
    io_keys = ("dataformat", "inputfile", "backgroundfile")
    head.append("# input and output specifications")
    for key in io_keys:
        if key in params:
            head.append(f"{key} = {_format_value(params[key])}")
    head.append(f"outputtype = {kind}")
    head += ["", "# PDF calculation setup"]
    for key, value in params.items():
        if key not in io_keys and key not in ("outputtype", "version"):
            head.append(f"{key} = {_format_value(value)}")
    lab = (
        list(labels) if labels is not None else list(COLUMN_LABELS[kind][: 2 if dy is None else 3])
    )
    head += [
        "",
        "# End of config " + "-" * 62,
        "",
        "#### start data",
        "#S 1",
        "#L " + "  ".join(lab),
    ]
    cols = [x, y] if dy is None else [x, y, np.asarray(dy, dtype=float).ravel()]
    body = "\n".join(" ".join(f"{v:.9g}" for v in row) for row in zip(*cols))
    target = Path(path)
    with atomic_output(target) as tmp:
        tmp.write_text("\n".join(head) + "\n" + body + "\n", encoding="utf-8")
    return target
