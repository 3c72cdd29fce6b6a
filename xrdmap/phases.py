"""Reference phases: crystal structures from CIF and their simulated I(Q), F(Q) and G(r).

The library ships the structures of the phases met in flash-sintered Li3V2(PO4)3 / LATP
pellets (``xrdmap/data/cifs``, provenance in its README). Several are isostructural or
approximate models (no open refinement exists): their peak positions are right for the
cell, their intensities approximate. Each :class:`Phase` says so in ``kind`` and
``provenance``. Users add their own CIFs with ``load_library(extra={"NAME": "x.cif"})``.

Conventions (all lengths in A, Q in A^-1, intensities in electron units):

- ``simulate_iq`` is the powder-averaged Bragg cross-section per unit mass of phase,
  ``I(Q) = 2 pi^2 / (V M) * sum_hkl m |F_hkl(Q)|^2 P(Q - Q_hkl) / Q_hkl^2`` (e^2 sr^-1 amu^-1),
  with ``V`` the cell volume and ``M`` the cell mass (amu). The ``1/Q^2`` is the
  ring-spreading (powder Lorentz) factor in Q: a reflection's power is spread over a sphere
  of radius Q in reciprocal space, which is what an azimuthally integrated, solid-angle and
  polarization corrected 2-D detector measures. No polarization factor is included (the
  integration removes it). With these units a mixture of weight fractions ``w_i`` is
  ``sum_i w_i I_i`` and the Bragg part equals the crystalline part of the Debye sum used
  by :meth:`Phase.simulate_total_iq`.
- ``simulate_fq``/``simulate_gr`` use the X-ray pair weights ``Z_i Z_j / <Z>^2`` (form factors
  at Q = 0, as PDFgui does), ``G(r) = R(r)/r - 4 pi rho0 r`` with
  ``R(r) = 1/N sum_i sum_j w_ij T(r - r_ij)`` and ``F(Q) = Q [S(Q) - 1]``, its sine transform.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import periodictable
from diffpy.structure import Atom, Lattice, Structure

from xrdmap import _tablecache
from xrdmap.composition import form_factor, formula_mass, parse_composition
from xrdmap.errors import InputError

__all__ = [
    "CIF_DIR",
    "DEFAULT_FWHM_Q",
    "DEFAULT_UISO",
    "SCHERRER_K",
    "KINDS",
    "UNAVAILABLE",
    "Phase",
    "PhaseLibrary",
    "Reflections",
    "load_cif",
    "load_library",
    "get_phase",
    "resolve_phases",
    "search_amcsd",
]

#: Default instrumental FWHM in Q (A^-1) for the I15-1 set-up (76.69 keV, PerkinElmer
#: XRD 4343 CT at 350 mm): one 150 um pixel alone gives ~0.017 A^-1 at low angle; the
#: 700 um wide beam and the mm-thick pellet (parallax) widen measured CeO2 lines to
#: ~0.03 A^-1.
DEFAULT_FWHM_Q = 0.03
#: Isotropic displacement (A^2) used for atoms whose CIF gives none (B = 0.5 A^2).
DEFAULT_UISO = 0.5 / (8.0 * np.pi**2)
#: Scherrer constant: size broadening FWHM(Q) = 2 pi K / size_A.
SCHERRER_K = 0.9
#: Allowed values of :attr:`Phase.kind`.
KINDS = ("direct", "isostructural model", "approximate model", "user")
#: Phases seen in the study for which no open structure exists: name -> explanation.
UNAVAILABLE = {
    "alpha1-LiVOPO4": "alpha1-LiVOPO4 (.nH2O, a hydrated layered phase): no open structure found",
    "LiTiOPO4": "LiTiOPO4 (Pnma): no open structure found",
}
_UNAVAILABLE_ALIASES = {
    "alpha1-LiVOPO4": ("a1-LiVOPO4", "alpha1-LiVOPO4.nH2O", "alpha-LiVOPO4", "LiVOPO4.nH2O"),
    "LiTiOPO4": ("LTOP",),
}

#: Folder of the shipped CIFs (provenance table in its README.md).
CIF_DIR = Path(__file__).resolve().parent / "data" / "cifs"
_BULK_FQ_DIAMETER_A = 60.0  # coherent domain assumed by simulate_fq when size_A is None
_GR_MARGIN_A = 10.0  # pairs are summed this far beyond the last r requested
_PEAK_REACH_FWHM = 30.0  # simulate_iq sums reflections this many FWHM beyond the last Q
_GR_TAPER_A = 5.0  # width of the smooth cut at the end of the pair sum
_ELEMENT = re.compile(r"([A-Z][a-z]?)")


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    file: str
    formula: str
    kind: str
    provenance: str
    aliases: tuple[str, ...] = ()


_LIBRARY: tuple[_Entry, ...] = (
    _Entry(
        "LVP",
        "Li3V2PO43_LVP_P21n_template_OBELiX-lrh_DLS.cif",
        "Li3V2(PO4)3",
        "approximate model",
        "Li2.5V2(PO4)3 framework of Yin et al., Chem. Mater. 16 (2004) 1456 (via OBELiX, noise "
        "removed by distance least squares), Li fully occupied, cell of the seed study "
        "8.60/8.59/12.03 A, beta 90.6; atoms ~0.1-0.2 A off, intensities approximate",
        ("Li3V2(PO4)3", "Li3V2PO43", "LVP-P21n"),
    ),
    _Entry(
        "eps-LiVOPO4",
        "LiVOPO4_epsilon_P-1_template_from_LiVPO4F_tavorite.cif",
        "LiVOPO4",
        "isostructural model",
        "tavorite LiVPO4F (Solid State Ionics 2013, doi 10.1016/j.ssi.2013.04.002) with F -> O in "
        "the epsilon-LiVOPO4 cell; V not off-centred, so weak superstructure lines are missing",
        ("epsilon-LiVOPO4", "e-LiVOPO4", "LiVOPO4", "eps-LVOP"),
    ),
    _Entry(
        "Li3PO4-beta",
        "Li3PO4_beta_Pmn21_AMCSD0012673_Keffer1967.cif",
        "Li3PO4",
        "direct",
        "Keffer et al., Inorg. Chem. 6 (1967) 119; AMCSD 0012673",
        ("beta-Li3PO4", "b-Li3PO4"),
    ),
    _Entry(
        "Li3PO4-gamma",
        "Li3PO4_gamma_Pmnb_AMCSD0013843_Wang1995.cif",
        "Li3PO4",
        "direct",
        "Wang et al., J. Solid State Chem. 115 (1995) 313 (neutron powder); AMCSD 0013843. "
        "Chosen over Baur 1980 (AMCSD 0012724): neutrons locate Li and O precisely and every "
        "site has its own refined Uiso (Baur's two Li share one value)",
        ("gamma-Li3PO4", "g-Li3PO4", "Li3PO4"),
    ),
    _Entry(
        "LATP",
        "Li1.3Al0.3Ti1.7PO43_LATP_R-3c_template_COD1008366.cif",
        "Li1.3Al0.3Ti1.7(PO4)3",
        "isostructural model",
        "NASICON coordinates of Tran Qui et al., J. Solid State Chem. 72 (1988) 309 (COD 1008366), "
        "Ti 0.85/Al 0.15 on 12c, 0.1 Li on 18e; cell a = 8.5004, c = 20.8156 A (Aono et al. 1990)",
        ("Li1.3Al0.3Ti1.7(PO4)3", "LATP-R-3c"),
    ),
    _Entry(
        "LTP",
        "LiTi2PO43_LTP_R-3c_template_COD1008366_TranQui1988.cif",
        "LiTi2(PO4)3",
        "isostructural model",
        "near-direct: Tran Qui et al., J. Solid State Chem. 72 (1988) 309 (COD 1008366) with "
        "In -> Ti and minority Li removed; cell a = 8.512, c = 20.858 A (Aono et al. 1990)",
        ("LiTi2(PO4)3",),
    ),
    _Entry(
        "anti-NASICON",
        "Li2Al0.15V0.77Ti1.08PO43_antiNASICON_Pbna_model.cif",
        "Li2Al0.15V0.77Ti1.08(PO4)3",
        "approximate model",
        "orthorhombic anti-NASICON template (LVP framework symmetrised to Pbna in a = 8.60, "
        "b = 8.63, c = 12.15 A) with the M site Al 0.075 / V 0.385 / Ti 0.540, the refined "
        "Li2Al0.15V0.77Ti1.08(PO4)3 of the seed study; positions a guess",
        (
            "anti-NASICON-doped",
            "AlTi-LVP",
            "Al,Ti-LVP",
            "LAVTP",
            "Li2(Al,V,Ti)2(PO4)3",
            "Li2Al0.15V0.77Ti1.08(PO4)3",
            "antiNASICON",
        ),
    ),
    _Entry(
        "LVP-Pbcn",
        "Li2V2PO43_orthorhombic_antiNASICON_Pbna_template.cif",
        "Li2V2(PO4)3",
        "approximate model",
        "derived model: LVP framework symmetrised onto Pbna (= Pbcn) in a = 8.60, b = 8.63, "
        "c = 12.15 A, 8 Li per cell spread over 24 sites; positions a guess",
        ("LixV2(PO4)3-Pbcn", "LixV2(PO4)3", "Li2V2(PO4)3", "LixV2PO43-Pbcn", "LxVP-Pbcn"),
    ),
    _Entry(
        "AlPO4",
        "AlPO4_berlinite_P3121_AMCSD0004489_Onac2007.cif",
        "AlPO4",
        "direct",
        "berlinite, Onac & Effenberger, Am. Mineral. 92 (2007) 1998; AMCSD 0004489",
        ("berlinite",),
    ),
    _Entry(
        "Li4P2O7",
        "Li4P2O7_P-1_template_OBELiX-47i_DLS.cif",
        "Li4P2O7",
        "approximate model",
        "OBELiX entry 47i (ICSD 248414, J. Solid State Chem. 2013, doi 10.1016/j.jssc.2013.12.015) "
        "de-noised by distance least squares; atoms ~0.1-0.2 A off",
        (),
    ),
    _Entry(
        "CeO2",
        "CeO2_Fm-3m_NIST_SRM674b.cif",
        "CeO2",
        "direct",
        "fluorite, a = 5.411651 A (NIST SRM 674b certificate, as in pyFAI's CeO2 calibrant)",
        ("ceria", "SRM674b"),
    ),
    _Entry(
        "Ni",
        "Ni_Fm-3m_COD9008476.cif",
        "Ni",
        "direct",
        "fcc nickel, Wyckoff, Crystal Structures 1 (1963); COD 9008476",
        ("nickel",),
    ),
    _Entry(
        "LiFePO4",
        "LiFePO4_Pnma_Streltsov1993.cif",
        "LiFePO4",
        "direct",
        "triphylite, Streltsov et al., Acta Cryst. B49 (1993) 147 (single-crystal X-ray)",
        ("LFP", "triphylite"),
    ),
)


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "", str(name)).lower()


# ---------------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class Reflections:
    """Reflections of a phase, lines of equal d merged, sorted by decreasing d.

    Iterating yields ``(hkl, d_A, q_A, multiplicity, f2)`` tuples.

    Attributes
    ----------
    hkl : (n, 3) int array, one representative per d (the largest indices of the orbit).
    d_A : d-spacings (A), descending.
    q_A : ``2 pi / d`` (A^-1).
    multiplicity : number of hkl contributing (all orbits of equal d merged).
    f2 : mean ``|F|^2`` per contributing hkl (electrons^2), with Debye-Waller factors,
        so ``multiplicity * f2`` is the summed intensity of the line.
    """

    hkl: np.ndarray
    d_A: np.ndarray
    q_A: np.ndarray
    multiplicity: np.ndarray
    f2: np.ndarray

    def __len__(self) -> int:
        return len(self.d_A)

    def __iter__(self) -> Iterator[tuple[tuple[int, int, int], float, float, int, float]]:
        for i in range(len(self)):
            yield (
                tuple(int(v) for v in self.hkl[i]),
                float(self.d_A[i]),
                float(self.q_A[i]),
                int(self.multiplicity[i]),
                float(self.f2[i]),
            )

    def strongest(self, n: int = 10) -> Reflections:
        """The ``n`` lines of largest ``multiplicity * f2 / q^2`` (powder intensity), by d."""
        power = self.multiplicity * self.f2 / np.maximum(self.q_A, 1e-12) ** 2
        keep = np.sort(np.argsort(power)[::-1][:n])
        return Reflections(*(a[keep] for a in dataclasses.astuple(self)))


@dataclasses.dataclass
class _ReflectionTable:
    """Unique (Laue-orbit) reflections with geometric partial structure factors."""

    q_max: float
    hkl: np.ndarray  # (n, 3) orbit representatives
    q0: np.ndarray  # Q at stretch 1 (A^-1)
    mult: np.ndarray  # orbit size
    partial: np.ndarray  # (n, groups) complex: sum_j occ_j exp(2 pi i h.x_j) per atom group


@dataclasses.dataclass
class _PairTable:
    r_max: float
    d: np.ndarray  # pair distances at stretch 1 (A), ascending
    weight: np.ndarray  # w_ij / N per pair (includes site multiplicity)
    usum: np.ndarray  # U_i + U_j (A^2)
    width_class: np.ndarray  # index of each pair's usum in width_values
    width_values: np.ndarray  # the distinct usum (rounded to 1e-6 A^2)


#: Arrays of the tables as kept by :mod:`xrdmap._tablecache`: name -> (dtype kind, ndim).
_REFLECTION_FIELDS = {"hkl": ("i", 2), "q0": ("f", 1), "mult": ("i", 1), "partial": ("c", 2)}
_PAIR_FIELDS = {"d": ("f", 1), "weight": ("f", 1), "usum": ("f", 1), "width_class": ("i", 1),
                "width_values": ("f", 1)}


def _merged_pairs(r_max: float, d: np.ndarray, weight: np.ndarray, usum: np.ndarray) -> _PairTable:
    """Pair table sorted by distance, pairs of equal distance (to 1e-9 A) and equal
    ``U_i + U_j`` merged into one of summed weight: symmetry makes most pairs of a cell
    such duplicates (2-5x fewer pairs), and every G(r) sums the same Gaussians."""
    d_key = np.round(d, 9)
    order = np.lexsort((usum, d_key))
    d, weight, usum, d_key = d[order], weight[order], usum[order], d_key[order]
    new = np.ones(len(d), dtype=bool)
    new[1:] = (d_key[1:] != d_key[:-1]) | (usum[1:] != usum[:-1])
    group = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    d, usum = d[first], usum[first]
    weight = np.bincount(group, weights=weight)
    values, width_class = np.unique(np.round(usum, 6), return_inverse=True)
    return _PairTable(r_max, d, weight, usum, width_class.astype(np.intp), values)


# ---------------------------------------------------------------------------- Phase


@dataclasses.dataclass(eq=False, repr=False)
class Phase:
    """A crystalline reference phase and its simulated patterns.

    Attributes
    ----------
    name : library name (short, CLI friendly).
    formula : formula unit, e.g. ``"Li3V2(PO4)3"``.
    structure : diffpy ``Structure`` expanded to P1 (all atoms of the cell, with occupancies).
    spacegroup : Hermann-Mauguin symbol.
    kind : one of :data:`KINDS`.
    provenance : where the structure comes from and what was changed.
    path : CIF file, or None.
    formula_mass : mass of one formula unit (amu).
    z : formula units per cell.
    aliases : other names accepted by the library lookup.
    """

    name: str
    formula: str
    structure: Structure
    spacegroup: str
    kind: str
    provenance: str
    path: Path | None
    formula_mass: float
    z: float
    aliases: tuple[str, ...] = ()
    _site: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _laue: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_structure(
        cls,
        structure: Structure,
        name: str,
        *,
        formula: str | None = None,
        spacegroup: str = "P1",
        kind: str = "user",
        provenance: str = "",
        path: str | Path | None = None,
        aliases: Iterable[str] = (),
        rotations: np.ndarray | None = None,
    ) -> Phase:
        """Build a phase from a P1 diffpy ``Structure`` (all atoms of the cell).

        ``rotations`` (k, 3, 3) are the point-group rotations of the space group in fractional
        coordinates; they only speed up the reflection list (P-1 symmetry is assumed without).
        """
        if kind not in KINDS:
            raise InputError(f"phase {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if len(structure) == 0:
            raise InputError(f"phase {name!r}: the structure has no atoms")
        content = _cell_content(structure, name)
        if formula is None:
            formula, z = _reduce_formula(content)
        else:
            z = _formula_units(content, parse_composition(formula), name)
        eye = np.eye(3, dtype=int)
        rots = [eye] if rotations is None else [np.rint(r).astype(int) for r in rotations]
        laue = {tuple(r.ravel()) for r in rots} | {tuple((-r).ravel()) for r in rots}
        return cls(
            name=name,
            formula=formula,
            structure=structure,
            spacegroup=spacegroup,
            kind=kind,
            provenance=provenance,
            path=Path(path) if path is not None else None,
            formula_mass=formula_mass(formula),
            z=z,
            aliases=tuple(aliases),
            _laue=np.array(sorted(laue), dtype=int).reshape(-1, 3, 3),
        )

    def __repr__(self) -> str:
        return (
            f"Phase(name={self.name!r}, formula={self.formula!r}, spacegroup={self.spacegroup!r}, "
            f"kind={self.kind!r}, z={self.z:g})"
        )

    def __getstate__(self) -> dict:
        # caches (reflection and pair tables, MBs) are rebuilt where needed, not shipped
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    # ------------------------------------------------------------ basic properties
    @property
    def lattice_abc(self) -> tuple[float, float, float, float, float, float]:
        """Cell lengths (A) and angles (degrees)."""
        return tuple(float(v) for v in self.structure.lattice.abcABG())

    @property
    def volume_A3(self) -> float:
        """Cell volume (A^3)."""
        return float(self.structure.lattice.volume)

    @property
    def cell_mass(self) -> float:
        """Mass of the cell content (amu)."""
        return float(self._arrays()["mass"])

    @property
    def density_g_cm3(self) -> float:
        """Crystallographic density (g cm^-3)."""
        return self.cell_mass / self.volume_A3 * 1.66053906660

    @property
    def atoms_per_cell(self) -> float:
        """Atoms in the cell, counting partial occupancies."""
        return float(self._arrays()["occ"].sum())

    @property
    def atoms_per_mass(self) -> float:
        """Atoms per amu of phase (the ``N/M`` turning per-atom into per-mass intensity)."""
        return self.atoms_per_cell / self.cell_mass

    @property
    def composition(self) -> dict[str, float]:
        """Atoms per formula unit, from the cell content."""
        return {el: n / self.z for el, n in _cell_content(self.structure, self.name).items()}

    def _arrays(self) -> dict:
        """Per-atom arrays of the P1 cell: fractional xyz, element, occupancy, Uiso."""
        if "atoms" not in self._cache:
            s = self.structure
            xyz = np.array([a.xyz for a in s], dtype=float) % 1.0
            elements = [_element_symbol(a.element, self.name) for a in s]
            occ = np.array([a.occupancy for a in s], dtype=float)
            uiso = np.array([float(a.Uisoequiv) for a in s], dtype=float)
            uiso = np.where(uiso > 0, uiso, DEFAULT_UISO)
            site = self._site if self._site is not None else np.arange(len(s))
            z_num = np.array([periodictable.elements.symbol(e).number for e in elements], float)
            mass = sum(o * periodictable.elements.symbol(e).mass for o, e in zip(occ, elements))
            # atom groups with one form factor and one Debye-Waller factor each
            keys = list(zip(elements, np.round(uiso, 6)))
            uniq = sorted(set(keys))
            group = np.array([uniq.index(k) for k in keys])
            self._cache["atoms"] = {
                "xyz": xyz,
                "elements": elements,
                "occ": occ,
                "uiso": uiso,
                "site": np.asarray(site),
                "z": z_num,
                "mass": mass,
                "group": group,
                "group_element": [k[0] for k in uniq],
                "group_u": np.array([k[1] for k in uniq], dtype=float),
            }
        return self._cache["atoms"]

    def form_factor_moments(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(<f^2>, <f>^2)`` per atom of the cell content at Q (A^-1)."""
        return _moments(self.composition, np.asarray(q, dtype=float))

    # ------------------------------------------------------------ reflections
    def _table(self, q_max: float) -> _ReflectionTable:
        table = self._cache.get("reflections")
        if table is None or table.q_max < q_max:
            # headroom so that the stretches of a lattice search (a few %) reuse the table,
            # and geometric growth so that requests creeping upwards (grids of growing
            # Q max) rebuild it a few times, not once per request
            grown = 1.25 * table.q_max if table is not None else 0.0
            limit = float(np.ceil(max(q_max * 1.06, grown)))
            table = self._stored_or_computed("reflections", limit, _ReflectionTable, _REFLECTION_FIELDS,
                                             tuple(_REFLECTION_FIELDS), self._compute_table)
            self._cache["reflections"] = table
        return table

    def _stored_or_computed(self, kind: str, limit: float, table_type: type, fields: dict, rows: tuple,
                            compute: Callable[[float], Any]) -> Any:
        """The ``kind`` table to ``limit`` from the on-disk cache (:mod:`xrdmap._tablecache`),
        or computed and kept there; its key is a digest of everything it is computed from."""
        atoms = self._arrays()
        parts = {name: atoms[name] for name in ("xyz", "occ", "uiso", "z", "site", "group", "group_u")}
        parts["group_element"] = " ".join(atoms["group_element"])
        parts["lattice"] = np.asarray(self.structure.lattice.base, dtype=float)
        parts["laue"] = self._laue
        key = _tablecache.digest(kind, limit, parts)
        stored = _tablecache.load(key, fields, rows=rows)
        if stored is not None:
            return table_type(limit, **stored)
        table = compute(limit)
        _tablecache.store(key, {f: getattr(table, f) for f in fields})
        return table

    def _compute_table(self, q_max: float) -> _ReflectionTable:
        atoms = self._arrays()
        base = np.asarray(self.structure.lattice.base, dtype=float)  # rows a, b, c (A)
        recip = np.linalg.inv(base)  # columns a*, b*, c* (1/A): G = recip @ h
        inv_d_max = q_max / (2.0 * np.pi)
        lengths = np.linalg.norm(base, axis=1)
        hmax = np.floor(lengths * inv_d_max + 1e-9).astype(int)
        ranges = [np.arange(-m, m + 1) for m in hmax]
        hkl = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
        g2 = np.einsum("ij,ij->i", hkl @ recip.T, hkl @ recip.T)
        keep = (g2 > 0) & (g2 <= inv_d_max**2 * (1 + 1e-12))
        hkl = hkl[keep]
        # one representative per Laue orbit: |F| is the same on the whole orbit
        off = int(hmax.max())
        span = 2 * off + 1

        def encode(h):
            return ((h[..., 0] + off) * span + (h[..., 1] + off)) * span + (h[..., 2] + off)

        # canonical member: most non-negative indices first, then the largest h, k, l
        canon = np.full(len(hkl), -1, dtype=np.int64)
        for rot in self._laue:
            h = hkl @ rot
            np.maximum(canon, (h >= 0).sum(axis=1) * span**3 + encode(h), out=canon)
        keys, mult = np.unique(canon, return_counts=True)
        keys = keys % span**3
        rep = np.stack(
            [keys // span**2 - off, (keys // span) % span - off, keys % span - off], axis=1
        )
        g = rep @ recip.T
        q0 = 2.0 * np.pi * np.sqrt(np.einsum("ij,ij->i", g, g))
        n_groups = len(atoms["group_element"])
        onehot = np.zeros((len(atoms["occ"]), n_groups))
        onehot[np.arange(len(atoms["occ"])), atoms["group"]] = atoms["occ"]
        partial = np.empty((len(rep), n_groups), dtype=complex)
        step = max(1, 2_000_000 // max(1, len(atoms["occ"])))
        for start in range(0, len(rep), step):
            phase = 2.0 * np.pi * (rep[start : start + step] @ atoms["xyz"].T)
            partial[start : start + step] = np.cos(phase) @ onehot + 1j * (np.sin(phase) @ onehot)
        # systematic absences: every partial amplitude vanishes
        present = np.sum(np.abs(partial) ** 2, axis=1) > 1e-10 * max(1.0, atoms["occ"].sum()) ** 2
        order = np.argsort(q0[present], kind="stable")
        sel = np.flatnonzero(present)[order]
        return _ReflectionTable(q_max, rep[sel], q0[sel], mult[sel], partial[sel])

    def _f2(self, partial: np.ndarray, q: np.ndarray, u_iso: float | None) -> np.ndarray:
        """|F|^2 (electrons^2) at the (stretched) Q of each reflection."""
        atoms = self._arrays()
        amp = np.zeros(len(q), dtype=complex)
        form_factors = _FormFactors(q)
        common = np.exp(-0.5 * u_iso * q * q) if u_iso is not None else None
        for g, el in enumerate(atoms["group_element"]):
            debye_waller = common if common is not None else np.exp(-0.5 * atoms["group_u"][g] * q * q)
            amp += partial[:, g] * (form_factors(el) * debye_waller)
        return amp.real**2 + amp.imag**2

    def prepare(self, q_max: float | None = None, r_max: float | None = None, *,
                fwhm_q: float | None = None, stretch_range: float = 0.0) -> None:
        """Build now the reflection and pair lists that later simulations will need.

        Enough for :meth:`simulate_iq` on Q grids up to ``q_max`` (A^-1) with peaks up to
        ``fwhm_q`` wide (default :data:`DEFAULT_FWHM_Q`) and :meth:`simulate_gr` on r grids
        up to ``r_max`` (A), on lattices stretched within ``1 +- stretch_range``. For a
        pipeline that knows its grids before it needs the references (e.g. in a background
        thread while frames are integrated); the lists cost up to ~0.5 s per large cell
        at 24 A^-1.
        """
        if not 0.0 <= stretch_range < 1.0:
            raise InputError(f"stretch_range {stretch_range!r}: expected 0 <= stretch_range < 1")
        if q_max is not None:
            reach = _iq_reach(_positive(q_max, "q_max"), _fwhm(fwhm_q, None))
            self._table(reach * (1.0 + stretch_range))
        if r_max is not None:
            self._pairs(_pair_reach(_positive(r_max, "r_max") + _GR_MARGIN_A, 1.0 - stretch_range))

    def reflections(
        self, q_max: float, stretch: float = 1.0, *, u_iso: float | None = None
    ) -> Reflections:
        """All reflections with ``Q <= q_max`` (A^-1), lines of equal d merged.

        Parameters
        ----------
        q_max : largest Q (A^-1), i.e. ``d >= 2 pi / q_max``.
        stretch : factor on all cell lengths (peaks move to ``Q / stretch``).
        u_iso : isotropic displacement (A^2) for all atoms instead of the CIF values.

        Returns
        -------
        Reflections
            Sorted by decreasing d; systematic absences removed.
        """
        q_max = _positive(q_max, "q_max")
        stretch = _positive(stretch, "stretch")
        table = self._table(q_max * stretch)
        sel = table.q0 / stretch <= q_max * (1 + 1e-12)
        q = table.q0[sel] / stretch
        f2 = self._f2(table.partial[sel], q, u_iso)
        mult = table.mult[sel]
        hkl = table.hkl[sel]
        # merge lines of equal d (different orbits, e.g. cubic 333 and 511)
        new = np.concatenate(([True], np.diff(q) > 1e-7 * q[1:]))
        line = np.cumsum(new) - 1
        m_line = np.bincount(line, weights=mult)
        i_line = np.bincount(line, weights=mult * f2)
        first = np.flatnonzero(new)
        q_line = q[first]
        return Reflections(
            hkl=hkl[first],
            d_A=2.0 * np.pi / q_line,
            q_A=q_line,
            multiplicity=m_line.astype(int),
            f2=i_line / m_line,
        )

    # ------------------------------------------------------------ I(Q)
    def simulate_iq(
        self,
        q: np.ndarray,
        *,
        stretch: float = 1.0,
        fwhm_q: float | None = None,
        size_A: float | None = None,
        eta: float = 0.5,
        u_iso: float | None = None,
    ) -> np.ndarray:
        """Bragg intensity per unit mass of phase on any Q grid.

        ``I(Q) = 2 pi^2 / (V M) sum m |F|^2 pV(Q - Q_hkl) / Q_hkl^2`` in e^2 sr^-1 amu^-1
        (module docstring). Peaks are pseudo-Voigt ``eta L + (1 - eta) G`` of unit area with
        ``FWHM = sqrt(fwhm_q^2 + (2 pi K / size_A)^2)``, ``K`` = :data:`SCHERRER_K`.

        Parameters
        ----------
        q : Q values (A^-1), any order and spacing.
        stretch : factor on all cell lengths; peaks move to ``Q_hkl / stretch``. A 1-D
            array of stretches gives one pattern per stretch, shape ``(len(stretch), *q.shape)``
            (the reflection list is computed once; each pattern costs milliseconds).
        fwhm_q : instrumental FWHM (A^-1); default :data:`DEFAULT_FWHM_Q`.
        size_A : crystallite size (A) for Scherrer broadening; None for none.
        eta : Lorentzian fraction of the pseudo-Voigt, 0..1.
        u_iso : isotropic displacement (A^2) for all atoms instead of the CIF values.

        Returns
        -------
        numpy.ndarray
            Intensity at ``q``, same shape.
        """
        if np.ndim(stretch) == 1:
            return np.stack(
                [
                    self.simulate_iq(
                        q, stretch=s, fwhm_q=fwhm_q, size_A=size_A, eta=eta, u_iso=u_iso
                    )
                    for s in stretch
                ]
            )
        q = _q_grid(q, "q")
        stretch = _positive(stretch, "stretch")
        fwhm = _fwhm(fwhm_q, size_A)
        if not 0.0 <= eta <= 1.0:
            raise InputError(f"eta {eta!r}: expected a pseudo-Voigt Lorentzian fraction in [0, 1]")
        q_top = _iq_reach(float(q.max()), fwhm)
        q_hkl, area = self._peak_areas(stretch, u_iso, q_top)
        return _pseudo_voigt_sum(q, q_hkl, area, fwhm, eta, q_top)

    def _peak_areas(self, stretch: float, u_iso: float | None, q_top: float) -> tuple[np.ndarray, np.ndarray]:
        """Positions (A^-1) and integrated intensities of the reflections up to ``q_top``
        on the stretched lattice (:meth:`simulate_iq` without the peak shape).

        The last few (stretch, u_iso) are remembered: fits try many peak widths at one
        stretch, and the structure factors (most of the cost) do not depend on the width.
        """
        table = self._table(q_top * stretch)
        key = (float(stretch), u_iso)
        with _AREAS_LOCK:
            areas = self._cache.setdefault("areas", OrderedDict())
            hit = areas.get(key)
            if hit is not None and hit[3] is table and hit[0] >= q_top:
                areas.move_to_end(key)
                n = int(np.searchsorted(hit[1], q_top, side="right"))
                return hit[1][:n], hit[2][:n]
        sel = table.q0 / stretch <= q_top
        q_hkl = table.q0[sel] / stretch
        f2 = self._f2(table.partial[sel], q_hkl, u_iso)
        volume = self.volume_A3 * stretch**3
        area = 2.0 * np.pi**2 / (volume * self.cell_mass) * table.mult[sel] * f2 / q_hkl**2
        q_hkl.setflags(write=False)
        area.setflags(write=False)
        with _AREAS_LOCK:
            areas[key] = (q_top, q_hkl, area, table)
            while len(areas) > _AREAS_KEPT:
                areas.popitem(last=False)
        return q_hkl, area

    # ------------------------------------------------------------ pairs, G(r), F(Q)
    def _pairs(self, r_max: float) -> _PairTable:
        table = self._cache.get("pairs")
        if table is None or table.r_max < r_max:
            table = self._stored_or_computed("pairs", float(np.ceil(r_max + 1e-9)), _PairTable, _PAIR_FIELDS,
                                             ("d", "weight", "usum", "width_class"), self._compute_pairs)
            self._cache["pairs"] = table
        return table

    def _compute_pairs(self, r_max: float) -> _PairTable:
        from scipy.spatial import cKDTree

        atoms = self._arrays()
        base = np.asarray(self.structure.lattice.base, dtype=float)
        cart = atoms["xyz"] @ base
        # lattice translations reaching r_max: |n_i| <= r_max / d_(plane i) + 1
        plane = 1.0 / np.linalg.norm(np.linalg.inv(base), axis=0)
        nmax = np.ceil(r_max / plane).astype(int) + 1
        ranges = [np.arange(-m, m + 1) for m in nmax]
        trans = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3) @ base
        images = (cart[None, :, :] + trans[:, None, :]).reshape(-1, 3)
        n_atoms = len(cart)
        tree = cKDTree(images)
        # one atom per symmetry-equivalent site suffices: equivalent atoms see the same shell
        site = atoms["site"]
        _, first, counts = np.unique(site, return_index=True, return_counts=True)
        zbar = float(np.sum(atoms["occ"] * atoms["z"]) / atoms["occ"].sum())
        n_tot = float(atoms["occ"].sum())
        d_all, w_all, u_all = [], [], []
        for i, mult in zip(first, counts):
            idx = np.asarray(tree.query_ball_point(cart[i], r_max), dtype=int)
            j = idx % n_atoms
            d = np.linalg.norm(images[idx] - cart[i], axis=1)
            ok = d > 0.5  # self and sites shared by partially occupied atoms
            j, d = j[ok], d[ok]
            w = (
                (mult * atoms["occ"][i] * atoms["z"][i] / zbar**2 / n_tot)
                * atoms["occ"][j]
                * atoms["z"][j]
            )
            d_all.append(d)
            w_all.append(w)
            u_all.append(atoms["uiso"][i] + atoms["uiso"][j])
        return _merged_pairs(r_max, np.concatenate(d_all), np.concatenate(w_all), np.concatenate(u_all))

    def _g_fine(
        self,
        r_end: float,
        stretch: float,
        u_iso: float | None,
        size_A: float | None,
        qdamp: float,
        delta2: float,
        dr: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Untruncated G(r) on a fine grid 0..r_end (A), envelopes applied, smooth end."""
        pairs = self._pairs(_pair_reach(r_end, stretch))
        n_pairs = int(np.searchsorted(pairs.d, r_end / stretch, side="left"))  # sorted: d < r_end
        d, w = pairs.d[:n_pairs] * stretch, pairs.weight[:n_pairs]
        # width classes: Gaussian broadening is a product in Fourier space per class
        if delta2:
            s2 = np.full(d.shape, 2.0 * u_iso) if u_iso is not None else pairs.usum[:n_pairs]
            s2 = s2 * np.clip(1.0 - delta2 / d**2, 0.05, None)
            classes, cls = np.unique(np.round(s2, 6), return_inverse=True)
        elif u_iso is not None:  # one class
            classes, cls = np.round(np.array([2.0 * u_iso]), 6), np.zeros(d.shape, np.intp)
        else:  # the CIF's U_i + U_j: classes made once with the table
            s2 = pairs.usum[:n_pairs]
            used = pairs.width_class[:n_pairs]
            present = np.unique(used)
            classes, cls = pairs.width_values[present], np.searchsorted(present, used)
        if len(classes) > 64:  # r-dependent widths (delta2), many sites: bins of 1 % in sigma^2
            log_bin = np.round(np.log(s2) / 0.01)
            bins, cls = np.unique(log_bin, return_inverse=True)
            classes = np.exp(bins * 0.01)
        n = int(np.ceil(r_end / dr)) + 1
        pad = n + int(np.ceil(8.0 * np.sqrt(classes.max()) / dr)) + 8
        x = d / dr
        lo = np.floor(x).astype(int)
        frac = x - lo
        hist = np.bincount(cls * pad + lo, weights=w * (1 - frac), minlength=len(classes) * pad)
        hist += np.bincount(cls * pad + lo + 1, weights=w * frac, minlength=len(classes) * pad)
        hist = hist[: len(classes) * pad].reshape(len(classes), pad)
        nu = np.fft.rfftfreq(pad, d=dr)
        spec = np.fft.rfft(hist, axis=1) * np.exp(
            -2.0 * np.pi**2 * classes[:, None] * nu[None, :] ** 2
        )
        rr = np.fft.irfft(spec.sum(axis=0), n=pad)[:n] / dr  # R(r), atoms per A
        r = np.arange(n) * dr
        rho0 = self.atoms_per_cell / (self.volume_A3 * stretch**3)
        g = np.zeros(n)
        g[1:] = rr[1:] / r[1:] - 4.0 * np.pi * rho0 * r[1:]
        if size_A is not None:
            g *= _sphere_envelope(r, size_A)
        if qdamp:
            g *= np.exp(-0.5 * (qdamp * r) ** 2)
        taper_start = r_end - _GR_TAPER_A
        t = np.clip((r - taper_start) / _GR_TAPER_A, 0.0, 1.0)
        g *= np.cos(0.5 * np.pi * t) ** 2
        return r, g

    def simulate_gr(
        self,
        r: np.ndarray,
        *,
        stretch: float = 1.0,
        qmax: float = 24.0,
        qdamp: float = 0.03,
        u_iso: float | None = None,
        size_A: float | None = None,
        qmin: float = 0.0,
        lorch: bool = False,
        delta2: float = 0.0,
    ) -> np.ndarray:
        """G(r) (A^-2) of the phase from the pair sum, as a Fourier transform over Q < qmax sees it.

        Pairs are Gaussians of variance ``U_i + U_j`` (``2 u_iso`` if given), sharpened at
        low r by ``(1 - delta2 / r^2)`` (correlated motion, as PDFfit's delta2), summed to
        ``r.max() + 10 A``; ``G = R/r - 4 pi rho0 r`` is multiplied by the spherical
        shape function of diameter ``size_A`` and by ``exp(-(qdamp r)^2 / 2)``, then
        terminated: its sine transform F(Q) is cut to ``qmin <= Q <= qmax`` (optionally
        Lorch-modified) and transformed back.

        Parameters
        ----------
        r : r values (A), 0 <= r; any spacing.
        stretch : factor on all cell lengths (pair distances scale with it); a 1-D array
            gives one G(r) per stretch, shape ``(len(stretch), *r.shape)``.
        qmax : termination of the transform (A^-1).
        qdamp : Gaussian Q-resolution damping (A^-1); 0 for none.
        u_iso : isotropic displacement (A^2) for all atoms instead of the CIF values.
        size_A : diameter (A) of spherical crystallites; None for bulk.
        qmin : low-Q cut of the transform (A^-1).
        lorch : apply the Lorch modification ``sin(pi Q/qmax)/(pi Q/qmax)``.
        delta2 : correlated-motion sharpening (A^2).

        Returns
        -------
        numpy.ndarray
            G at ``r``.
        """
        if np.ndim(stretch) == 1:
            kw = dict(
                qmax=qmax,
                qdamp=qdamp,
                u_iso=u_iso,
                size_A=size_A,
                qmin=qmin,
                lorch=lorch,
                delta2=delta2,
            )
            return np.stack([self.simulate_gr(r, stretch=s, **kw) for s in stretch])
        r = _q_grid(r, "r")
        stretch = _positive(stretch, "stretch")
        qmax = _positive(qmax, "qmax")
        if size_A is not None:
            _positive(size_A, "size_A")
        r_end = float(r.max()) + _GR_MARGIN_A
        if size_A is not None:
            r_end = min(r_end, size_A + _GR_TAPER_A + 1.0)
            r_end = max(r_end, float(r.max()) + 1.0)
        dr = min(0.01, np.pi / qmax / 8.0)
        rf, g = self._g_fine(r_end, stretch, u_iso, size_A, qdamp, delta2, dr)
        n_out = min(len(g), int(np.ceil(float(r.max()) / dr)) + 2)
        gt = _terminate(g, dr, float(qmin), qmax, bool(lorch), n_out)
        return np.interp(r, np.arange(n_out) * dr, gt)

    def simulate_fq(
        self,
        q: np.ndarray,
        *,
        stretch: float = 1.0,
        size_A: float | None = None,
        u_iso: float | None = None,
        qdamp: float = 0.03,
        delta2: float = 0.0,
    ) -> np.ndarray:
        """Reduced structure function F(Q) = Q [S(Q) - 1] (A^-1) from the same pair sum.

        The exact sine transform ``F(Q) = int G(r) sin(Q r) dr`` of the untruncated G(r) of
        :meth:`simulate_gr` (same pairs, widths and envelopes). A finite sum needs a finite
        crystal: with ``size_A=None`` a spherical domain of 60 A diameter is used, which
        broadens Bragg-like features to ~0.1 A^-1; use :meth:`simulate_iq` for sharp Bragg
        peaks and this for short-range-ordered (glassy, nanocrystalline) material.

        Parameters
        ----------
        q : Q values (A^-1), any spacing.
        stretch, size_A, u_iso, qdamp, delta2 : as in :meth:`simulate_gr`.

        Returns
        -------
        numpy.ndarray
            F at ``q``.
        """
        q = _q_grid(q, "q")
        stretch = _positive(stretch, "stretch")
        size = _BULK_FQ_DIAMETER_A if size_A is None else _positive(size_A, "size_A")
        r_end = size + _GR_TAPER_A + 1.0
        dr = min(0.01, np.pi / max(float(q.max()), 1.0) / 8.0)
        _, g = self._g_fine(r_end, stretch, u_iso, size, qdamp, delta2, dr)
        # features are ~2 pi / size wide: sample them 30 times finer, then interpolate
        qk, fq = _sine_transform(g, dr, q_step=min(0.005, 2.0 * np.pi / size / 30.0))
        return np.interp(q, np.concatenate(([0.0], qk)), np.concatenate(([0.0], fq)))

    def simulate_total_iq(
        self,
        q: np.ndarray,
        *,
        stretch: float = 1.0,
        size_A: float | None = None,
        u_iso: float | None = None,
        qdamp: float = 0.03,
    ) -> np.ndarray:
        """Coherent intensity per unit mass from the pair sum (Debye route).

        ``(N/M) [<f^2> + <f>^2 F(Q)/Q]`` in the units of :meth:`simulate_iq`
        (e^2 sr^-1 amu^-1): Bragg plus diffuse for a crystallite of ``size_A``
        (self-scattering included, Compton not).
        """
        q = _q_grid(q, "q")
        fq = self.simulate_fq(q, stretch=stretch, size_A=size_A, u_iso=u_iso, qdamp=qdamp)
        f2, fbar2 = self.form_factor_moments(q)
        with np.errstate(divide="ignore", invalid="ignore"):
            sq_minus_1 = np.where(q > 0, fq / q, 0.0)
        return self.atoms_per_mass * (f2 + fbar2 * sq_minus_1)


# ---------------------------------------------------------------------------- helpers


def _iq_reach(q_max: float, fwhm: float) -> float:
    """Largest Q (A^-1) whose reflections count in :meth:`Phase.simulate_iq` up to ``q_max``."""
    return q_max + _PEAK_REACH_FWHM * fwhm


def _pair_reach(r_end: float, stretch: float) -> float:
    """Pair distance (A, unstretched) the pair list needs for a G(r) summed to ``r_end``."""
    return r_end / stretch + 1.0


def _positive(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} {value!r}: expected a positive number") from None
    if not np.isfinite(v) or v <= 0:
        raise InputError(f"{name} {value!r}: expected a positive number")
    return v


def _q_grid(values: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise InputError(f"{name} grid: expected a non-empty array of finite values >= 0")
    return a


def _fwhm(fwhm_q: float | None, size_A: float | None) -> float:
    inst = DEFAULT_FWHM_Q if fwhm_q is None else float(fwhm_q)
    if not np.isfinite(inst) or inst < 0:
        raise InputError(f"fwhm_q {fwhm_q!r}: expected a FWHM >= 0 in A^-1")
    size = 0.0 if size_A is None else 2.0 * np.pi * SCHERRER_K / _positive(size_A, "size_A")
    total = float(np.hypot(inst, size))
    if total <= 0:
        raise InputError("fwhm_q 0 with no size_A: peaks would have zero width")
    return total


def _pseudo_voigt_sum(
    q: np.ndarray, centres: np.ndarray, areas: np.ndarray, fwhm: float, eta: float, q_top: float
) -> np.ndarray:
    """Sum of unit-area pseudo-Voigt peaks by deposition on a fine grid and FFT convolution."""
    dq = fwhm / 16.0
    n_data = int(np.ceil(q_top / dq)) + 2
    n = 1 << int(np.ceil(np.log2(2 * n_data)))  # zero padding keeps Lorentzian tails from wrapping
    if n > 1 << 22:
        dq *= n / (1 << 22)
        n_data = int(np.ceil(q_top / dq)) + 2
        n = 1 << 22
    x = centres / dq
    lo = np.floor(x).astype(int)
    frac = x - lo
    hist = np.bincount(lo, weights=areas * (1 - frac), minlength=n)
    hist += np.bincount(lo + 1, weights=areas * frac, minlength=n)
    hist = hist[:n]
    # circular convolution: what leaks below Q = 0 wraps into the padding, not onto the data
    profile = np.fft.irfft(np.fft.rfft(hist) * _pseudo_voigt_kernel(n, dq, fwhm, eta), n=n) / dq
    grid = np.arange(n_data) * dq
    return np.maximum(np.interp(q, grid, profile[:n_data]), 0.0)


@functools.lru_cache(maxsize=64)
def _pseudo_voigt_kernel(n: int, dq: float, fwhm: float, eta: float) -> np.ndarray:
    """Fourier transform of a unit-area pseudo-Voigt on the ``rfft`` frequencies of ``n``
    samples ``dq`` apart (fits ask for the same peak width many times)."""
    nu = np.fft.rfftfreq(n, d=dq)
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    kernel = eta * np.exp(-np.pi * fwhm * nu) + (1 - eta) * np.exp(-2.0 * np.pi**2 * sigma**2 * nu**2)
    kernel.setflags(write=False)
    return kernel


def _sine_transform(g: np.ndarray, dr: float, q_step: float) -> tuple[np.ndarray, np.ndarray]:
    """``F(Q_k) = int G(r) sin(Q_k r) dr`` of G on ``r_n = n dr`` (G(0) = 0), by DST-I.

    The grid is zero-padded so that ``Q_k = pi k / (M dr)`` has spacing <= ``q_step``.
    """
    from scipy.fft import dst

    m = int(max(2 * len(g), np.ceil(np.pi / q_step / dr)))
    x = np.zeros(m - 1)
    x[: len(g) - 1] = g[1:]
    return np.pi * np.arange(1, m) / (m * dr), dst(x, type=1) * dr / 2.0


def _terminate(g: np.ndarray, dr: float, qmin: float, qmax: float, lorch: bool, n_out: int) -> np.ndarray:
    """G(r) as a Fourier transform over ``qmin <= Q <= qmax`` sees it, on ``r_n = n dr``, n < n_out.

    ``G_t(r) = 2/pi int_qmin^qmax W(Q) F(Q) sin(Qr) dQ`` with ``F(Q) = int G(r') sin(Qr') dr'``
    and ``W`` 1 or the Lorch function ``sin(pi Q/qmax) / (pi Q/qmax)``. Exchanging the
    integrals, ``G_t(r) = int G(r') [K(r - r') - K(r + r')] dr'`` with the exact kernel
    ``K(u) = 1/pi int_qmin^qmax W(Q) cos(Qu) dQ`` (closed forms in :func:`_termination_kernel`),
    summed over the samples of ``g`` (``g[0]`` at r = 0) as one FFT convolution. Unlike a
    discrete sine transform pair, the result has no Q sampling error.
    """
    from scipy.fft import irfft, rfft

    spectrum, size, centre = _termination_kernel_spectrum(dr, qmin, qmax, lorch, len(g), n_out)
    conv = irfft(rfft(g, size) * spectrum, size)
    n = np.arange(n_out)
    return dr * (conv[centre + n] - conv[centre - n])


@functools.lru_cache(maxsize=16)
def _termination_kernel_spectrum(dr: float, qmin: float, qmax: float, lorch: bool, n_in: int,
                                 n_out: int) -> tuple[np.ndarray, int, int]:
    """FFT of :func:`_termination_kernel` on ``u = j dr``, ``|j| <= n_in + n_out``, for
    :func:`_terminate` (the FFT size is long enough that the outputs needed do not wrap)."""
    from scipy.fft import next_fast_len, rfft

    centre = n_in + n_out
    size = next_fast_len(2 * (n_in + n_out) + 1, real=True)
    kernel = _termination_kernel((np.arange(2 * centre + 1) - centre) * dr, qmin, qmax, lorch)
    spectrum = rfft(kernel, size)
    spectrum.setflags(write=False)
    return spectrum, size, centre


def _termination_kernel(u: np.ndarray, qmin: float, qmax: float, lorch: bool) -> np.ndarray:
    """``K(u) = 1/pi int_qmin^qmax W(Q) cos(Qu) dQ`` (A^-1), W as in :func:`_terminate`.

    Step window: ``(sin(qmax u) - sin(qmin u)) / (pi u)``. Lorch, ``a = pi/qmax``:
    ``sin(aQ) cos(uQ) = [sin((a+u)Q) + sin((a-u)Q)] / 2``, so
    ``K = [Si((a+u)Q) + Si((a-u)Q)] / (2 pi a)`` between the limits (Si the sine integral).
    """
    u = np.asarray(u, dtype=float)
    if lorch:
        from scipy.special import sici

        a = np.pi / qmax

        def antiderivative(q: float) -> np.ndarray:
            return sici((a + u) * q)[0] + sici((a - u) * q)[0]

        return (antiderivative(qmax) - antiderivative(qmin)) / (2.0 * np.pi * a)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = (np.sin(qmax * u) - np.sin(qmin * u)) / (np.pi * u)
    return np.where(u == 0.0, (qmax - qmin) / np.pi, k)


def _sphere_envelope(r: np.ndarray, diameter: float) -> np.ndarray:
    x = np.asarray(r) / diameter
    return np.where(x < 1.0, 1.0 - 1.5 * x + 0.5 * x**3, 0.0)


_AREAS_LOCK = threading.Lock()
_AREAS_KEPT = 8  # (stretch, u_iso) remembered per phase by Phase._peak_areas: ~100 kB each

_FF_STEP = 0.002  # A^-1; f0 is smooth, linear interpolation error < 1e-5 electrons


@functools.cache
def _form_factor_table(element: str, q_end: float) -> np.ndarray:
    return form_factor(element, np.arange(0.0, q_end + 2 * _FF_STEP, _FF_STEP))


class _FormFactors:
    """Waasmaier-Kirfel f0 (xrdmap.composition.form_factor) of any element at the Q values
    ``q`` (A^-1, >= 0), linearly interpolated in a table made once per element (step
    :data:`_FF_STEP`); the interpolation weights, shared by all elements, are made once."""

    def __init__(self, q: np.ndarray) -> None:
        self._q_end = max(64.0, float(2 ** np.ceil(np.log2(max(float(np.max(q, initial=0.0)), 1.0)))))
        t = np.asarray(q, dtype=float) / _FF_STEP
        self._index = t.astype(np.intp)  # floor: q >= 0
        self._frac = t - self._index

    def __call__(self, element: str) -> np.ndarray:
        table = _form_factor_table(element, self._q_end)
        lo = table[self._index]
        return lo + self._frac * (table[self._index + 1] - lo)


def _moments(composition: Mapping[str, float], q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = sum(composition.values())
    f_mean = np.zeros_like(q)
    f2_mean = np.zeros_like(q)
    for el, n in composition.items():
        f = form_factor(el, q)
        f_mean += n / total * f
        f2_mean += n / total * f * f
    return f2_mean, f_mean**2


def _element_symbol(text: str, name: str) -> str:
    m = _ELEMENT.match(str(text).strip().capitalize() if str(text).islower() else str(text).strip())
    if m is None:
        raise InputError(f"phase {name!r}: atom type {text!r} is not a chemical element")
    symbol = m.group(1)
    try:
        periodictable.elements.symbol(symbol)
    except ValueError:
        raise InputError(f"phase {name!r}: atom type {text!r} is not a chemical element") from None
    return symbol


def _cell_content(structure: Structure, name: str) -> dict[str, float]:
    content: dict[str, float] = {}
    for atom in structure:
        el = _element_symbol(atom.element, name)
        content[el] = content.get(el, 0.0) + float(atom.occupancy)
    return {el: n for el, n in content.items() if n > 0}


def _formula_units(content: Mapping[str, float], formula: Mapping[str, float], name: str) -> float:
    if set(content) != set(formula):
        raise InputError(
            f"phase {name!r}: cell holds elements {sorted(content)} but the formula has {sorted(formula)}"
        )
    ratios = np.array([content[el] / formula[el] for el in formula])
    z = float(np.mean(ratios))
    if np.max(np.abs(ratios - z)) > 0.02 * z:
        raise InputError(
            f"phase {name!r}: cell content {content} is not a multiple of the formula {dict(formula)}"
        )
    return round(z, 3)


def _reduce_formula(content: Mapping[str, float]) -> tuple[str, float]:
    counts = np.array(list(content.values()))
    z = 1
    for cand in range(int(np.floor(counts.min() + 1e-6)), 0, -1):
        if np.allclose(counts / cand, np.round(counts / cand), atol=1e-3):
            z = cand
            break
    parts = []
    for el, n in content.items():
        v = n / z
        parts.append(el if abs(v - 1) < 1e-6 else f"{el}{v:g}")
    return "".join(parts), float(z)


# ---------------------------------------------------------------------------- CIF


def _cif_formula_sum(text: str) -> str | None:
    m = re.search(r"^\s*_chemical_formula_sum\s+(['\"]?)(.+?)\1\s*$", text, flags=re.M)
    return m.group(2).strip() if m else None


def _cif_spacegroup(text: str) -> str | None:
    m = re.search(r"^\s*_symmetry_space_group_name_H-M\s+(['\"]?)(.+?)\1\s*$", text, flags=re.M)
    if m is None:
        m = re.search(r"^\s*_space_group_name_H-M_alt\s+(['\"]?)(.+?)\1\s*$", text, flags=re.M)
    return re.sub(r"\s*:\s*[HhRr12]$", "", m.group(2).strip()) if m else None


def load_cif(
    path: str | Path,
    name: str | None = None,
    *,
    formula: str | None = None,
    kind: str = "user",
    provenance: str | None = None,
    aliases: Iterable[str] = (),
) -> Phase:
    """Read a CIF (first data block) into a :class:`Phase`, expanded to P1 with diffpy.

    Parameters
    ----------
    path : CIF file.
    name : library name; default the file stem.
    formula : formula unit; default ``_chemical_formula_sum`` or the reduced cell content.
    kind, provenance, aliases : metadata (see :class:`Phase`).
    """
    from diffpy.structure.parsers import getParser
    from diffpy.structure.symmetryutilities import expandPosition

    p = Path(path)
    name = name or p.stem
    if not p.is_file():
        raise InputError(f"CIF {str(p)!r} for phase {name!r}: file not found")
    text = p.read_text(errors="replace")
    parser = getParser("cif")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser.parseLines(text.splitlines())
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"CIF {str(p)!r}: cannot be read as a crystal structure ({first})"
        ) from None
    sg = parser.spacegroup
    asym = parser.asymmetric_unit
    if sg is None or not asym:
        raise InputError(
            f"CIF {str(p)!r}: expected a space group and atom sites (_atom_site_fract_x ...)"
        )
    lattice = Lattice(*parser.stru.lattice.abcABG())
    atoms, sites = [], []
    for k, a in enumerate(asym):
        positions = expandPosition(sg, a.xyz, sgoffset=[0, 0, 0], eps=1e-4)[0]
        for xyz in positions:
            b = Atom(a)
            b.xyz = np.asarray(xyz) % 1.0
            atoms.append(b)
            sites.append(k)
    structure = Structure(atoms, lattice=lattice, title=name)
    if formula is None:
        formula_text = _cif_formula_sum(text)
        if formula_text is not None:
            try:
                cif_comp = parse_composition(formula_text)
                content = _cell_content(structure, name)
                _formula_units(content, cif_comp, name)
                formula = formula_text.replace(" ", "")
            except InputError:
                formula = None
    rotations = np.array([op.R for op in sg.iter_symops()])
    phase = Phase.from_structure(
        structure,
        name,
        formula=formula,
        spacegroup=_cif_spacegroup(text) or str(getattr(sg, "short_name", "")) or "P1",
        kind=kind,
        provenance=provenance if provenance is not None else f"user CIF {p}",
        path=p,
        aliases=aliases,
        rotations=rotations,
    )
    phase._site = np.asarray(sites)
    return phase


# ---------------------------------------------------------------------------- library


class PhaseLibrary(dict):
    """``dict`` of name -> :class:`Phase` that also accepts aliases, case-insensitively."""

    def _resolve(self, key: str) -> str | None:
        if dict.__contains__(self, key):
            return key
        k = _norm(key)
        for name, phase in self.items():
            if k == _norm(name) or k in (_norm(a) for a in phase.aliases):
                return name
        return None

    def __getitem__(self, key: str) -> Phase:
        name = self._resolve(key)
        if name is None:
            raise InputError(_unknown_message(key, self))
        return dict.__getitem__(self, name)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._resolve(key) is not None

    def get(self, key, default=None):
        name = self._resolve(key) if isinstance(key, str) else None
        return default if name is None else dict.__getitem__(self, name)


def _unknown_message(key: str, library: Mapping[str, Phase]) -> str:
    k = _norm(key)
    for name, explanation in UNAVAILABLE.items():
        if k in {_norm(name), *(_norm(a) for a in _UNAVAILABLE_ALIASES.get(name, ()))}:
            return (
                f"phase {key!r}: {explanation}; supply a CIF with --phase {name}=path.cif "
                f"(or load_library(extra={{{name!r}: 'path.cif'}}))"
            )
    return (
        f"phase {key!r} is not in the library; available: {', '.join(library)} (or NAME=path.cif)"
    )


@functools.cache
def _shipped(entry: _Entry) -> Phase:
    return load_cif(
        CIF_DIR / entry.file,
        entry.name,
        formula=entry.formula,
        kind=entry.kind,
        provenance=entry.provenance,
        aliases=entry.aliases,
    )


def load_library(
    extra: Mapping[str, str | Path] | None = None,
    folder: str | Path | None = None,
) -> PhaseLibrary:
    """The shipped reference phases plus user CIFs.

    Parameters
    ----------
    extra : name -> CIF path; a name equal to a shipped one replaces it.
    folder : directory whose ``*.cif`` files are added, named by file stem.

    Returns
    -------
    PhaseLibrary
        Mapping name -> :class:`Phase` (aliases and case-insensitive names accepted).
        Shipped phases are shared objects (their caches too); do not modify them.
    """
    lib = PhaseLibrary()
    for entry in _LIBRARY:
        lib[entry.name] = _shipped(entry)
    user: dict[str, Path] = {}
    if folder is not None:
        d = Path(folder)
        if not d.is_dir():
            raise InputError(f"phase folder {str(d)!r}: expected a directory of .cif files")
        for f in sorted(d.glob("*.cif")) + sorted(d.glob("*.CIF")):
            user[f.stem] = f
    for name, path in (extra or {}).items():
        user[str(name)] = Path(path)
    for name, path in user.items():
        existing = lib._resolve(name)
        if existing is not None:
            del lib[existing]
        lib[name] = load_cif(path, name)
    return lib


def get_phase(
    name: str, *, extra: Mapping[str, str | Path] | None = None, folder: str | Path | None = None
) -> Phase:
    """One phase by name or alias (case-insensitive), or ``"NAME=path.cif"``.

    Raises :class:`~xrdmap.errors.InputError` listing the available names when unknown.
    """
    if "=" in name:
        return resolve_phases([name])[name.split("=", 1)[0].strip()]
    return load_library(extra=extra, folder=folder)[name]


def resolve_phases(specs: Iterable[str], *, folder: str | Path | None = None) -> dict[str, Phase]:
    """Phases from CLI-style specs: library names/aliases or ``NAME=path.cif``.

    Returns name -> Phase in the order given (library names in canonical spelling).
    """
    extra: dict[str, str] = {}
    names: list[str] = []
    for spec in specs:
        if "=" in spec:
            n, path = (s.strip() for s in spec.split("=", 1))
            if not n or not path:
                raise InputError(f"phase {spec!r}: expected NAME or NAME=path.cif")
            extra[n] = path
            names.append(n)
        else:
            names.append(spec.strip())
    lib = load_library(extra=extra, folder=folder)
    out: dict[str, Phase] = {}
    for n in names:
        phase = lib[n]
        out[phase.name] = phase
    return out


# ---------------------------------------------------------------------------- AMCSD


def search_amcsd(formula: str, *, max_results: int = 50) -> list[dict]:
    """Structures of a chemical system in the offline AMCSD copy shipped by ``larixite``.

    Matches every entry made of exactly the elements of ``formula`` (any stoichiometry).
    Each result: ``amcsd_id``, ``formula``, ``mineral``, ``spacegroup``, ``cell``
    (a, b, c, alpha, beta, gamma), ``reference``, ``cif`` (CIF text).
    Needs the optional dependency ``larixite`` (``pip install xrdmap[search]``); never
    downloads anything.
    """
    elements = sorted(parse_composition(formula))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from larixite.amcsd import AMCSD
    except ImportError:
        raise InputError(
            "phase search needs the optional package larixite (offline AMCSD database): "
            "pip install 'xrdmap[search]'"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        db = AMCSD(read_only=True)
        found = db.find_cifs(contains_elements=elements, strict_contains=True)
    results = []
    for c in found[:max_results]:
        pub = c.publication
        authors = ", ".join(pub.authors[:2]) + (" et al." if len(pub.authors) > 2 else "")
        results.append(
            {
                "amcsd_id": int(c.ams_id),
                "formula": str(c.formula),
                "mineral": str(c.get_mineralname()),
                "spacegroup": str(c.hm_symbol).strip(),
                "cell": tuple(float(v) for v in (c.a, c.b, c.c, c.alpha, c.beta, c.gamma)),
                "reference": f"{authors}, {pub.journalname} {pub.volume} ({pub.year}) {pub.page_first}",
                "cif": c.ciftext,
            }
        )
    results.sort(key=lambda d: d["amcsd_id"])
    return results
