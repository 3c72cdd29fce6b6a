"""Run configuration: a pydantic-validated YAML file, one section per pipeline stage.

``xrdmap config init`` writes :data:`TEMPLATE`, a commented starting point. Every field
can be overridden on the command line with ``--set section.key=value`` (the value is
parsed as YAML, so ``--set decompose.q_ranges='[[1, 15]]'`` works).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xrdmap.errors import ConfigError

__all__ = ["RunConfig", "load_config", "apply_overrides", "TEMPLATE"]

Range = tuple[float, float]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ranges(ranges: list[Range] | None) -> list[Range] | None:
    for lo, hi in ranges or []:
        if not lo < hi:
            raise ValueError(f"range [{lo}, {hi}] must have low < high")
    return ranges


class ScanConfig(_Section):
    source: str | list[str] = Field(description="HDF5/NeXus scan file, a glob of images, or a list of image files")
    frames_path: str | None = None
    positions_path: str | None = None
    times_path: str | None = None
    monitor_path: str | None = None
    positions: str | None = Field(None, description="'file.csv:column' or 'start,step' (mm)")
    times: str | None = Field(None, description="'file.csv:column' or 'start,step' (s)")
    chunk_frames: int | None = Field(None, ge=1)
    time_bin: int = Field(1, ge=1, description="average every N consecutive points (time series)")
    time_window: Range | None = Field(None, description="keep points with t0 <= time <= t1 (s)")

    @field_validator("time_window")
    @classmethod
    def _window(cls, v):
        return _check_ranges([v])[0] if v else v


class GeometryConfig(_Section):
    poni: str = Field(description="pyFAI PONI file")
    mask: str | None = Field(None, description="mask image (EDF/TIFF/NPY), nonzero = masked")
    dark: str | None = None
    flat: str | None = None


class IntegrationConfig(_Section):
    npt: int = Field(3000, ge=2)
    q_range: Range | None = (0.5, 25.0)
    polarization_factor: float | None = Field(0.99, ge=-1.0, le=1.0)
    error_model: Literal["poisson"] = "poisson"
    outlier_sigma: float | None = Field(
        None, gt=0, description="sigma clipping along rings for spotty frames (standard deviations); null: off"
    )
    saturation: float | Literal["auto"] | None = Field(
        "auto", description="counts at which a pixel saturates; auto: the maximum of unsigned-integer frames"
    )

    @field_validator("q_range")
    @classmethod
    def _range(cls, v):
        return _check_ranges([v])[0] if v else v


class BackgroundConfig(_Section):
    file: str | None = Field(None, description="container/Kapton measurement: frames file, image or .xy/.chi pattern")
    frames_path: str | None = None
    monitor: float | str | None = Field(
        None, description="incident-flux monitor of the background: a number, or a dataset path in its HDF5 file"
    )
    scale: float | Literal["auto"] = 1.0

    @field_validator("scale")
    @classmethod
    def _scale(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("background scale must be >= 0 or 'auto'")
        return v


class PDFConfig(_Section):
    enabled: bool = True
    composition: str = Field("Li3V2(PO4)3", description="formula or mixture by weight, e.g. '0.6 Li3V2(PO4)3 + 0.4 LiTi2(PO4)3'")
    qmin: float = Field(0.5, ge=0)
    qmax: float = Field(24.0, gt=0)
    qmaxinst: float | None = Field(25.0, gt=0)
    rpoly: float = Field(0.9, gt=0)
    rmin: float = Field(0.0, ge=0)
    rmax: float = Field(30.0, gt=0)
    rstep: float = Field(0.01, gt=0)
    lorch: bool = True

    @field_validator("composition")
    @classmethod
    def _composition(cls, v: str) -> str:
        from xrdmap.composition import parse_composition
        from xrdmap.errors import InputError

        try:
            parse_composition(v)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _order(self):
        if self.qmin >= self.qmax:
            raise ValueError(f"pdf.qmin ({self.qmin}) must be below pdf.qmax ({self.qmax})")
        if self.rmin >= self.rmax:
            raise ValueError(f"pdf.rmin ({self.rmin}) must be below pdf.rmax ({self.rmax})")
        return self


class DecomposeConfig(_Section):
    q_ranges: list[Range] | None = Field(default_factory=lambda: [(1.0, 15.0)], description="active Q ranges (A^-1); null: skip NMF in Q")
    r_ranges: list[Range] | None = Field(default_factory=lambda: [(1.0, 20.0)], description="active r ranges (A); null: skip NMF in r")
    components: int | Literal["auto"] = "auto"
    min_components: int = Field(2, ge=1)
    max_components: int = Field(5, ge=1)
    random_state: int = 0
    q_init: Literal["spa", "nndsvd", "nndsvda", "random"] = Field(
        "spa", description="start of the NMF in Q: 'spa' = the scan's most distinct patterns (end-member "
        "components, named by reference mixtures); 'nndsvd' = the NMF-mapping app's (mean pattern and differences). "
        "NMF in r always starts from nndsvd"
    )
    solver: Literal["anls", "cd"] = Field(
        "anls", description="NMF solver: 'anls' = alternating exact non-negative least squares with "
        "extrapolation, which converges in tens of rounds; 'cd' = scikit-learn's coordinate descent, stopped "
        "after 1000 iterations, often far above the minimum (the NMF-mapping app's: in r, from nndsvd, it gives "
        "the app's weights, hence the published study's)"
    )
    smoothness: float = Field(0.0, ge=0)
    q_diffuse: Literal["subtract", "keep"] = Field(
        "subtract", description="subtract the smooth diffuse scattering before NMF in Q, so components are Bragg patterns"
    )
    q_diffuse_window_A: float = Field(1.0, gt=0, description="window (A^-1) of the diffuse-baseline opening; wider than the Bragg peaks")

    _q = field_validator("q_ranges")(classmethod(lambda cls, v: _check_ranges(v)))
    _r = field_validator("r_ranges")(classmethod(lambda cls, v: _check_ranges(v)))

    @model_validator(mode="after")
    def _counts(self):
        if self.min_components > self.max_components:
            raise ValueError("decompose.min_components must not exceed decompose.max_components")
        return self


class PhasesConfig(_Section):
    names: list[str] | None = Field(None, description="reference phases to consider; null: the whole shipped library")
    extra: dict[str, str] = Field(default_factory=dict, description="NAME: path.cif of user phases")
    folder: str | None = Field(None, description="folder of user CIF files")
    stretch_range: float = Field(0.03, ge=0, le=0.2)


class SeriesConfig(_Section):
    """Descriptors of time series (used when the scan has a ``time`` coordinate)."""

    enabled: bool | Literal["auto"] = "auto"
    phase: str | None = Field(None, description="phase whose lattice scale is refined per point")
    peaks: list[Range] = Field(default_factory=list, description="Q windows (A^-1) of Bragg peaks to follow")
    q_range: Range = (1.0, 15.0)
    lattice_q_range: Range | None = Field(
        None, description="Q range (A^-1) of the lattice-scale fit; null: q_range. Start above broad glass humps"
    )

    _p = field_validator("peaks")(classmethod(lambda cls, v: _check_ranges(v)))


class OutputConfig(_Section):
    path: str = "result.h5"
    figures: bool = True
    formats: list[Literal["png", "svg", "pdf"]] = Field(default_factory=lambda: ["png"])
    report: bool = True
    export: list[Literal["xy", "chi", "sq", "fq", "gr"]] = Field(default_factory=list)
    keep_checkpoints: bool = False
    compression: Literal["none", "gzip"] = Field(
        "none", description="arrays of the result file: none, or gzip (~25 % smaller, ~1.1 CPU-s per 500 points)"
    )


class ComputeConfig(_Section):
    workers: int = Field(2, ge=0, description="0: in-process; N: a LocalCluster of N processes")
    threads_per_worker: int = Field(1, ge=1)
    scheduler: str | None = Field(None, description="address of a running dask scheduler, e.g. tcp://host:8786")
    cluster: Literal["local", "slurm"] = "local"
    slurm: dict[str, Any] = Field(default_factory=dict, description="dask_jobqueue.SLURMCluster arguments")
    jobs: int = Field(2, ge=1, description="SLURM jobs to start")
    memory_limit: str | None = "auto"


class RunConfig(_Section):
    """The whole run: one section per stage."""

    scan: ScanConfig
    geometry: GeometryConfig
    integration: IntegrationConfig = Field(default_factory=IntegrationConfig)
    background: BackgroundConfig = Field(default_factory=BackgroundConfig)
    pdf: PDFConfig = Field(default_factory=PDFConfig)
    decompose: DecomposeConfig = Field(default_factory=DecomposeConfig)
    phases: PhasesConfig = Field(default_factory=PhasesConfig)
    series: SeriesConfig = Field(default_factory=SeriesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    def resolve_paths(self, base: Path) -> RunConfig:
        """Make relative input/output paths relative to ``base`` (the config's folder)."""

        def fix(p: str | None) -> str | None:
            if p is None or "://" in p or Path(p).is_absolute():
                return p
            return str(base / p)

        data = self.model_dump()
        src = data["scan"]["source"]
        data["scan"]["source"] = [fix(s) for s in src] if isinstance(src, list) else fix(src)
        for sec, key in [("geometry", "poni"), ("geometry", "mask"), ("geometry", "dark"),
                         ("geometry", "flat"), ("background", "file"), ("phases", "folder"),
                         ("output", "path")]:
            data[sec][key] = fix(data[sec][key])
        data["phases"]["extra"] = {k: fix(v) for k, v in data["phases"]["extra"].items()}
        return RunConfig.model_validate(data)


def _format_errors(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "missing" and err["type"] != "extra_forbidden" else ""))
    return f"configuration {source}: " + "; ".join(parts)


