"""Result files: NeXus layout, exact round trip, atomic replacement, clear errors."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import xarray as xr

from xrdmap.errors import ConfigError, InputError, OutputError
from xrdmap.results import ResultFile, atomic_output, open_result, provenance, save_result


@pytest.fixture
def result() -> xr.Dataset:
    rng = np.random.default_rng(1)
    n, nq = 7, 50
    ds = xr.Dataset(
        {
            "iq": (("point", "q"), rng.random((n, nq))),
            "iq_sigma": (("point", "q"), rng.random((n, nq)).astype(np.float32)),
            "phase_fraction": (("point", "phase"), rng.random((n, 3))),
            "component_phase": (("component",), np.array(["LVP", "unassigned"])),
            "masked_pixels": (("point",), np.arange(n, dtype=np.int64)),
        },
        coords={
            "point": np.arange(n),
            "position": ("point", np.linspace(0.0, 0.6, n), {"units": "mm"}),
            "monitor": ("point", rng.uniform(0.9, 1.1, n)),
            "q": ("q", np.linspace(0.5, 25.0, nq), {"units": "1/angstrom"}),
            "phase": ["LVP", "LATP", "Li3PO4"],
        },
        attrs={"configuration": {"npt": 50, "ranges": [[1, 15]]}, "pyfai_method": "bbox,csr,cython"},
    )
    ds["iq"].attrs["units"] = "arb. units"
    return ds


def test_round_trip_is_exact(tmp_path, result):
    path = save_result(result, tmp_path / "r.h5")
    back = open_result(path)
    xr.testing.assert_identical(back, result)
    assert back["iq_sigma"].dtype == np.float32


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_compression_is_chosen_and_lossless(tmp_path, result, compression):
    rng = np.random.default_rng(2)
    big = result.assign(iq=(("point", "q"), rng.normal(size=(7, 50)) * 1e3))
    big = big.reindex(point=np.arange(100), fill_value=1.5).assign(gr=(("point", "q"), rng.random((100, 50))))
    path = save_result(big, tmp_path / "r.h5", compression=compression)
    with h5py.File(path, "r") as fh:
        for name in ("iq", "gr"):  # 5000 values: compressed with gzip, never without
            dset = fh[f"entry/process/{name}/data"]
            assert dset.compression == (None if compression == "none" else "gzip")
            assert dset.shuffle == (compression == "gzip")
        assert fh["entry/process/phase_fraction/data"].compression is None  # 300 values: never
    xr.testing.assert_identical(open_result(path), big)


def test_unknown_compression_is_a_config_error(tmp_path, result):
    with pytest.raises(ConfigError, match=r"compression 'lzf': expected one of none, gzip"):
        save_result(result, tmp_path / "r.h5", compression="lzf")
    assert not list(tmp_path.iterdir())  # nothing written


def test_layout_is_plottable_nexus(tmp_path, result):
    path = save_result(result, tmp_path / "r.h5")
    with h5py.File(path, "r") as fh:
        assert fh.attrs["default"] == "entry"
        assert fh["entry"].attrs["NX_class"] == "NXentry"
        assert fh["entry/process"].attrs["NX_class"] == "NXprocess"
        default = fh["entry"].attrs["default"]
        group = fh["entry"][default]
        assert group.attrs["NX_class"] == "NXdata"
        iq = fh["entry/process/iq"]
        assert iq.attrs["signal"] == "data"
        assert list(iq.attrs["axes"]) == ["position", "q"]
        # the axis datasets have the length of the signal's dimensions
        assert iq["position"].shape == (7,)
        assert iq["q"].shape == (50,)
        np.testing.assert_array_equal(iq["data"][()], result["iq"].values)


def test_failed_write_keeps_previous_file(tmp_path, result):
    path = save_result(result, tmp_path / "r.h5")
    bad = result.assign(broken=(("point",), np.array([object()] * 7, dtype=object)))
    bad["broken"].attrs["note"] = {1, 2}  # a set is not storable: the write fails midway
    with pytest.raises(TypeError):
        save_result(bad, path)
    xr.testing.assert_identical(open_result(path), result)
    assert [p.name for p in tmp_path.iterdir()] == ["r.h5"]


def _h5_tree(path):
    """Every object of an HDF5 file with its attributes and data (links resolved)."""
    out = {}

    def visit(name, obj):
        attrs = {k: np.asarray(v).tolist() for k, v in obj.attrs.items() if k != "file_time"}
        data = np.asarray(obj[()]).tolist() if isinstance(obj, h5py.Dataset) else None
        out[name] = (attrs, data)

    with h5py.File(path, "r") as fh:
        fh.visititems(visit)
        out[""] = ({k: np.asarray(v).tolist() for k, v in fh.attrs.items() if k not in ("file_time", "file_name")},
                   None)
    return out


def test_result_file_in_steps_equals_save_result(tmp_path, result):
    one = save_result(result, tmp_path / "one.h5")
    target = tmp_path / "steps.h5"
    target.write_text("previous")
    steps = ResultFile(target)
    steps.write(result, ["iq", "iq_sigma"])
    assert target.read_text() == "previous"  # nothing at the path until close
    # the final dataset gains variables, a coordinate and attributes after the first step
    assert steps.close(result) == target
    assert _h5_tree(target) == _h5_tree(one)
    xr.testing.assert_identical(open_result(target), result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "steps.h5"]


def test_result_file_rewrites_a_variable_changed_after_its_step(tmp_path, result):
    steps = ResultFile(tmp_path / "r.h5")
    early = result.assign(iq=result["iq"] * 0.0)
    early = early.assign_coords(q=early["q"] + 1.0)  # a coordinate changed too
    steps.write(early, ["iq"])
    path = steps.close(result)
    xr.testing.assert_identical(open_result(path), result)
    assert _h5_tree(path) == _h5_tree(save_result(result, tmp_path / "one.h5"))


def test_discarded_result_file_leaves_the_previous_one(tmp_path, result):
    path = save_result(result, tmp_path / "r.h5")
    steps = ResultFile(path)
    steps.write(result.assign(iq=result["iq"] + 1), ["iq"])
    steps.discard()
    xr.testing.assert_identical(open_result(path), result)
    assert [p.name for p in tmp_path.iterdir()] == ["r.h5"]


def test_atomic_output_removes_partial_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_output_in_missing_directory_is_an_output_error(tmp_path, result):
    with pytest.raises(OutputError, match="does not exist"):
        save_result(result, tmp_path / "nope" / "r.h5")


def test_open_result_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_result(tmp_path / "missing.h5")
    notes = tmp_path / "notes.h5"
    notes.write_text("not hdf5")
    with pytest.raises(InputError, match="notes.h5"):
        open_result(notes)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh["x"] = 1
    with pytest.raises(InputError, match="not an xrdmap result"):
        open_result(other)


def test_provenance_records_versions_and_checksums(tmp_path):
    f = tmp_path / "input.bin"
    f.write_bytes(b"abc")
    prov = provenance({"npt": 10}, inputs=[f])
    # sha256("abc") from FIPS 180-2, appendix B.1
    assert prov["input_checksums"][str(f)] == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert "pyFAI" in prov["software_versions"]
    assert prov["configuration"] == {"npt": 10}


def test_outputs_follow_the_umask(tmp_path, result):
    old = os.umask(0o022)
    try:
        path = save_result(result, tmp_path / "r.h5")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_export_columns_round_trip_through_the_text_reader(tmp_path, result):
    from xrdmap.results import export_columns
    from xrdmap.textio import read_columns

    files = export_columns(result, tmp_path, kind="xy")
    assert [f.name for f in files[:2]] == ["point_0000.xy", "point_0001.xy"]
    assert len(files) == result.sizes["point"]
    cols = read_columns(files[3])
    np.testing.assert_allclose(cols[:, 0], result["q"].values, rtol=1e-8)
    np.testing.assert_allclose(cols[:, 1], result["iq"][3].values, rtol=1e-8)
    np.testing.assert_allclose(cols[:, 2], result["iq_sigma"][3].values, rtol=1e-6)
    header = files[3].read_text().split("#### start data")[0]
    assert "position = 0.3" in header
    with pytest.raises(InputError, match="'gr'"):
        export_columns(result, tmp_path, kind="gr")
