"""Compositions and form factors against tabulated values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xrdmap.composition import (
    atomic_fractions,
    electron_count,
    form_factor,
    form_factor_moments,
    formula_mass,
    parse_composition,
)
from xrdmap.errors import InputError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Li3V2(PO4)3", {"Li": 3, "V": 2, "P": 3, "O": 12}),
        ("Li1.3Al0.3Ti1.7(PO4)3", {"Li": 1.3, "Al": 0.3, "Ti": 1.7, "P": 3, "O": 12}),
        ("Ce 1 O 2", {"Ce": 1, "O": 2}),
        ("CeO2", {"Ce": 1, "O": 2}),
        ("Ni", {"Ni": 1}),
        ("Li2Al0.15V0.77Ti1.08(PO4)3", {"Li": 2, "Al": 0.15, "V": 0.77, "Ti": 1.08, "P": 3, "O": 12}),
        ("Ca(OH)2(H2O)0.5", {"Ca": 1, "O": 2.5, "H": 3}),
    ],
)
def test_formulas(text, expected):
    got = parse_composition(text)
    assert got.keys() == expected.keys()
    for el, n in expected.items():
        assert got[el] == pytest.approx(n)


def test_molar_masses_match_handbook_values():
    # IUPAC standard atomic weights: Li 6.94, V 50.9415, P 30.973762, O 15.999, Ce 140.116
    assert formula_mass("Li3V2(PO4)3") == pytest.approx(407.6, abs=0.1)
    assert formula_mass("CeO2") == pytest.approx(172.115, abs=0.01)
    assert electron_count("Li3V2(PO4)3") == 3 * 3 + 2 * 23 + 3 * 15 + 12 * 8


def test_mixture_by_weight_gives_the_right_atom_ratio():
    # 60 g LVP + 40 g CeO2: moles of formula units 60/407.6 and 40/172.1
    comp = parse_composition("0.6 Li3V2(PO4)3 + 0.4 CeO2")
    n_lvp, n_ceo2 = 60 / formula_mass("Li3V2(PO4)3"), 40 / formula_mass("CeO2")
    assert comp["V"] / comp["Ce"] == pytest.approx(2 * n_lvp / n_ceo2)
    assert comp["O"] / comp["Ce"] == pytest.approx((12 * n_lvp + 2 * n_ceo2) / n_ceo2)
    # the mean formula unit has the harmonic-mean mass
    assert formula_mass(comp) == pytest.approx(100 / (n_lvp + n_ceo2))


@pytest.mark.parametrize(
    "bad", ["Xx2O3", "Li3V2(PO4", "Li3V2PO4)3", "", "3Li", "0.6 LVP + 0.4", "-0.5 Ni + 1 O", "0.6 LVP + 0.4 Ni", "Li$"]
)
def test_garbled_compositions_are_named(bad):
    with pytest.raises(InputError) as exc:
        parse_composition(bad)
    message = str(exc.value)  # the whole composition, and what was expected
    assert message.startswith(f"composition {bad!r}: ") and "expected" in message, message


def test_form_factor_at_zero_is_the_electron_count():
    for el, z in [("Li", 3), ("O", 8), ("V", 23), ("Ce", 58)]:
        assert form_factor(el, np.array([0.0]))[0] == pytest.approx(z, abs=0.02)


def test_form_factor_matches_international_tables():
    # International Tables C, Table 6.1.1.1: f0(O) at sin(theta)/lambda = 0.5 A^-1 is 2.338
    q = 4 * np.pi * 0.5
    assert form_factor("O", np.array([q]))[0] == pytest.approx(2.338, abs=0.02)


def test_form_factor_moments_of_ceria_at_q0():
    f2, fsq = form_factor_moments("Ce 1 O 2", np.array([0.0]))
    assert f2[0] == pytest.approx((58**2 + 2 * 8**2) / 3, rel=1e-3)
    assert fsq[0] == pytest.approx(((58 + 2 * 8) / 3) ** 2, rel=1e-3)


_elements = st.sampled_from(["Li", "V", "P", "O", "Al", "Ti", "Ce", "Ni", "Fe", "H"])
_counts = st.one_of(st.integers(1, 12), st.floats(0.05, 12, allow_nan=False).map(lambda x: round(x, 3)))


@given(st.lists(st.tuples(_elements, _counts), min_size=1, max_size=5))
def test_parsing_a_written_formula_gives_its_counts_back(pairs):
    text = "".join(f"{el}{n}" for el, n in pairs)
    expected: dict[str, float] = {}
    for el, n in pairs:
        expected[el] = expected.get(el, 0) + float(n)
    got = parse_composition(text)
    assert set(got) == set(expected)
    for el in expected:
        assert got[el] == pytest.approx(expected[el])
    assert sum(atomic_fractions(text).values()) == pytest.approx(1.0)


@given(st.floats(0.01, 0.99))
def test_spaced_and_mixture_forms_agree(w):
    one = parse_composition(f"{w} Ni + {1 - w} Ni")
    assert atomic_fractions(one) == {"Ni": pytest.approx(1.0)}
