"""Name NMF components after reference phases, and fit per-point phase weight fractions.

Two questions, two functions:

- :func:`assign_components`: which reference phase (or non-negative mixture of two) does
  each NMF component look like? Every reference is simulated on the component's grid over
  a lattice stretch of +-3 % and a set of peak widths; the score is the Pearson
  correlation of component and reference after a smooth baseline is projected out of both
  (equivalently ``sqrt(1 - RSS/TSS)`` of the fit ``component ~ a * reference + baseline``
  with ``a >= 0``). A component whose best score stays below ``min_score``, or whose best
  match needs a stretch at the limit of the search, is reported as ``"unassigned"``: it
  is never forced onto the nearest name (alpha1-LiVOPO4, for example, has no open
  structure in the library). Components of Bragg parts (the diffuse baseline taken off)
  are compared with references treated the same way; given a whole-scan fit
  (``scan_fit``), look-alike references are told apart by that fit and mixtures are
  chosen among the phases it found.
- :func:`phase_fractions`: non-negative least squares of every pattern on the reference
  patterns plus a smooth background, turned into weight fractions. The references are
  per unit mass of phase (:meth:`xrdmap.phases.Phase.simulate_iq`), so the coefficients
  are already proportional to the mass of each phase.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr
from scipy.optimize import lsq_linear, minimize_scalar, nnls

from xrdmap._nnls import nnls_rows
from xrdmap.errors import ConfigError, InputError

__all__ = [
    "DEFAULT_WIDTHS",
    "select_phases",
    "UNASSIGNED",
    "assign_components",
    "phase_fractions",
    "scan_phase_fractions",
    "reference_pattern",
]

#: Name given to a component that matches no reference well enough.
UNASSIGNED = "unassigned"

#: Peak widths tried: FWHM in Q (A^-1) for ``dim="q"``; isotropic displacement U (A^2)
#: for ``dim="r"`` (it sets the G(r) peak widths).
DEFAULT_WIDTHS = {
    "q": (0.015, 0.03, 0.06, 0.12, 0.25, 0.5),
    "r": (0.002, 0.005, 0.01, 0.02),
}

#: Default x ranges scored (as the NMF ranges of the published study).
DEFAULT_RANGES = {"q": (1.0, 15.0), "r": (1.0, 20.0)}


# ------------------------------------------------------------------ helpers


def _phases_dict(phases) -> dict:
    if phases is None:
        from xrdmap.phases import load_library

        phases = load_library()
    if isinstance(phases, Mapping):
        out = {str(k): v for k, v in phases.items()}
    else:
        out = {p.name: p for p in phases}
    if not out:
        raise InputError("reference phases: expected at least one phase")
    return out


#: Widest FWHM (A^-1) simulated directly; broader peaks come from Gaussian smoothing of
#: this one (the simulation sums reflections to 30 FWHM beyond the grid, so a direct 0.5
#: A^-1 FWHM would need every reflection to Q ~ 30 A^-1).
_DIRECT_FWHM_Q = 0.06


_SIMULATED: OrderedDict = OrderedDict()
_SIMULATED_LOCK = threading.Lock()
_SIMULATED_MAX = 512  # patterns of ~2000 points: a few MB


def _simulate(phase, x: np.ndarray, dim: str, stretch: float, width: float, *, bragg_window: float | None = None,
              bragg_step: float | None = None, **gr_kwargs) -> np.ndarray:
    """A phase's reference on ``x`` (read-only array), remembered for repeated requests.

    The stretch and width searches ask for the same (phase, stretch, width) several
    times (a line search's best point, then the reference kept, then the mixture fit).
    ``bragg_window``: the reference's Bragg part (see :func:`_bragg_part`).
    """
    x = np.ascontiguousarray(x, dtype=float)
    key = (id(phase), dim, float(stretch), float(width), x.shape, hashlib.blake2b(x.tobytes()).digest(),
           bragg_window, bragg_step, tuple(sorted(gr_kwargs.items())))
    with _SIMULATED_LOCK:
        hit = _SIMULATED.get(key)
        if hit is not None and hit[0] is phase:
            _SIMULATED.move_to_end(key)
            return hit[1]
    out = _simulate_uncached(phase, x, dim, stretch, width, bragg_window, bragg_step, **gr_kwargs)
    out.setflags(write=False)
    with _SIMULATED_LOCK:
        _SIMULATED[key] = (phase, out)
        while len(_SIMULATED) > _SIMULATED_MAX:
            _SIMULATED.popitem(last=False)
    return out


def _simulate_uncached(phase, x: np.ndarray, dim: str, stretch: float, width: float, bragg_window: float | None,
                       bragg_step: float | None, **gr_kwargs) -> np.ndarray:
    if dim == "r":
        return np.asarray(phase.simulate_gr(x, stretch=stretch, u_iso=width, **gr_kwargs), dtype=float)
    if bragg_window:
        return _bragg_part(phase, x, stretch, width, bragg_window, bragg_step)
    if width <= _DIRECT_FWHM_Q:
        return np.asarray(phase.simulate_iq(x, stretch=stretch, fwhm_q=width), dtype=float)
    from scipy.ndimage import gaussian_filter1d

    sigma = np.sqrt(width**2 - _DIRECT_FWHM_Q**2) / (2 * np.sqrt(2 * np.log(2)))
    step = min(float(np.min(np.diff(np.sort(x)))), _DIRECT_FWHM_Q / 4)
    grid = np.arange(max(x.min() - 4 * width, 1e-3), x.max() + 4 * width + step, step)
    fine = np.asarray(phase.simulate_iq(grid, stretch=stretch, fwhm_q=_DIRECT_FWHM_Q), dtype=float)
    return np.interp(x, grid, gaussian_filter1d(fine, sigma / step, mode="nearest"))


def _bragg_part(phase, x: np.ndarray, stretch: float, width: float, window_A: float,
                step: float | None) -> np.ndarray:
    """The reference's intensity above its diffuse baseline, as the data's Bragg part.

    :func:`xrdmap.series.diffuse_baseline` (a morphological opening) is not linear: at
    coarse resolution it also takes off the continuum of overlapping peaks. So a
    component of Bragg parts is compared with the reference treated the same way, on
    the data's Q step and with a margin so that the ends are opened as the data were.
    """
    from xrdmap.series import bragg_values

    step = float(step) if step else float(np.min(np.diff(np.sort(x))))
    grid = np.arange(max(x.min() - 2 * window_A, 1e-3), x.max() + 2 * window_A + step, step)
    # the grid's own step (as series.bragg_part would take it from the coordinate)
    grid_step = float(np.median(np.diff(grid)))
    return np.interp(x, grid, bragg_values(_simulate(phase, grid, "q", stretch, width), grid_step, window_A))


def reference_pattern(phase, x, dim: str = "q", *, stretch: float = 1.0, width: float | None = None,
                      diffuse_window_A: float | None = None) -> np.ndarray:
    """A phase's reference on ``x`` as :func:`assign_components` compares it with a component.

    ``width``: FWHM (A^-1) in Q, ``U_iso`` (A^2) in r; None for the phase's defaults.
    ``diffuse_window_A`` (Q only): the Bragg part, for components of Bragg parts (the
    attribute ``nmf_q_diffuse_window_A`` of a decomposition).
    """
    _check_dim(dim)
    x = np.asarray(x, dtype=float)
    if width is None:
        if dim == "r":
            return np.asarray(phase.simulate_gr(x, stretch=stretch), dtype=float)
        from xrdmap.phases import DEFAULT_FWHM_Q

        width = DEFAULT_FWHM_Q
    kw = _bragg_kwargs(x, diffuse_window_A) if dim == "q" else {}
    return np.array(_simulate(phase, x, dim, float(stretch), float(width), **kw))


def _bragg_kwargs(x: np.ndarray, window_A: float | None) -> dict[str, float]:
    """:func:`_simulate` keywords for references of Bragg parts taken with ``window_A``
    on the grid ``x`` (none without a window)."""
    if not window_A:
        return {}
    return {"bragg_window": float(window_A), "bragg_step": float(np.median(np.diff(np.asarray(x, dtype=float))))}


def _baseline_basis(x: np.ndarray, n_terms: int) -> np.ndarray:
    """Legendre polynomials of degree < n_terms on x mapped to [-1, 1], shape (n_x, n_terms)."""
    if n_terms <= 0:
        return np.zeros((x.size, 0))
    t = 2 * (x - x.min()) / max(x.max() - x.min(), 1e-12) - 1
    return np.polynomial.legendre.legvander(t, n_terms - 1)


def _projector(basis: np.ndarray):
    """Function removing the span of ``basis`` columns from vectors (last axis)."""
    if basis.shape[1] == 0:
        return lambda v: v
    qmat, _ = np.linalg.qr(basis)

    def project(v: np.ndarray) -> np.ndarray:
        return v - (v @ qmat) @ qmat.T

    return project


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of the rows of ``a`` (n, x) with vector ``b`` (x,) (inputs already centred)."""
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (a @ b) / (na * nb)
    return np.nan_to_num(c, nan=-1.0)


def _check_dim(dim: str) -> None:
    if dim not in ("q", "r"):
        raise ConfigError(f"dim {dim!r}: expected 'q' (I(Q)) or 'r' (G(r))")


def _components_array(components, dim: str) -> xr.DataArray:
    if isinstance(components, xr.Dataset):
        name = f"nmf_{dim}_components"
        if name not in components:
            raise InputError(f"dataset has no {name!r}: expected NMF components (component, {dim})")
        components = components[name]
    if not isinstance(components, xr.DataArray):
        raise InputError("components: expected an xarray.DataArray (component, q|r)")
    if dim not in components.dims:
        raise InputError(f"components have dims {components.dims}: expected a {dim!r} dimension")
    if components.ndim == 1:
        components = components.expand_dims(component=[0])
    other = [d for d in components.dims if d != dim]
    if len(other) != 1:
        raise InputError(f"components have dims {components.dims}: expected (component, {dim})")
    return components.transpose(other[0], dim)


# ------------------------------------------------------------------ assignment


def _fit_mixture(target: np.ndarray, refs: np.ndarray, basis: np.ndarray) -> tuple[float, np.ndarray]:
    """Fit target ~ refs.T @ a + basis @ b with a >= 0; return (score, a)."""
    proj = _projector(basis)
    tc = proj(target)
    rc = proj(refs)
    norms = np.linalg.norm(rc, axis=1)
    norms = np.where(norms > 0, norms, 1.0)
    sol = lsq_linear((rc / norms[:, None]).T, tc, bounds=(0.0, np.inf))
    a = sol.x / norms
    tss = float(tc @ tc)
    rss = float(np.sum((tc - a @ rc) ** 2))
    score = float(np.sqrt(max(0.0, 1.0 - rss / tss))) if tss > 0 else 0.0
    return score, a


def _grow_mixture(target, label, score, frac, names, shifted, widths_found, widths, stretches,
                  max_phases, gain, min_fraction, min_score):
    """Greedily add phases to a component's assignment (forward selection by NNLS).

    NMF components of a scan whose phases vary together (gradients, layers of fixed
    composition) are end members, i.e. mixtures of several phases, not single phases.
    Starting from the accepted single phase or pair, the phase (at the stretch on the
    coarse grid) that removes most of the remaining unexplained variance is added while
    it removes at least ``gain`` of it and every phase keeps ``min_fraction`` of the mass.
    All phases share the peak width of the main phase (the instrument dominates it).
    Returns the new ``(label, score, frac, params)``, ``params`` the (stretch, width) of
    each member's reference as fitted (None when nothing was added).
    """
    major = max(frac, key=frac.get)
    iw = int(np.argmin(np.abs(np.log(np.asarray(widths)) - np.log(widths_found[major]))))
    chosen: dict[int, np.ndarray] = {}
    at: dict[int, int] = {}  # stretch index of each member's reference
    for ip in frac:  # members so far: their best coarse stretch at the common width
        refs = shifted[(ip, iw)]
        at[ip] = int(np.argmax(_corr_rows(refs, target)))
        chosen[ip] = refs[at[ip]]
    tss = float(target @ target)
    if tss <= 0:
        return label, score, frac, None

    def fit(rows):
        mat = np.array(rows)
        norms = np.linalg.norm(mat, axis=1)
        norms = np.where(norms > 0, norms, 1.0)
        coef, rnorm = nnls((mat / norms[:, None]).T, target)
        return float(np.sqrt(max(0.0, 1.0 - rnorm**2 / tss))), coef / norms

    cur_score, coef = fit(list(chosen.values()))
    cur_score = max(cur_score, score)
    grown = False
    while len(chosen) < max_phases:
        best = None
        for ip in range(len(names)):
            if ip in chosen:
                continue
            refs = shifted[(ip, iw)]
            for i_s in range(0, len(stretches)):
                sc, c = fit([*chosen.values(), refs[i_s]])
                if best is None or sc > best[0]:
                    best = (sc, c, ip, i_s)
        if best is None:
            break
        sc, c, ip, i_s = best
        f = c / c.sum() if c.sum() > 0 else c
        if 1.0 - sc**2 > (1.0 - gain) * (1.0 - cur_score**2) or f.min() < min_fraction:
            break
        chosen[ip] = shifted[(ip, iw)][i_s]
        at[ip] = i_s
        cur_score, coef, grown = sc, c, True
    if not grown:
        return label, score, frac, None
    f = coef / coef.sum()
    new = {ip: float(fi) for ip, fi in zip(chosen, f, strict=True)}
    order = sorted(new, key=new.get, reverse=True)
    params = {ip: (float(stretches[at[ip]]), float(widths[iw])) for ip in chosen}
    return " + ".join(names[i] for i in order), cur_score, new, params


def _present_in_scan(scan_fit: xr.Dataset, names: list[str]) -> dict[str, tuple[float, float]]:
    """Phases a whole-scan fit found (some mass somewhere): name -> (stretch, width)."""
    need = ("phase_amount", "phase_stretch", "phase_width")
    if not isinstance(scan_fit, xr.Dataset) or any(v not in scan_fit for v in need):
        raise InputError(f"scan_fit: expected a phase_fractions result with {', '.join(need)}")
    out = {}
    for n in map(str, scan_fit["phase"].values):
        if n not in names:
            continue
        amount = np.nan_to_num(scan_fit["phase_amount"].sel(phase=n).values)
        s = float(scan_fit["phase_stretch"].sel(phase=n))
        w = float(scan_fit["phase_width"].sel(phase=n))
        if amount.max() > 0 and np.isfinite(s) and np.isfinite(w):
            out[n] = (s, w)
    return out


def _scan_mixture(target: np.ndarray, basis: np.ndarray, refs: dict[str, np.ndarray], gain: float,
                  min_fraction: float, max_phases: int) -> tuple[list[str], float, dict[str, float]]:
    """Backward elimination of a component's mixture over the candidate references.

    All candidates are fitted together (NNLS plus baseline); then, one at a time, the
    phase whose removal costs least is dropped while it has less than ``min_fraction``
    of the mass or removes less than ``gain`` of the variance left unexplained without
    it, or while there are more than ``max_phases``. Returns the members by decreasing mass, the unexplained variance ``1 - score^2``
    and their mass fractions.
    """

    def fit(members):
        sc, a = _fit_mixture(target, np.array([refs[m] for m in members]), basis)
        return 1.0 - sc**2, dict(zip(members, a, strict=True))

    members = list(refs)
    unexplained, amount = fit(members)
    while len(members) > 1:
        total = sum(amount.values())
        small = [m for m in members if total <= 0 or amount[m] / total < min_fraction]
        if small:
            members.remove(min(small, key=amount.get))
            unexplained, amount = fit(members)
            continue
        without, weakest = min((fit([m for m in members if m != n])[0], n) for n in members)
        if len(members) <= max_phases and without > 0 and (without - unexplained) / without >= gain:
            break
        members.remove(weakest)
        unexplained, amount = fit(members)
    total = sum(amount.values())
    frac = {m: (amount[m] / total if total > 0 else 1.0 / len(members)) for m in members}
    return sorted(members, key=frac.get, reverse=True), unexplained, frac


def assign_components(
    components,
    phases=None,
    *,
    dim: str = "q",
    x_range: tuple[float, float] | None = None,
    stretch_range: float = 0.03,
    stretch_step: float = 0.0025,
    widths: Sequence[float] | None = None,
    min_score: float = 0.7,
    max_phases_per_component: int = 2,
    mixture_gain: float = 0.5,
    min_mixture_fraction: float = 0.05,
    baseline_terms: int = 3,
    n_runners_up: int = 3,
    n_refine: int = 4,
    gr_kwargs: Mapping | None = None,
    diffuse_window_A: float | None = None,
    scan_fit: xr.Dataset | None = None,
    scan_mixture_gain: float = 0.25,
    alike: float = 0.99,
) -> xr.Dataset:
    """Assign each NMF component to a reference phase, a mixture of phases, or nothing.

    Parameters
    ----------
    components : xr.DataArray (component, q|r) or a Dataset with ``nmf_{dim}_components``
    phases : mapping name -> :class:`xrdmap.phases.Phase`, sequence of Phases, or None
        for the shipped library.
    dim : {"q", "r"}
        ``"q"``: components are I(Q)-like, references from ``simulate_iq``; ``"r"``: G(r),
        references from ``simulate_gr``.
    x_range : (lo, hi), optional
        Range scored (A^-1 or A); default 1-15 A^-1 or 1-20 A.
    stretch_range, stretch_step : float
        Lattice stretch searched: ``1 +- stretch_range`` on a grid of ``stretch_step``,
        then refined by a bounded 1-D search with exact simulations (<< 0.1 %).
    widths : sequence of float, optional
        Peak widths tried (see :data:`DEFAULT_WIDTHS`: FWHM in A^-1 for Q, U_iso in A^2
        for r); the best is refined on a log scale between its neighbours.
    min_score : float
        Lowest score (correlation after baseline removal, -1..1) accepted as a match. A
        phase whose best stretch lies at the limit (``1 +- stretch_range``) is not
        accepted as the main phase: its optimum is outside the plausible range (at coarse
        resolution an unrelated pattern can reach ``min_score`` by sliding its broad
        peaks that far); ``component_score`` is then that of the best phase within it
        (-1 if none).
    max_phases_per_component : int
        1 for single phases only; 2 (default) also tries non-negative mixtures of two of
        the best candidates; more grows the mixture by forward selection over all phases
        (see :func:`_grow_mixture`; NMF components of graded or layered samples are end
        members with three or four phases). Labels list the phases by decreasing mass.
    gr_kwargs : mapping, optional
        For ``dim="r"``: keywords of :meth:`xrdmap.phases.Phase.simulate_gr` (``qmax``,
        ``qmin``, ``lorch``, ``qdamp``) so that references are terminated and damped as the
        data were (e.g. the PDF settings of the run and ``qdamp = FWHM_Q / 2.355``).
    mixture_gain : float
        A mixture replaces the best single phase only if it removes at least this fraction
        of the variance the single phase leaves unexplained (``1 - score^2``), and every
        phase in it has at least ``min_mixture_fraction`` of the weight (by mass).
    baseline_terms : int
        Legendre polynomial terms of the smooth baseline projected out before scoring.
    n_runners_up : int
        Number of next-best single phases listed in ``component_runners_up``.
    n_refine : int
        Number of best phases per component whose stretch and width are refined with
        exact simulations (the others keep the coarse-grid values).
    diffuse_window_A : float, optional
        For ``dim="q"`` components of Bragg parts (NMF after
        :func:`xrdmap.series.diffuse_baseline` with this window, A^-1 was taken off the
        patterns): the references are treated the same way before they are compared
        (:func:`_bragg_part`). At coarse resolution the opening also removes the
        continuum of overlapping peaks, and an untreated reference of the right phase
        can then score below a relative at a 2 % stretch.
    scan_fit : xr.Dataset, optional
        For ``dim="q"``: a :func:`phase_fractions` result (in Q) for the same scan (``phase_amount``,
        ``phase_stretch``, ``phase_width``): the phases it found, with their stretch and
        width fitted on every point at once. Then (1) a best single match that the scan
        fit did not keep but that has a look-alike it kept (references correlating at
        >= ``alike`` at the scan's peak width, e.g. LTP for LATP, LVP-Pbcn for the
        anti-NASICON model) is named after that look-alike: one component cannot tell
        them apart, the joint fit of all points can; (2) mixtures are chosen among the
        best single match and the scan's phases by backward elimination
        (:func:`_scan_mixture`, with ``scan_mixture_gain`` and
        ``min_mixture_fraction``) instead of the pair search and forward growth over the
        whole library. A component still needs ``min_score`` to be named.
    scan_mixture_gain : float
        With ``scan_fit``: the share of the variance left unexplained without it that a
        phase must explain to stay in a component's mixture. Lower than
        ``mixture_gain`` because the candidates already passed the whole-scan test; the
        misfit left is mostly model error of approximate structures, against which a
        minor phase (18 wt% LVP-Pbcn in LVP at the hotspot's periphery) removes only
        0.35-0.5 of it.
    alike : float
        Correlation above which two references are one pattern at the scan's resolution.

    Returns
    -------
    xr.Dataset
        ``component_phase`` (component; str: a name, ``"A + B"``, or ``"unassigned"``),
        ``component_score`` (component), ``component_stretch`` (component; stretch of the
        main phase, NaN if unassigned), ``component_width`` (component),
        ``component_runners_up`` (component; str ``"name score stretch; ..."``),
        ``component_phase_score`` (component, phase): best single-phase score,
        ``component_phase_stretch`` and ``component_phase_width`` (component, phase),
        ``component_phase_fraction`` (component, phase): weight fractions of the accepted
        assignment (zeros if unassigned); ``component_mixture_stretch`` and
        ``component_mixture_width`` (component, phase): the stretch and width of each
        phase's reference in that assignment, as it was scored (NaN for other phases).
    """
    _check_dim(dim)
    sim_kw = dict(gr_kwargs or {}) if dim == "r" else {}
    comps = _components_array(components, dim)
    if dim == "q":
        sim_kw = _bragg_kwargs(comps[dim].values, diffuse_window_A)
    lib = _phases_dict(phases)
    if not 0 < stretch_range < 0.5 or stretch_step <= 0:
        raise ConfigError(f"stretch_range {stretch_range}, stretch_step {stretch_step}: expected 0 < range < 0.5, step > 0")
    if max_phases_per_component < 1:
        raise ConfigError(f"max_phases_per_component={max_phases_per_component}: expected >= 1")
    widths = tuple(DEFAULT_WIDTHS[dim] if widths is None else widths)
    if not widths or min(widths) <= 0:
        raise ConfigError(f"widths {widths}: expected positive peak widths")
    lo, hi = x_range or DEFAULT_RANGES[dim]

    x_all = np.asarray(comps[dim].values, dtype=float)
    values = np.asarray(comps.values, dtype=float)
    sel = (x_all >= lo) & (x_all <= hi) & np.all(np.isfinite(values), axis=0)
    if sel.sum() < 10:
        raise InputError(
            f"components {dim} grid {x_all.min():g}..{x_all.max():g} has {int(sel.sum())} finite samples "
            f"in {lo:g}..{hi:g}: expected at least 10"
        )
    x = x_all[sel]
    y = values[:, sel]
    basis = _baseline_basis(x, baseline_terms)
    proj = _projector(basis)
    yc = proj(y)

    # Coarse search: a reference at stretch s is, to first order, the unstretched one read
    # at x*s (Q) or x/s (r); overall scale does not matter to the correlation.
    stretches = 1.0 + np.arange(-stretch_range, stretch_range + 1e-12, stretch_step)
    span = np.linspace(x.min() * (1 - stretch_range) * 0.99, x.max() * (1 + stretch_range) * 1.01, 4 * x.size)
    if dim == "q":
        sample = np.outer(stretches, x)
    else:
        sample = np.outer(1.0 / stretches, x)
    names = list(lib)
    n_c, n_p, n_w, n_s = len(y), len(names), len(widths), len(stretches)
    coarse = np.full((n_c, n_p, n_w, n_s), -1.0)
    shifted: dict[tuple[int, int], np.ndarray] = {}  # (phase, width) -> (stretch, x), baseline removed
    for ip, name in enumerate(names):
        for iw, width in enumerate(widths):
            ref = _simulate(lib[name], span, dim, 1.0, width, **sim_kw)
            refs = proj(np.interp(sample, span, ref))
            if max_phases_per_component > 2:
                shifted[(ip, iw)] = refs
            for ic in range(n_c):
                coarse[ic, ip, iw, :] = _corr_rows(refs, yc[ic])

    best_score = np.full((n_c, n_p), -1.0)
    best_stretch = np.full((n_c, n_p), np.nan)
    best_width = np.full((n_c, n_p), np.nan)
    refined_refs: dict[tuple[int, int], np.ndarray] = {}

    def score_at(ic: int, phase, s: float, w: float) -> tuple[float, np.ndarray]:
        r = proj(_simulate(phase, x, dim, s, w, **sim_kw))
        return float(_corr_rows(r[None, :], yc[ic])[0]), r

    for ic in range(n_c):
        # Refine the most promising phases only; the others keep their coarse score.
        top = np.argsort(-coarse[ic].reshape(n_p, -1).max(axis=1))[: max(n_refine, n_runners_up + 1)]
        for ip in range(n_p):
            iw, i_s = np.unravel_index(np.argmax(coarse[ic, ip]), (n_w, n_s))
            best_score[ic, ip] = coarse[ic, ip, iw, i_s]
            best_stretch[ic, ip] = stretches[i_s]
            best_width[ic, ip] = widths[iw]
            if ip not in top or best_score[ic, ip] <= 0:
                continue
            phase = lib[names[ip]]
            w0 = widths[iw]
            s_lo = max(stretches[i_s] - stretch_step, 1 - stretch_range)
            s_hi = min(stretches[i_s] + stretch_step, 1 + stretch_range)
            res = minimize_scalar(
                lambda s, w0=w0, phase=phase, ic=ic: -score_at(ic, phase, s, w0)[0],
                bounds=(s_lo, s_hi), method="bounded", options={"xatol": 1e-4},
            )
            s_best = float(res.x)
            lw_lo = np.log(widths[iw - 1]) if iw > 0 else np.log(w0) - np.log(2)
            lw_hi = np.log(widths[iw + 1]) if iw < n_w - 1 else np.log(w0) + np.log(2)
            res_w = minimize_scalar(
                lambda lw, s_best=s_best, phase=phase, ic=ic: -score_at(ic, phase, s_best, float(np.exp(lw)))[0],
                bounds=(lw_lo, lw_hi), method="bounded", options={"xatol": 1e-2},
            )
            w_best = float(np.exp(res_w.x))
            res = minimize_scalar(
                lambda s, w=w_best, phase=phase, ic=ic: -score_at(ic, phase, s, w)[0],
                bounds=(s_lo, s_hi), method="bounded", options={"xatol": 1e-4},
            )
            s_best = float(res.x)
            sc, ref = score_at(ic, phase, s_best, w_best)
            if sc >= best_score[ic, ip]:
                best_score[ic, ip], best_stretch[ic, ip], best_width[ic, ip] = sc, s_best, w_best
                refined_refs[(ic, ip)] = _simulate(phase, x, dim, s_best, w_best, **sim_kw)

    if scan_fit is not None and (dim != "q" or getattr(scan_fit, "attrs", {}).get("phase_fraction_dim", "q") != "q"):
        raise InputError(f"scan_fit with dim={dim!r}: expected a phase_fractions result in Q for components in Q")
    present = _present_in_scan(scan_fit, names) if scan_fit is not None else {}
    scan_refs = {n: _simulate(lib[n], x, dim, s, w, **sim_kw) for n, (s, w) in present.items()}

    def _name_by_scan(ic: int, i0: int) -> tuple[str, float, dict[int, float], dict | None]:
        """Look-alike resolution and mixture over the scan fit's phases (see scan_fit)."""
        main = names[i0]
        if main not in present:
            width = float(np.median([w for _, w in present.values()]))
            own = proj(_simulate(lib[main], x, dim, best_stretch[ic, i0], width, **sim_kw))
            twins = [n for n in present if _corr_rows(proj(scan_refs[n])[None, :], own)[0] >= alike]
            if twins:
                main = max(twins, key=lambda n: best_score[ic, names.index(n)])
        refs = dict(scan_refs)
        if main not in refs:
            ip = names.index(main)
            refs[main] = refined_refs.get((ic, ip), _simulate(lib[main], x, dim, best_stretch[ic, ip],
                                                               best_width[ic, ip], **sim_kw))
        members, unexplained, frac = _scan_mixture(
            y[ic], basis, refs, scan_mixture_gain, min_mixture_fraction, max_phases_per_component,
        )
        if members == [main]:
            return main, float(eligible[ic, names.index(main)]), {names.index(main): 1.0}, None
        score = float(np.sqrt(max(0.0, 1.0 - unexplained)))
        # members from the scan fit were scored with its stretch and width; the main phase,
        # if the scan fit lacks it, with its own (the default of the caller)
        params = {names.index(m): present[m] for m in members if m in present}
        return " + ".join(members), score, {names.index(m): float(frac[m]) for m in members}, params

    labels, scores, main_stretch, main_width, runners = [], [], [], [], []
    fractions = np.zeros((n_c, n_p))
    # stretch and width of each phase's reference in the accepted assignment
    used_stretch, used_width = np.full((n_c, n_p), np.nan), np.full((n_c, n_p), np.nan)
    # A best stretch at the limit of the search means the optimum lies outside it: not a
    # match at a plausible lattice (at coarse resolution an unrelated pattern can reach
    # min_score by sliding its broad peaks as far as allowed).
    at_limit = np.abs(np.abs(best_stretch - 1.0) - stretch_range) < 0.25 * stretch_step
    eligible = np.where(at_limit, -1.0, best_score)
    for ic in range(n_c):
        order = np.argsort(-eligible[ic])
        i0 = int(order[0])
        label, score = names[i0], float(eligible[ic, i0])
        frac = {i0: 1.0}
        params = None  # None: each member's own best stretch and width
        if present:
            label, score, frac, params = _name_by_scan(ic, i0)
        elif max_phases_per_component >= 2 and n_p > 1:
            cands = [int(i) for i in order[:4] if (ic, int(i)) in refined_refs]
            for i, j in itertools.combinations(cands, 2):
                refs = np.stack([refined_refs[(ic, i)], refined_refs[(ic, j)]])
                sc, a = _fit_mixture(y[ic], refs, basis)
                total = a.sum()
                if total <= 0:
                    continue
                f = a / total
                unexplained = 1.0 - max(score, 0.0) ** 2
                if 1.0 - sc**2 <= (1.0 - mixture_gain) * unexplained and f.min() >= min_mixture_fraction:
                    major, minor = (i, j) if f[0] >= f[1] else (j, i)
                    label = f"{names[major]} + {names[minor]}"
                    score = sc
                    frac = {i: float(f[0]), j: float(f[1])}
        if max_phases_per_component > 2 and n_p > 2 and not present:
            label, score, frac, grown = _grow_mixture(
                yc[ic], label, score, frac, names, shifted, best_width[ic], widths, stretches,
                max_phases_per_component, mixture_gain, min_mixture_fraction, min_score,
            )
            params = grown if grown is not None else params
        if score < min_score:
            labels.append(UNASSIGNED)
            scores.append(score)
            main_stretch.append(np.nan)
            main_width.append(np.nan)
        else:
            labels.append(label)
            scores.append(score)
            major = max(frac, key=frac.get)
            main_stretch.append(float(best_stretch[ic, major]))
            main_width.append(float(best_width[ic, major]))
            for ip, f in frac.items():
                fractions[ic, ip] = f
                used_stretch[ic, ip], used_width[ic, ip] = (
                    params[ip] if params is not None and ip in params else (best_stretch[ic, ip], best_width[ic, ip])
                )
        shown = [int(i) for i in order if int(i) != i0 or labels[-1] == UNASSIGNED][:n_runners_up]
        runners.append(
            "; ".join(f"{names[i]} {best_score[ic, i]:.3f} {best_stretch[ic, i]:.4f}" for i in shown)
        )

    comp_coord = comps[comps.dims[0]].values if comps.dims[0] in comps.coords else np.arange(n_c)
    cdim = "component"
    ds = xr.Dataset(
        {
            "component_phase": (cdim, np.array(labels, dtype=object).astype(str)),
            "component_score": (cdim, np.array(scores)),
            "component_stretch": (cdim, np.array(main_stretch)),
            "component_width": (cdim, np.array(main_width)),
            "component_runners_up": (cdim, np.array(runners, dtype=object).astype(str)),
            "component_phase_score": ((cdim, "phase"), best_score),
            "component_phase_stretch": ((cdim, "phase"), best_stretch),
            "component_phase_width": ((cdim, "phase"), best_width),
            "component_phase_fraction": ((cdim, "phase"), fractions),
            "component_mixture_stretch": ((cdim, "phase"), used_stretch),
            "component_mixture_width": ((cdim, "phase"), used_width),
        },
        coords={cdim: comp_coord, "phase": names},
    )
    ds.attrs.update(
        {
            "assign_dim": dim,
            "assign_x_range": np.array([lo, hi], dtype=float),
            "assign_score": "Pearson correlation of component and reference after projecting out "
            f"a {baseline_terms}-term Legendre baseline",
            "assign_min_score": min_score,
            "assign_stretch_range": stretch_range,
            "assign_widths": np.asarray(widths, dtype=float),
            "assign_width_units": "FWHM A^-1" if dim == "q" else "U_iso A^2",
        }
    )
    return ds


# ------------------------------------------------------------------ phase fractions


def _per_phase(value, names: list[str], what: str, default: float | None) -> list[float | None]:
    if value is None:
        return [default] * len(names)
    if isinstance(value, xr.Dataset):
        var = {"stretch": "component_phase_stretch", "width": "component_phase_width"}[what]
        if var not in value or "component_phase_fraction" not in value:
            raise InputError(f"{what} from an assignment dataset: expected {var!r} and 'component_phase_fraction'")
        out = []
        for n in names:
            if n in value.phase.values:
                fr = value["component_phase_fraction"].sel(phase=n).values
                vals = value[var].sel(phase=n).values
                use = fr > 0
                out.append(float(np.average(vals[use], weights=fr[use])) if use.any() else default)
            else:
                out.append(default)
        return out
    if isinstance(value, Mapping):
        return [float(value[n]) if n in value else default for n in names]
    return [float(value)] * len(names)


def _bernstein_basis(x: np.ndarray, n_terms: int) -> np.ndarray:
    """Bernstein polynomials on x mapped to [0, 1]: non-negative, and so is any
    non-negative combination of them (a smooth non-negative background)."""
    from scipy.special import comb

    if n_terms <= 0:
        return np.zeros((x.size, 0))
    t = (x - x.min()) / max(x.max() - x.min(), 1e-12)
    n = n_terms - 1
    k = np.arange(n_terms)
    return comb(n, k)[None, :] * t[:, None] ** k[None, :] * (1 - t[:, None]) ** (n - k)[None, :]


def _background_design(x: np.ndarray, dim: str, n_terms: int) -> np.ndarray:
    """Background rows for NNLS: non-negative Bernstein terms (Q), signed Legendre (r)."""
    if dim == "q":
        return _bernstein_basis(x, n_terms).T
    leg = _baseline_basis(x, n_terms).T
    return np.concatenate([leg, -leg])


def _nnls_rss(target: np.ndarray, design: np.ndarray) -> float:
    norms = np.linalg.norm(design, axis=0)
    norms = np.where(norms > 0, norms, 1.0)
    _, rnorm = nnls(design / norms, target, maxiter=50 * design.shape[1])
    return float(rnorm**2)


def _refine_on_mixture(target, x, dim, lib, names, stretch, width, bg, stretch_range, refine_width,
                       sweeps=2, thorough=True):
    """Refine each phase's stretch, and one common peak width, on the whole NNLS model.

    A single reference correlated alone with a mixture is pulled by overlapping peaks of
    the other phases; fitting all of them together (one phase at a time, the others
    fixed) removes that bias. Close relatives (LVP, the anti-NASICON phase) can mimic
    each other with a 1 % stretch, so the descent runs from two starts, the unstretched
    references and the single-phase stretches, and keeps the better end point. The width
    is shared by all phases (the instrument dominates it); a per-phase width would let a
    minor phase broaden into a background-like shape.

    ``thorough=False``: one descent (from the single-phase stretches) with one sweep;
    about a quarter of the cost, for fits that only feed a phase selection.

    Returns ``(stretch, width, rss)`` dicts and the final residual sum of squares.
    """
    grid = 1.0 + np.arange(-stretch_range, stretch_range + 1e-12, 0.0025)

    def descend(stretch, width, n_sweeps):
        stretch, width = dict(stretch), float(width)
        refs = {n: _simulate(lib[n], x, dim, stretch[n], width) for n in names}

        def rss(n, s, w):
            others = [refs[m] for m in names if m != n]
            ref = _simulate(lib[n], x, dim, s, w)
            return _nnls_rss(target, np.concatenate([np.array([ref, *others]), bg]).T)

        def rss_width(w):
            return _nnls_rss(target, np.concatenate([
                np.array([_simulate(lib[n], x, dim, stretch[n], w) for n in names]), bg]).T)

        best = rss_width(width)
        for sweep in range(n_sweeps):
            for n in names:
                s0 = stretch[n]
                if sweep == 0:
                    values = [rss(n, s, width) for s in grid]
                    if min(values) < best:
                        s0, best = float(grid[int(np.argmin(values))]), float(min(values))
                        stretch[n] = s0
                lo = max(s0 - 0.004, 1 - stretch_range)
                hi = min(s0 + 0.004, 1 + stretch_range)
                res = minimize_scalar(lambda s, n=n, w=width: rss(n, s, w), bounds=(lo, hi), method="bounded",
                                      options={"xatol": 1e-5})
                if res.fun < best:
                    stretch[n], best = float(res.x), float(res.fun)
                refs[n] = _simulate(lib[n], x, dim, stretch[n], width)
            if refine_width:
                res = minimize_scalar(lambda lw: rss_width(float(np.exp(lw))),
                                      bounds=(np.log(width) - 0.7, np.log(width) + 0.7), method="bounded",
                                      options={"xatol": 1e-3})
                if res.fun < best:
                    width, best = float(np.exp(res.x)), float(res.fun)
                refs = {n: _simulate(lib[n], x, dim, stretch[n], width) for n in names}
        return stretch, width, best

    if thorough:
        ends = [descend({n: 1.0 for n in names}, width, sweeps), descend(stretch, width, sweeps)]
    else:
        ends = [descend(stretch, width, 1)]
    s_best, w_best, _ = min(ends, key=lambda e: e[2])
    return s_best, {n: w_best for n in names}


def phase_fractions(
    iq,
    phases=None,
    *,
    dim: str = "q",
    x_range: tuple[float, float] | None = None,
    stretch=None,
    width=None,
    stretch_range: float = 0.0,
    background_terms: int = 6,
    weight: str = "mass",
    thorough: bool = True,
) -> xr.Dataset:
    """Per-point phase weight fractions by non-negative least squares on the references.

    Each pattern is fitted as ``sum_i c_i I_i(x) + background(x)`` with ``c_i >= 0``. For
    ``dim="q"`` the background is a non-negative combination of Bernstein polynomials
    (a smooth, non-negative diffuse/amorphous/incoherent signal); for ``dim="r"`` a
    Legendre polynomial of either sign (G(r) baselines). The references are per unit mass
    of phase, so ``c_i`` is proportional to the mass of phase ``i`` and the weight fraction
    is ``c_i / sum_j c_j`` over the crystalline phases (``weight="mass"``), or the molar
    fraction of formula units with ``weight="mole"`` (``c_i / M_i`` normalised).

    Parameters
    ----------
    iq : xr.DataArray (point, q|r), or a Dataset with ``iq`` / ``gr``
    phases : mapping name -> Phase, sequence of Phases, or None for the shipped library
    dim : {"q", "r"}
    x_range : (lo, hi), optional
        Range fitted; default 1-15 A^-1 or 1-20 A.
    stretch, width : float, mapping name -> float, assignment Dataset, or None
        Lattice stretch and peak width (FWHM A^-1 for Q, U_iso A^2 for r) per phase; an
        :func:`assign_components` result supplies the values found for each phase.
        Defaults: 1 and the library defaults, or found from the data (below).
    stretch_range : float
        When > 0 and ``stretch`` is None, the stretch of every phase is searched within
        ``1 +- stretch_range`` (and, if ``width`` is None, one peak width common to all
        phases) on the scan-mean pattern: single-phase correlations first
        (:func:`assign_components`), then a descent on the full NNLS model from the
        unstretched references and from those values, keeping the better fit. One value
        per phase for the whole scan.
    background_terms : int
        Number of smooth background basis functions (0 for none).
    weight : {"mass", "mole"}
    thorough : bool
        With ``stretch_range``: run the mixture descent from both starts with two sweeps
        (default). False runs one descent, from the single-phase values, with one sweep
        (~4x cheaper; :func:`scan_phase_fractions` uses it for the library-wide fit that
        only feeds the phase selection).

    Returns
    -------
    xr.Dataset
        ``phase_fraction`` (point, phase): fractions summing to 1 over the phases (NaN
        where no crystalline phase was found); ``phase_amount`` (point, phase): the NNLS
        coefficients (mass, arbitrary units); ``residual`` (point): fraction of the
        integrated signal (Q) or of its sum of squares (r) that the crystalline phases'
        Bragg references do not explain, 0..1. In Q this is ``1 - sum(Bragg fit) /
        sum(|I|)`` over the fitted range: it includes the smooth diffuse scattering of
        the crystals themselves (thermal diffuse, self and Compton scattering: about 0.4
        of I(Q) over 1-15 A^-1 at 76.7 keV for a fully crystalline phosphate), plus
        amorphous and unknown-phase signal and misfit. Read it relative to the scan's
        crystalline points (:func:`xrdmap.maps.amorphous_points` uses the excess over
        the scan's 10th percentile): a glass raises it (0.40 -> 0.69 for 85 wt% glass
        in the simulated vitreous rim);
        ``background_fraction`` (point): integrated share of the smooth background (Q only,
        else NaN); ``phase_stretch``, ``phase_width`` (phase): the values used.
    """
    _check_dim(dim)
    if weight not in ("mass", "mole"):
        raise ConfigError(f"weight={weight!r}: expected 'mass' or 'mole'")
    if background_terms < 0:
        raise ConfigError(f"background_terms={background_terms}: expected >= 0")
    if isinstance(iq, xr.Dataset):
        name = "iq" if dim == "q" else "gr"
        if name not in iq:
            raise InputError(f"dataset has no {name!r} variable: expected ({'point'}, {dim})")
        iq = iq[name]
    if not isinstance(iq, xr.DataArray) or dim not in iq.dims or iq.ndim != 2:
        dims = getattr(iq, "dims", None)
        raise InputError(f"patterns with dims {dims}: expected an xarray.DataArray (point, {dim})")
    lib = _phases_dict(phases)
    names = list(lib)
    pdim = next(d for d in iq.dims if d != dim)
    da = iq.transpose(pdim, dim)
    x_all = np.asarray(da[dim].values, dtype=float)
    lo, hi = x_range or DEFAULT_RANGES[dim]
    sel = (x_all >= lo) & (x_all <= hi)
    if sel.sum() < len(names) + background_terms + 1:
        raise InputError(f"patterns {dim} grid has {int(sel.sum())} samples in {lo:g}..{hi:g}: expected more than the unknowns")
    x = x_all[sel]
    data = np.asarray(da.values, dtype=float)[:, sel]
    finite = np.all(np.isfinite(data), axis=1)
    data = np.where(np.isfinite(data), data, 0.0)

    if stretch is None and stretch_range > 0:
        mean = xr.DataArray(data[finite].mean(axis=0)[None, :], dims=("component", dim), coords={dim: x})
        found = assign_components(
            mean, lib, dim=dim, x_range=(lo, hi), stretch_range=stretch_range,
            max_phases_per_component=1, min_score=-1.0, n_refine=len(names),
        )
        stretch = {n: float(found["component_phase_stretch"].sel(phase=n)[0]) for n in names}
        refine_width = width is None
        if refine_width:
            # Start the common width from the phase that matches the mean pattern best.
            top = names[int(np.argmax(found["component_phase_score"].values[0]))]
            common = float(found["component_phase_width"].sel(phase=top)[0])
        else:
            given = _per_phase(width, names, "width", None)
            common = float(np.median([w for w in given if w is not None]))
        stretch, width = _refine_on_mixture(
            mean.values[0], x, dim, lib, names, stretch, common, _background_design(x, dim, background_terms),
            stretch_range, refine_width, thorough=thorough,
        )
        if not refine_width:
            width = dict(zip(names, _per_phase(width, names, "width", None), strict=True))
    stretches = _per_phase(stretch, names, "stretch", 1.0)
    widths = _per_phase(width, names, "width", None)
    refs = []
    for n, s, w in zip(names, stretches, widths, strict=True):
        if dim == "q":
            refs.append(lib[n].simulate_iq(x, stretch=s, fwhm_q=w))
        else:
            refs.append(lib[n].simulate_gr(x, stretch=s, u_iso=w))
    refs = np.asarray(refs, dtype=float)
    bg = _background_design(x, dim, background_terms)
    design = np.concatenate([refs, bg]).T  # (n_x, n_var)
    coef = np.zeros((data.shape[0], design.shape[1]))
    coef[finite] = nnls_rows(design, data[finite], maxiter=50 * design.shape[1])[0]
    n_p = len(names)
    amount = coef[:, :n_p]
    moles = amount if weight == "mass" else amount / np.array([lib[n].formula_mass for n in names])
    total = moles.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total > 0, moles / total, np.nan)
    crystalline = amount @ refs
    if dim == "q":
        signal = np.abs(data).sum(axis=1)
        background = (coef[:, n_p:] @ bg).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            residual = np.clip(1.0 - crystalline.sum(axis=1) / signal, 0.0, 1.0)
            bg_share = background / signal
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            residual = np.clip(np.sum((data - crystalline) ** 2, axis=1) / np.sum(data**2, axis=1), 0.0, 1.0)
        bg_share = np.full(data.shape[0], np.nan)
    residual = np.where(finite, residual, np.nan)
    frac[~finite] = np.nan

    coords = {k: v for k, v in da.coords.items() if v.dims == (pdim,)}
    ds = xr.Dataset(
        {
            "phase_fraction": ((pdim, "phase"), frac),
            "phase_amount": ((pdim, "phase"), amount),
            "residual": (pdim, residual),
            "background_fraction": (pdim, bg_share),
        },
        coords={**coords, "phase": names},
    )
    ds["phase_stretch"] = ("phase", np.array(stretches, dtype=float))
    ds["phase_width"] = ("phase", np.array([np.nan if w is None else w for w in widths], dtype=float))
    ds.attrs.update(
        {
            "phase_fraction_weight": weight,
            "phase_fraction_dim": dim,
            "phase_fraction_x_range": np.array([lo, hi], dtype=float),
            "phase_fraction_background_terms": background_terms,
        }
    )
    return ds


