"""Geometry helpers: Q <-> 2theta, wavelength, detectors, PONI round trip."""

from __future__ import annotations

import numpy as np
import pyFAI.detectors
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyFAI.integrator.azimuthal import AzimuthalIntegrator

from xrdmap.errors import InputError
from xrdmap.geometry import (
    make_integrator,
    q_from_twotheta,
    read_poni,
    twotheta_from_q,
    wavelength_from_energy,
    write_poni,
)


def test_i15_1_wavelength():
    # the published set-up: 76.69 keV <-> 0.161669 A
    assert wavelength_from_energy(76.69) == pytest.approx(0.161669, abs=2e-6)


def test_bragg_law_for_ceria_111():
    a = 5.411651  # NIST SRM 674b
    d111 = a / np.sqrt(3)
    lam = 0.161669
    tth = 2 * np.degrees(np.arcsin(lam / (2 * d111)))
    assert q_from_twotheta(tth, lam) == pytest.approx(2 * np.pi / d111, rel=1e-12)


@given(st.floats(0.01, 179.0), st.floats(0.05, 2.0))
def test_twotheta_q_round_trip(tth, lam):
    assert twotheta_from_q(q_from_twotheta(tth, lam), lam) == pytest.approx(tth, rel=1e-9)


def test_unreachable_q_is_nan_and_bad_wavelength_is_an_error():
    assert np.isnan(twotheta_from_q(100.0, 0.5))
    with pytest.raises(InputError, match="wavelength"):
        q_from_twotheta(10.0, -0.1)
    with pytest.raises(InputError, match="energy"):
        wavelength_from_energy(0)


def test_perkinelmer_detector_is_registered():
    det = pyFAI.detectors.detector_factory("PerkinElmer XRD 4343 CT")
    assert det.shape == (2880, 2880)
    assert det.pixel1 == det.pixel2 == pytest.approx(150e-6)


def test_poni_round_trip(tmp_path):
    ai = AzimuthalIntegrator(
        dist=0.35, poni1=0.2, poni2=0.21, rot1=0.01, wavelength=0.161669e-10,
        detector=pyFAI.detectors.detector_factory("perkinelmer_xrd4343ct"),
    )
    path = write_poni(ai, tmp_path / "g.poni")
    cfg = read_poni(path)
    assert cfg["dist"] == pytest.approx(0.35)
    assert cfg["poni2"] == pytest.approx(0.21)
    ai2 = make_integrator(cfg)
    assert ai2.detector.shape == (2880, 2880)
    np.testing.assert_allclose(ai2.wavelength, 0.161669e-10)


def test_bad_poni_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_poni(tmp_path / "none.poni")
    bad = tmp_path / "bad.poni"
    bad.write_text("Distance: 0.3\nDetector: Pilatus1M\n")
    with pytest.raises(InputError, match="bad.poni"):
        read_poni(bad)