def validate_config(data: Any, source: str = "(in memory)") -> RunConfig:
    """Validate a configuration mapping, raising ConfigError that names each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"configuration {source}: expected a mapping of sections (scan, geometry, ...), got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML configuration; relative paths follow the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"configuration file {str(p)!r} does not exist (write one with `xrdmap config init`)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {str(p)!r} is not valid YAML: {exc}") from None
    data = apply_overrides(data, overrides or [])
    return validate_config(data, repr(str(p))).resolve_paths(p.resolve().parent)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a config mapping."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. integration.npt=2000")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


TEMPLATE = """\
# xrdmap run configuration. Run with:  xrdmap run THIS_FILE.yaml
# Relative paths are relative to this file. Any key can be overridden on the command
# line:  xrdmap run cfg.yaml --set integration.npt=2000 --set compute.workers=4

scan:
  source: scan.h5            # NeXus/HDF5 stack, a glob ("frames/*.tif") or a list of files
  frames_path: null          # dataset of frames; null: auto-detect (NXdetector/data, NXdata signal)
  positions_path: null       # dataset of scan positions (mm); null: auto-detect
  times_path: null           # dataset of times (s), for time series
  monitor_path: null         # incident-flux monitor dataset; null: auto-detect or none
  positions: null            # for image series: "positions.csv:z" or "start,step" (mm)
  times: null                # for image series: "times.csv:t" or "start,step" (s)
  chunk_frames: null         # frames per task; null: automatic (~64 MB)
  time_bin: 1                # average N consecutive points (time series)
  time_window: null          # [t0, t1] in s: keep only this part of a series