def select_phases(
    iq,
    phases,
    *,
    stretch=None,
    width=None,
    x_range: tuple[float, float] | None = None,
    background_terms: int = 6,
    min_gain: float = 0.1,
    min_fraction: float = 0.03,
    max_phases: int = 8,
    max_similarity: float = 0.98,
    start: Sequence[str] = (),
    backward: bool = False,
) -> list[str]:
    """Phases needed to explain a whole scan, by forward selection on the NNLS fit.

    Every pattern is fitted by NNLS on the chosen references plus the smooth background
    (as :func:`phase_fractions`, with fixed stretch and width); the phase whose addition
    lowers the scan's total squared residual most is added while it lowers it by at least
    ``min_gain`` (relative) and reaches ``min_fraction`` (weight) at some point. Fitting
    the whole library instead lets near-identical structures (LATP and LiTi2(PO4)3, the
    anti-NASICON and Pbcn LVP frameworks) share one phase and leaves traces of absent
    phases everywhere.

    Parameters
    ----------
    iq : xr.DataArray (point, q)
    phases : mapping name -> Phase
    stretch, width : as in :func:`phase_fractions` (e.g. from a full-library fit)
    start : phases chosen before the search (e.g. those NMF components were assigned to)
    backward : instead of forward selection, start from all phases and drop, one at a
        time, the phase whose loss raises the residual least while the rise stays below
        ``min_gain``; then of phases that are alike (``max_similarity``) keep the one
        with the larger total mass. Robust when stretches come from a full-library fit.
    max_similarity : a phase whose reference correlates at least this much (after a
        3-term baseline is removed) with a chosen one is not offered: at this resolution
        the two are one pattern (LATP and LiTi2(PO4)3 correlate at 0.99; the shipped
        anti-NASICON model and LVP-Pbcn at 1.00, so whichever explains more is named).

    Returns
    -------
    list of str
        Chosen names in order of selection.
    """
    lib = _phases_dict(phases)
    names = list(lib)
    pdim = next(d for d in iq.dims if d != "q")
    da = iq.transpose(pdim, "q")
    x_all = np.asarray(da["q"].values, dtype=float)
    lo, hi = x_range or DEFAULT_RANGES["q"]
    sel = (x_all >= lo) & (x_all <= hi)
    x = x_all[sel]
    data = np.asarray(da.values, dtype=float)[:, sel]
    data = data[np.all(np.isfinite(data), axis=1)]
    stretches = _per_phase(stretch, names, "stretch", 1.0)
    widths = _per_phase(width, names, "width", None)
    refs = {n: np.asarray(lib[n].simulate_iq(x, stretch=s, fwhm_q=w), dtype=float)
            for n, s, w in zip(names, stretches, widths, strict=True)}
    bg = _background_design(x, "q", background_terms)
    proj = _projector(_baseline_basis(x, 3))
    centred = {n: proj(r) for n, r in refs.items()}

    def alike(a: str, b: str) -> bool:
        return float(_corr_rows(centred[a][None, :], centred[b])[0]) >= max_similarity

    def fit(chosen):
        design = np.concatenate([np.array([refs[n] for n in chosen]).reshape(len(chosen), x.size), bg]).T
        coef, rn = nnls_rows(design, data, maxiter=50 * design.shape[1])
        total = float(np.sum(rn**2))
        amount = coef[:, : len(chosen)]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = amount / amount.sum(axis=1, keepdims=True)
        return total, np.nan_to_num(frac)

    if backward:
        # backward elimination from all phases: drop the phase whose loss raises the
        # residual least while that rise stays below min_gain (relative)
        chosen = list(names)
        current, frac = fit(chosen)
        while len(chosen) > 1:
            trials = [(fit([m for m in chosen if m != n])[0], n) for n in chosen]
            rss, n = min(trials)
            if rss * (1.0 - min_gain) > current and len(chosen) <= max_phases:
                break
            chosen.remove(n)
            current = rss
        # of references that are one pattern at this resolution keep the larger mass
        _, frac = fit(chosen)
        mass = dict(zip(chosen, frac.sum(axis=0), strict=True))
        for n in sorted(chosen, key=mass.get):
            if any(m != n and alike(n, m) and mass[m] >= mass[n] for m in chosen):
                chosen.remove(n)
        return chosen
    chosen = [n for n in start if n in lib]
    current, _ = fit(chosen)
    while len(chosen) < max_phases:
        best = None
        for n in names:
            if n in chosen or any(alike(n, m) for m in chosen):
                continue
            rss, frac = fit([*chosen, n])
            if frac[:, -1].max() >= min_fraction and (best is None or rss < best[0]):
                best = (rss, n)
        if best is None or best[0] > (1.0 - min_gain) * current:
            break
        current = best[0]
        chosen.append(best[1])
    return chosen


