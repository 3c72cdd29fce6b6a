"""xrdmap.textio: reading headers of real files, PDFgetX3-style writing and round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xrdmap.errors import ConfigError, InputError
from xrdmap.pdf import read_pdfgetx3_cfg
from xrdmap.textio import read_columns, read_pattern, write_columns

DATA = Path(__file__).parent / "data" / "pdfgetx3"


def test_reads_mar_utilities_chi_after_start_marker():
    data = read_columns(DATA / "Ni" / "ni300mesh_300k_nor_1-5.chi")
    # 3460 lines: 9 comment lines, the "##### start data" marker, 3450 rows of data
    assert data.shape == (3450, 2)
    assert data[0, 0] == pytest.approx(0.006) and data[-1, 0] == pytest.approx(41.394)


def test_reads_pdfgetx3_gr_skipping_config_header():
    data = read_columns(DATA / "Ni" / "ni300mesh_300k_nor_1-5-pdfgetx3.gr")
    assert data.shape == (3001, 2)
    assert data[1].tolist() == [0.01, -0.00272255]


def test_reads_fit2d_chi_with_count_line(tmp_path):
    path = tmp_path / "fit2d.chi"
    path.write_text(
        "ceo2_001.tif: 2-Theta Angle (Degrees)\n2-Theta Angle (Degrees)\nIntensity\n       3\n"
        "  1.000000E+00  2.500000E+02\n  1.100000E+00  2.600000E+02\n  1.200000E+00  2.700000E+02\n"
    )
    data = read_columns(path)
    np.testing.assert_allclose(data, [[1.0, 250.0], [1.1, 260.0], [1.2, 270.0]])


def test_read_pattern_units(tmp_path):
    path = tmp_path / "p.xy"
    path.write_text("# Q in nm^-1\n10 1 0.1\n20 2 0.2\n30 3 0.3\n")
    da = read_pattern(path, dataformat="Qnm")
    np.testing.assert_allclose(da["q"].values, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(da["sigma"].values, [0.1, 0.2, 0.3])
    lam = 0.5
    da = read_pattern(path, dataformat="twotheta", wavelength_A=lam, twothetazero_deg=1.0)
    np.testing.assert_allclose(
        da["q"].values, 4 * np.pi * np.sin(np.deg2rad([9.0, 19.0, 29.0]) / 2) / lam
    )
    with pytest.raises(InputError, match="wavelength"):
        read_pattern(path, dataformat="twotheta")
    with pytest.raises(InputError, match="wavelength"):
        read_pattern(path, dataformat="twotheta", wavelength_A=-1.0)


def test_garbage_and_missing_files(tmp_path):
    path = tmp_path / "junk.chi"
    path.write_text("hello\nworld 1\n")
    with pytest.raises(InputError, match="no rows of numbers"):
        read_columns(path)
    with pytest.raises(InputError, match="does not exist"):
        read_columns(tmp_path / "missing.chi")


def test_write_round_trip_and_header_parsed_as_pdfgetx3_config(tmp_path):
    r = np.arange(0, 5, 0.01)
    g = np.sin(r)
    params = {
        "dataformat": "twotheta",
        "inputfile": "x.chi",
        "wavelength": 0.142774,
        "composition": "Ce 1 O 2",
        "qmin": 0.5,
        "qmax": 24.0,
        "qmaxinst": 25.0,
        "rpoly": 0.9,
        "rmin": 0.0,
        "rmax": 4.99,
        "rstep": 0.01,
        "bgscale": 1.0,
        "lorch": True,
    }
    path = write_columns(
        tmp_path / "x.gr", r, g, kind="gr", params=params, dy=0.1 * np.ones_like(r)
    )
    back = read_columns(path)
    np.testing.assert_allclose(back[:, 0], r, atol=1e-12)
    np.testing.assert_allclose(back[:, 1], g, rtol=1e-8)
    np.testing.assert_allclose(back[:, 2], 0.1)
    cfg = read_pdfgetx3_cfg(path)
    for key in ("wavelength", "qmin", "qmax", "qmaxinst", "rpoly", "rstep"):
        assert cfg[key] == pytest.approx(params[key])
    assert cfg["composition"] == "Ce 1 O 2" and cfg["outputtype"] == ["gr"] and cfg["lorch"] is True
    text = path.read_text(encoding="utf-8")
    assert "#### start data\n#S 1\n#L r(Å)  G(Å$^{-2}$)  dG(Å$^{-2}$)\n" in text


def test_reference_cfg_files():
    ni = read_pdfgetx3_cfg(DATA / "Ni" / "pdfgetx3.cfg")
    assert ni["dataformat"] == "twotheta" and ni["wavelength"] == 0.142774
    assert (
        ni["qmaxinst"] == 26.5 and ni["qmax"] == 26.0 and ni["qmin"] == 0.0
    )  # qmin commented out: default
    assert ni["backgroundfile"] == "kapton_bgrd_300k_nor_2-3.chi" and ni["outputtype"] == ["gr"]
    header = read_pdfgetx3_cfg(DATA / "CeO2" / "ceo2_300k_nor_1-6-pdfgetx3.gr")
    assert (
        header["composition"] == "Ce 1  O 2"
        and header["qmaxinst"] == 27.0
        and header["bgscale"] == 1.0
    )


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("wavelength = -0.1", "wavelength"),
        ("rpoly = 0", "rpoly"),
        ("rstep = 0", "rstep"),
        ("dataformat = tof", "dataformat"),
        ("composition = Qq2", "unknown element"),
        ("qmax = lots", "number"),
        ("outputtype = gr, pdf", "outputtype"),
    ],
)
def test_bad_cfg_values(tmp_path, line, match):
    path = tmp_path / "bad.cfg"
    path.write_text(f"[DEFAULT]\ndataformat = QA\n{line}\n")
    with pytest.raises(ConfigError, match=match):
        read_pdfgetx3_cfg(path)


def test_cfg_without_default_section(tmp_path):
    path = tmp_path / "bad.cfg"
    path.write_text("qmax = 20\n")
    with pytest.raises(ConfigError, match="DEFAULT"):
        read_pdfgetx3_cfg(path)