geometry:
  poni: geometry.poni        # from `xrdmap calibrate` on a CeO2 image
  mask: null                 # from `xrdmap mask` (EDF/TIFF/NPY; nonzero = masked)
  dark: null
  flat: null

integration:
  npt: 3000                  # Q bins
  q_range: [0.5, 25.0]       # A^-1
  polarization_factor: 0.99  # horizontal linear polarisation of the synchrotron beam
  error_model: poisson
  outlier_sigma: null        # e.g. 5: reject spots of large grains per frame (slower); null: off
  saturation: auto           # counts at which pixels saturate (left out, counted); auto: 65535 for uint16

background:
  file: null                 # empty container / Kapton: frames file, image or .xy/.chi pattern
  frames_path: null          # dataset of the background frame(s) in an HDF5 file
  monitor: null              # its monitor: a number or a dataset path (null: 1, or auto-detected)
  scale: 1.0                 # or "auto": largest scale keeping the sample minus background >= 0

pdf:
  enabled: true
  composition: Li3V2(PO4)3   # or a mixture by weight: "0.6 Li3V2(PO4)3 + 0.4 Li1.3Al0.3Ti1.7(PO4)3"
  qmin: 0.5                  # A^-1
  qmax: 24.0                 # A^-1
  qmaxinst: 25.0             # A^-1, upper end of good data (fixes the correction polynomial degree)
  rpoly: 0.9                 # A
  rmin: 0.0                  # A
  rmax: 30.0                 # A
  rstep: 0.01                # A
  lorch: true                # Lorch modification function (suppresses termination ripples)

