"""Tests of xrdmap.report: the static HTML report of a synthetic result with known numbers."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import xarray as xr
from test_maps import PHASES, TRUE_BOUNDARIES, TRUE_SLICES, make_result

from xrdmap import maps
from xrdmap.report import render_report, write_report

K_TRIED = [2, 3, 4, 5]
ERRORS = [12.5, 4.25, 4.0, 3.9]


def full_result() -> xr.Dataset:
    ds = make_result()
    ds["nmf_q_reconstruction_error"] = ("nmf_q_n_components", ERRORS)
    ds = ds.assign_coords(nmf_q_n_components=K_TRIED)
    ds.attrs["nmf_q_n_components"] = 3
    ds.attrs["nmf_q_criterion"] = "smallest k with relative improvement <= 0.05"
    ds.attrs["nmf_r_n_components"] = 2
    scores = np.array([[0.93, 0.40, 0.20], [0.35, 0.87, 0.30], [0.41, 0.12, 0.38]])
    ds["q_phase_score"] = (("component", "phase"), scores)
    ds.attrs["input_checksums"] = {"/data/scan<7>&co.h5": "ab" * 32}
    ds.attrs["software_versions"] = {"xrdmap": "0.1.0", "pyFAI": "2025.1"}
    ds.attrs["configuration"] = {
        "scan": {"source": "/data/scan<7>&co.h5"},
        "integration": {"npt": 2000, "polarization_factor": 0.99},
        "pdf": {"qmax": 24.0, "lorch": True, "composition": "Li3V2(PO4)3"},
        "note": "<script>alert('x')</script>",
    }
    return ds


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report_html() -> str:
    return render_report(full_result(), title="Pellet <A> & B")


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, flags=re.S)
    assert m, sid
    return m.group(1)


def test_sections_present_and_parseable(report_html):
    parser = _Collector()
    parser.feed(report_html)
    ids = [a.get("id") for t, a in parser.tags if t == "section"]
    assert ids[:7] == ["summary", "integration", "pdf", "nmf", "assignment", "zones", "quality"]
    assert "configuration" in ids
    assert any(t == "details" for t, _ in parser.tags)  # collapsible configuration
    assert not any(t == "script" for t, _ in parser.tags)
    assert not any(t == "link" or (t == "img" and not a["src"].startswith("data:")) for t, a in parser.tags)


def test_text_is_escaped(report_html):
    assert "<script>" not in report_html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in report_html
    assert "<title>Pellet &lt;A&gt; &amp; B</title>" in report_html
    assert "/data/scan&lt;7&gt;&amp;co.h5" in report_html


def test_summary_numbers(report_html):
    summary = _section(report_html, "summary")
    assert "<td>scan points</td><td>50</td>" in summary
    assert "0 – 4.9 (step 0.1)" in summary
    assert "ab" * 32 in summary
    assert "0.1.0" in summary


def test_nmf_and_assignment(report_html):
    nmf = _section(report_html, "nmf")
    assert '<strong id="nmf-q-k">3</strong>' in nmf
    assert '<strong id="nmf-r-k">2</strong>' in nmf
    rows = re.findall(r"<tr( class=\"chosen\")?><td class=\"num\">(\d)</td><td class=\"num\">([\d.]+)</td>", nmf)
    assert [(int(k), float(e)) for _, k, e in rows] == list(zip(K_TRIED, ERRORS, strict=True))
    assert [k for chosen, k, _ in rows if chosen] == ["3"]
    assign = _section(report_html, "assignment")
    assert "Li3V2(PO4)3" in assign and "0.930" in assign and "0.870" in assign
    # runners-up of C1 by descending score, independent of the assignment: Li3PO4 then epsilon
    c1 = re.search(r"<td>C1</td>(.*?)</tr>", assign, flags=re.S).group(1)
    assert "Li3PO4 (0.400), epsilon-LiVOPO4 (0.200)" in c1
    # real space: 2 components, the NaN-padded third is not listed
    r_part = assign.split("Components in r")[1]
    assert r_part.count("<td>C") == 2


def test_zone_table_numbers(report_html):
    zones = _section(report_html, "zones")
    ds = full_result()
    pf = ds["phase_fraction"].values
    for b in TRUE_BOUNDARIES:
        assert f"{b:.4g} mm" in zones
    rows = re.findall(r"<tr><td class=\"num\">(\d)</td>(.*?)</tr>", zones, flags=re.S)
    assert len(rows) == 3
    for (zone, row), sl in zip(rows, TRUE_SLICES, strict=True):
        means = [f"{100 * m:.1f}" for m in pf[sl].mean(axis=0)]
        found = re.findall(r'<td class="num">([\d.]+) <span', row)
        assert found == means, zone
        assert f"{100 * ds['residual'].values[sl].mean():.1f}</td>" in row
    for p in PHASES:
        assert f"{p} (wt%)" in zones


def test_quality_flags(report_html):
    quality = _section(report_html, "quality")
    assert 'id="n-flagged">3</strong> of 50' in quality
    assert "2.2 – 2.4" in quality


def test_figures_embedded_as_png(report_html):
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report_html)
    expected = maps.make_figures(full_result())
    assert len(images) == len(expected)
    for img in images:
        assert base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_with_svg_files(tmp_path):
    ds = full_result()
    paths = maps.save_figures(ds, tmp_path, formats=("svg",), what=["fractions"])
    out = write_report(ds, tmp_path / "report.html", figures=paths)
    text = out.read_text(encoding="utf-8")
    assert text.count("<svg") == 2 and "<img" not in text  # inline SVG, not <img> links
    assert "<?xml" not in text
    assert not list(tmp_path.glob("*.partial"))


def test_minimal_result_still_reports(tmp_path):
    ds = make_result()[["iq"]]
    text = write_report(ds, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "No NMF decomposition in this result." in text
    assert "No phase fractions in this result." in text
    assert "data:image/png;base64," in text  # the I(Q) map


def test_report_cli(tmp_path):
    from typer.testing import CliRunner

    from xrdmap.cli import app
    from xrdmap.results import save_result

    path = save_result(full_result(), tmp_path / "result.h5")
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text(encoding="utf-8")
    assert '<strong id="nmf-q-k">3</strong>' in text
    assert "result.h5" in text


def test_nmf_table_shows_svd_errors_beside_the_nmf_error_of_the_chosen_count():
    # with the SVD criterion only the chosen count is factorised: its NMF error is shown,
    # the other counts show the best rank-k (SVD) error and a dash
    ds = full_result()
    svd = [11.0, 4.0, 3.8, 3.7]
    ds["nmf_q_svd_error"] = ("nmf_q_n_components", svd)
    ds["nmf_q_reconstruction_error"] = ("nmf_q_n_components", [np.nan, 4.25, np.nan, np.nan])
    nmf = _section(render_report(ds, title="t"), "nmf")
    assert "best rank-k error (SVD)" in nmf and "NMF reconstruction error" in nmf
    rows = re.findall(r"<tr(?: class=\"chosen\")?><td class=\"num\">(\d)</td><td class=\"num\">([\d.]+)</td>"
                      r"<td class=\"num\">([^<]+)</td>", nmf)
    assert [(int(k), float(e), n) for k, e, n in rows] == [(2, 11.0, "–"), (3, 4.0, "4.25"), (4, 3.8, "–"),
                                                           (5, 3.7, "–")]
