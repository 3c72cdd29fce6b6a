"""Chemical compositions and X-ray atomic form factors.

Compositions are written as chemical formulas (``Li3V2(PO4)3``,
``Li1.3Al0.3Ti1.7(PO4)3``), in PDFgetX3's spaced form (``Ce 1 O 2``), or as mixtures by
weight (``0.6 Li3V2(PO4)3 + 0.4 Li1.3Al0.3Ti1.7(PO4)3``). Form factors are the
Waasmaier-Kirfel parametrisation of neutral atoms as tabulated by ``xraydb``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import periodictable
import xraydb

from xrdmap.errors import InputError

__all__ = [
    "parse_composition",
    "atomic_fractions",
    "formula_mass",
    "electron_count",
    "form_factor",
    "form_factor_moments",
]

_TOKEN = re.compile(r"\s*(?:([A-Z][a-z]?)|(\()|(\))|(\d+(?:\.\d*)?|\.\d+))")
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_MIXTURE_TERM = re.compile(rf"^\s*({_NUMBER})\s*\*?\s+(.+?)\s*$")


def _element(symbol: str, text: str) -> str:
    try:
        periodictable.elements.symbol(symbol)
    except ValueError:
        raise InputError(
            f"composition {text!r}: unknown element {symbol!r} (expected a chemical symbol such as Li, V, P, O)"
        ) from None
    if symbol in ("D", "T", "n"):
        raise InputError(f"composition {text!r}: {symbol!r} is not a chemical element for X-rays")
    return symbol


def _parse_formula(text: str) -> dict[str, float]:
    """Parse one formula with nested parentheses and decimal counts."""
    stack: list[dict[str, float]] = [{}]
    last: dict[str, float] | str | None = None  # what a following number multiplies
    pos = 0
    s = text.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None or m.end() == pos:
            raise InputError(
                f"composition {text!r}: cannot read {s[pos:]!r} (expected a formula such as Li3V2(PO4)3 or 'Ce 1 O 2')"
            )
        pos = m.end()
        symbol, lpar, rpar, number = m.groups()
        if symbol:
            el = _element(symbol, text)
            stack[-1][el] = stack[-1].get(el, 0.0) + 1.0
            last = el
        elif lpar:
            stack.append({})
            last = None
        elif rpar:
            if len(stack) == 1:
                raise InputError(f"composition {text!r}: unbalanced ')' (expected a '(' before each ')')")
            group = stack.pop()
            for el, n in group.items():
                stack[-1][el] = stack[-1].get(el, 0.0) + n
            last = group
        else:
            count = float(number)
            if last is None:
                raise InputError(
                    f"composition {text!r}: number {number!r} does not follow an element or ')' "
                    "(expected counts after what they count, as in Li3V2(PO4)3)"
                )
            if isinstance(last, str):
                stack[-1][last] += count - 1.0
            else:
                for el, n in last.items():
                    stack[-1][el] += n * (count - 1.0)
            last = None
    if len(stack) != 1:
        raise InputError(f"composition {text!r}: unbalanced '(' (expected a ')' after each '(')")
    counts = {el: n for el, n in stack[0].items() if n != 0}
    if not counts or any(n < 0 for n in counts.values()):
        raise InputError(f"composition {text!r}: expected at least one element with a positive count")
    return counts


def parse_composition(text: str | Mapping[str, float]) -> dict[str, float]:
    """Atoms per formula unit of a formula or a mixture by weight.

    For a mixture ``w1 A + w2 B`` (weights need not sum to 1), the result is the
    composition of the mixture's mean formula unit, whose mass is the harmonic mean of
    the component formula masses weighted by ``w``; only ratios matter downstream.

    >>> parse_composition("Li3V2(PO4)3")["O"]
    12.0
    >>> parse_composition("Ce 1 O 2")
    {'Ce': 1.0, 'O': 2.0}
    """
    if isinstance(text, Mapping):
        counts = {_element(str(k), str(dict(text))): float(v) for k, v in text.items()}
        if not counts or any(v < 0 for v in counts.values()) or sum(counts.values()) <= 0:
            raise InputError(f"composition {dict(text)!r}: expected positive atom counts")
        return counts
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"composition {text!r}: expected a chemical formula such as Li3V2(PO4)3")
    terms = [t for t in text.split("+")]
    if len(terms) == 1:
        return _parse_formula(terms[0])
    weights, formulas = [], []
    for term in terms:
        m = _MIXTURE_TERM.match(term)
        if m is None:
            raise InputError(
                f"composition {text!r}: mixture term {term.strip()!r}: expected 'weight formula', e.g. '0.6 Li3V2(PO4)3'"
            )
        w = float(m.group(1))
        if w <= 0:
            raise InputError(f"composition {text!r}: mixture weight {w}: expected a positive weight")
        weights.append(w)
        try:
            formulas.append(_parse_formula(m.group(2)))
        except InputError as exc:  # name the whole composition, not only the term
            term_error = str(exc).removeprefix("composition ")
            raise InputError(f"composition {text!r}: mixture term {term_error}") from None
    moles = [w / formula_mass(f) for w, f in zip(weights, formulas)]
    mean_mass = 1.0 / sum(moles) * sum(weights)
    total: dict[str, float] = {}
    for n_moles, f in zip(moles, formulas):
        for el, n in f.items():
            total[el] = total.get(el, 0.0) + n * n_moles / sum(weights) * mean_mass
    return total


def atomic_fractions(composition: str | Mapping[str, float]) -> dict[str, float]:
    """Fraction of atoms of each element (sums to 1)."""
    counts = parse_composition(composition)
    total = sum(counts.values())
    return {el: n / total for el, n in counts.items()}


def formula_mass(composition: str | Mapping[str, float]) -> float:
    """Mass of one formula unit in g/mol (amu)."""
    counts = parse_composition(composition)
    return float(sum(n * periodictable.elements.symbol(el).mass for el, n in counts.items()))


def electron_count(composition: str | Mapping[str, float]) -> float:
    """Electrons per formula unit (the X-ray form factor sum at Q = 0)."""
    counts = parse_composition(composition)
    return float(sum(n * periodictable.elements.symbol(el).number for el, n in counts.items()))


def form_factor(element: str, q_A: np.ndarray) -> np.ndarray:
    """Waasmaier-Kirfel X-ray form factor f0 of a neutral atom at Q (A^-1), in electrons."""
    q = np.asarray(q_A, dtype=float)
    # xraydb takes sin(theta)/lambda = Q / (4 pi)
    return np.asarray(xraydb.f0(element, q / (4.0 * np.pi)), dtype=float).reshape(q.shape)


def form_factor_moments(composition: str | Mapping[str, float], q_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(<f^2>, <f>^2)`` per atom at Q (A^-1), averaged over atomic fractions."""
    q = np.asarray(q_A, dtype=float)
    f_mean = np.zeros_like(q)
    f2_mean = np.zeros_like(q)
    for el, c in atomic_fractions(composition).items():
        f = form_factor(el, q)
        f_mean += c * f
        f2_mean += c * f * f
    return f2_mean, f_mean**2