def scan_phase_fractions(iq, phases, *, stretch_range: float = 0.03, select: bool = True) -> xr.Dataset:
    """Per-point weight fractions of the phases a whole scan needs.

    Fitting every library phase to every point lets near-identical structures (LATP and
    LiTi2(PO4)3, the anti-NASICON and Pbcn LVP frameworks) share one phase's intensity
    and puts a few per cent of absent phases everywhere. So, with ``select``: one fit
    with all ``phases`` gives every phase's stretch and the common peak width, backward
    elimination (:func:`select_phases`) keeps the phases whose removal would raise the
    scan's residual by >= 10 % (of near-identical references, the one with more mass),
    and the final fit (stretches refined) uses those; phases not selected get fraction 0
    and the attribute ``phase_fraction_selected`` lists the kept ones. Without
    ``select`` (the user named the phases), exactly ``phases`` are fitted
    (:func:`phase_fractions`).

    This joint fit is also what :func:`assign_components` ``scan_fit`` takes to name NMF
    components in Q.
    """
    phases = _phases_dict(phases)
    select = select and len(phases) > 1
    # the library-wide fit only feeds the selection: a single descent is enough there;
    # the fit of the chosen phases below is the thorough one
    full = phase_fractions(iq, phases, dim="q", stretch_range=stretch_range, thorough=not select)
    if not select:
        return full
    stretch = {n: float(full["phase_stretch"].sel(phase=n)) for n in phases}
    width = float(np.nanmedian(full["phase_width"].values))
    chosen = select_phases(iq, phases, stretch=stretch, width=width, backward=True)
    if not chosen:
        return full
    out = phase_fractions(iq, {n: phases[n] for n in chosen}, dim="q", stretch_range=stretch_range)
    out = out.reindex(phase=list(phases), fill_value={"phase_fraction": 0.0, "phase_amount": 0.0})
    out["phase_fraction"] = out["phase_fraction"].where(np.isfinite(out["residual"]))
    out.attrs["phase_fraction_selected"] = ", ".join(chosen)
    return out
