"""S(Q), F(Q) and G(r) by PDFgetX3's ad hoc method, vectorised over scan points.

The method (Juhás, Davis, Farrow & Billinge, J. Appl. Cryst. 46 (2013) 560-566) treats
the measured, background-subtracted intensity as ``I(Q) = a I_c(Q) + b(Q)`` with smooth
``a`` and ``b`` and removes everything slowly varying with a polynomial in F(Q):

1. ``I = I_sample - bgscale * I_background`` (:func:`xrdmap.background.subtract_background`).
2. ``F_raw(Q) = Q [I(Q) / (c <f>^2) - <f^2>/<f>^2]`` with the per-atom form factor moments
   of the composition (:func:`xrdmap.composition.form_factor_moments`) and the scale ``c``
   of each pattern fixed as below.
3. A polynomial without constant term (F(0) = 0) is fitted to ``F_raw`` over
   ``[0, qmaxinst]`` and subtracted. Its degree ``n = rpoly * qmaxinst / pi`` is in general
   not an integer: the correction interpolates linearly between the least-squares fits of
   degrees ``floor(n)`` and ``floor(n) + 1``, so that the result varies smoothly with
   ``rpoly``.
4. ``S(Q) = 1 + F(Q) / Q``; ``F(Q)`` is set to zero outside ``[qmin, qmax]`` (optionally
   multiplied by the Lorch function) and sine-transformed,
   ``G(r) = (2/pi) * integral F(Q) sin(Q r) dQ`` (trapezoid rule on the data grid).

Every step is linear in the intensity except the scale ``c``: all points are processed at
once (one batched least-squares solve for the polynomials, one matrix product per block
of r for the sine transform).

Normalisation (Juhas et al. 2013, section 1, around equation 4): since ``S - 1 = I/<f>^2 -
<f^2>/<f>^2`` oscillates about zero, PDFgetX3 rescales the raw intensity by least squares so
that ``I/<f>^2`` follows ``<f^2>/<f>^2``. xrdmap takes ``1/c`` minimising
``int (x/c - y)^2 dQ`` over ``qmin <= Q <= qmaxinst`` (the range PDFgetX3 keeps before this
step: manual 2.2.1, chapter 4, transformation list), uniform in Q, with ``x = I/<f>^2`` and
``y = <f^2>/<f>^2``: ``c = int x^2 dQ / int x y dQ``. For constant ``y`` (neutrons) this is the PDF scale
``<I>/(<I>^2 + std(I)^2)`` of Juhas et al., J. Appl. Cryst. 51 (2018) 1492, equation 6. It
reproduces PDFgetX3 2.0's G(r) of six of its examples (Ni, CeO2, Pt, Si0.95Ni0.05, BaTiO3,
menthol) to Rw <= 0.007 and their amplitudes to 0.2 %, with no free or calibrated factor.
``c`` scales with the intensity units, G(r) does not.

What the scale means. For purely coherent data ``I = a [<f^2> + <f>^2 d]``, ``d = S - 1``,
the fit gives ``c = a (1 + (int y d + int d^2) / (int y^2 + int y d))``: the power of the
structural oscillations enters, so G(r) comes out too small by that factor, which grows
with the sharpness of the peaks (simulated spherical Ni crystallites, Q to 25.5 A^-1: 1.01
at 6 A diameter, 1.06 at 10 A, 1.13 at 15 A, 1.46 at 40 A, 1.87 at 80 A). Compton and other additive
scattering, taken for self scattering, make ``c`` larger still: on PDFgetX3's Ni example
G(r) (PDFgetX3's and xrdmap's) is about 3 times below that of fcc Ni. G(r) is therefore
proportional to the absolute G(r) by a sample-dependent factor, as in PDFgetX3: peak
positions, widths and relative areas hold, absolute coordination numbers and the
``-4 pi rho0 r`` baseline do not (the polynomial removes that baseline below ``rpoly``
anyway), and points of a scan that differ in crystallinity get different factors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import xarray as xr

from xrdmap.composition import form_factor_moments, parse_composition
from xrdmap.errors import ConfigError, InputError

__all__ = [
    "transform",
    "sine_matrix",
    "polynomial_degree",
    "iq_from_twotheta",
    "low_r_ripple",
    "coherence_length",
    "read_pdfgetx3_cfg",
]

_R_BLOCK_BYTES = 64 * 2**20  # sine-matrix block size: keeps peak memory small


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def polynomial_degree(rpoly: float, qmaxinst: float) -> float:
    """Degree ``rpoly * qmaxinst / pi`` of the F(Q) correction polynomial (not rounded)."""
    if not rpoly > 0:
        raise ConfigError(f"rpoly {rpoly}: expected a positive r limit in A (PDFgetX3 default 0.9)")
    return rpoly * qmaxinst / math.pi


def _check_r_grid(rmin: float, rmax: float, rstep: float) -> np.ndarray:
    if not rstep > 0:
        raise ConfigError(f"rstep {rstep}: expected a positive r step in A, e.g. 0.01")
    if rmin < 0:
        raise ConfigError(f"rmin {rmin}: expected rmin >= 0 A")
    if not rmax > rmin:
        raise ConfigError(f"rmax {rmax} <= rmin {rmin}: expected rmax > rmin (A)")
    n = int(math.floor((rmax - rmin) / rstep + 1e-9)) + 1
    return rmin + rstep * np.arange(n)


def _check_q_params(q: np.ndarray, qmin: float, qmax: float, qmaxinst: float | None) -> float:
    qlo, qhi = float(np.nanmin(q)), float(np.nanmax(q))
    if qmin < 0:
        raise ConfigError(f"qmin {qmin}: expected qmin >= 0 A^-1")
    if not qmax > qmin:
        raise ConfigError(f"qmax {qmax} <= qmin {qmin}: expected qmin < qmax (A^-1)")
    if qmax > qhi + 1e-9:
        raise InputError(f"qmax {qmax} A^-1 is beyond the data, which end at Q = {qhi:.4g} A^-1")
    if qmax <= qlo:
        raise InputError(f"qmax {qmax} A^-1 is below the data, which start at Q = {qlo:.4g} A^-1")
    if qmaxinst is None:
        qmaxinst = qmax
    if qmaxinst < qmax:
        raise ConfigError(
            f"qmaxinst {qmaxinst} < qmax {qmax}: qmaxinst is the upper bound for qmax"
        )
    if qmaxinst > qhi + 1e-9:
        raise InputError(
            f"qmaxinst {qmaxinst} A^-1 is beyond the data, which end at Q = {qhi:.4g} A^-1"
        )
    return float(qmaxinst)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def _trapezoid_weights(q: np.ndarray) -> np.ndarray:
    w = np.zeros_like(q)
    if q.size > 1:
        d = np.diff(q)
        w[1:] += d / 2
        w[:-1] += d / 2
    return w


def sine_matrix(
    r: np.ndarray, q: np.ndarray, *, qmin: float = 0.0, qmax: float | None = None
) -> np.ndarray:
    """``(r, q)`` matrix ``M`` so that ``G = M @ F`` is ``(2/pi) int_qmin^qmax F sin(Qr) dQ``.

    Trapezoid weights over the grid points inside ``[qmin, qmax]``; columns outside are 0.
    """
    q = np.asarray(q, dtype=float)
    qmax = float(q.max()) if qmax is None else qmax
    inside = (q >= qmin) & (q <= qmax)
    w = np.zeros_like(q)
    w[inside] = _trapezoid_weights(q[inside])
    return (2.0 / math.pi) * np.sin(np.outer(np.asarray(r, dtype=float), q)) * w


def _sine_transform(
    fq: np.ndarray, r: np.ndarray, q: np.ndarray, qmin: float, qmax: float, squared: np.ndarray | None = None,
):
    """``fq`` (P, nq) -> (P, nr), one matrix product per block of r.

    ``squared``: also transform this (P, nq) array with the squared kernel (variance
    propagation), reusing the sines; a pair of arrays is then returned.
    """
    inside = (q >= qmin) & (q <= qmax)
    qi = q[inside]
    fi = fq[:, inside]
    out = np.empty((fq.shape[0], r.size))
    out2 = np.empty((squared.shape[0], r.size)) if squared is not None else None
    block = max(1, int(_R_BLOCK_BYTES // (8 * max(qi.size, 1))))
    w = (2.0 / math.pi) * _trapezoid_weights(qi)
    for start in range(0, r.size, block):
        m = np.sin(np.outer(r[start : start + block], qi)) * w
        out[:, start : start + block] = fi @ m.T
        if out2 is not None:
            out2[:, start : start + block] = squared[:, inside] @ (m * m).T
    return out if out2 is None else (out, out2)


def _poly_basis(x: np.ndarray, degree: int) -> np.ndarray:
    """``x * T_k(2x - 1)``, k = 0..degree-1: spans x, x^2, ..., x^degree, well conditioned."""
    return x[:, None] * np.polynomial.chebyshev.chebvander(2.0 * x - 1.0, degree - 1)


def _poly_correction(
    fq: np.ndarray, valid: np.ndarray, q: np.ndarray, qmaxinst: float, degree: float
) -> np.ndarray:
    """Smooth correction of ``fq`` (P, nq): interpolated LSQ fits of degrees floor/ceil.

    The polynomials have no constant term (F(0) = 0); each point is fitted over its
    finite values with Q <= qmaxinst. Points sharing a mask (usually all of them) are
    solved together in one least-squares call.
    """
    lo = int(math.floor(degree))
    frac = degree - lo
    x = q / qmaxinst
    fit = valid & (q <= qmaxinst)[None, :]
    if (fit == fit[:1]).all():  # one mask for every point (usual): no row sort needed
        masks, groups = fit[:1], np.zeros(len(fit), dtype=np.intp)
    else:
        masks, groups = np.unique(fit, axis=0, return_inverse=True)
        groups = np.asarray(groups).ravel()
    out = np.zeros_like(fq)
    for deg, weight in ((lo, 1.0 - frac), (lo + 1, frac)):
        if deg < 1 or weight == 0.0:
            continue
        basis = _poly_basis(x, deg)  # (nq, deg)
        for g, m in enumerate(masks):
            rows = groups == g
            if m.sum() <= deg:
                raise InputError(
                    f"only {int(m.sum())} valid points below qmaxinst; too few for the correction polynomial"
                )
            coef, *_ = np.linalg.lstsq(basis[m], fq[rows][:, m].T, rcond=None)  # (deg, p)
            out[rows] += weight * (basis @ coef).T
    return out


def _scale(
    iq: np.ndarray,
    valid: np.ndarray,
    q: np.ndarray,
    f2: np.ndarray,
    fm2: np.ndarray,
    qmin: float,
    qmaxinst: float,
) -> np.ndarray:
    """Per-point S(Q) scale ``c``: least squares of ``I/(c <f>^2)`` onto ``<f^2>/<f>^2``.

    With ``x = I/<f>^2`` and ``y = <f^2>/<f>^2`` on ``qmin <= Q <= qmaxinst``, ``1/c``
    minimises ``int (x/c - y)^2 dQ`` (trapezoid weights, i.e. uniform in Q), so
    ``c = int x^2 dQ / int x y dQ``. See the module docstring for the source and meaning.
    """
    inside = ((q >= qmin) & (q <= qmaxinst))[None, :] & valid
    w = _trapezoid_weights(q)
    x = np.where(inside, iq / fm2, 0.0)
    num = (x * x) @ w
    den = x @ (w * f2 / fm2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def iq_from_twotheta(
    iq: xr.DataArray, wavelength_A: float, *, twothetazero_deg: float = 0.0, dim: str = "twotheta"
) -> xr.DataArray:
    """Re-label a pattern on a 2theta grid (degrees) with Q (A^-1), dimension ``q``.

    ``Q = 4 pi sin((2theta - twothetazero) / 2) / lambda`` (:func:`xrdmap.geometry.q_from_twotheta`).
    Intensities are not resampled.
    """
    from xrdmap.geometry import q_from_twotheta

    if dim not in iq.dims:
        raise InputError(f"pattern has dims {iq.dims}; expected a {dim!r} dimension in degrees")
    q = q_from_twotheta(np.asarray(iq[dim].values, dtype=float) - twothetazero_deg, wavelength_A)
    out = iq.rename({dim: "q"}).assign_coords(q=q)
    out["q"].attrs.update(units="1/angstrom", long_name="Q")
    return out


def transform(
    iq: xr.DataArray,
    *,
    composition: str | Mapping[str, float],
    qmin: float,
    qmax: float,
    qmaxinst: float | None = None,
    rpoly: float = 0.9,
    rmin: float = 0.0,
    rmax: float = 30.0,
    rstep: float = 0.01,
    lorch: bool = False,
    background: xr.DataArray | None = None,
    bgscale: float | str = 1.0,
    iq_sigma: xr.DataArray | None = None,
    background_sigma: xr.DataArray | None = None,
    q_dim: str = "q",
) -> xr.Dataset:
    """S(Q), F(Q) and G(r) of every pattern by PDFgetX3's ad hoc method.

    Parameters
    ----------
    iq
        Intensities with dimension ``q_dim`` (coordinate Q in A^-1) and any others (e.g.
        ``point``); a single pattern works too. NaN marks missing values.
    composition
        Chemical formula or mixture by weight (:func:`xrdmap.composition.parse_composition`).
    qmin, qmax
        Q range (A^-1) of the Fourier transform; F(Q) is zero outside it.
    qmaxinst
        Upper end (A^-1) of the polynomial fit, ``>= qmax``; default ``qmax``.
    rpoly
        r limit (A) of the correction polynomial: degree ``rpoly * qmaxinst / pi``.
    rmin, rmax, rstep
        r grid (A) of G(r).
    lorch
        Multiply F(Q) by the Lorch function ``sin(pi Q/qmax) / (pi Q/qmax)`` before the
        transform (S(Q) and F(Q) are returned unmodified).
    background, bgscale, background_sigma
        Container/air background (on its own Q grid) and its scale, or ``"auto"``; see
        :func:`xrdmap.background.subtract_background`.
    iq_sigma
        Standard deviations of ``iq``; propagated linearly to ``*_sigma`` (the fitted
        polynomial and the scale are treated as exact).
    q_dim
        Name of the Q dimension of ``iq``.

    Returns
    -------
    xarray.Dataset
        ``sq``, ``fq`` (..., q) (F in A^-1), ``gr`` (..., r) (G in A^-2), ``sq_sigma``,
        ``fq_sigma``, ``gr_sigma`` when ``iq_sigma`` is given, and ``pdf_scale`` (...):
        the normalisation ``c`` of each pattern. Attributes record every parameter.
    """
    if not isinstance(iq, xr.DataArray):
        raise InputError(
            f"iq: expected an xarray.DataArray with a {q_dim!r} dimension, got {type(iq).__name__}"
        )
    if q_dim not in iq.dims:
        raise InputError(f"iq has dims {iq.dims}; expected a {q_dim!r} dimension (Q in A^-1)")
    comp = parse_composition(composition)
    degree = polynomial_degree(rpoly, 1.0)  # validates rpoly before any work
    r = _check_r_grid(rmin, rmax, rstep)
    if background is not None:
        from xrdmap.background import subtract_background

        sub = subtract_background(
            iq,
            background,
            scale=bgscale,
            iq_sigma=iq_sigma,
            background_sigma=background_sigma,
            q_dim=q_dim,
        )
        iq = sub["iq"]
        iq_sigma = sub.get("iq_sigma")
    iq = iq.transpose(..., q_dim)
    if iq[q_dim].size < 2:
        raise InputError(f"iq has {iq[q_dim].size} Q values; expected a pattern of many points")
    q = np.asarray(iq[q_dim].values, dtype=float)
    if np.any(np.diff(q) <= 0):
        order = np.argsort(q)
        iq = iq.isel({q_dim: order})
        iq_sigma = None if iq_sigma is None else iq_sigma.transpose(..., q_dim).isel({q_dim: order})
        q = q[order]
        if np.any(np.diff(q) <= 0):
            raise InputError("iq: Q values repeat; expected a strictly increasing Q grid")
    qmaxinst = _check_q_params(q, qmin, qmax, qmaxinst)
    degree = polynomial_degree(rpoly, qmaxinst)
    lead_dims = iq.dims[:-1]
    lead_shape = iq.shape[:-1]
    data = np.asarray(iq.values, dtype=float).reshape(-1, q.size)
    valid = np.isfinite(data)
    data = np.where(valid, data, 0.0)

    f2, fm2 = form_factor_moments(comp, q)
    c = _scale(data, valid, q, f2, fm2, qmin, qmaxinst)
    bad = ~(np.isfinite(c) & (c > 0))
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        where = f" (pattern {first} of {data.shape[0]})" if data.shape[0] > 1 else ""
        raise InputError(
            f"background-subtracted intensity{where} has no positive scattering over Q = {max(qmin, q[0]):.3g}-{qmaxinst} A^-1; "
            "expected sample scattering above the background (is the background the sample itself, or bgscale too large?)"
        )
    c = c[:, None]
    fraw = q * (data / (c * fm2) - f2 / fm2)
    fq = fraw - _poly_correction(fraw, valid, q, qmaxinst, degree)
    # the polynomial is not defined beyond its fit range
    valid = valid & (q <= qmaxinst)[None, :]
    fq = np.where(valid, fq, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = np.where(q > 0, 1.0 + fq / q, np.nan)
    window = np.ones_like(q)
    if lorch:
        x = math.pi * q / qmax
        window = np.where(x > 0, np.sin(x) / np.where(x > 0, x, 1.0), 1.0)
    fq_t = np.where(valid, fq * window, 0.0)
    var_g = None
    if iq_sigma is not None:
        sig = np.asarray(
            iq_sigma.transpose(..., q_dim).broadcast_like(iq).values, dtype=float
        ).reshape(-1, q.size)
        sig = np.where(np.isfinite(sig), sig, 0.0)
        fq_sig = np.abs(q / (c * fm2)) * sig
        # G's variance: the squared kernel on F's variance (same sines as G itself)
        gr, var_g = _sine_transform(fq_t, r, q, qmin, qmax, squared=np.where(valid, (fq_sig * window) ** 2, 0.0))
    else:
        gr = _sine_transform(fq_t, r, q, qmin, qmax)

    coords_q = {k: v for k, v in iq.coords.items() if q_dim not in v.dims or k == q_dim}
    point_coords = {k: v for k, v in iq.coords.items() if q_dim not in v.dims and k != q_dim}
    qdims = (*lead_dims, q_dim)
    rdims = (*lead_dims, "r")
    ds = xr.Dataset(
        {
            "sq": (qdims, sq.reshape(*lead_shape, q.size)),
            "fq": (qdims, fq.reshape(*lead_shape, q.size)),
            "gr": (rdims, gr.reshape(*lead_shape, r.size)),
            "pdf_scale": (lead_dims, c[:, 0].reshape(lead_shape)),
        },
        coords={**coords_q, **point_coords, "r": ("r", r)},
    )
    if var_g is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            sq_sig = np.where(q > 0, fq_sig / q, np.nan)
        ds["fq_sigma"] = (qdims, np.where(valid, fq_sig, np.nan).reshape(*lead_shape, q.size))
        ds["sq_sigma"] = (qdims, np.where(valid, sq_sig, np.nan).reshape(*lead_shape, q.size))
        ds["gr_sigma"] = (rdims, np.sqrt(var_g).reshape(*lead_shape, r.size))
    ds["sq"].attrs.update(long_name="S(Q)", units="1")
    ds["fq"].attrs.update(long_name="F(Q) = Q[S(Q)-1]", units="1/angstrom")
    ds["gr"].attrs.update(long_name="G(r)", units="1/angstrom^2")
    ds["r"].attrs.update(long_name="r", units="angstrom")
    ds["pdf_scale"].attrs.update(long_name="S(Q) normalisation c (intensity per <f^2>)")
    ds.attrs.update(
        pdf_method="PDFgetX3 ad hoc (Juhas et al. 2013), xrdmap implementation",
        composition=composition if isinstance(composition, str) else repr(dict(composition)),
        qmin=float(qmin),
        qmax=float(qmax),
        qmaxinst=float(qmaxinst),
        rpoly=float(rpoly),
        polynomial_degree=float(degree),
        rmin=float(rmin),
        rmax=float(r[-1]),
        rstep=float(rstep),
        lorch=int(bool(lorch)),
        bgscale=bgscale if isinstance(bgscale, str) else float(bgscale),
    )
    return ds


# --------------------------------------------------------------------------------------
# Per-point quality metrics
# --------------------------------------------------------------------------------------


def _gr_values(gr: xr.DataArray) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
    if not isinstance(gr, xr.DataArray) or "r" not in gr.dims:
        raise InputError("gr: expected an xarray.DataArray with an 'r' dimension (A)")
    gr = gr.transpose(..., "r")
    return (
        np.asarray(gr["r"].values, dtype=float),
        np.asarray(gr.values, dtype=float),
        gr.dims[:-1],
        gr.shape[:-1],
    )


def low_r_ripple(
    gr: xr.DataArray, r_max: float | None = None, *, r_min: float = 0.0
) -> xr.DataArray:
    """RMS of G(r) (A^-2) over ``r_min < r < r_max``, below the first interatomic distance.

    No pair of atoms is closer than about 1.2 A (``r_max`` default), so any signal there
    is termination ripple, noise or an imperfect correction; small is good.
    """
    r, g, dims, shape = _gr_values(gr)
    r_max = 1.2 if r_max is None else r_max
    sel = (r > r_min) & (r < r_max)
    if not np.any(sel):
        raise InputError(
            f"gr has no r values in ({r_min}, {r_max}) A; expected r grid to start below {r_max} A"
        )
    rms = np.sqrt(np.nanmean(g[..., sel] ** 2, axis=-1))
    return xr.DataArray(
        rms.reshape(shape),
        dims=dims,
        coords={k: v for k, v in gr.coords.items() if "r" not in v.dims},
        name="low_r_ripple",
        attrs={"units": "1/angstrom^2", "r_max": r_max},
    )


def coherence_length(
    gr: xr.DataArray, threshold: float = 0.05, *, r_min: float = 1.0
) -> xr.DataArray:
    """Distance (A) beyond which the G(r) envelope stays below ``threshold`` of its maximum.

    The envelope at r is the largest ``|G|`` at any distance ``>= r`` (a running maximum
    from the far end), considered for ``r >= r_min`` to skip termination ripple near 0. The
    result is the last r where ``|G(r)| >= threshold * max|G|``: for a damped oscillation
    ``A exp(-r/xi) sin(k r)`` it is ``xi ln(1/threshold)`` to within half a period. It is
    ``rmax`` of the grid when correlations persist to the end.
    """
    if not 0 < threshold < 1:
        raise ConfigError(
            f"coherence_length threshold {threshold}: expected a fraction between 0 and 1"
        )
    r, g, dims, shape = _gr_values(gr)
    sel = r >= r_min
    if not np.any(sel):
        raise InputError(f"gr has no r values >= {r_min} A")
    a = np.abs(np.nan_to_num(g[..., sel].reshape(-1, int(sel.sum()))))
    rs = r[sel]
    peak = a.max(axis=1, keepdims=True)
    above = a >= threshold * peak
    last = above.shape[1] - 1 - np.argmax(above[:, ::-1], axis=1)
    out = np.where(peak[:, 0] > 0, rs[last], np.nan)
    return xr.DataArray(
        out.reshape(shape),
        dims=dims,
        coords={k: v for k, v in gr.coords.items() if "r" not in v.dims},
        name="coherence_length",
        attrs={"units": "angstrom", "threshold": threshold},
    )


# --------------------------------------------------------------------------------------
# PDFgetX3 configuration files
# --------------------------------------------------------------------------------------

_CFG_FLOATS = (
    "wavelength",
    "twothetazero",
    "bgscale",
    "rpoly",
    "qmaxinst",
    "qmin",
    "qmax",
    "rmin",
    "rmax",
    "rstep",
)
_CFG_STRINGS = ("dataformat", "composition", "backgroundfile", "outputtype", "outputtypes")
_CFG_IGNORED = (
    "version",
    "inputfile",
    "mode",
    "datapath",
    "output",
    "force",
    "plot",
    "interact",
    "verbose",
    "formfactorfile",
    "pdf_scale",
    "config",
    "section",
    "saveplot",
    "sasmode",
    "smear",
)
_CFG_DEFAULTS = {
    "dataformat": "QA",
    "wavelength": None,
    "twothetazero": 0.0,
    "composition": None,
    "backgroundfile": None,
    "bgscale": 1.0,
    "rpoly": 0.9,
    "qmaxinst": None,
    "qmin": 0.0,
    "qmax": None,
    "rmin": 0.0,
    "rmax": 30.0,
    "rstep": 0.01,
    "outputtype": ["gr"],
    "lorch": False,
}
DATAFORMATS = ("twotheta", "QA", "Qnm")


def read_pdfgetx3_cfg(path, section: str = "DEFAULT") -> dict:
    """Read a PDFgetX3 configuration (``pdfgetx3.cfg`` or the header of its ``.gr`` output).

    Returns a dict with keys ``dataformat`` (``"twotheta"``, ``"QA"`` or ``"Qnm"``),
    ``wavelength`` (A), ``twothetazero`` (deg), ``composition``, ``backgroundfile``,
    ``bgscale``, ``rpoly`` (A), ``qmaxinst``, ``qmin``, ``qmax`` (A^-1), ``rmin``,
    ``rmax``, ``rstep`` (A) and ``outputtype`` (list of ``iq``/``sq``/``fq``/``gr``);
    PDFgetX3's defaults fill what the file does not set (``None`` where PDFgetX3 has
    none). Keys PDFgetX3 uses only for its own operation are ignored; unknown keys warn.
    """
    import configparser
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"PDFgetX3 configuration {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    for marker in ("# End of config", "#### start data"):
        if marker in text:
            text = text.split(marker, 1)[0]
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(text, source=str(p))
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            f"PDFgetX3 configuration {str(p)!r} line {exc.lineno}: expected a [DEFAULT] section header "
            f"before {exc.line.strip()!r}"
        ) from None
    except configparser.ParsingError as exc:
        lineno, line = exc.errors[0] if exc.errors else (None, "")
        raise ConfigError(
            f"PDFgetX3 configuration {str(p)!r} line {lineno}: {line.strip()!r} is not 'key = value'"
        ) from None
    except configparser.Error as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"PDFgetX3 configuration {str(p)!r} is not INI text with a [DEFAULT] section: {first}"
        ) from None
    if section != "DEFAULT" and not parser.has_section(section):
        raise ConfigError(f"PDFgetX3 configuration {str(p)!r} has no [{section}] section")
    items = dict(parser.defaults()) if section == "DEFAULT" else dict(parser.items(section))
    out = dict(_CFG_DEFAULTS)
    for key, raw in items.items():
        value = raw.strip()
        if key in _CFG_FLOATS:
            if value.lower() in ("", "none"):
                out[key] = None
                continue
            try:
                out[key] = float(value)
            except ValueError:
                raise ConfigError(f"{p.name}: {key} = {value!r}; expected a number") from None
        elif key in _CFG_STRINGS:
            if key.startswith("outputtype"):
                kinds = [t.strip() for t in value.replace(",", " ").split() if t.strip()]
                kinds = [] if kinds in (["none"], ["NONE"]) else kinds
                unknown = [t for t in kinds if t not in ("iq", "sq", "fq", "gr")]
                if unknown:
                    raise ConfigError(
                        f"{p.name}: outputtype {value!r}; expected some of iq, sq, fq, gr"
                    )
                out["outputtype"] = kinds
            else:
                out[key] = value or None
        elif key == "lorch":
            if value.lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                raise ConfigError(f"{p.name}: lorch = {value!r}; expected true or false")
            out["lorch"] = value.lower() in ("true", "yes", "on", "1")
        elif key not in _CFG_IGNORED:
            warnings.warn(
                f"{p.name}: key {key!r} is not a PDFgetX3 parameter xrdmap uses; ignored",
                stacklevel=2,
            )
    if out["dataformat"] not in DATAFORMATS:
        raise ConfigError(
            f"{p.name}: dataformat = {out['dataformat']!r}; expected one of {', '.join(DATAFORMATS)}"
        )
    if out["wavelength"] is not None and not out["wavelength"] > 0:
        raise ConfigError(
            f"{p.name}: wavelength = {out['wavelength']}; expected a positive wavelength in A"
        )
    if out["dataformat"] == "twotheta" and out["wavelength"] is None:
        raise ConfigError(f"{p.name}: dataformat = twotheta needs a wavelength (A)")
    if out["composition"] is not None:
        try:
            parse_composition(out["composition"])
        except InputError as exc:
            raise ConfigError(f"{p.name}: {exc}") from None
    if out["rpoly"] is not None:
        polynomial_degree(out["rpoly"], 1.0)
    _check_r_grid(out["rmin"], out["rmax"], out["rstep"])
    return out
