"""Reference phase library and simulated I(Q), F(Q), G(r) against independent truths."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import find_peaks

from xrdmap.composition import form_factor, formula_mass
from xrdmap.errors import InputError
from xrdmap.phases import (
    DEFAULT_UISO,
    KINDS,
    Phase,
    get_phase,
    load_cif,
    load_library,
    resolve_phases,
)

DATA = Path(__file__).parent / "data" / "phases"
PHOSPHATES = [
    "LVP",
    "LATP",
    "LTP",
    "Li3PO4-beta",
    "Li3PO4-gamma",
    "eps-LiVOPO4",
    "anti-NASICON",
    "LVP-Pbcn",
    "AlPO4",
    "Li4P2O7",
    "LiFePO4",
]


@pytest.fixture(scope="module")
def lib():
    return load_library()


def _peak_max(x, y, i):
    """Sub-grid position of the maximum at index i (parabola through 3 points)."""
    y0, y1, y2 = y[i - 1], y[i], y[i + 1]
    return x[i] + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2) * (x[1] - x[0])


# ------------------------------------------------------------------ library


def test_library_has_the_study_phases(lib):
    expected = {
        "LVP": ("Li3V2(PO4)3", 4),
        "eps-LiVOPO4": ("LiVOPO4", 4),
        "Li3PO4-beta": ("Li3PO4", 2),
        "Li3PO4-gamma": ("Li3PO4", 4),
        "LATP": ("Li1.3Al0.3Ti1.7(PO4)3", 6),
        "LTP": ("LiTi2(PO4)3", 6),
        "anti-NASICON": ("Li2Al0.15V0.77Ti1.08(PO4)3", 4),
        "LVP-Pbcn": ("Li2V2(PO4)3", 4),
        "AlPO4": ("AlPO4", 3),
        "Li4P2O7": ("Li4P2O7", 2),
        "CeO2": ("CeO2", 4),
        "Ni": ("Ni", 4),
        "LiFePO4": ("LiFePO4", 4),
    }
    assert set(expected) <= set(lib)
    for name, (formula, z) in expected.items():
        p = lib[name]
        assert p.formula == formula
        assert p.z == pytest.approx(z, abs=1e-3)
        assert p.kind in KINDS and p.kind != "user"
        assert p.provenance and p.path.is_file()
        # cell mass = Z formula masses (composition module as the independent truth)
        assert p.cell_mass == pytest.approx(z * formula_mass(formula), rel=1e-3)
    # published/certified densities (g cm^-3)
    assert lib["CeO2"].density_g_cm3 == pytest.approx(7.215, abs=0.005)
    assert lib["Ni"].density_g_cm3 == pytest.approx(8.91, abs=0.01)
    assert lib["AlPO4"].density_g_cm3 == pytest.approx(2.618, abs=0.005)  # AMCSD 0004489 header


def test_space_groups_and_kinds(lib):
    assert lib["LVP"].spacegroup.replace(" ", "") == "P121/n1"
    assert lib["eps-LiVOPO4"].spacegroup.replace(" ", "") == "P-1"
    assert lib["Li3PO4-beta"].spacegroup.replace(" ", "") == "Pmn21"
    assert lib["Li3PO4-gamma"].spacegroup.replace(" ", "") == "Pmnb"
    assert lib["LATP"].spacegroup.replace(" ", "") == "R-3c"
    assert lib["LVP"].kind == "approximate model"
    assert lib["LATP"].kind == "isostructural model"
    assert lib["CeO2"].kind == "direct"
    assert "Wang" in lib["Li3PO4-gamma"].provenance


def test_site_multiplicities_from_symmetry(lib):
    # atoms per cell = sum of Wyckoff multiplicities (International Tables)
    assert len(lib["CeO2"].structure) == 4 + 8
    assert len(lib["Ni"].structure) == 4
    # LATP: Li 6b + Li 18e + (Ti,Al) 12c x2 + P 18e + O 36f x2
    assert len(lib["LATP"].structure) == 6 + 18 + 12 + 12 + 18 + 36 + 36
    assert len(lib["LVP"].structure) == 20 * 4  # 20 general positions of P2_1/n


def test_anti_nasicon_m_site(lib):
    p = lib["anti-NASICON"]
    occ = {}
    for a in p.structure:
        if a.element in ("Al", "V", "Ti"):
            occ.setdefault(tuple(np.round(a.xyz, 4)), {})[a.element] = a.occupancy
    assert len(occ) == 8  # one 8d site of Pbna
    for site in occ.values():
        assert site == pytest.approx({"Al": 0.075, "V": 0.385, "Ti": 0.54})
        assert sum(site.values()) == pytest.approx(1.0)
    comp = p.composition
    for el, n in {"Li": 2, "Al": 0.15, "V": 0.77, "Ti": 1.08, "P": 3, "O": 12}.items():
        assert comp[el] == pytest.approx(n, abs=2e-3)


def test_aliases_and_errors(lib):
    assert lib["lvp"] is lib["LVP"]
    assert lib["LixV2(PO4)3-Pbcn"].name == "LVP-Pbcn"
    assert lib["epsilon-LiVOPO4"].name == "eps-LiVOPO4"
    assert lib["Li2(Al,V,Ti)2(PO4)3"].name == "anti-NASICON"
    assert "ceria" in lib and "nonsense" not in lib
    assert get_phase("li3po4").name == "Li3PO4-gamma"
    with pytest.raises(InputError, match="available: LVP, "):
        lib["LiCoO2"]
    with pytest.raises(InputError, match=r"alpha1-LiVOPO4=path.cif"):
        get_phase("alpha1-LiVOPO4")
    with pytest.raises(InputError, match="LiTiOPO4"):
        lib["LiTiOPO4"]
    with pytest.raises(InputError, match="not found"):
        load_cif(DATA / "missing.cif")


def test_user_cifs(tmp_path, lib):
    src = lib["Ni"].path
    folder = tmp_path / "cifs"
    folder.mkdir()
    shutil.copy(src, folder / "MyNi.cif")
    shutil.copy(src, tmp_path / "alpha1.cif")
    user = load_library(extra={"alpha1-LiVOPO4": tmp_path / "alpha1.cif"}, folder=folder)
    assert user["myni"].kind == "user" and user["myni"].formula == "Ni" and user["myni"].z == 4
    assert user["alpha1-LiVOPO4"].kind == "user"
    assert "LVP" in user
    got = resolve_phases(["LATP", f"X={tmp_path / 'alpha1.cif'}"])
    assert list(got) == ["LATP", "X"]
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell_length_a 3\n")
    with pytest.raises(InputError, match="bad.cif"):
        load_cif(bad)


# ------------------------------------------------------------------ reflections


@pytest.mark.parametrize("name", ["CeO2", "Ni"])
def test_d_spacings_match_pyfai_calibrants(lib, name):
    from pyFAI.calibrant import get_calibrant

    cal = get_calibrant(name)
    cal.wavelength = 1e-11  # 0.1 A: every line down to d = 0.05 A
    d_ref = np.array(cal.dspacing)
    ref = d_ref[d_ref > 2 * np.pi / 20.0]  # pyFAI's Ni file lists only the first 5 lines
    ours = lib[name].reflections(20.0).d_A
    ours = ours[ours > ref.min() * (1 - 1e-6)]
    assert len(ref) >= 5 and len(ours) == len(ref)
    np.testing.assert_allclose(np.sort(ours), np.sort(ref), rtol=1e-4)


def test_ceo2_structure_factors_analytic(lib):
    # fluorite: F(111) = 4 f_Ce, F(200) = 4 (f_Ce - 2 f_O), F(220) = 4 (f_Ce + 2 f_O), DW exp(-U Q^2/2)
    ceo2 = lib["CeO2"]
    rows = {r[0]: r for r in ceo2.reflections(5.0)}
    dw = lambda q: np.exp(-0.5 * DEFAULT_UISO * q * q)  # noqa: E731
    for hkl, mult, sign in [((1, 1, 1), 8, 0), ((2, 0, 0), 6, -1), ((2, 2, 0), 12, 1)]:
        _, d, q, m, f2 = rows[hkl]
        assert d == pytest.approx(5.411651 / np.sqrt(sum(h * h for h in hkl)), rel=1e-9)
        assert m == mult
        f = 4 * (form_factor("Ce", q) + 2 * sign * form_factor("O", q)) * dw(q)
        assert f2 == pytest.approx(float(f * f), rel=1e-4)
    # the strongest powder line of ceria is (111)
    assert ceo2.reflections(10.0).strongest(1).hkl[0].tolist() == [1, 1, 1]
    q = np.linspace(1, 10, 4000)
    iq = ceo2.simulate_iq(q)
    assert q[np.argmax(iq)] == pytest.approx(2 * np.pi / rows[(1, 1, 1)][1], abs=0.005)


def test_merged_multiplicity_cubic(lib):
    # (333) and (511) share d in a cubic cell: one line of multiplicity 8 + 24
    rows = {round(r[1], 6): r for r in lib["Ni"].reflections(20.0)}
    d = round(3.52387 / np.sqrt(27), 6)
    assert rows[d][3] == 32


def test_laue_reduction_matches_brute_force(lib):
    # symmetry-reduced list == plain sum over every hkl (P1 treatment of the same atoms)
    latp = lib["LATP"]
    p1 = Phase.from_structure(latp.structure, "LATP-P1", formula=latp.formula)
    a, b = latp.reflections(6.0), p1.reflections(6.0)
    np.testing.assert_allclose(a.d_A, b.d_A, rtol=1e-10)
    np.testing.assert_array_equal(a.multiplicity, b.multiplicity)
    np.testing.assert_allclose(a.f2, b.f2, rtol=1e-8)


# ------------------------------------------------------------------ I(Q)


def test_iq_peak_area_absolute(lib):
    # area of the (111) line = 2 pi^2 / (V M) * 8 |F|^2 / Q^2, with F from form factors
    ceo2 = lib["CeO2"]
    a = 5.411651
    q111 = 2 * np.pi * np.sqrt(3) / a
    f = 4 * form_factor("Ce", q111) * np.exp(-0.5 * DEFAULT_UISO * q111**2)
    expected = 2 * np.pi**2 / (a**3 * 4 * formula_mass("CeO2")) * 8 * f * f / q111**2
    q = np.linspace(q111 - 0.3, q111 + 0.3, 6001)
    area = np.trapezoid(ceo2.simulate_iq(q, fwhm_q=0.01, eta=0.0), q)
    assert area == pytest.approx(float(expected), rel=2e-3)


def test_per_mass_intensity_independent_of_cell_choice(lib):
    from diffpy.structure.expansion import supercell

    li3po4 = lib["Li3PO4-gamma"]
    double = Phase.from_structure(supercell(li3po4.structure, (2, 1, 1)), "2x", formula="Li3PO4")
    assert double.z == 2 * li3po4.z
    q = np.linspace(0.5, 8.0, 3000)
    single_iq = li3po4.simulate_iq(q)
    np.testing.assert_allclose(
        double.simulate_iq(q), single_iq, rtol=1e-6, atol=1e-9 * single_iq.max()
    )
    # mixtures by weight: w1 I1 + w2 I2; 50/50 of the same phase is the phase
    np.testing.assert_allclose(
        0.5 * single_iq + 0.5 * double.simulate_iq(q),
        single_iq,
        rtol=1e-6,
        atol=1e-9 * single_iq.max(),
    )


def test_stretch_moves_peaks_and_keeps_area(lib):
    ni = lib["Ni"]
    q = np.linspace(2.5, 4.0, 3001)
    q111 = 2 * np.pi * np.sqrt(3) / 3.52387
    for s in (0.98, 1.0, 1.03):
        iq = ni.simulate_iq(q, stretch=s, fwhm_q=0.01, eta=0.0, u_iso=0.0)
        i = np.argmax(np.where(q < 3.3, iq, 0))
        assert _peak_max(q, iq, i) == pytest.approx(q111 / s, abs=1e-4)
        # zero displacements: area ~ f(Q)^2 / (V Q^2) with V ~ s^3, Q ~ 1/s: area ~ f^2 / s
        w = q < 3.3
        area = np.trapezoid(iq[w], q[w])
        expected = (
            2
            * np.pi**2
            / (3.52387**3 * s**3 * 4 * formula_mass("Ni"))
            * 8
            * (4 * form_factor("Ni", q111 / s)) ** 2
            / (q111 / s) ** 2
        )
        assert area == pytest.approx(float(expected), rel=2e-3)


def test_size_broadening_scherrer(lib):
    ni = lib["Ni"]
    q = np.linspace(2.6, 3.6, 4001)
    iq = ni.simulate_iq(q, fwhm_q=0.0, size_A=200.0, eta=0.0)
    half = iq > iq.max() / 2
    fwhm = q[half][-1] - q[half][0]
    assert fwhm == pytest.approx(2 * np.pi * 0.9 / 200.0, rel=0.02)


def test_iq_fast_path_and_validation(lib):
    lvp = lib["LVP"]
    q = np.linspace(0.5, 25, 3000)
    base = lvp.simulate_iq(q)
    assert base.shape == q.shape and np.all(base >= 0) and base.max() > 0
    table = lvp._cache["reflections"]
    lvp.simulate_iq(q, stretch=1.02)
    assert lvp._cache["reflections"] is table  # stretched patterns reuse the reflection list
    with pytest.raises(InputError, match="stretch"):
        lvp.simulate_iq(q, stretch=-1)
    with pytest.raises(InputError, match="q grid"):
        lvp.simulate_iq([np.nan])
    with pytest.raises(InputError, match="eta"):
        lvp.simulate_iq(q, eta=2)


def test_remembered_peak_areas_give_the_same_patterns(lib):
    # Phase._peak_areas keeps the structure factors of recent (stretch, u_iso): patterns
    # from it (other widths, shorter and longer Q ranges) equal those of a fresh copy
    import pickle

    warm = pickle.loads(pickle.dumps(lib["LATP"]))  # own, empty cache
    q_short, q_long = np.linspace(0.5, 8, 900), np.linspace(0.5, 20, 2400)
    calls = [(q_short, 1.01, 0.05, None), (q_short, 1.01, 0.03, None), (q_long, 1.01, 0.03, None),
             (q_short, 1.01, 0.05, None), (q_long, 1.01, 0.05, 0.01), (q_short, 0.99, 0.05, None)]
    for q, stretch, fwhm, u in calls:
        got = warm.simulate_iq(q, stretch=stretch, fwhm_q=fwhm, u_iso=u)
        fresh = pickle.loads(pickle.dumps(lib["LATP"])).simulate_iq(q, stretch=stretch, fwhm_q=fwhm, u_iso=u)
        # equal to round-off: on some CPUs (AMD EPYC here) numpy's vector paths differ in
        # the last bit between the two (max relative difference 4e-15); any real reuse
        # error (another stretch, width or Q range) is orders of magnitude larger
        np.testing.assert_allclose(got, fresh, rtol=1e-12, atol=0)
    assert len(warm._cache["areas"]) == 3  # (1.01, None), (1.01, 0.01), (0.99, None)


# ------------------------------------------------------------------ G(r), F(Q)


@pytest.mark.parametrize("name", PHOSPHATES)
def test_first_gr_peak_is_p_o_bond(lib, name):
    phase = lib[name]
    # the structure itself: mean P-O bond of the PO4 tetrahedra (4 nearest O of each P,
    # periodic images of the 27 neighbouring cells); models distort single bonds by ~0.05 A
    base = phase.structure.lattice.base
    xyz = np.array([a.xyz for a in phase.structure])
    el = np.array([a.element for a in phase.structure])
    shifts = np.array(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij")).reshape(3, -1).T
    diff = xyz[el == "O"][None, :, None, :] - xyz[el == "P"][:, None, None, :] + shifts
    d = np.linalg.norm(diff @ base, axis=-1).min(axis=2)
    p_o = np.sort(d, axis=1)[:, :4]
    assert p_o.mean() == pytest.approx(1.53, abs=0.03)
    assert p_o.max() < 1.65
    # G(r) of the phase: its first maximum is that bond (in AlPO4 merged with Al-O 1.73 A
    # by the large room-temperature Uiso of AMCSD 0004489, maximum at ~1.58 A)
    r = np.arange(0.8, 3.0, 0.005)
    g = phase.simulate_gr(r, qmax=24.0, qdamp=0.03)
    peaks, _ = find_peaks(g, prominence=0.3)
    first = _peak_max(r, g, peaks[0])
    assert first == pytest.approx(1.53, abs=0.05)


def _read_pdfgetx3_gr(path):
    text = path.read_text().split("#### start data", 1)[1]
    rows = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    data = np.array(rows, dtype=float)
    return data[:, 0], data[:, 1]


def test_ni_gr_peak_positions_match_pdfgetx3(lib):
    r, g_ref = _read_pdfgetx3_gr(DATA / "ni300mesh_300k_nor_1-5-pdfgetx3.gr")
    g = lib["Ni"].simulate_gr(r, qmax=26.0, qdamp=0.06, u_iso=0.005)
    ref_peaks, _ = find_peaks(g_ref, prominence=1.0)
    ref_peaks = ref_peaks[r[ref_peaks] > 1.5][:10]
    ours, _ = find_peaks(g, prominence=1.0)
    ours_r = np.array([_peak_max(r, g, i) for i in ours])
    assert len(ref_peaks) == 10
    for i in ref_peaks:
        r_ref = _peak_max(r, g_ref, i)
        assert np.min(np.abs(ours_r - r_ref)) < 0.02, r_ref
    # the same fcc shells: sqrt(n/2) a for the first ones
    assert ours_r[0] == pytest.approx(3.52387 / np.sqrt(2), abs=0.01)


def test_gr_low_r_baseline_is_number_density(lib):
    # below the first neighbour G(r) = -4 pi rho0 r
    ni = lib["Ni"]
    r = np.linspace(0.3, 1.6, 131)
    g = ni.simulate_gr(r, qmax=60.0, qdamp=0.0)
    slope = np.polyfit(r, g, 1)[0]
    assert -slope == pytest.approx(4 * np.pi * 4 / 3.52387**3, rel=0.03)


def test_size_envelope_kills_long_range(lib):
    r = np.linspace(1, 30, 2901)
    g = lib["LATP"].simulate_gr(r, size_A=7.0)
    assert np.max(np.abs(g[r > 9.0])) < 0.05 * np.max(np.abs(g))


def test_fq_and_gr_are_a_sine_transform_pair(lib):
    # G from simulate_gr equals 2/pi int_0^qmax F(Q) sin(Qr) dQ with F from simulate_fq
    latp = lib["LATP"]
    qmax = 20.0
    q = np.linspace(0, qmax, 8001)
    fq = latp.simulate_fq(q, size_A=12.0, qdamp=0.0)
    r = np.linspace(1.0, 10.0, 91)
    g_direct = 2 / np.pi * np.trapezoid(fq[None, :] * np.sin(np.outer(r, q)), q, axis=1)
    g = latp.simulate_gr(r, size_A=12.0, qmax=qmax, qdamp=0.0)
    np.testing.assert_allclose(g, g_direct, atol=0.01 * np.abs(g).max())


@pytest.mark.parametrize("lorch", [False, True])
def test_termination_equals_quadrature_of_the_truncated_transform(lorch):
    # G_t(r) = 2/pi int_qmin^qmax W(Q) F(Q) sin(Qr) dQ, F(Q) = int g(r') sin(Qr') dr',
    # both integrals by brute-force quadrature (Q step 2e-4 A^-1) on a smooth test G(r):
    # Gaussian pair peaks minus a density line, tapered to zero at 12 A
    from xrdmap.phases import _terminate

    dr = 0.01
    rg = np.arange(0.0, 12.0 + dr / 2, dr)
    g = sum(a * np.exp(-0.5 * ((rg - c) / 0.08) ** 2) for a, c in ((3.0, 1.9), (1.5, 3.1), (2.0, 5.4), (1.0, 8.8)))
    g = (g - 0.3 * rg) * np.cos(0.5 * np.pi * np.clip((rg - 9.0) / 3.0, 0.0, 1.0)) ** 2
    g[0] = 0.0
    qmin, qmax = 0.6, 17.0
    q = np.arange(qmin, qmax + 1e-9, 2e-4)
    fq = np.sin(np.outer(q, rg)) @ g * dr
    w = np.sinc(q / qmax) if lorch else np.ones_like(q)
    n_out = 801
    r = np.arange(n_out) * dr
    truth = 2.0 / np.pi * np.trapezoid(w * fq * np.sin(np.outer(r, q)), q, axis=1)
    got = _terminate(g, dr, qmin, qmax, lorch, n_out)
    np.testing.assert_allclose(got, truth, atol=2e-5 * np.abs(truth).max())
    # and the termination matters at this size: the test G differs from its terminated form
    assert np.abs(got - g[:n_out]).max() > 0.05 * np.abs(g).max()


def test_merged_pair_table_keeps_every_pair(lib):
    # merging equal pairs changes no pair weight per (distance, width) and no G(r)
    from xrdmap.phases import _merged_pairs

    phase = lib["LATP"]
    table = phase._pairs(12.0)
    # the same pairs, each split in three and shuffled: merging must restore the table
    rng = np.random.default_rng(1)
    d = np.repeat(table.d, 3)
    u = np.repeat(table.usum, 3)
    w = np.repeat(table.weight, 3) * np.tile([0.5, 0.3, 0.2], len(table.d))
    order = rng.permutation(len(d))
    again = _merged_pairs(table.r_max, d[order], w[order], u[order])
    assert np.all(np.diff(again.d) >= -1e-9)  # ascending (ties of different widths in any order)
    np.testing.assert_allclose(again.d, table.d, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(again.usum, table.usum)
    np.testing.assert_allclose(again.weight, table.weight, rtol=1e-12)
    np.testing.assert_allclose(again.width_values[again.width_class], np.round(table.usum, 6))
    # and no two pairs left with the same distance and width
    assert len(np.unique(np.stack([np.round(table.d, 9), table.usum]), axis=1).T) == len(table.d)


def test_debye_route_matches_bragg_route_per_mass(lib):
    # Ni (one element: pair weights exact at every Q). Real-space route: pair sum -> F(Q) ->
    # (N/M)[f^2 + f^2 F/Q], minus the Laue diffuse (N/M) f^2 (1 - exp(-U Q^2)) that the
    # Debye-Waller factor moves out of the lines. Reciprocal route: structure factors.
    ni = lib["Ni"]
    q = np.linspace(1.0, 9.0, 8001)
    total = ni.simulate_total_iq(q, size_A=60.0, qdamp=0.0)
    f2, _ = ni.form_factor_moments(q)
    debye = total - ni.atoms_per_mass * f2 * (1 - np.exp(-DEFAULT_UISO * q * q))
    bragg = ni.simulate_iq(q, fwhm_q=0.001, size_A=60.0, eta=0.0)
    for lo, hi, rel in ((2.0, 8.5, 0.01), (2.0, 3.3, 0.05), (4.3, 5.5, 0.05)):
        w = (q >= lo) & (q <= hi)
        assert np.trapezoid(debye[w], q[w]) == pytest.approx(np.trapezoid(bragg[w], q[w]), rel=rel)


# ------------------------------------------------------------------ CLI


def test_cli_list_show_search(tmp_path):
    from typer.testing import CliRunner

    from xrdmap.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["phases", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for name in ("LVP", "eps-LiVOPO4", "Li3PO4-gamma", "LATP", "anti-NASICON", "alpha1-LiVOPO4"):
        assert name in res.output
    assert "approximate model" in res.output and "--phase alpha1-LiVOPO4=path.cif" in res.output
    res = runner.invoke(app, ["phases", "show", "ceria", "-n", "3"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "Fm-3m" in res.output.replace(" ", "") and "Z = 4" in res.output
    assert "3.1244" in res.output and "2.0110" in res.output  # (111): d = a/sqrt(3), Q = 2 pi/d
    assert "NIST SRM 674b" in res.output
    res = runner.invoke(app, ["phases", "show", "LiCoO2"])
    assert res.exit_code != 0 and "available: LVP" in str(res.exception)
    pytest.importorskip("larixite")
    out = tmp_path / "berlinite.cif"
    res = runner.invoke(
        app, ["phases", "search", "AlPO4", "--id", "4489", "-o", str(out)], env={"COLUMNS": "200"}
    )
    assert res.exit_code == 0, res.output
    assert "Berlinite" in res.output
    written = load_cif(out, "berlinite")
    # AMCSD 4489 is the entry the shipped AlPO4 CIF was transcribed from
    assert written.lattice_abc[:3] == pytest.approx(
        load_library()["AlPO4"].lattice_abc[:3], rel=1e-4
    )
    assert written.formula == "AlPO4" and written.z == pytest.approx(3)


def test_stretch_arrays_and_pickling(lib):
    import pickle

    latp = lib["LATP"]
    q = np.linspace(0.5, 10, 500)
    r = np.linspace(1, 10, 91)
    stretches = np.array([0.99, 1.0, 1.01])
    iqs = latp.simulate_iq(q, stretch=stretches)
    grs = latp.simulate_gr(r, stretch=stretches)
    assert iqs.shape == (3, 500) and grs.shape == (3, 91)
    np.testing.assert_array_equal(iqs[1], latp.simulate_iq(q))
    copy = pickle.loads(pickle.dumps(latp))
    assert copy._cache == {}  # caches are not shipped to workers
    np.testing.assert_allclose(copy.simulate_iq(q), iqs[1], rtol=1e-12)
    np.testing.assert_allclose(copy.simulate_gr(r), grs[1], rtol=1e-9, atol=1e-12)


def test_delta2_sharpens_near_neighbours(lib):
    # PDFfit-style correlated motion: sigma^2 -> sigma^2 (1 - delta2 / r^2) for each pair
    ni = lib["Ni"]
    r = np.linspace(2.0, 3.0, 2001)
    r1 = 3.52387 / np.sqrt(2)
    widths = []
    for delta2 in (0.0, 2.0):
        g = ni.simulate_gr(r, qmax=90.0, qdamp=0.0, delta2=delta2)
        g = g + 4 * np.pi * 4 / 3.52387**3 * r  # R(r)/r: the peak alone
        half = g > g.max() / 2
        widths.append(r[half][-1] - r[half][0])
    assert widths[1] / widths[0] == pytest.approx(np.sqrt(1 - 2.0 / r1**2), rel=0.03)


def test_search_without_larixite_says_how_to_install(monkeypatch):
    import sys

    from xrdmap.phases import search_amcsd

    monkeypatch.setitem(sys.modules, "larixite", None)
    monkeypatch.setitem(sys.modules, "larixite.amcsd", None)
    with pytest.raises(InputError, match=r"xrdmap\[search\]"):
        search_amcsd("Li3PO4")


def test_search_finds_lithiophosphate():
    pytest.importorskip("larixite")
    from xrdmap.phases import search_amcsd

    found = {r["amcsd_id"]: r for r in search_amcsd("Li3PO4")}
    # the two AMCSD entries the shipped Li3PO4 CIFs were transcribed from
    assert {12673, 13843} <= set(found)
    assert found[13843]["cell"][:3] == pytest.approx((6.1113, 10.4612, 4.9208))
    assert found[13843]["spacegroup"].replace(" ", "") == "Pmnb"


@pytest.mark.parametrize(("name", "r_lo", "r_hi"), [("Ni", 2.1, 2.9), ("CeO2", 1.9, 3.2)])
def test_first_shell_coordination_number(lib, name, r_lo, r_hi):
    # integral of R(r) = r (G + 4 pi rho0 r) over the first shells = X-ray-weighted
    # neighbours per atom, sum over pairs of Z_i Z_j / <Z>^2 / N
    phase = lib[name]
    r = np.linspace(r_lo, r_hi, 801)
    g = phase.simulate_gr(r, qmax=90.0, qdamp=0.0)
    rho0 = phase.atoms_per_cell / phase.volume_A3
    n = np.trapezoid(r * (g + 4 * np.pi * rho0 * r), r)
    if name == "Ni":
        expected = 12.0  # fcc
    else:
        # fluorite cell: 4 Ce x 8 O at a sqrt(3)/4 (both directions), 8 O x 6 O at a/2
        zbar = (58 + 2 * 8) / 3
        expected = (2 * 4 * 8 * 58 * 8 + 8 * 6 * 8 * 8) / zbar**2 / 12
    assert n == pytest.approx(expected, rel=0.01)


def test_prepare_builds_the_tables_later_simulations_use():
    # the same pattern with the lists built up front as when they grow with the requests,
    # and no rebuild for the simulations prepare was told of
    cif = Path(__file__).parents[1] / "xrdmap" / "data" / "cifs" / "Li3V2PO43_LVP_P21n_template_OBELiX-lrh_DLS.cif"
    fresh, prepared = load_cif(cif, "LVP-a"), load_cif(cif, "LVP-b")
    prepared.prepare(q_max=20.0, r_max=20.0, stretch_range=0.02)
    table, pairs = prepared._cache["reflections"], prepared._cache["pairs"]
    q = np.linspace(0.5, 20.0, 1500)
    r = np.linspace(0.5, 20.0, 800)
    for stretch in (0.98, 1.0, 1.02):
        np.testing.assert_allclose(prepared.simulate_iq(q, stretch=stretch), fresh.simulate_iq(q, stretch=stretch),
                                   rtol=1e-12, atol=1e-12 * fresh.simulate_iq(q).max())
        np.testing.assert_allclose(prepared.simulate_gr(r, stretch=stretch), fresh.simulate_gr(r, stretch=stretch),
                                   rtol=1e-10, atol=1e-10)
    assert prepared._cache["reflections"] is table  # no rebuild
    assert prepared._cache["pairs"] is pairs
    with pytest.raises(InputError, match="q_max"):
        prepared.prepare(q_max=-1.0)
