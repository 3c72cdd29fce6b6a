"""Run configuration: template, validation messages, overrides, path resolution."""

from __future__ import annotations

import pytest
import yaml

from xrdmap.config import TEMPLATE, RunConfig, apply_overrides, load_config, validate_config
from xrdmap.errors import ConfigError


def test_template_is_valid_and_matches_the_defaults():
    cfg = validate_config(yaml.safe_load(TEMPLATE))
    defaults = RunConfig(scan={"source": "scan.h5"}, geometry={"poni": "geometry.poni"})
    assert cfg == defaults


def test_published_processing_is_the_default():
    cfg = RunConfig(scan={"source": "s.h5"}, geometry={"poni": "g.poni"})
    # G(r) over Q = 0.5-24 A^-1 with Lorch; NMF on 1-20 A and 1-15 A^-1 trying 2-5 components
    assert (cfg.pdf.qmin, cfg.pdf.qmax, cfg.pdf.lorch) == (0.5, 24.0, True)
    assert cfg.decompose.r_ranges == [(1.0, 20.0)]
    assert cfg.decompose.q_ranges == [(1.0, 15.0)]
    assert (cfg.decompose.min_components, cfg.decompose.max_components) == (2, 5)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"scan": {"source": "s.h5", "bogus": 1}}, "scan.bogus: unknown key"),
        ({"integration": {"npt": "many"}}, "integration.npt"),
        ({"integration": {"npt": 1}}, "integration.npt"),
        ({"pdf": {"qmin": 30.0}}, "pdf.qmin"),
        ({"pdf": {"rstep": -0.01}}, "pdf.rstep"),
        ({"decompose": {"q_ranges": [[15, 1]]}}, "decompose.q_ranges"),
        ({"background": {"scale": -1}}, "background.scale"),
        ({"compute": {"cluster": "pbs"}}, "compute.cluster"),
        ({"unknown_section": {}}, "unknown_section: unknown key"),
    ],
)
def test_errors_name_the_key(patch, message):
    data = {"scan": {"source": "s.h5"}, "geometry": {"poni": "g.poni"}}
    for section, values in patch.items():
        data[section] = {**data.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_config(data)


def test_missing_sections_are_reported():
    with pytest.raises(ConfigError, match="geometry: Field required"):
        validate_config({"scan": {"source": "s.h5"}})
    with pytest.raises(ConfigError, match="expected a mapping"):
        validate_config(["scan"])


def test_overrides_parse_yaml_values():
    data = apply_overrides({"scan": {"source": "a"}}, ["integration.npt=2000", "decompose.q_ranges=[[1, 10]]",
                                                       "decompose.components=3", "phases.names=[LVP, LATP]"])
    assert data["integration"]["npt"] == 2000
    assert data["decompose"]["q_ranges"] == [[1, 10]]
    assert data["phases"]["names"] == ["LVP", "LATP"]
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["npt2000"])


def test_load_config_resolves_paths_relative_to_the_file(tmp_path):
    sub = tmp_path / "beamtime"
    sub.mkdir()
    cfg_file = sub / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"scan": {"source": "scan.h5"}, "geometry": {"poni": "cal/g.poni"}}))
    cfg = load_config(cfg_file, ["output.path=out/result.h5"])
    assert cfg.scan.source == str(sub / "scan.h5")
    assert cfg.geometry.poni == str(sub / "cal" / "g.poni")
    assert cfg.output.path == str(sub / "out" / "result.h5")


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scan: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


WORKFLOWS = sorted((__import__("pathlib").Path(__file__).parents[1] / "workflows").glob("*.yaml"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_shipped_workflows_are_valid(path):
    cfg = load_config(path)
    assert cfg.pdf.lorch
    if path.stem == "i15-1_linescan":
        assert cfg.decompose.r_ranges == [(1.0, 20.0)] and cfg.decompose.q_ranges == [(1.0, 15.0)]
        assert (cfg.decompose.min_components, cfg.decompose.max_components) == (2, 5)
        assert (cfg.pdf.qmin, cfg.pdf.qmax) == (0.5, 24.0)
    if path.stem == "slurm":
        assert cfg.compute.cluster == "slurm"
    # the phase names (aliases included) resolve in the shipped library
    from xrdmap.pipeline import _phase_library

    chosen = _phase_library(cfg)
    assert len(chosen) == len(cfg.phases.names or chosen)


def test_there_are_three_workflows():
    assert {p.stem for p in WORKFLOWS} >= {"i15-1_linescan", "insitu_timeseries", "slurm"}
