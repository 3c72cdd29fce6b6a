"""Detector geometry: PONI files, detector definitions and Q <-> 2theta conversion.

Geometry is kept apart from how frames are reduced (see :mod:`xrdmap.integrate`): a
geometry is described by a small, picklable PONI dictionary, and integrators are built
from it where they are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pyFAI.detectors import Detector

from xrdmap.errors import InputError

__all__ = [
    "PerkinElmerXRD4343CT",
    "read_poni",
    "write_poni",
    "make_integrator",
    "q_from_twotheta",
    "twotheta_from_q",
    "wavelength_from_energy",
]

HC_KEV_A = 12.398419843320026  # h c in keV * A


class PerkinElmerXRD4343CT(Detector):
    """PerkinElmer XRD 4343 CT amorphous-Si flat panel: 2880 x 2880 pixels of 150 um.

    pyFAI ships no class for it; this one registers under the names
    ``"PerkinElmer XRD 4343 CT"`` and ``"perkinelmer_xrd4343ct"``.
    """

    MANUFACTURER = "PerkinElmer"
    aliases = ["PerkinElmer XRD 4343 CT", "XRD 4343 CT", "perkinelmer_xrd4343ct", "xrd4343ct"]
    MAX_SHAPE = (2880, 2880)
    force_pixel = True

    def __init__(self, pixel1: float = 150e-6, pixel2: float = 150e-6, max_shape=None, orientation=0):
        super().__init__(pixel1=pixel1, pixel2=pixel2, max_shape=max_shape, orientation=orientation)


def read_poni(path: str | Path) -> dict[str, Any]:
    """Read a pyFAI PONI file into a plain, picklable dictionary.

    The dictionary is what pyFAI's ``Geometry.get_config()`` returns: ``dist``, ``poni1``,
    ``poni2`` (m), ``rot1..3`` (rad), ``wavelength`` (m), ``detector`` and
    ``detector_config``.
    """
    from pyFAI.io.ponifile import PoniFile

    p = Path(path)
    if not p.is_file():
        raise InputError(f"PONI file {str(p)!r} does not exist (expected a pyFAI .poni geometry file)")
    try:
        poni = PoniFile(str(p))
        cfg = poni.as_dict()
    except Exception as exc:  # pyFAI raises assorted errors on garbled files
        raise InputError(f"PONI file {str(p)!r} could not be read as pyFAI geometry: {exc}") from None
    if not cfg.get("wavelength"):
        raise InputError(f"PONI file {str(p)!r} has no wavelength (expected a 'Wavelength:' line in metres)")
    if cfg.get("dist") is None or cfg["dist"] <= 0:
        raise InputError(f"PONI file {str(p)!r}: distance must be positive")
    return dict(cfg)


def write_poni(geometry: Mapping[str, Any] | Any, path: str | Path) -> Path:
    """Write a geometry (PONI dict or pyFAI geometry object) to a PONI file atomically."""
    from pyFAI.geometry import Geometry

    from xrdmap.results import atomic_output

    geo = geometry if hasattr(geometry, "save") else Geometry(**_geometry_kwargs(geometry))
    p = Path(path)
    with atomic_output(p) as tmp:
        tmp.unlink(missing_ok=True)
        geo.save(str(tmp))
    return p


def _geometry_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    import pyFAI.detectors

    det = pyFAI.detectors.detector_factory(cfg["detector"], cfg.get("detector_config") or None)
    keys = ("dist", "poni1", "poni2", "rot1", "rot2", "rot3", "wavelength")
    return {"detector": det, **{k: cfg[k] for k in keys if k in cfg}}


def make_integrator(poni: Mapping[str, Any] | str | Path):
    """A fresh pyFAI ``AzimuthalIntegrator`` from a PONI dict or file."""
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    cfg = read_poni(poni) if isinstance(poni, (str, Path)) else poni
    return AzimuthalIntegrator(**_geometry_kwargs(cfg))


def wavelength_from_energy(energy_keV: float) -> float:
    """Wavelength in A of photons of ``energy_keV``."""
    if energy_keV <= 0:
        raise InputError(f"energy {energy_keV} keV: expected a positive photon energy")
    return HC_KEV_A / energy_keV


def q_from_twotheta(twotheta_deg, wavelength_A: float):
    """Q (A^-1) from scattering angle 2theta (degrees): Q = 4 pi sin(theta) / lambda."""
    if wavelength_A <= 0:
        raise InputError(f"wavelength {wavelength_A} A: expected a positive wavelength")
    return 4.0 * np.pi * np.sin(np.deg2rad(np.asarray(twotheta_deg, dtype=float)) / 2.0) / wavelength_A


def twotheta_from_q(q_A, wavelength_A: float):
    """2theta (degrees) from Q (A^-1); NaN where Q is beyond 4 pi / lambda."""
    if wavelength_A <= 0:
        raise InputError(f"wavelength {wavelength_A} A: expected a positive wavelength")
    s = np.asarray(q_A, dtype=float) * wavelength_A / (4.0 * np.pi)
    with np.errstate(invalid="ignore"):
        return np.rad2deg(2.0 * np.arcsin(np.where(np.abs(s) <= 1, s, np.nan)))
