"""Synthetic total-scattering scans with ground truth.

:func:`simulate_scan` writes a NeXus/HDF5 file of detector frames for one of the sample
layouts in :data:`LAYOUTS`, modelled on the published study of flash-sintered LVP / LATP
pellets (I15-1, 76.69 keV, PerkinElmer XRD 4343 CT at 350 mm), together with everything
needed to check a pipeline against the truth: phase weight fractions per point, the true
1-D pattern per point, zone boundaries, the Kapton background and the PONI geometry.

Forward model, per scan point ``i`` and momentum transfer ``Q`` (A^-1)::

    I_i(Q) = flux * [ sum_p w_ip * (B_p(Q) + D_p(Q)) + a_i * A(Q) ]      (sample)
    frame_i = Poisson( monitor_i * (I_i + K)(Q(pixel)) * solid_angle * polarization )
              + dark, with gaps, beamstop shadow and hot pixels

``B_p`` is the Bragg intensity per unit mass of phase ``p`` (``Phase.simulate_iq``),
``D_p`` its thermal diffuse scattering (the part ``sum_atoms f^2 (1 - exp(-U Q^2))`` of
the self scattering that the Debye-Waller factor moves out of the peaks) plus a
Compton-like term, per unit mass, ``A`` the total scattering per unit mass of a glass (self scattering plus the
interference term from ``Phase.simulate_fq`` with correlations cut at ``size_A`` ~ 7 A),
and ``K`` the Kapton-tape + air background. ``w_ip`` and ``a_i`` are weight fractions that
sum to one per point. The pattern of each pixel is the average of the 1-D pattern over
``s x s`` sub-pixels (a real pixel integrates over its area), times pyFAI's relative
solid angle and polarization (factor 0.99), exactly as ``ai.calcfrom1d`` would.

File layout (``h5py`` paths; ``import hdf5plugin`` before reading the frames)::

    /entry                          NXentry, default -> data
    /entry/instrument/detector      NXdetector
        data        (point, y, x) uint32 (or float32), Bitshuffle-LZ4, one frame per chunk
        dark        (y, x) float32 dark offset per pixel (already included in data)
        pixel_mask  (y, x) uint32, NeXus bits: 1 = gap, 8 = hot pixel
        distance (m), x_pixel_size / y_pixel_size (m), beam_center_x / beam_center_y (px)
    /entry/instrument/monochromator energy (keV), wavelength (A)
    /entry/monitor                  NXmonitor: data (point) incident counts
    /entry/data                     NXdata: signal "data" (link), axes position (mm) or time (s)
    /entry/sample                   NXsample: name, description, position (mm) / time (s)
    /entry/calibration              NXnote: ``poni`` (PONI file text; attrs = PONI dict)
    /entry/background               NXdata: data (y, x), one Kapton/air-only frame; monitor
    /entry/truth                    NXcollection:
        q (q) A^-1; iq (point, q) sample intensity without background, in frame counts per
        pixel after solid-angle/polarization correction at monitor = monitor_reference;
        background_iq (q) the same for Kapton/air; phase (phase) names;
        phase_fraction (point, phase) weight fractions (rows sum to 1);
        amorphous_fraction (point); lattice_scale (point); zones (boundaries, mm or s),
        zone_names, zone_points (the point nearest each boundary); position or time;
        mask (y, x) every pixel a pipeline should mask; hot_pixels (n, 2)

Beside ``scan.h5``: ``scan.poni`` (pyFAI geometry), ``scan.mask.npy`` (True = gap,
beamstop or hot pixel) and ``scan.dark.npy``, so that
``xrdmap integrate scan.h5 --poni scan.poni --mask scan.mask.npy --dark scan.dark.npy``
reduces the scan.

Peak widths: Bragg peaks have the intrinsic FWHM ``fwhm_q`` (stored; default 0.05 A^-1 or
two pixels, whichever is broader: 0.375 A^-1 at 256 px, 0.19 at 512 px, 0.05 at 2880 px).
Each pixel averages the pattern over its area (``pixel_dq``, stored, is the Q span of one
pixel near the beam); pixel-splitting integration (pyFAI ``bbox``) widens peaks by up to
about one more pixel. At 256 px LVP, LVP-Pbcn and the anti-NASICON phase (one framework)
are barely distinguishable; use 512 px or more for phase-fraction work.

Counting statistics: ``counts`` is the mean expected number of sample counts per
unmasked pixel (averaged over the scan). The default 2e4 gives 1e4-1e5 counts per pixel
in the strong low-Q region, about what a PerkinElmer panel collects in a few seconds at
I15-1 (the detector saturates near 6e4 per frame, so real data sum several frames).

Approximations: no sample absorption, no multiple scattering, no oblique-incidence or
detector-efficiency effects, Compton scattering approximated by ``Z - f^2/Z`` per atom
without the Breit-Dirac factor. The hotspot layout omits alpha1-LiVOPO4.nH2O, for which no
open structure exists (recorded in ``/entry/truth`` attribute ``unavailable_phases``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdmap.composition import form_factor, parse_composition
from xrdmap.errors import ConfigError, InputError
from xrdmap.geometry import PerkinElmerXRD4343CT, make_integrator, wavelength_from_energy

__all__ = [
    "LAYOUTS",
    "Layout",
    "Zone",
    "scan_geometry",
    "layout_truth",
    "self_scattering",
    "compton_scattering",
    "thermal_diffuse",
    "crystal_pattern",
    "glass_pattern",
    "kapton_pattern",
    "pixel_dq",
    "simulate_scan",
]

PANEL_PIXELS = 2880
PANEL_PIXEL_M = 150e-6
# The I15-1 beam hits the panel off-centre so that the far corner reaches Q > 25 A^-1
# while complete rings still reach Q ~ 18 A^-1.
BEAM_CENTER_FRACTION = (0.44, 0.42)  # (y, x) as fractions of the panel side
POLARIZATION_FACTOR = 0.99
MONITOR_REFERENCE = 1.0e6  # incident counts per frame of the nominal beam
KAPTON_FORMULA = "C22H10N2O5"
DEFAULT_U_ISO = 0.5 / (8.0 * np.pi**2)  # A^2, B = 0.5 A^2


# ---------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Zone:
    """A region of the scan axis with a composition varying linearly across it.

    ``start`` and ``end`` are in mm (line scans) or s (time series); ``begin`` and
    ``finish`` map phase name -> weight fraction at ``start`` and at ``end``.
    """

    name: str
    start: float
    end: float
    begin: Mapping[str, float]
    finish: Mapping[str, float] | None = None

    def fractions(self, z: np.ndarray, phases: list[str]) -> np.ndarray:
        end_comp = self.finish if self.finish is not None else self.begin
        t = np.clip((z - self.start) / (self.end - self.start), 0.0, 1.0)[:, None]
        a = np.array([self.begin.get(p, 0.0) for p in phases])
        b = np.array([end_comp.get(p, 0.0) for p in phases])
        return (1.0 - t) * a + t * b


@dataclass(frozen=True)
class Layout:
    """A sample: zones along the scan axis and the phases that appear in them.

    ``axis`` is ``"position"`` (mm) or ``"time"`` (s). ``amorphous`` names the phase
    columns that are glasses (simulated from ``simulate_fq`` with short correlations)
    and the library phase whose pair sum they use. ``lattice_scale`` gives the stretch
    of every crystalline lattice along the scan axis (thermal expansion in a flash).
    """

    name: str
    description: str
    axis: str
    length: float
    zones: tuple[Zone, ...]
    amorphous: Mapping[str, str] = field(default_factory=dict)
    lattice_scale: Callable[[np.ndarray], np.ndarray] | None = None
    unavailable: tuple[str, ...] = ()

    @property
    def phases(self) -> list[str]:
        names: list[str] = []
        for zone in self.zones:
            for comp in (zone.begin, zone.finish or {}):
                names.extend(p for p in comp if p not in names)
        return names


def _mirror(zones: list[Zone], length: float) -> tuple[Zone, ...]:
    """Zones from the edge to the centre, mirrored to make a symmetric pellet."""
    mirrored = [
        Zone(
            z.name,
            length - z.end,
            length - z.start,
            z.finish if z.finish is not None else z.begin,
            z.begin,
        )
        for z in reversed(zones[:-1])
    ]
    centre = zones[-1]
    centre = Zone(centre.name, centre.start, length - centre.start, centre.begin, centre.finish)
    return (*zones[:-1], centre, *mirrored)


LVP, EPS, LI3PO4, PBCN = "LVP", "eps-LiVOPO4", "Li3PO4-gamma", "LVP-Pbcn"
LATP, DOPED, ALPO4 = "LATP", "anti-NASICON", "AlPO4"
GLASS = "LATP-glass"

_FLASH_ONSET, _FLASH_END, _FLASH_PERIOD_S = 0.25, 0.55, 0.01


def _flash_lattice(t_rel: np.ndarray) -> np.ndarray:
    """Thermal expansion during the pulse (t as a fraction of the series)."""
    heat = np.where(
        t_rel < _FLASH_ONSET,
        0.0,
        np.where(t_rel < _FLASH_END, 1.0, np.exp(-(t_rel - _FLASH_END) / 0.12)),
    )
    return 1.0 + 0.008 * heat


LAYOUTS: dict[str, Layout] = {
    "hotspot": Layout(
        name="hotspot",
        description=(
            "Flash-sintered LVP pellet, 3 mm (Fukada et al., Fig. 5-6): phase-pure LVP hotspot "
            "core, eps-LiVOPO4 in the intermediate zone, LixV2(PO4)3 (Pbcn) and Li3PO4 at the periphery"
        ),
        axis="position",
        length=3.0,
        zones=_mirror(
            [
                Zone(
                    "periphery",
                    0.0,
                    0.45,
                    {LVP: 0.74, PBCN: 0.18, LI3PO4: 0.08},
                    {LVP: 0.84, PBCN: 0.12, LI3PO4: 0.04},
                ),
                Zone("intermediate", 0.45, 0.95, {LVP: 0.92, EPS: 0.08}, {LVP: 0.94, EPS: 0.06}),
                Zone("core", 0.95, 1.5, {LVP: 1.0}),
            ],
            3.0,
        ),
        unavailable=("alpha1-LiVOPO4",),
    ),
    "composite": Layout(
        name="composite",
        description=(
            "EFS LVP-LATP composite 40:60 by weight, 3 mm (Fig. 9): Al,Ti-doped anti-NASICON "
            "hotspot core, reacted intermediate zone, unreacted bulk, Li3PO4 at the rim"
        ),
        axis="position",
        length=3.0,
        zones=_mirror(
            [
                Zone("periphery", 0.0, 0.4, {LATP: 0.57, LVP: 0.37, LI3PO4: 0.06}),
                Zone("bulk", 0.4, 0.9, {LATP: 0.6, LVP: 0.4}),
                Zone("intermediate", 0.9, 1.2, {DOPED: 0.3, LATP: 0.42, LVP: 0.28}),
                Zone("core", 1.2, 1.5, {DOPED: 0.62, LATP: 0.15, LVP: 0.23}),
            ],
            3.0,
        ),
    ),
    "multilayer": Layout(
        name="multilayer",
        description=(
            "EFS LVP-LATP|LATP|LVP-LATP multilayer, 5 mm (Fig. 10): doped anti-NASICON rising "
            "towards the interfaces, 15-30 % eps-LiVOPO4 and < 5 % LVP in the composite layers, "
            "5-8 % doped phase in the LATP layer"
        ),
        axis="position",
        length=5.0,
        zones=(
            Zone(
                "composite",
                0.0,
                1.8,
                {DOPED: 0.20, EPS: 0.27, LVP: 0.04, LATP: 0.49},
                {DOPED: 0.42, EPS: 0.16, LVP: 0.02, LATP: 0.40},
            ),
            Zone("electrolyte", 1.8, 2.5, {LATP: 0.92, DOPED: 0.08}, {LATP: 0.95, DOPED: 0.05}),
            Zone("electrolyte", 2.5, 3.2, {LATP: 0.95, DOPED: 0.05}, {LATP: 0.92, DOPED: 0.08}),
            Zone(
                "composite",
                3.2,
                5.0,
                {DOPED: 0.42, EPS: 0.16, LVP: 0.02, LATP: 0.40},
                {DOPED: 0.20, EPS: 0.27, LVP: 0.04, LATP: 0.49},
            ),
        ),
    ),
    "vitreous": Layout(
        name="vitreous",
        description=(
            "Conventionally flash-sintered LATP pellet, 3 mm: crystalline LATP core (2 % AlPO4), "
            "vitreous rim with no correlations beyond ~7 A"
        ),
        axis="position",
        length=3.0,
        zones=_mirror(
            [
                Zone("vitreous rim", 0.0, 0.5, {GLASS: 0.85, LATP: 0.15}),
                Zone("transition", 0.5, 0.8, {GLASS: 0.45, LATP: 0.55}),
                Zone("core", 0.8, 1.5, {LATP: 0.98, ALPO4: 0.02}),
            ],
            3.0,
        ),
        amorphous={GLASS: LATP},
    ),
    "flash": Layout(
        name="flash",
        description=(
            "In-situ flash of the LATP layer, millisecond frames: crystalline -> amorphous "
            "intermediate during the pulse -> recrystallised, with thermal lattice expansion"
        ),
        axis="time",
        length=1.0,  # in units of the series; scaled to the number of frames
        zones=(
            Zone("crystalline", 0.0, _FLASH_ONSET, {LATP: 1.0}),
            Zone("amorphous intermediate", _FLASH_ONSET, _FLASH_END, {GLASS: 0.7, LATP: 0.3}),
            Zone("recrystallised", _FLASH_END, 1.0, {GLASS: 0.15, LATP: 0.85}, {LATP: 1.0}),
        ),
        amorphous={GLASS: LATP},
        lattice_scale=_flash_lattice,
    ),
}


def _layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ConfigError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}") from None


def layout_truth(layout: str | Layout, points: int) -> dict[str, Any]:
    """Scan axis, weight fractions and zones of a layout sampled at ``points`` points.

    Line scans sample the pellet at the centres of ``points`` equal steps; the flash
    series has frames every 10 ms. Zone transitions are smoothed over about one step
    (a logistic of width step / 2), so each boundary spans one or two points.

    Returns
    -------
    dict
        ``axis`` ("position" | "time"), ``coord`` (points,) in mm or s, ``phases``
        (names), ``fractions`` (points, phases) rows summing to 1, ``boundaries``
        (zone boundaries in the axis unit), ``zone_names``, ``lattice_scale`` (points,),
        ``amorphous`` (points,) summed glass fraction.
    """
    lay = _layout(layout)
    if points < 2:
        raise ConfigError(f"points {points}: expected at least 2 scan points")
    if lay.axis == "time":
        scale = points * _FLASH_PERIOD_S
        coord = np.arange(points) * _FLASH_PERIOD_S
    else:
        scale = 1.0
        step = lay.length / points
        coord = (np.arange(points) + 0.5) * step
    zrel = coord / scale
    step_rel = (lay.length if lay.axis != "time" else 1.0) / points
    phases = lay.phases
    width = step_rel / 2.0
    zones = lay.zones
    membership = np.empty((points, len(zones)))
    edges = [z.start for z in zones[1:]]
    from scipy.special import expit  # the logistic function, without overflow far from an edge

    for k in range(len(zones)):
        lo = 1.0 if k == 0 else expit((zrel - edges[k - 1]) / width)
        hi = 0.0 if k == len(zones) - 1 else expit((zrel - edges[k]) / width)
        membership[:, k] = lo - hi
    fractions = sum(membership[:, [k]] * z.fractions(zrel, phases) for k, z in enumerate(zones))
    fractions = np.clip(fractions, 0.0, None)
    fractions /= fractions.sum(axis=1, keepdims=True)
    lattice = lay.lattice_scale(zrel) if lay.lattice_scale else np.ones(points)
    amorphous = fractions[:, [phases.index(p) for p in lay.amorphous]].sum(axis=1)
    return {
        "axis": lay.axis,
        "coord": coord,
        "phases": phases,
        "fractions": fractions,
        "boundaries": np.array(edges) * scale,
        "zone_names": [z.name for z in zones],
        "lattice_scale": lattice,
        "amorphous": amorphous,
    }


# -------------------------------------------------------------------------- geometry


def scan_geometry(
    size: int = 256,
    *,
    energy_keV: float = 76.69,
    distance_mm: float = 350.0,
    pixel_um: float | None = None,
    beam_center: tuple[float, float] = BEAM_CENTER_FRACTION,
) -> dict[str, Any]:
    """PONI dictionary of the I15-1 set-up scaled to a ``size`` x ``size`` frame.

    The default pixel is ``150 um * 2880 / size`` so that the small frame covers the same
    solid angle as the real 432 mm panel; ``beam_center`` is the (y, x) fraction of the
    panel side where the direct beam hits (no tilt).
    """
    if not 16 <= size <= 4096:
        raise ConfigError(f"size {size} px: expected a frame side between 16 and 4096 pixels")
    if distance_mm <= 0:
        raise ConfigError(
            f"distance {distance_mm} mm: expected a positive sample-detector distance"
        )
    pixel_m = (pixel_um * 1e-6) if pixel_um else PANEL_PIXEL_M * PANEL_PIXELS / size
    if pixel_m <= 0:
        raise ConfigError(f"pixel size {pixel_um} um: expected a positive pixel size")
    det = PerkinElmerXRD4343CT(pixel1=pixel_m, pixel2=pixel_m, max_shape=(size, size))
    cfg = {
        "poni_version": 2.1,
        "detector": "PerkinElmerXRD4343CT",
        "detector_config": det.get_config(),
        "dist": distance_mm * 1e-3,
        "poni1": beam_center[0] * size * pixel_m,
        "poni2": beam_center[1] * size * pixel_m,
        "rot1": 0.0,
        "rot2": 0.0,
        "rot3": 0.0,
        "wavelength": wavelength_from_energy(energy_keV) * 1e-10,
    }
    return cfg


def _poni_text(poni: Mapping[str, Any]) -> str:
    cfg = dict(poni["detector_config"])
    cfg["orientation"] = int(cfg.get("orientation", 3))
    cfg["max_shape"] = list(cfg["max_shape"])
    return (
        "# Nota: C-Order, 1 refers to the Y axis, 2 to the X axis\n"
        "# Simulated I15-1 geometry written by xrdmap.simulate\n"
        "poni_version: 2.1\n"
        f"Detector: {poni['detector']}\n"
        f"Detector_config: {json.dumps(cfg)}\n"
        f"Distance: {poni['dist']!r}\n"
        f"Poni1: {poni['poni1']!r}\n"
        f"Poni2: {poni['poni2']!r}\n"
        f"Rot1: {poni['rot1']!r}\n"
        f"Rot2: {poni['rot2']!r}\n"
        f"Rot3: {poni['rot3']!r}\n"
        f"Wavelength: {poni['wavelength']!r}\n"
    )


class _PixelModel:
    """Per-pixel Q, solid angle and polarization of a geometry, computed once per scan.

    A frame is the 1-D pattern averaged over ``s x s`` sub-pixels of each pixel, times the
    solid angle and polarization at the pixel centre (pyFAI's relative conventions).
    """

    def __init__(self, poni: Mapping[str, Any], subsample: int):
        ai = make_integrator(poni)
        n1, n2 = ai.detector.shape
        self.shape = (n1, n2)
        offsets = (np.arange(subsample) + 0.5) / subsample - 0.5
        i1, i2 = np.meshgrid(np.arange(n1, dtype=float), np.arange(n2, dtype=float), indexing="ij")
        self.q_sub = [
            (ai.qFunction(i1 + o1, i2 + o2) / 10.0).astype(np.float64).ravel()
            for o1 in offsets
            for o2 in offsets
        ]
        self.weight = (ai.solidAngleArray() * ai.polarization(factor=POLARIZATION_FACTOR)).astype(
            np.float64
        )
        self.q_max = float(max(q.max() for q in self.q_sub))
        self._cache: tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None = None

    def _interp_index(self, q: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        key = hash((q.size, float(q[0]), float(q[-1])))
        if self._cache is None or self._cache[0] != key:
            out = []
            for qs in self.q_sub:
                idx = np.clip(np.searchsorted(q, qs) - 1, 0, q.size - 2)
                frac = np.clip((qs - q[idx]) / (q[idx + 1] - q[idx]), 0.0, 1.0)
                out.append((idx, frac))
            self._cache = (key, out)
        return self._cache[1]

    def frame(self, q: np.ndarray, iq: np.ndarray) -> np.ndarray:
        """Expected counts per pixel of the 1-D pattern ``iq(q)``."""
        acc = np.zeros(self.shape[0] * self.shape[1])
        for idx, frac in self._interp_index(q):
            acc += iq[idx] * (1.0 - frac) + iq[idx + 1] * frac
        return acc.reshape(self.shape) / len(self.q_sub) * self.weight


# ------------------------------------------------------------------- 1-D patterns


def compton_scattering(composition: str | Mapping[str, float], q: np.ndarray) -> np.ndarray:
    """Compton-like incoherent scattering per amu: ``sum_atoms Z (1 - (f/Z)^2)`` / mass.

    A smooth rise from 0 at Q = 0 to ``Z`` per atom at high Q (no Breit-Dirac factor).
    """
    import periodictable

    counts = parse_composition(composition)
    q = np.asarray(q, dtype=float)
    total = np.zeros_like(q)
    mass = 0.0
    for el, n in counts.items():
        z = periodictable.elements.symbol(el).number
        total += n * z * np.clip(1.0 - (form_factor(el, q) / z) ** 2, 0.0, None)
        mass += n * periodictable.elements.symbol(el).mass
    return total / mass


def self_scattering(
    composition: str | Mapping[str, float], q: np.ndarray, *, compton: bool = True
) -> np.ndarray:
    """Self scattering ``sum_atoms f(Q)^2`` per amu of ``composition`` (e^2 / amu).

    With ``compton`` the :func:`compton_scattering` term is added.
    """
    import periodictable

    counts = parse_composition(composition)
    q = np.asarray(q, dtype=float)
    total = np.zeros_like(q)
    mass = 0.0
    for el, n in counts.items():
        total += n * form_factor(el, q) ** 2
        mass += n * periodictable.elements.symbol(el).mass
    out = total / mass
    return out + compton_scattering(counts, q) if compton else out


_SYMBOL = re.compile(r"[A-Z][a-z]?")


def thermal_diffuse(phase: Any, q: np.ndarray) -> np.ndarray:
    """Thermal diffuse scattering per amu of a crystal (Einstein model).

    ``sum_atoms occ f(Q)^2 (1 - exp(-U Q^2))`` / cell mass with each atom's ``Uiso``
    (0.5 / (8 pi^2) A^2 where the structure gives none): the part of the self scattering
    that the Debye-Waller factor takes out of the Bragg peaks. It vanishes at low Q, where
    a dense solid scatters almost nothing outside its Bragg peaks, and tends to the full
    self scattering at high Q. Objects without a ``structure`` use their ``formula`` and
    the default ``U``.
    """
    import periodictable

    q = np.asarray(q, dtype=float)
    structure = getattr(phase, "structure", None)
    if structure is not None:
        atoms = [
            (_SYMBOL.match(a.element).group(0), float(a.occupancy), float(a.Uisoequiv))
            for a in structure
        ]
    else:
        atoms = [(el, n, 0.0) for el, n in parse_composition(phase.formula).items()]
    total = np.zeros_like(q)
    mass = 0.0
    for el, occ, u in atoms:
        u = u if u > 0 else DEFAULT_U_ISO
        total += occ * form_factor(el, q) ** 2 * -np.expm1(-u * q * q)
        mass += occ * periodictable.elements.symbol(el).mass
    return total / mass


def _atoms_per_amu(composition: str) -> float:
    import periodictable

    counts = parse_composition(composition)
    mass = sum(n * periodictable.elements.symbol(el).mass for el, n in counts.items())
    return sum(counts.values()) / mass


def crystal_pattern(
    phase: Any, q: np.ndarray, *, fwhm_q: float, stretch: float = 1.0, compton: bool = True
) -> np.ndarray:
    """Total scattering per unit mass of a crystalline phase (e^2 / amu).

    Bragg peaks (``Phase.simulate_iq``) + :func:`thermal_diffuse` (+ Compton). This is the
    reference a weight-fraction fit needs: a mixture with weight fractions ``w_p``
    scatters ``sum_p w_p * crystal_pattern(p)``.
    """
    q = np.asarray(q, dtype=float)
    bragg = np.asarray(phase.simulate_iq(q, stretch=stretch, fwhm_q=fwhm_q), dtype=float)
    out = bragg + thermal_diffuse(phase, q)
    return out + compton_scattering(phase.formula, q) if compton else out


def glass_pattern(
    phase: Any, q: np.ndarray, *, size_A: float = 7.0, stretch: float = 1.0, compton: bool = True
) -> np.ndarray:
    """Total scattering per unit mass of a glass of ``phase``'s composition.

    Faber-Ziman: per atom ``<f^2> + <f>^2 F(Q) / Q`` with ``F(Q)`` from the phase's pair
    sum with correlations damped beyond ``size_A`` (``Phase.simulate_fq``).
    """
    from xrdmap.composition import form_factor_moments

    q = np.asarray(q, dtype=float)
    fq = np.asarray(phase.simulate_fq(q, stretch=stretch, size_A=size_A), dtype=float)
    _, f_mean_sq = form_factor_moments(phase.formula, q)
    interference = _atoms_per_amu(phase.formula) * f_mean_sq * fq / np.where(q > 0, q, np.inf)
    return self_scattering(phase.formula, q, compton=compton) + interference


def kapton_pattern(q: np.ndarray) -> np.ndarray:
    """Kapton tape + air scattering per amu of tape (electrons^2 / amu), amorphous polymer.

    Self scattering of C22H10N2O5 times a structure factor with a strong broad hump at
    Q ~ 1.2 A^-1 (inter-chain), a shoulder near 0.45 A^-1 and a weak hump at ~3 A^-1, plus a
    smooth low-Q rise from air.
    """
    q = np.asarray(q, dtype=float)
    humps = (
        1.6 * np.exp(-0.5 * ((q - 1.2) / 0.28) ** 2)
        + 0.6 * np.exp(-0.5 * ((q - 0.45) / 0.12) ** 2)
        + 0.25 * np.exp(-0.5 * ((q - 3.0) / 0.6) ** 2)
    )
    structure = 1.0 + humps - 0.35 * np.exp(-0.5 * ((q - 2.1) / 0.35) ** 2)
    air = 0.8 * np.exp(-q / 0.6)
    return self_scattering(KAPTON_FORMULA, q) * structure + air * self_scattering(
        KAPTON_FORMULA, 0.0 * q
    )


def pixel_dq(poni: Mapping[str, Any]) -> float:
    """Q span (A^-1) of one pixel near the direct beam: ``(2 pi / lambda) * pixel / distance``."""
    wavelength_A = poni["wavelength"] * 1e10
    return 2.0 * math.pi / wavelength_A * poni["detector_config"]["pixel1"] / poni["dist"]


def _default_fwhm(poni: Mapping[str, Any]) -> float:
    """Peak FWHM (A^-1): 0.05 (I15-1 with a 2880 px panel) or two pixels if coarser."""
    return max(0.05, 2.0 * pixel_dq(poni))


# ----------------------------------------------------------------------- the scan


def _library(library: Mapping[str, Any] | None, needed: list[str]) -> Mapping[str, Any]:
    if library is None:
        from xrdmap.phases import load_library

        library = load_library()
    missing = [p for p in needed if p not in library]
    if missing:
        raise InputError(
            f"phase library lacks {', '.join(missing)} (expected these reference phases for the layout)"
        )
    return library


def _point_patterns(
    lay: Layout, truth: dict[str, Any], q: np.ndarray, library, fwhm_q: float, compton: bool
) -> np.ndarray:
    phases = truth["phases"]
    sources = {p: lay.amorphous.get(p, p) for p in phases}
    lib = _library(library, sorted(set(sources.values())))
    scales = truth["lattice_scale"]
    cache: dict[tuple[str, float], np.ndarray] = {}

    def pattern(name: str, stretch: float) -> np.ndarray:
        key = (name, round(float(stretch), 9))
        if key not in cache:
            phase = lib[sources[name]]
            if name in lay.amorphous:
                cache[key] = glass_pattern(phase, q, stretch=stretch, compton=compton)
            else:
                cache[key] = crystal_pattern(
                    phase, q, fwhm_q=fwhm_q, stretch=stretch, compton=compton
                )
        return cache[key]

    out = np.zeros((len(scales), q.size))
    for i, s in enumerate(scales):
        for j, name in enumerate(phases):
            w = truth["fractions"][i, j]
            if w > 0:
                out[i] += w * pattern(name, s)
    return out


def _static_defects(shape: tuple[int, int], poni: Mapping[str, Any], rng: np.random.Generator):
    """Gap rows/columns, beamstop shadow and hot pixels of the simulated panel."""
    n1, n2 = shape
    pixel = poni["detector_config"]["pixel1"]
    gaps = np.zeros(shape, dtype=bool)
    width = max(1, round(n1 / 512))
    for frac in (1 / 3, 2 / 3):
        gaps[int(frac * n1) : int(frac * n1) + width, :] = True
        gaps[:, int(frac * n2) : int(frac * n2) + width] = True
    c1, c2 = poni["poni1"] / pixel - 0.5, poni["poni2"] / pixel - 0.5
    i1, i2 = np.ogrid[:n1, :n2]
    radius = max(1.5, 0.012 * n1)  # ~5 mm on the 432 mm panel: shadow below Q ~ 0.5 A^-1
    beamstop = ((i1 - c1) ** 2 + (i2 - c2) ** 2 <= radius**2) | (
        (np.abs(i2 - c2) <= radius / 2.5) & (i1 <= c1)
    )
    hot = np.zeros(shape, dtype=bool)
    n_hot = max(3, n1 * n2 // 20000)
    hot.flat[rng.choice(n1 * n2, size=n_hot, replace=False)] = True
    hot &= ~gaps
    return gaps, beamstop, hot


def simulate_scan(
    layout: str | Layout,
    path: str | Path,
    *,
    points: int = 40,
    size: int = 256,
    seed: int = 0,
    energy_keV: float = 76.69,
    distance_mm: float = 350.0,
    pixel_um: float | None = None,
    counts: float = 2.0e4,
    kapton: bool = True,
    kapton_fraction: float = 0.06,
    noise: bool = True,
    defects: bool = True,
    dtype: str = "uint32",
    fwhm_q: float | None = None,
    compton: bool = True,
    dark_offset: float = 100.0,
    monitor_rms: float = 0.005,
    subsample: int | None = None,
    library: Mapping[str, Any] | None = None,
    poni_file: bool = True,
) -> Path:
    """Simulate a line scan (or flash time series) and write it as a NeXus file.

    Parameters
    ----------
    layout : str or Layout
        One of :data:`LAYOUTS`: ``hotspot``, ``composite``, ``multilayer``, ``vitreous``,
        ``flash``.
    path : str or Path
        Output ``.h5`` file, written atomically. With ``poni_file`` the geometry is also
        written to ``path`` with suffix ``.poni``, the mask (gaps, beamstop, hot pixels;
        True = excluded) to ``.mask.npy`` and the dark image to ``.dark.npy``.
    points : int
        Scan points (frames).
    size : int
        Frame side in pixels; the pixel is ``150 um * 2880 / size`` unless ``pixel_um``.
    seed : int
        Seed of the numpy ``Generator``: the same seed gives byte-identical frames.
    energy_keV, distance_mm : float
        Photon energy (keV) and sample-detector distance (mm).
    counts : float
        Mean expected sample counts per unmasked pixel over the scan (see module notes).
    kapton : bool
        Add Kapton tape + air scattering to every frame (and write the background frame).
    kapton_fraction : float
        Mean Kapton/air counts relative to the mean sample counts.
    noise : bool
        Poisson counting noise; ``False`` writes float32 expected counts (dark included).
    defects : bool
        Gap rows/columns (0), beamstop shadow and hot pixels.
    dtype : {"uint32", "float32"}
        Frame data type (``noise=False`` forces float32).
    fwhm_q : float, optional
        Bragg peak FWHM (A^-1); default 0.05 or two pixels, whichever is broader.
    compton : bool
        Include the Compton-like smooth term in the sample and reference patterns.
    dark_offset : float
        Mean dark counts per pixel (a fixed per-pixel pattern around it is stored).
    monitor_rms : float
        Relative rms of the incident-flux fluctuations recorded by the monitor.
    subsample : int, optional
        Sub-pixels per pixel side used to average the pattern over each pixel (default
        ``ceil(512 / size)``, at least 1).
    library : mapping, optional
        Phase name -> object with ``simulate_iq``, ``simulate_fq`` and ``formula``;
        default :func:`xrdmap.phases.load_library`.
    poni_file : bool
        Also write ``<stem>.poni``, ``<stem>.mask.npy`` and ``<stem>.dark.npy`` beside
        the scan.

    Returns
    -------
    Path
        The scan file.
    """
    import h5py
    import hdf5plugin

    from xrdmap.results import atomic_output

    lay = _layout(layout)
    if dtype not in ("uint32", "float32"):
        raise ConfigError(f"dtype {dtype!r}: expected 'uint32' or 'float32'")
    if counts <= 0:
        raise ConfigError(f"counts {counts}: expected a positive mean number of counts per pixel")
    if not 0 <= kapton_fraction < 10:
        raise ConfigError(f"kapton_fraction {kapton_fraction}: expected a value between 0 and 10")
    path = Path(path)
    rng = np.random.default_rng(seed)
    poni = scan_geometry(size, energy_keV=energy_keV, distance_mm=distance_mm, pixel_um=pixel_um)
    fwhm = float(fwhm_q) if fwhm_q else _default_fwhm(poni)
    s = subsample or max(1, math.ceil(512 / size))
    pixels = _PixelModel(poni, s)
    q = np.linspace(0.05, pixels.q_max + 0.1, max(4000, int((pixels.q_max + 0.15) / (fwhm / 8))))

    truth = layout_truth(lay, points)
    sample = _point_patterns(lay, truth, q, library, fwhm, compton)
    if defects:
        gaps, beamstop, hot = _static_defects(pixels.shape, poni, rng)
    else:
        gaps = beamstop = hot = np.zeros(pixels.shape, dtype=bool)
    mask = gaps | beamstop | hot
    good = ~mask

    # flux scale: the mean sample frame over the scan has `counts` per unmasked pixel
    mean_frame = pixels.frame(q, sample.mean(axis=0))
    flux = counts / float(mean_frame[good].mean())
    iq_truth = flux * sample
    if kapton:
        kap = kapton_pattern(q)
        kap_frame = pixels.frame(q, kap)
        bg_iq = kap * (kapton_fraction * counts / float(kap_frame[good].mean()))
        bg_frame = pixels.frame(q, bg_iq)
    else:
        bg_iq = np.zeros_like(q)
        bg_frame = np.zeros(pixels.shape)

    monitor = MONITOR_REFERENCE * (1.0 + monitor_rms * rng.standard_normal(points))
    rel_monitor = monitor / MONITOR_REFERENCE
    dark = (dark_offset + 2.0 * rng.standard_normal(pixels.shape)).clip(0.0).astype(np.float32)
    shadow = np.where(beamstop, 2e-3, 1.0)
    float_out = (not noise) or dtype == "float32"
    out_dtype = np.float32 if float_out else np.uint32
    hot_level = 2.0**20

    def detector_frame(expected: np.ndarray) -> np.ndarray:
        signal = expected * shadow
        frame = rng.poisson(signal).astype(np.float64) if noise else signal
        frame = frame + dark
        if defects:
            frame[hot] = hot_level
            frame[gaps] = 0.0
        return np.round(frame).astype(out_dtype) if not float_out else frame.astype(out_dtype)

    compression = hdf5plugin.Bitshuffle(cname="lz4")
    n1, n2 = pixels.shape
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update({"default": "entry", "creator": "xrdmap.simulate", "NX_class": "NXroot"})
        entry = h5.create_group("entry")
        entry.attrs.update({"NX_class": "NXentry", "default": "data"})
        entry["title"] = f"simulated {lay.name} scan ({lay.description})"
        inst = entry.create_group("instrument")
        inst.attrs["NX_class"] = "NXinstrument"
        src = inst.create_group("source")
        src.attrs["NX_class"] = "NXsource"
        src["name"] = "Diamond Light Source I15-1 (simulated)"
        mono = inst.create_group("monochromator")
        mono.attrs["NX_class"] = "NXmonochromator"
        mono["energy"] = energy_keV
        mono["energy"].attrs["units"] = "keV"
        mono["wavelength"] = poni["wavelength"] * 1e10
        mono["wavelength"].attrs["units"] = "angstrom"
        det = inst.create_group("detector")
        det.attrs["NX_class"] = "NXdetector"
        det["description"] = f"PerkinElmer XRD 4343 CT (simulated, {n1} x {n2} px)"
        det["distance"] = poni["dist"]
        det["distance"].attrs["units"] = "m"
        for name in ("x_pixel_size", "y_pixel_size"):
            det[name] = poni["detector_config"]["pixel1"]
            det[name].attrs["units"] = "m"
        det["beam_center_x"] = poni["poni2"] / poni["detector_config"]["pixel2"]
        det["beam_center_y"] = poni["poni1"] / poni["detector_config"]["pixel1"]
        det["beam_center_x"].attrs["units"] = det["beam_center_y"].attrs["units"] = "pixel"
        data = det.create_dataset(
            "data", shape=(points, n1, n2), dtype=out_dtype, chunks=(1, n1, n2), **compression
        )
        data.attrs["interpretation"] = "image"
        data.attrs["dark_offset"] = dark_offset
        for i in range(points):
            expected = rel_monitor[i] * (pixels.frame(q, iq_truth[i]) + bg_frame)
            data[i] = detector_frame(expected)
        det.create_dataset("dark", data=dark, chunks=(n1, n2), **compression)
        pixel_mask = gaps.astype(np.uint32) * 1 + hot.astype(np.uint32) * 8
        det.create_dataset("pixel_mask", data=pixel_mask, chunks=(n1, n2), **compression)

        axis_name = truth["axis"]
        axis_units = "mm" if axis_name == "position" else "s"
        mon = entry.create_group("monitor")
        mon.attrs["NX_class"] = "NXmonitor"
        mon["data"] = monitor
        mon["data"].attrs["units"] = "counts"
        mon["mode"] = "monitor"
        sample_group = entry.create_group("sample")
        sample_group.attrs["NX_class"] = "NXsample"
        sample_group["name"] = lay.name
        sample_group["description"] = lay.description
        sample_group[axis_name] = truth["coord"]
        sample_group[axis_name].attrs["units"] = axis_units

        nxdata = entry.create_group("data")
        nxdata.attrs.update({"NX_class": "NXdata", "signal": "data", "axes": [axis_name, ".", "."]})
        nxdata.attrs[f"{axis_name}_indices"] = 0
        nxdata["data"] = data
        nxdata[axis_name] = sample_group[axis_name]

        calib = entry.create_group("calibration")
        calib.attrs["NX_class"] = "NXnote"
        calib["poni"] = _poni_text(poni)
        calib["poni"].attrs.update({k: v for k, v in poni.items() if k not in ("detector_config",)})
        calib["poni"].attrs["detector_config"] = json.dumps(
            {
                **poni["detector_config"],
                "orientation": int(poni["detector_config"].get("orientation", 3)),
                "max_shape": list(poni["detector_config"]["max_shape"]),
            }
        )
        calib["type"] = "text/x-pyfai-poni"

        bg = entry.create_group("background")
        bg.attrs.update({"NX_class": "NXdata", "signal": "data"})
        bg["description"] = (
            "Kapton tape + air only (dark only with kapton=False), same geometry and exposure as the scan frames"
        )
        bg_monitor = MONITOR_REFERENCE * (1.0 + monitor_rms * rng.standard_normal())
        bg.create_dataset(
            "data",
            data=detector_frame(bg_monitor / MONITOR_REFERENCE * bg_frame),
            chunks=(n1, n2),
            **compression,
        )
        bg["monitor"] = bg_monitor

        tr = entry.create_group("truth")
        tr.attrs.update(
            {
                "NX_class": "NXcollection",
                "layout": lay.name,
                "seed": seed,
                "counts": counts,
                "flux_scale": flux,
                "fwhm_q": fwhm,
                "pixel_dq": pixel_dq(poni),
                "compton": compton,
                "monitor_reference": MONITOR_REFERENCE,
                "polarization_factor": POLARIZATION_FACTOR,
                "subsample": s,
                "unavailable_phases": ",".join(lay.unavailable),
                "amorphous_phases": ",".join(f"{k}={v}" for k, v in lay.amorphous.items()),
                "axis": axis_name,
            }
        )
        tr["q"] = q
        tr["q"].attrs["units"] = "1/angstrom"
        tr["iq"] = iq_truth
        tr["iq"].attrs["description"] = (
            "sample intensity per pixel, corrected, at monitor_reference, no background"
        )
        tr["background_iq"] = bg_iq
        tr["phase"] = np.array(truth["phases"], dtype=h5py.string_dtype())
        tr["phase_fraction"] = truth["fractions"]
        tr["phase_fraction"].attrs["phases"] = truth["phases"]
        tr["amorphous_fraction"] = truth["amorphous"]
        tr["lattice_scale"] = truth["lattice_scale"]
        tr["zones"] = truth["boundaries"]
        tr["zones"].attrs["units"] = axis_units
        tr["zone_names"] = np.array(truth["zone_names"], dtype=h5py.string_dtype())
        nearest = np.abs(truth["coord"][None, :] - truth["boundaries"][:, None]).argmin(axis=1)
        tr["zone_points"] = nearest.astype(np.int64)
        tr["zone_points"].attrs["description"] = "index of the point nearest each boundary"
        tr[axis_name] = truth["coord"]
        tr.create_dataset("mask", data=mask.astype(np.uint8), chunks=(n1, n2), **compression)
        tr["hot_pixels"] = np.argwhere(hot).astype(np.int32)

    if poni_file:
        with atomic_output(path.with_suffix(".poni")) as tmp:
            tmp.write_text(_poni_text(poni))
        with atomic_output(path.with_suffix(".mask.npy")) as tmp, open(tmp, "wb") as fh:
            np.save(fh, mask)
        with atomic_output(path.with_suffix(".dark.npy")) as tmp, open(tmp, "wb") as fh:
            np.save(fh, dark)
    return path
