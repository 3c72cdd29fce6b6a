"""``xrdmap phases``: list, show and search reference crystal structures."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from xrdmap.cli._app import app

phases_app = typer.Typer(
    help=(
        "Reference phases (CIF structures) used to name NMF components and to simulate scans. "
        "Add your own with --phase NAME=path.cif where a command takes phases."
    ),
    no_args_is_help=True,
)
app.add_typer(phases_app, name="phases")


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


@phases_app.command("list")
def list_phases(
    folder: Path | None = typer.Option(
        None, "--folder", help="Also list the *.cif files of this directory (user phases)."
    ),
) -> None:
    """Table of the library: name, formula, space group, kind of structure model."""
    from xrdmap.phases import UNAVAILABLE, load_library

    lib = load_library(folder=folder)
    table = Table(title="xrdmap reference phases")
    for col in ("name", "formula", "space group", "kind", "aliases"):
        table.add_column(col)
    for name, p in lib.items():
        table.add_row(name, p.formula, p.spacegroup, p.kind, ", ".join(p.aliases[:3]))
    for name in UNAVAILABLE:
        table.add_row(name, "-", "-", "no open structure", "")
    con = _console()
    con.print(table)
    for name, why in UNAVAILABLE.items():
        con.print(f"{name}: {why}; supply one as --phase {name}=path.cif")
    con.print("Details of one phase: xrdmap phases show NAME")


@phases_app.command("show")
def show_phase(
    name: str = typer.Argument(
        ..., help="Phase name or alias (case-insensitive), or NAME=path.cif."
    ),
    lines: int = typer.Option(12, "--lines", "-n", help="Number of strongest reflections to list."),
    q_max: float = typer.Option(
        12.0, "--qmax", help="Largest Q (A^-1) of the reflections considered."
    ),
    folder: Path | None = typer.Option(None, "--folder", help="Directory of extra *.cif phases."),
) -> None:
    """Cell, composition, Z, provenance and strongest reflections (d, Q) of one phase."""
    from xrdmap.phases import resolve_phases

    (phase,) = resolve_phases([name], folder=folder).values()
    con = _console()
    a, b, c, al, be, ga = phase.lattice_abc
    comp = " ".join(f"{el}{n:g}" for el, n in sorted(phase.composition.items()))
    con.print(f"[bold]{phase.name}[/]  {phase.formula}  ({phase.kind})")
    con.print(f"space group   {phase.spacegroup}")
    con.print(
        f"cell          a={a:.5f} b={b:.5f} c={c:.5f} A  alpha={al:.3f} beta={be:.3f} gamma={ga:.3f} deg"
    )
    con.print(
        f"volume        {phase.volume_A3:.3f} A^3   Z = {phase.z:g}   density {phase.density_g_cm3:.3f} g/cm^3"
    )
    con.print(
        f"composition   {comp} per formula unit ({phase.formula_mass:.2f} g/mol); {len(phase.structure)} atom sites in the cell"
    )
    if phase.aliases:
        con.print(f"aliases       {', '.join(phase.aliases)}")
    con.print(f"provenance    {phase.provenance}")
    con.print(f"file          {phase.path}")
    refl = phase.reflections(q_max).strongest(lines)
    power = refl.multiplicity * refl.f2 / refl.q_A**2
    table = Table(title=f"strongest reflections (Q <= {q_max:g} A^-1; I = m|F|^2/Q^2, % of max)")
    for col in ("hkl", "d (A)", "Q (A^-1)", "mult", "|F|^2", "I %"):
        table.add_column(col, justify="right")
    for i in range(len(refl)):
        hkl = " ".join(str(int(v)) for v in refl.hkl[i])
        table.add_row(
            hkl,
            f"{refl.d_A[i]:.4f}",
            f"{refl.q_A[i]:.4f}",
            str(int(refl.multiplicity[i])),
            f"{refl.f2[i]:.4g}",
            f"{100 * power[i] / power.max():.1f}",
        )
    con.print(table)


@phases_app.command("search")
def search_phases(
    formula: str = typer.Argument(
        ..., help="Formula whose elements the structure must have exactly, e.g. Li3PO4."
    ),
    amcsd_id: int | None = typer.Option(
        None, "--id", help="AMCSD id of the entry to write with --output."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write the chosen entry as a CIF file."
    ),
    limit: int = typer.Option(50, "--limit", help="Largest number of entries listed."),
) -> None:
    """Look up structures offline in the AMCSD copy shipped by the optional package larixite.

    Lists every entry made of exactly the elements of FORMULA (any stoichiometry); with
    --output writes one as a CIF (choose it with --id unless there is a single match), to
    be used as --phase NAME=FILE.cif.
    """
    from xrdmap.errors import InputError
    from xrdmap.phases import search_amcsd
    from xrdmap.results import atomic_output

    results = search_amcsd(formula, max_results=limit if output is None else 100_000)
    con = _console()
    if not results:
        con.print(f"no AMCSD entry made of exactly the elements of {formula}")
        return
    table = Table(title=f"AMCSD entries with the elements of {formula} (offline copy in larixite)")
    for col in (
        "id",
        "formula",
        "mineral",
        "space group",
        "a, b, c (A)",
        "alpha, beta, gamma",
        "reference",
    ):
        table.add_column(col)
    for res in results[:limit]:
        a, b, c, al, be, ga = res["cell"]
        table.add_row(
            str(res["amcsd_id"]),
            res["formula"],
            res["mineral"],
            res["spacegroup"],
            f"{a:.4f} {b:.4f} {c:.4f}",
            f"{al:.2f} {be:.2f} {ga:.2f}",
            res["reference"],
        )
    con.print(table)
    if output is None:
        return
    if amcsd_id is None:
        if len(results) != 1:
            raise InputError(
                f"--output {output}: {len(results)} entries match {formula}; choose one with --id"
            )
        chosen = results[0]
    else:
        found = [r for r in results if r["amcsd_id"] == amcsd_id]
        if not found:
            raise InputError(f"--id {amcsd_id}: not among the AMCSD entries of {formula}")
        chosen = found[0]
    header = (
        f"# AMCSD {chosen['amcsd_id']:07d}: {chosen['formula']} ({chosen['mineral']}), {chosen['reference']}\n"
        "# Written by `xrdmap phases search` from the offline AMCSD copy in the larixite package.\n"
    )
    with atomic_output(output) as tmp:
        tmp.write_text(header + chosen["cif"])
    con.print(f"wrote {output} (use it as --phase NAME={output})")
