"""Non-negative least squares for many right-hand sides that share one design matrix.

Scan fits solve ``min ||A c - b_i||, c >= 0`` for every point ``i`` with the same ``A``
(the references and a background basis): hundreds of small problems whose solutions
mostly share a few active sets (the phases present in a zone). Solving them one by one
with :func:`scipy.optimize.nnls` costs a Python call and a fresh active-set search each.
:func:`nnls_rows` solves one point with scipy, then tries that point's set of positive
coefficients on every unsolved point at once (one linear solve for all of them) and
keeps the points where it satisfies the optimality (KKT) conditions: coefficients on
the set positive, and no coefficient off the set that could lower the residual. Those
are the NNLS solutions; the others go on to the next scipy solve. The result is scipy's
solution wherever the problem has a unique one.
"""

from __future__ import annotations

import numpy as np

__all__ = ["nnls_rows"]

#: Gradient entries off the active set up to this fraction of ``|a_j| |b_i|`` count as
#: zero (rounding); larger positive ones mean the set is not optimal for that row.
_KKT_RTOL = 1e-9


def nnls_rows(a: np.ndarray, b: np.ndarray, *, maxiter: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``min ||a @ c_i - b_i||`` with ``c_i >= 0`` for every row ``b_i`` of ``b``.

    The columns of ``a`` are scaled to unit norm (conditioning) and a tall ``a`` is
    reduced once by its QR factorisation (``||a c - b|| = ||R c - Q^T b||`` plus the part
    of ``b`` outside the span of ``a``), so each point's problem is n x n.

    Parameters
    ----------
    a : (m, n) design matrix, shared by all rows.
    b : (p, m) right-hand sides (finite).
    maxiter : passed to :func:`scipy.optimize.nnls` (default ``3 n``).

    Returns
    -------
    coef : (p, n) non-negative coefficients.
    rnorm : (p,) residual norms ``||a @ c_i - b_i||``.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"nnls_rows: design {a.shape} and right-hand sides {b.shape} do not match")
    if b.shape[0] == 0 or a.shape[1] == 0:
        return np.zeros((b.shape[0], a.shape[1])), np.linalg.norm(b, axis=1)
    norms = np.linalg.norm(a, axis=0)
    norms = np.where(norms > 0, norms, 1.0)
    a = a / norms
    outside = np.zeros(b.shape[0])
    if a.shape[0] > a.shape[1]:
        qmat, a = np.linalg.qr(a)
        reduced = b @ qmat
        outside = np.maximum(np.sum(b * b, axis=1) - np.sum(reduced * reduced, axis=1), 0.0)
        b = reduced
    coef = _solve_rows(a, b, maxiter)
    rnorm = np.sqrt(np.sum((b - coef @ a.T) ** 2, axis=1) + outside)
    return coef / norms, rnorm


def _solve_rows(a: np.ndarray, b: np.ndarray, maxiter: int | None) -> np.ndarray:
    """The coefficients of :func:`nnls_rows` for a design with unit columns."""
    from scipy.optimize import nnls

    p, n = b.shape[0], a.shape[1]
    coef = np.zeros((p, n))
    gram = a.T @ a
    h = b @ a  # (p, n): a^T b_i
    tol = _KKT_RTOL * np.linalg.norm(b, axis=1)[:, None]
    todo = np.ones(p, dtype=bool)
    tried: set[bytes] = set()
    while True:
        left = np.flatnonzero(todo)
        if left.size == 0:
            break
        i = left[0]
        coef[i], _ = nnls(a, b[i], maxiter=maxiter)
        todo[i] = False
        active = coef[i] > 0
        key = active.tobytes()
        rows = left[1:]
        if key in tried or rows.size == 0:
            continue
        tried.add(key)
        trial = np.zeros((rows.size, n))
        if active.any():  # least squares on the set's columns (orthogonal factorisation)
            trial[:, active] = np.linalg.lstsq(a[:, active], b[rows].T, rcond=None)[0].T
        grad = h[rows] - trial @ gram  # a^T (b - a c): positive where adding c_j would help
        ok = np.all(trial[:, active] > 0, axis=1) & np.all(grad[:, ~active] <= tol[rows], axis=1)
        coef[rows[ok]] = trial[ok]
        todo[rows[ok]] = False
    return coef