decompose:
  q_ranges: [[1.0, 15.0]]    # NMF on I(Q) over these Q ranges (A^-1); null to skip
  r_ranges: [[1.0, 20.0]]    # NMF on G(r) over these r ranges (A); null to skip
  components: auto           # or a fixed number
  min_components: 2
  max_components: 5
  random_state: 0
  q_init: spa                # NMF in Q starts at the most distinct patterns (end members); nndsvd: as the NMF-mapping app
  solver: anls               # NMF by alternating exact NNLS (converges); cd: coordinate descent, as the NMF-mapping app
  smoothness: 0.0            # > 0: smooth the weights along the scan axis
  q_diffuse: subtract        # NMF in Q on the Bragg part: the smooth diffuse scattering is taken off first
  q_diffuse_window_A: 1.0    # width (A^-1) of that baseline: wider than the Bragg peaks

phases:
  names: null                # e.g. [LVP, eps-LiVOPO4, Li3PO4-gamma, LATP, anti-NASICON-doped]; null: all shipped
  extra: {}                  # your own structures, e.g. {alpha1-LiVOPO4: my_alpha1.cif}
  folder: null               # a folder of CIF files to add
  stretch_range: 0.03        # lattice stretch searched when matching (+-3 %)

series:                     # time series (in-situ, operando): descriptors against time
  enabled: auto              # auto: when the scan has a time coordinate
  phase: null                # e.g. LATP: refine its lattice scale for every frame
  peaks: []                  # Q windows of Bragg peaks to follow, e.g. [[1.9, 2.1], [4.2, 4.4]]
  q_range: [1.0, 15.0]
  lattice_q_range: null      # e.g. [4.0, 16.0]: fit the lattice scale above the glass humps; null: q_range

output:
  path: result.h5            # NeXus result (open with xrdmap.open_result, silx view or h5web)
  figures: true
  formats: [png]             # png, svg, pdf
  report: true               # static HTML report next to the result
  export: []                 # per-point text files: xy, chi, sq, fq, gr
  keep_checkpoints: false    # keep the per-chunk checkpoints after a successful run
  compression: none          # result arrays: none, or gzip (~25 % smaller, ~1.1 CPU-s per 500 points)

compute:
  workers: 2                 # 0: in-process; N: local dask cluster of N processes
  threads_per_worker: 1
  scheduler: null            # tcp://host:8786 to use a running dask scheduler
  cluster: local             # or slurm (needs the 'cluster' extra: dask-jobqueue)
  slurm: {}                  # SLURMCluster arguments: queue, cores, memory, walltime, ...
  jobs: 2
  memory_limit: auto
"""
