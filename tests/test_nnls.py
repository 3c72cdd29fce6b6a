"""xrdmap._nnls.nnls_rows against scipy.optimize.nnls, one right-hand side at a time."""

import numpy as np
import pytest
from scipy.optimize import nnls

from xrdmap._nnls import nnls_rows


def _scipy_rows(a, b):
    out = [nnls(a, row) for row in b]
    return np.array([c for c, _ in out]).reshape(len(b), a.shape[1]), np.array([r for _, r in out])


def _check(a, b):
    coef, rnorm = nnls_rows(a, b)
    ref, ref_rnorm = _scipy_rows(a, b)
    assert coef.shape == ref.shape and np.all(coef >= 0)
    np.testing.assert_allclose(coef, ref, rtol=1e-7, atol=1e-9 * max(1.0, np.abs(ref).max()))
    np.testing.assert_allclose(rnorm, ref_rnorm, rtol=1e-7, atol=1e-9 * np.linalg.norm(b, axis=1).max())


def test_zoned_mixtures_match_scipy(monkeypatch):
    # a scan across zones: each point mixes the references of its zone plus a background;
    # most points share an active set, the edge cases (absent phases at noise level) do not
    rng = np.random.default_rng(3)
    x = np.linspace(0, 1, 400)
    refs = np.array([np.exp(-0.5 * ((x - c) / 0.01) ** 2) for c in rng.uniform(0.05, 0.95, 40)]).reshape(8, 5, -1).sum(1)
    background = np.array([x**k * (1 - x) ** (3 - k) for k in range(4)])
    a = np.concatenate([refs, background]).T  # (400, 12)
    zone = np.repeat(np.arange(4), 60)
    present = np.array([[1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0],
                        [0, 0, 0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 1, 1, 1]], dtype=bool)[zone]
    amounts = rng.uniform(0.2, 1.0, present.shape) * present
    b = amounts @ refs + rng.uniform(0, 0.3, (len(zone), 4)) @ background + 0.01 * rng.normal(size=(len(zone), x.size))
    _check(a, b)
    # points sharing an active set were solved together: one scipy call per distinct
    # optimal set (noise makes some absent phases slightly positive: many sets here)
    import scipy.optimize

    sets = {tuple(nnls(a, row)[0] > 0) for row in b}
    calls = []
    monkeypatch.setattr(scipy.optimize, "nnls", lambda *args, **kw: calls.append(1) or nnls(*args, **kw))
    nnls_rows(a, b)
    assert len(sets) < len(b) // 2 and len(calls) <= len(sets)


@pytest.mark.parametrize("seed", range(6))
def test_random_problems_match_scipy(seed):
    # arbitrary signs: many distinct active sets, including all-zero solutions
    rng = np.random.default_rng(seed)
    m, n, p = 30, 7, 50
    a = rng.normal(size=(m, n))
    _check(a, rng.normal(size=(p, m)))


def test_square_system_and_columns_of_very_different_scales():
    # a square design is solved as it is (no QR reduction); columns are rescaled inside,
    # and the coefficients come back in the caller's units
    rng = np.random.default_rng(1)
    design = np.abs(rng.normal(size=(300, 9))) * np.logspace(-3, 3, 9)
    qmat, rmat = np.linalg.qr(design)
    b = np.abs(rng.normal(size=(40, 9))) @ design.T + 0.05 * rng.normal(size=(40, 300))
    _check(rmat, b @ qmat)
    _check(design, b)


def test_empty_and_mismatched_inputs():
    coef, rnorm = nnls_rows(np.ones((5, 2)), np.zeros((0, 5)))
    assert coef.shape == (0, 2) and rnorm.shape == (0,)
    with pytest.raises(ValueError, match="do not match"):
        nnls_rows(np.ones((5, 2)), np.ones((3, 4)))
