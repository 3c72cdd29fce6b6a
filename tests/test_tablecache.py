"""On-disk cache of reflection and pair tables (xrdmap._tablecache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from xrdmap import _tablecache
from xrdmap.phases import CIF_DIR, load_cif

LATP_CIF = next(Path(CIF_DIR).glob("*LATP*.cif"))
Q = np.linspace(0.8, 15.0, 1200)
R = np.linspace(1.0, 12.0, 600)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XRDMAP_CACHE_DIR", str(tmp_path))
    return tmp_path / "tables"


def _patterns(phase):
    return phase.simulate_iq(Q, stretch=1.004), phase.simulate_gr(R, stretch=0.997, qmax=18.0, lorch=True)


def _no_build(monkeypatch):
    from xrdmap.phases import Phase

    def fail(*_):
        raise AssertionError("table built although it was cached")

    monkeypatch.setattr(Phase, "_compute_table", fail)
    monkeypatch.setattr(Phase, "_compute_pairs", fail)


def test_second_phase_reads_the_tables_and_simulates_the_same(cache, monkeypatch):
    first = _patterns(load_cif(LATP_CIF, "LATP-a"))
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.npz")) == ["pairs", "reflections"]
    _no_build(monkeypatch)
    again = _patterns(load_cif(LATP_CIF, "LATP-b"))  # another object, the same structure
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_a_changed_structure_gets_its_own_tables(cache, tmp_path):
    load_cif(LATP_CIF, "LATP").simulate_iq(Q)
    # the same CIF with a 1 % longer c axis: a different lattice, so different tables
    text = LATP_CIF.read_text()
    import re

    m = re.search(r"_cell_length_c\s+([0-9.]+)", text)
    changed = tmp_path / "latp_long_c.cif"
    changed.write_text(text.replace(m.group(0), f"_cell_length_c {float(m.group(1)) * 1.01:.5f}"))
    long_c = load_cif(changed, "LATP-long-c")
    iq = long_c.simulate_iq(Q)
    assert len(list(cache.glob("reflections-*.npz"))) == 2
    # and its pattern is that of its own lattice: 00l lines move by 1 %, so it differs
    assert not np.allclose(iq, load_cif(LATP_CIF, "LATP-2").simulate_iq(Q))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong arrays"])
def test_a_damaged_file_is_rebuilt(cache, damage):
    truth = _patterns(load_cif(LATP_CIF, "LATP-a"))
    path = next(cache.glob("reflections-*.npz"))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a numpy file")
    else:
        np.savez(path, hkl=np.zeros(3), q0=np.zeros(4))
    again = _patterns(load_cif(LATP_CIF, "LATP-b"))
    for a, b in zip(truth, again):
        np.testing.assert_array_equal(a, b)
    with np.load(path) as npz:  # rewritten, complete
        assert set(npz.files) == {"hkl", "q0", "mult", "partial"}


def test_disabled_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XRDMAP_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _tablecache.cache_dir() is None
    _patterns(load_cif(LATP_CIF, "LATP"))
    assert list(tmp_path.rglob("*.npz")) == []


def test_default_location_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XRDMAP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _tablecache.cache_dir() == tmp_path / "xrdmap" / "tables"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only folder")
def test_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    (ro / "tables").mkdir(parents=True)
    (ro / "tables").chmod(0o500)
    monkeypatch.setenv("XRDMAP_CACHE_DIR", str(ro))
    try:
        iq, gr = _patterns(load_cif(LATP_CIF, "LATP"))
    finally:
        (ro / "tables").chmod(0o700)
    assert np.isfinite(iq).all() and np.isfinite(gr).all()


def test_a_cache_path_that_is_a_file_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XRDMAP_CACHE_DIR", str(blocker))
    iq, _ = _patterns(load_cif(LATP_CIF, "LATP"))
    assert np.isfinite(iq).all()


def test_prune_keeps_the_most_recently_used(tmp_path):
    for i, age in enumerate((300, 100, 200)):
        p = tmp_path / f"t{i}.npz"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (1e9 - age, 1e9 - age))
    _tablecache._prune(tmp_path, max_bytes=2000)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["t1.npz", "t2.npz"]


def test_digest_depends_on_every_input():
    base = {"a": np.arange(3.0), "b": "Li O"}
    key = _tablecache.digest("pairs", 30.0, base)
    assert key.startswith("pairs-")
    assert _tablecache.digest("pairs", 30.0, {"a": np.arange(3.0), "b": "Li O"}) == key
    assert _tablecache.digest("pairs", 31.0, base) != key
    assert _tablecache.digest("reflections", 30.0, base) != key
    assert _tablecache.digest("pairs", 30.0, {**base, "a": np.arange(3.0) + 1e-12}) != key
    assert _tablecache.digest("pairs", 30.0, {**base, "a": np.arange(3)}) != key  # dtype
    assert _tablecache.digest("pairs", 30.0, {**base, "b": "Li  O"}) != key
