"""xrdmap.background: interpolation, scaled subtraction, variance propagation, auto scale."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from xrdmap.background import auto_scale, subtract_background
from xrdmap.errors import ConfigError, InputError

Q = np.linspace(0.5, 20.0, 400)


def _da(values, q=Q, dims=("q",), **coords):
    return xr.DataArray(values, dims=dims, coords={"q": q, **coords})


def test_linear_background_interpolated_exactly_and_subtracted():
    qb = np.linspace(0.0, 25.0, 57)  # a coarser, different grid
    bg = _da(3.0 + 0.5 * qb, q=qb)
    sample = _da(10.0 + np.sin(Q))
    out = subtract_background(sample, bg, scale=0.8)
    np.testing.assert_allclose(
        out["iq"].values, 10.0 + np.sin(Q) - 0.8 * (3.0 + 0.5 * Q), rtol=1e-12
    )
    assert float(out["bgscale"]) == 0.8


def test_variance_propagation():
    bg = _da(np.full(Q.size, 5.0))
    sample = _da(np.full(Q.size, 20.0))
    out = subtract_background(
        sample,
        bg,
        scale=2.0,
        iq_sigma=_da(np.full(Q.size, 3.0)),
        background_sigma=_da(np.full(Q.size, 2.0)),
    )
    np.testing.assert_allclose(out["iq_sigma"].values, np.sqrt(3.0**2 + (2.0 * 2.0) ** 2))
    np.testing.assert_allclose(out["iq"].values, 10.0)


def test_auto_scale_recovers_container_fraction_per_point():
    rng = np.random.default_rng(0)
    bg = _da(100.0 * np.exp(-(((Q - 1.5) / 0.4) ** 2)) + 10.0)
    signal = np.clip(np.sin(Q) * 50.0, 0.0, None)  # zero on half of the range
    true = np.array([0.7, 1.3])
    sample = xr.DataArray(
        true[:, None] * bg.values + signal + rng.uniform(0, 1e-6, (2, Q.size)),
        dims=("point", "q"),
        coords={"q": Q},
    )
    s = auto_scale(sample, bg)
    np.testing.assert_allclose(s.values, true, rtol=1e-6)
    out = subtract_background(sample, bg, scale="auto")
    assert float(out["iq"].min()) >= -1e-9
    window = auto_scale(sample, bg, q_window=(3.5, 6.0))  # sin(Q) <= 0 there: signal is zero
    np.testing.assert_allclose(window.values, true, rtol=1e-6)


def test_partial_coverage_warns_with_range_and_leaves_nan():
    bg = _da(np.ones(50), q=np.linspace(2.0, 15.0, 50))
    with pytest.warns(UserWarning, match=r"0\.5-2 and 15-20"):
        out = subtract_background(_da(np.ones(Q.size)), bg)
    inside = (Q >= 2.0) & (Q <= 15.0)
    assert np.all(np.isfinite(out["iq"].values[inside]))
    assert np.all(np.isnan(out["iq"].values[~inside]))


def test_full_coverage_does_not_warn():
    bg = _da(np.ones(10), q=np.linspace(0.0, 30.0, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        subtract_background(_da(np.ones(Q.size)), bg)


def test_disjoint_background_is_an_input_error():
    bg = _da(np.ones(10), q=np.linspace(25.0, 30.0, 10))
    with pytest.raises(InputError, match="none of the data range"):
        subtract_background(_da(np.ones(Q.size)), bg)


@pytest.mark.parametrize("scale", [-1.0, float("nan"), "half"])
def test_bad_scale(scale):
    with pytest.raises(ConfigError, match="scale"):
        subtract_background(_da(np.ones(Q.size)), _da(np.ones(Q.size)), scale=scale)


def test_background_without_q_dimension():
    with pytest.raises(InputError, match="'q' dimension"):
        subtract_background(_da(np.ones(Q.size)), xr.DataArray(np.ones(5), dims="x"))
