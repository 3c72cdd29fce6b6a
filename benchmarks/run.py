"""xrdmap performance benchmark: engine, streaming run, worker scaling, post-integration.

Run on demand (not part of the tests)::

    .venv/bin/python benchmarks/run.py            # full: 2048 px frames, ~15-20 min
    .venv/bin/python benchmarks/run.py --quick    # smoke check: 512 px frames, ~1-2 min

Parts (each runs in its own child process, so that peak memory is measured from a
clean start; select some with ``--parts``):

``engine``
    One core: xrdmap's batched engine against pyFAI ``integrate1d(method=("bbox", "csr",
    "cython"))`` and ``integrate1d_legacy`` on the same in-memory float32 frames, npt 3000,
    Q in A^-1 (reuses ``benchmarks/integrate.py``). Targets: >= 5x and >= 2x.
``stream``
    ``xrdmap run`` (:func:`xrdmap.pipeline.run`: integration, background, PDF, NMF in Q
    and r, phase assignment, fractions, result file, figures, report) on simulated
    Bitshuffle-LZ4 HDF5 scans of two lengths (each in a fresh process), against
    ``integrate_scan`` alone over the same file with the same dask workers (the file
    read once, untimed, before each, so both read the page cache). Peak RSS of the
    process tree (this process + dask nanny and worker processes, psutil every 0.1 s;
    PSS every 1 s). Targets: peak <= 2 GB, not growing with the number of frames;
    end-to-end >= 70 % of the frames/s of integration alone.
``scaling``
    Integration of the longer scan on xrdmap's LocalCluster (:func:`xrdmap.cluster.dask_client`)
    of 1 and of 2 worker processes (threads_per_worker=1; engines built before timing).
    Target >= 1.7x.
``post``
    pdf.transform + decompose (q and r) + assign_components (q and r) + phase_fractions
    on a synthetic (1000 point x 3000 Q) stack of reference-phase mixtures with noise.
    Target: < 20 s in total.

All parts run single-threaded per process (OpenMP/BLAS threads = 1, set before numpy is
imported and checked with threadpoolctl). Ratios are measured within one run and are
what to compare between machines; absolute numbers depend on the CPU and on whatever
else the machine is doing (the load average is printed).

Simulated scans are cached in ``--data-dir`` (default ``$TMPDIR/xrdmap-bench``) and
reused between runs: the 2048 px, 500-frame scan takes several minutes to simulate
once and about 3.5 GB of disk.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import integrate as ib  # noqa: E402  (benchmarks/integrate.py: frames, pyFAI loops, machine)

PARTS = ("engine", "stream", "scaling", "post")
LAYOUT = "multilayer"
GB = 2**30
QUICK_PHASES = ("LVP", "LATP", "eps-LiVOPO4", "Li3PO4-gamma", "anti-NASICON")
Q_MIN = 0.6  # A^-1, just outside the beamstop shadow of xrdmap.simulate's panel


# --------------------------------------------------------------------------------------
# helpers shared by the parts
# --------------------------------------------------------------------------------------


class TreeRSS:
    """Peak memory of this process and all its descendants, sampled in a thread.

    ``peak``: the largest sum of RSS over the tree (pages shared between processes, such
    as libraries and the memory-mapped integration engine, count once per process: an
    upper bound), sampled every ``interval_s``. ``peak_pss``: the largest sum of PSS
    (shared pages split between the processes sharing them: what the tree holds),
    sampled every ``pss_interval_s`` -- PSS needs /proc/<pid>/smaps, tens of ms per
    sample, which every 0.1 s took a third of a core from the workers being measured.
    ``per_process``: the peak RSS of each process (``"main"`` is this one). ``cpu_s``:
    CPU seconds (user + system) used meanwhile by the other processes (the dask workers
    and nannies) and by this one: against the wall time, how much of it they computed.
    """

    def __init__(self, interval_s: float = 0.1, pss_interval_s: float = 1.0):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._pss_every = max(1, round(pss_interval_s / interval_s))
        self._stop = threading.Event()
        self.peak = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self.per_process: dict[int, int] = {}
        self._cpu: dict[int, float] = {}
        self._cpu0 = sum(self._proc.cpu_times()[:2])
        self.main_cpu_s = 0.0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self, pss: bool) -> None:
        import psutil

        total, total_pss, count = 0, 0, 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                info = p.memory_full_info() if pss else p.memory_info()
                if p.pid != self._proc.pid:
                    self._cpu[p.pid] = sum(p.cpu_times()[:2])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += info.rss
            total_pss += getattr(info, "pss", info.rss)
            count += 1
            self.per_process[p.pid] = max(self.per_process.get(p.pid, 0), info.rss)
        if total > self.peak:
            self.peak, self.peak_procs = total, count
        if pss:
            self.peak_pss = max(self.peak_pss, total_pss)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample(pss=self.samples % self._pss_every == 0)
            self._stop.wait(self._interval)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(pss=True)
        self.main_cpu_s = sum(self._proc.cpu_times()[:2]) - self._cpu0

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the child processes (as last sampled before each ended)."""
        return sum(self._cpu.values())

    def describe(self) -> str:
        """``main X GB + others``: peak RSS per process, largest first after this one."""
        me = self._proc.pid
        others = sorted((v for pid, v in self.per_process.items() if pid != me and v > 50 * 2**20), reverse=True)
        parts = [f"main {self.per_process.get(me, 0) / GB:.2f}"] + [f"{v / GB:.2f}" for v in others]
        return " + ".join(parts) + " GB"


def thread_report() -> str:
    """Threads of every BLAS/OpenMP pool loaded in this process."""
    from threadpoolctl import threadpool_info

    pools = [f"{p['internal_api']} {p['num_threads']}" for p in threadpool_info()]
    return ", ".join(pools) or "no BLAS/OpenMP pools loaded"


def worker_threads() -> list:
    """Run on a dask worker: (api, threads) of its BLAS/OpenMP pools (importable function)."""
    from threadpoolctl import threadpool_info

    return [(p["internal_api"], p["num_threads"]) for p in threadpool_info()]


def machine_line() -> str:
    import psutil

    ram = psutil.virtual_memory().total / GB
    return (f"machine: {ib.cpu_model()}, {os.cpu_count()} logical cores, {ram:.1f} GB RAM, "
            f"load average {os.getloadavg()[0]:.1f}")


def versions_line() -> str:
    import dask
    import distributed
    import h5py
    import hdf5plugin
    import pyFAI
    import scipy
    import sklearn

    import xrdmap

    return (f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
            f"pyFAI {pyFAI.version}, dask {dask.__version__}, distributed {distributed.__version__}, "
            f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), hdf5plugin {hdf5plugin.version}, "
            f"scikit-learn {sklearn.__version__}, xrdmap {getattr(xrdmap, '__version__', '?')}")


def scan_path(data_dir: Path, size: int, points: int) -> Path:
    return data_dir / f"scan_{LAYOUT}_{size}px_{points}.h5"


def ensure_scan(data_dir: Path, size: int, points: int) -> Path:
    """The simulated Bitshuffle-LZ4 scan (cached); simulated with xrdmap.simulate if absent."""
    import h5py
    import hdf5plugin  # noqa: F401

    from xrdmap.simulate import simulate_scan

    path = scan_path(data_dir, size, points)
    ok = False
    if path.is_file() and path.with_suffix(".poni").is_file() and path.with_suffix(".mask.npy").is_file():
        try:
            with h5py.File(path, "r") as fh:
                ok = fh["entry/instrument/detector/data"].shape == (points, size, size)
        except (OSError, KeyError):
            ok = False
    if not ok:
        data_dir.mkdir(parents=True, exist_ok=True)
        print(f"simulating {path.name} ({points} frames of {size} x {size} px, cached for later runs) ...",
              flush=True)
        t0 = time.perf_counter()
        simulate_scan(LAYOUT, path, points=points, size=size, seed=0)
        print(f"  simulated in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def fmt_gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB"


# --------------------------------------------------------------------------------------
# part 1: engine vs pyFAI on one core
# --------------------------------------------------------------------------------------


def part_engine(args) -> dict:
    import logging

    import dask.array as da
    import xarray as xr
    from threadpoolctl import threadpool_limits

    from xrdmap.geometry import make_integrator
    from xrdmap.integrate import get_engine, integrate_scan, make_spec

    threadpool_limits(1)
    logging.getLogger("pyFAI").setLevel(logging.ERROR)
    n, size, npt = args.frames, args.size, args.npt
    geo = ib.poni(size)
    ai = make_integrator(geo)
    mask = ib.make_mask(size)
    frames = ib.make_frames(ai, n, size)
    print(f"{n} frames of {size} x {size} float32 in memory, npt {npt}, q in A^-1, polarization "
          f"{ib.POL}, mask, Poisson errors")
    spec = make_spec(geo, (size, size), mask=mask, npt=npt, polarization_factor=ib.POL)
    t0 = time.perf_counter()
    engine = get_engine(spec)
    t_build = time.perf_counter() - t0
    scan = xr.DataArray(da.from_array(frames, chunks=(32, -1, -1)), dims=("point", "y", "x"))
    lazy = integrate_scan(scan, geo, mask=mask, npt=npt, polarization_factor=ib.POL)
    runs = {
        "ng": ib.pyfai_loop(ai, frames, mask, npt, legacy=False),
        "legacy": ib.pyfai_loop(ai, frames, mask, npt, legacy=True),
        "engine": lambda: lazy.compute(scheduler="sync"),
    }
    print(f"threads in this process: {thread_report()}")
    lazy.compute(scheduler="sync")  # warm-up: first-call imports and page faults, untimed
    best, outputs = ib.best_times(runs, args.repeats)
    iq_ref = np.array([r.intensity for r in outputs["ng"]])
    sel = np.abs(iq_ref) > 0.01 * np.abs(iq_ref).max(axis=1, keepdims=True)
    rel = float(np.max(np.abs(outputs["engine"]["iq"].values - iq_ref)[sel] / np.abs(iq_ref[sel])))
    print(f"engine build (pyFAI CSR + folding, once per process): {t_build:.2f} s, nnz {engine.nnz / 1e6:.1f} M")
    print(f"best of {args.repeats} interleaved rounds:")
    print(f"  {'method':46s} {'frames/s':>9s} {'ms/frame':>9s}")
    for label, key in (("pyFAI integrate1d bbox/csr/cython (poisson)", "ng"),
                       ("pyFAI integrate1d_legacy bbox/csr/cython", "legacy"),
                       ("xrdmap engine (integrate_scan, sync, poisson)", "engine")):
        print(f"  {label:46s} {ib.rate(n, best[key]):9.1f} {1000 * best[key] / n:9.1f}")
    r_ng, r_legacy = best["ng"] / best["engine"], best["legacy"] / best["engine"]
    print(f"RATIO engine / integrate1d        : {r_ng:5.1f}x  (target >= 5)   {'PASS' if r_ng >= 5 else 'MISS'}")
    print(f"RATIO engine / integrate1d_legacy : {r_legacy:5.1f}x  (target >= 2)   {'PASS' if r_legacy >= 2 else 'MISS'}")
    print(f"agreement with integrate1d (I > 1% of max): max relative difference {rel:.1e}")
    print(f"peak RSS of this process {ib.peak_rss_mb():.0f} MB (frames {frames.nbytes / 2**20:.0f} MB)")
    return {"engine_fps": ib.rate(n, best["engine"]), "ng_fps": ib.rate(n, best["ng"]),
            "legacy_fps": ib.rate(n, best["legacy"]), "ratio_ng": r_ng, "ratio_legacy": r_legacy}


# --------------------------------------------------------------------------------------
# part 2: streaming run
# --------------------------------------------------------------------------------------


def run_config(scan: Path, outdir: Path, workers: int, npt: int, phases: list[str] | None = None):
    """The configuration ``xrdmap run`` would get for a simulated scan (pipeline.demo_config)."""
    from xrdmap.config import validate_config
    from xrdmap.pipeline import demo_config

    cfg = demo_config(scan, outdir, workers=workers)
    data = json.loads(cfg.model_dump_json())
    data["integration"]["npt"] = npt
    # demo_config's Q range starts at 0.5 A^-1, inside the simulated beamstop shadow: its
    # first bins get no pixel (NaN), and NMF refuses non-finite input anywhere in the pattern.
    data["integration"]["q_range"] = [Q_MIN, 20.0]
    data["phases"]["names"] = phases
    return validate_config(data, "benchmark")


#: Functions the pipeline calls (looked up in their modules at call time), timed in the run.
STAGES = (
    ("xrdmap.pipeline", "_open_scan", "open scan"),
    ("xrdmap.cluster", "dask_client", "cluster start"),
    ("xrdmap.pipeline", "integrate_checkpointed", "integrate frames (+ checkpoints)"),
    ("xrdmap.pipeline", "_Background.result", "wait for the background"),
    ("xrdmap.background", "subtract_background", "subtract background"),
    ("xrdmap.pdf", "transform", "pdf.transform"),
    ("xrdmap.pdf", "coherence_length", "coherence_length + low_r_ripple"),
    ("xrdmap.pdf", "low_r_ripple", "coherence_length + low_r_ripple"),
    ("xrdmap.phases", "load_library", "load phase library"),
    ("xrdmap.pipeline", "bin_points", "bin points"),
    ("xrdmap.pipeline", "analyse", "analyse (waits for its threads)"),
    ("xrdmap.assign", "scan_phase_fractions", "scan_phase_fractions (selection)"),
    ("xrdmap.pipeline", "_WarmUp._run", "warm-up (imports, reference tables)"),
    ("xrdmap.pipeline", "_WarmUp.result", "wait for the warm-up"),
    ("xrdmap.decompose", "decompose", "decompose (q and r)"),
    ("xrdmap.assign", "assign_components", "assign_components (q and r)"),
    ("xrdmap.assign", "phase_fractions", "phase_fractions"),
    ("xrdmap.pipeline", "_provenance", "provenance (input checksums)"),
    ("xrdmap.results", "ResultFile.write", "save result: patterns"),
    ("xrdmap.results", "ResultFile.close", "save result: the rest"),
    ("xrdmap.maps", "save_figures", "figures"),
    ("xrdmap.report", "write_report", "report"),
)


class StageTimer:
    """Exclusive wall time of the pipeline's stage functions (a call inside another timed
    call counts for the inner one only), by patching them in their modules."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.hwm: dict[str, float] = {}  # peak RSS of this process (MB) when the stage ended
        self._local = threading.local()  # one stack of open stages per thread
        self._lock = threading.Lock()
        self._saved: list = []
        self.t0 = time.perf_counter()
        self.events: list[tuple[str, str, float, float]] = []  # (label, thread, start, end), s from t0

    def _wrap(self, fn, label):
        import functools

        timer = self

        @functools.wraps(fn)
        def timed(*a, **k):
            stack = timer._local.__dict__.setdefault("stack", [])
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                total = time.perf_counter() - t0
                inner = stack.pop()
                # stages run by helper threads beside the main thread are listed apart:
                # their time overlaps the main thread's and is not part of the wall-time sum
                key = label if threading.current_thread() is threading.main_thread() else f"[thread] {label}"
                with timer._lock:
                    timer.events.append((label, threading.current_thread().name, t0 - timer.t0, t0 + total - timer.t0))
                    timer.times[key] = timer.times.get(key, 0.0) + total - inner
                    timer.hwm[key] = ib.peak_rss_mb()
                if stack:
                    stack[-1] += total
        return timed

    def __enter__(self) -> StageTimer:
        import contextlib
        import importlib

        for module, name, label in STAGES:
            mod = importlib.import_module(module)
            if "." in name:  # a method: patch it on its class
                cls_name, name = name.split(".")
                mod = getattr(mod, cls_name)
            fn = getattr(mod, name)
            self._saved.append((mod, name, fn))
            if name == "dask_client":  # a context manager: time its start and its shutdown
                def started(*a, _fn=fn, **k):
                    @contextlib.contextmanager
                    def cm():
                        t0 = time.perf_counter()
                        with _fn(*a, **k) as client:
                            t1 = time.perf_counter()
                            self.times["cluster start"] = self.times.get("cluster start", 0.0) + t1 - t0
                            self.events.append(("cluster start", "MainThread", t0 - self.t0, t1 - self.t0))
                            try:
                                yield client
                            finally:
                                t2 = time.perf_counter()
                        t3 = time.perf_counter()
                        self.times["cluster shutdown"] = self.times.get("cluster shutdown", 0.0) + t3 - t2
                        self.events.append(("cluster shutdown", "MainThread", t2 - self.t0, t3 - self.t0))
                    return cm()
                setattr(mod, name, started)
            else:
                setattr(mod, name, self._wrap(fn, label))
        return self

    def __exit__(self, *exc) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)


def prepare_table_cache(cfg, mode: str) -> str:
    """Empty (``cold``) or fill (``warm``, by an untimed run of the warm-up in a separate
    process) the on-disk cache of reference tables the run will use; returns a description."""
    folder = Path(os.environ["XRDMAP_CACHE_DIR"])
    shutil.rmtree(folder, ignore_errors=True)
    if mode == "cold":
        return f"built by the run (empty on-disk cache {folder}: a machine's first run)"
    script = (
        "import sys; from xrdmap import pipeline; from xrdmap.config import RunConfig\n"
        "cfg = RunConfig.model_validate_json(sys.stdin.read())\n"
        "pipeline._WarmUp(pipeline._phase_library(cfg), cfg)._run(20.0)\n"
    )
    subprocess.run([sys.executable, "-c", script], input=cfg.model_dump_json(), text=True, check=True)
    n = len(list((folder / "tables").glob("*.npz")))
    return (f"read from the on-disk cache {folder} ({n} tables, filled beforehand by an untimed process: "
            f"every run after a machine's first with these phases)")


def warm_page_cache(path: Path) -> float:
    """Read ``path`` once (untimed) so that every timed run reads it from the page cache;
    otherwise whichever run comes first also pays the disk. Returns the seconds it took."""
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        while fh.read(64 * 2**20):
            pass
    return time.perf_counter() - t0


def reset_peak_rss() -> None:
    """Restart this process's VmHWM (Linux), so a stage's peak is not an earlier run's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def time_pipeline(cfg, timeline: bool = False) -> tuple[float, dict[str, tuple[float, float]], TreeRSS, float]:
    """Wall time of pipeline.run; per stage function its exclusive time (s) and the peak RSS
    of this process when it ended (MB); tree RSS; the time from the end of the frames'
    integration to the end of the run (s)."""
    from xrdmap import pipeline

    reset_peak_rss()
    with TreeRSS() as mem, StageTimer() as stages:
        t0 = stages.t0 = time.perf_counter()
        pipeline.run(cfg)
        total = time.perf_counter() - t0
    if timeline:
        print("  timeline of the run (s from its start; thread):")
        for label, thread, start, end in sorted(stages.events, key=lambda e: e[2]):
            print(f"    {start:6.2f} - {end:6.2f}  {label:36s} {thread}")
    last_frame = max((end for label, _, _, end in stages.events if label.startswith("integrate frames")),
                     default=float("nan"))
    return (total, {k: (t, stages.hwm.get(k, float("nan"))) for k, t in stages.times.items()}, mem,
            total - last_frame)


def time_integration(cfg) -> tuple[float, TreeRSS, list]:
    """Wall time of integrate_scan alone over the pipeline's scan, with the pipeline's workers.

    Counted like the pipeline: cluster start, engine build on each worker, every frame.
    """
    from xrdmap import pipeline
    from xrdmap.cluster import dask_client
    from xrdmap.integrate import integrate_scan

    c = cfg.compute
    t0 = time.perf_counter()
    with TreeRSS() as mem, dask_client(workers=c.workers, threads_per_worker=c.threads_per_worker,
                                       memory_limit=c.memory_limit) as client:
        scan = pipeline._open_scan(cfg)  # the pipeline's chunking
        lazy = integrate_scan(scan, cfg.geometry.poni, **pipeline._integrate_kwargs(cfg))
        if client is None:
            lazy.compute(scheduler="sync")
            threads = []
        else:
            client.compute(lazy).result()
            threads = list(client.run(worker_threads).values())
    return time.perf_counter() - t0, mem, threads


def stage_table(stages: dict[str, tuple[float, float]], total: float) -> list[str]:
    lines = [f"    {t:7.1f} s  {label:36s} {hwm:6.0f} MB" for label, (t, hwm) in stages.items()]
    rest = total - sum(t for label, (t, _) in stages.items() if not label.startswith("[thread]"))
    lines.append(f"    {rest:7.1f} s  (rest: dataset assembly, merges, cleanup, shutdown)")
    return lines


def part_stream(args) -> dict:
    workers = args.workers[-1]
    print(f"xrdmap run (pipeline.run: integration + background + PDF + NMF q/r + assignment + fractions "
          f"+ result + figures + report), {workers} dask worker processes, npt {args.npt}, "
          f"Q {Q_MIN}-20 A^-1, phases: {', '.join(args.phases) if args.phases else 'the whole shipped library'}")
    if len(args.stream_points) == 1 and args.stream_rounds == 1:
        return stream_one(args, args.stream_points[0])
    # one clean process per scan length and round: a run's peak must not include the heap
    # left behind by the runs measured before it in the same process, and a second run in
    # one process would find the reference phases' tables already built (a CLI run does not)
    res = {}
    for points in args.stream_points:
        rounds = []
        for _ in range(args.stream_rounds):
            cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--stream-points", str(points),
                   "--stream-rounds", "1"]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            for line in proc.stdout.splitlines():
                if line.startswith("RESULT-JSON "):
                    rounds += [v for k, v in json.loads(line[len("RESULT-JSON "):]).items()]
                elif not line.startswith("xrdmap run (pipeline.run"):
                    print(line)
            if proc.returncode:
                print(f"stream measurement of {points} frames FAILED (exit code {proc.returncode})")
        if len(rounds) > 1:
            # each round a fresh process measuring both; the best time of each is kept and
            # the highest memory peak
            best = dict(min(rounds, key=lambda r: r["t_run"]))
            best["t_int"] = min(r["t_int"] for r in rounds)
            best["ratio"] = best["t_int"] / best["t_run"]
            for key in ("peak_run", "peak_int", "pss_run"):
                best[key] = max(r[key] for r in rounds)
            t_runs = ", ".join(f"{r['t_run']:.1f}" for r in rounds)
            t_ints = ", ".join(f"{r['t_int']:.1f}" for r in rounds)
            t_afters = ", ".join(f"{r['t_after']:.1f}" for r in rounds)
            print(f"\n{points} frames, {len(rounds)} rounds (each a fresh process): run {t_runs} s; "
                  f"integration alone {t_ints} s; after the last frame {t_afters} s")
            print(f"  RATIO end-to-end / integration alone, best of each: {best['ratio']:5.2f}  (target >= 0.70)   "
                  f"{'PASS' if best['ratio'] >= 0.7 else 'MISS'}")
            res[points] = best
        elif rounds:
            res[points] = rounds[0]
    if len(res) < 2:
        return {str(k): v for k, v in res.items()}
    small, big = min(res), max(res)
    peak = max(r["peak_run"] for r in res.values())
    growth = res[big]["peak_run"] / res[small]["peak_run"]
    pss = max(r["pss_run"] for r in res.values())
    print(f"\nPEAK RSS of the process tree during xrdmap run: {fmt_gb(res[small]['peak_run'])} at {small} frames, "
          f"{fmt_gb(res[big]['peak_run'])} at {big} frames (target <= 2 GB: {'PASS' if peak <= 2 * GB else 'MISS'})")
    print(f"PEAK PSS of the process tree during xrdmap run: {fmt_gb(res[small]['pss_run'])} at {small} frames, "
          f"{fmt_gb(res[big]['pss_run'])} at {big} frames (target <= 2 GB: {'PASS' if pss <= 2 * GB else 'MISS'})")
    print(f"RATIO peak RSS {big} / {small} frames: {growth:5.2f}  (target: not growing, <= 1.15)   "
          f"{'PASS' if growth <= 1.15 else 'MISS'}")
    return {str(k): v for k, v in res.items()}


def stream_one(args, points: int) -> dict:
    """``xrdmap run`` and ``integrate_scan`` alone on the ``points``-frame scan, in this process.

    The run is measured first (its memory peak from a fresh process), then integration
    alone; the scan file is read once, untimed, before each, so both read the page cache.
    """
    data_dir = Path(args.data_dir)
    workers = args.workers[-1]
    scan = ensure_scan(data_dir, args.stream_size, points)
    size_gb = scan.stat().st_size / GB
    outdir = data_dir / f"run_{args.stream_size}px_{points}"
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    cfg = run_config(scan, outdir, workers, args.npt, args.phases)
    tables = prepare_table_cache(cfg, args.table_cache)
    warm_page_cache(scan)
    t_run, stages, mem_run, t_after = time_pipeline(cfg, timeline=args.timeline)
    t_warm = warm_page_cache(scan)
    t_int, mem_int, threads = time_integration(cfg)
    fps_int, fps_run = points / t_int, points / t_run
    ratio = fps_run / fps_int
    print(f"\n{points} frames of {args.stream_size} x {args.stream_size} px, Bitshuffle-LZ4 HDF5 "
          f"{size_gb:.2f} GB ({scan.name}); load average {os.getloadavg()[0]:.1f}")
    print(f"  worker threads: {threads}; the file is read once before each timed run (page cache "
          f"warm for both; a re-read took {t_warm:.1f} s)")
    print(f"  reference tables: {tables}")
    print(f"  xrdmap run end to end                                  : {t_run:6.1f} s  "
          f"{fps_run:5.2f} frames/s  peak of tree: RSS {fmt_gb(mem_run.peak)}, PSS {fmt_gb(mem_run.peak_pss)}")
    print(f"  integrate_scan alone (cluster start + engine build + all frames): {t_int:6.1f} s  "
          f"{fps_int:5.2f} frames/s  peak of tree: RSS {fmt_gb(mem_int.peak)}, PSS {fmt_gb(mem_int.peak_pss)}")
    print(f"  of the run, after the last frame (analysis, result file, figures, report; less noisy than "
          f"the ratio, whose spread comes mostly from the integration): {t_after:6.1f} s")
    print(f"  peak RSS per process during the run (>50 MB): {mem_run.describe()}; {mem_run.samples} samples")
    for label, t, mem in (("run", t_run, mem_run), ("integration alone", t_int, mem_int)):
        print(f"  CPU during the {label}: worker processes {mem.cpu_s:5.1f} s ({1000 * mem.cpu_s / points:.0f} ms/frame; "
              f"{100 * mem.cpu_s / (t * workers):3.0f} % of {workers} x the wall time), this process {mem.main_cpu_s:5.1f} s")
    print("  stages of the run: exclusive wall time of each stage function (main thread; [thread]: run by a "
          "helper thread beside it), peak RSS of the main process when it ended:")
    print("\n".join(stage_table(stages, t_run)))
    print(f"  RATIO end-to-end / integration alone: {ratio:5.2f}  (target >= 0.70)   "
          f"{'PASS' if ratio >= 0.7 else 'MISS'}")
    return {str(points): {"t_int": t_int, "t_run": t_run, "peak_run": mem_run.peak, "peak_int": mem_int.peak,
                          "pss_run": mem_run.peak_pss, "ratio": ratio, "stages": stages, "t_after": t_after}}


# --------------------------------------------------------------------------------------
# part 3: scaling over worker processes
# --------------------------------------------------------------------------------------


def part_scaling(args) -> dict:
    import cloudpickle

    from xrdmap.cluster import dask_client
    from xrdmap.integrate import integrate_scan, make_spec
    from xrdmap.io import open_scan

    cloudpickle.register_pickle_by_value(ib)  # its task helpers live outside an installed package
    points = max(args.stream_points)
    scan_file = ensure_scan(Path(args.data_dir), args.stream_size, points)
    poni = str(scan_file.with_suffix(".poni"))
    mask = str(scan_file.with_suffix(".mask.npy"))
    scan = open_scan(str(scan_file), chunk_frames=args.chunk)
    if args.scaling_frames and args.scaling_frames < points:
        scan = scan.isel(point=slice(0, args.scaling_frames))
    n = scan.sizes["point"]
    kw = dict(mask=mask, npt=args.npt, q_range=(Q_MIN, 20.0))
    spec = make_spec(poni, tuple(scan.shape[1:]), **kw)
    print(f"integrate_scan of {n} frames of {args.stream_size} x {args.stream_size} px from "
          f"{scan_file.name} (Bitshuffle-LZ4, read by the workers), {args.chunk} frames per task, "
          f"npt {args.npt}; xrdmap's LocalCluster (processes, threads_per_worker=1); engines built before timing; "
          f"best of {args.repeats}")
    times = {}
    for workers in args.workers:
        # the cluster xrdmap runs on (the workers' environment included)
        with dask_client(workers=workers, threads_per_worker=1, memory_limit=None) as client:
            client.run(ib._single_thread)
            client.run(ib._build_engine, spec)
            lazy = integrate_scan(scan, poni, **kw)
            best, best_cpu = float("inf"), float("nan")
            for _ in range(args.repeats):
                c0 = sum(client.run(time.process_time).values())
                t0 = time.perf_counter()
                client.compute(lazy).result()
                wall = time.perf_counter() - t0
                cpu = sum(client.run(time.process_time).values()) - c0
                if wall < best:
                    best, best_cpu = wall, cpu
            rss = client.run(ib.peak_rss_mb)
            threads = list(client.run(worker_threads).values())
        times[workers] = best
        # CPU seconds of the workers / (wall time x workers): below ~90 % the workers were
        # waiting for a core (other jobs) or for I/O, not computing.
        busy = best_cpu / (best * workers)
        print(f"  {workers} worker process(es): {best:6.1f} s  {n / best:6.2f} frames/s  worker CPU {best_cpu:5.1f} s "
              f"({1000 * best_cpu / n:.0f} ms/frame, on CPU {100 * busy:3.0f} % of the time)  worker peak RSS "
              f"{', '.join(f'{v:.0f}' for v in rss.values())} MB")
        print(f"    threads {threads}")
    if 1 in times and 2 in times:
        ratio = times[1] / times[2]
        print(f"RATIO 2 workers / 1 worker: {ratio:5.2f}x  (target >= 1.7)   {'PASS' if ratio >= 1.7 else 'MISS'}"
              f"   (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return {str(k): v for k, v in times.items()}


# --------------------------------------------------------------------------------------
# part 4: everything after integration
# --------------------------------------------------------------------------------------


def synthetic_iq(n_points: int, npt: int, seed: int = 0):
    """(point, q) mixtures of reference phases with a smooth background and Poisson-like noise."""
    import xarray as xr

    from xrdmap.phases import load_library

    lib = load_library()
    names = ["LVP", "LATP", "eps-LiVOPO4", "Li3PO4-gamma"]
    q = np.linspace(0.5, 25.0, npt)
    refs = np.stack([lib[name].simulate_iq(q, fwhm_q=0.06) for name in names])
    refs /= refs.max(axis=1, keepdims=True)
    z = np.linspace(0, 1, n_points)
    # a multilayer-like profile: LVP-rich edges, LATP centre, two minor phases in bands
    w = np.stack([np.clip(1.5 - 4 * np.abs(z - 0.5), 0, 1), np.clip(4 * np.abs(z - 0.5) - 0.5, 0, 1),
                  0.3 * np.exp(-0.5 * ((z - 0.2) / 0.05) ** 2), 0.2 * np.exp(-0.5 * ((z - 0.8) / 0.05) ** 2)], 1)
    w /= w.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    iq = 1e4 * (w @ refs + 0.3 * np.exp(-q / 6) + 0.05)
    iq = iq + np.sqrt(iq) * rng.standard_normal(iq.shape)
    da = xr.DataArray(iq, dims=("point", "q"), coords={"q": q, "point": np.arange(n_points)}, name="iq")
    sigma = xr.DataArray(np.sqrt(np.abs(iq)), dims=("point", "q"), coords=da.coords, name="iq_sigma")
    return da, sigma, lib


def part_post(args) -> dict:
    from threadpoolctl import threadpool_limits

    from xrdmap.assign import assign_components, phase_fractions
    from xrdmap.decompose import decompose
    from xrdmap.pdf import transform

    threadpool_limits(1)
    n, npt = args.post_points, args.npt
    iq, sigma, lib = synthetic_iq(n, npt)
    if args.phases:
        lib = {name: lib[name] for name in args.phases}
    print(f"synthetic I(Q): {n} points x {npt} Q points (0.5-25 A^-1), mixtures of 4 reference phases + "
          f"background + noise; library of {len(lib)} phases; defaults of the pipeline; threads: {thread_report()}")
    times: dict[str, float] = {}

    def timed(label, fn):
        t0 = time.perf_counter()
        out = fn()
        times[label] = time.perf_counter() - t0
        return out

    pdf = timed("pdf.transform (S, F, G(r), Lorch)", lambda: transform(
        iq, composition="0.5 Li3V2(PO4)3 + 0.5 Li1.3Al0.3Ti1.7(PO4)3", qmin=0.5, qmax=24.0, qmaxinst=25.0,
        lorch=True, iq_sigma=sigma))
    dq = timed("decompose q (1-15 A^-1, auto 2-5)", lambda: decompose(iq, dim="q", x_ranges=[(1.0, 15.0)]))
    dr = timed("decompose r (1-20 A, auto 2-5)", lambda: decompose(pdf["gr"], dim="r", x_ranges=[(1.0, 20.0)]))
    timed("assign_components q", lambda: assign_components(dq["nmf_q_components"], lib, dim="q",
                                                            stretch_range=0.03))
    timed("assign_components r", lambda: assign_components(dr["nmf_r_components"], lib, dim="r",
                                                            stretch_range=0.03))
    timed("phase_fractions q (stretch 3 %)", lambda: phase_fractions(iq, lib, dim="q", stretch_range=0.03))
    total = sum(times.values())
    for label, t in times.items():
        print(f"  {t:7.2f} s  {label}")
    print(f"  components found: {dq.attrs.get('nmf_q_n_components')} in Q, {dr.attrs.get('nmf_r_n_components')} in r")
    print(f"TOTAL after integration: {total:6.2f} s  (target < 20 s)   {'PASS' if total < 20 else 'MISS'}")
    return {"times": times, "total": total}


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small frames, few frames: a ~1-2 min smoke check")
    p.add_argument("--frames", type=int, help="in-memory frames of the engine comparison (default 48, quick 8)")
    p.add_argument("--size", type=int, help="frame side (px) of the engine comparison (default 2048, quick 512)")
    p.add_argument("--stream-size", type=int, help="frame side (px) of the simulated scans (default 2048, quick 512)")
    p.add_argument("--stream-points", type=lambda s: [int(v) for v in s.split(",")],
                   help="frames of the two simulated scans (default 100,500; quick 20,80)")
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2],
                   help="worker processes for scaling; the last one also runs the stream part (default 1,2)")
    p.add_argument("--scaling-frames", type=int, help="frames of the longer scan integrated for scaling "
                   "(default all: at 200 frames, 2.7 s on a fast machine, fixed costs set the ratio)")
    p.add_argument("--post-points", type=int, help="points of the post-integration stack (default 1000, quick 300)")
    p.add_argument("--phases", type=lambda s: [v.strip() for v in s.split(",")] if s != "all" else [],
                   help="reference phases used by the pipeline and the post part, comma-separated, or 'all' "
                   f"(default all; quick {','.join(QUICK_PHASES)})")
    p.add_argument("--npt", type=int, default=3000)
    p.add_argument("--chunk", type=int, default=8, help="frames per task in the scaling part")
    p.add_argument("--repeats", type=int, help="interleaved rounds, best kept (default 3, quick 1)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--stream-rounds", type=int, default=1,
                   help="stream: interleaved rounds of run and integration alone, the best of each kept (default 1)")
    p.add_argument("--timeline", action="store_true", help="stream: print when each stage of the run started and ended")
    p.add_argument("--table-cache", choices=("warm", "cold"), default="warm",
                   help="stream: the on-disk cache of reference tables (XRDMAP_CACHE_DIR, a folder in --data-dir) "
                   "is filled before the timed run (warm, default: every run after a machine's first) or "
                   "emptied (cold: the first run)")
    p.add_argument("--data-dir", default=str(Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "xrdmap-bench"),
                   help="where simulated scans are cached and runs write their output")
    p.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"frames": 8 if q else 48, "size": 512 if q else 2048, "stream_size": 512 if q else 2048,
                "stream_points": [20, 80] if q else [100, 500], "scaling_frames": None,
                "post_points": 300 if q else 1000, "repeats": 2 if q else 3,
                "phases": list(QUICK_PHASES) if q else []}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.phases = args.phases or None  # None: the whole shipped library
    # the benchmark's own table cache (inherited by the parts and the runs they start)
    os.environ["XRDMAP_CACHE_DIR"] = str(Path(args.data_dir) / "table-cache")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.part:
        result = {"engine": part_engine, "stream": part_stream, "scaling": part_scaling, "post": part_post}[args.part](args)
        print("RESULT-JSON " + json.dumps(result, default=float), flush=True)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        sys.exit(f"--parts: unknown {unknown}; expected some of {', '.join(PARTS)}")
    print(f"xrdmap benchmark {'(quick) ' if args.quick else ''}{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(machine_line())
    print(versions_line())
    print("OpenMP/BLAS threads: 1 per process (environment set before numpy import; checked with threadpoolctl)")
    t_all = time.perf_counter()
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for i, part in enumerate(parts, 1):
        print(f"\n=== {i}. {part} " + "=" * 60, flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--part", part]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout.splitlines():
            if not line.startswith("RESULT-JSON "):
                print(line)
        if proc.returncode:
            print(f"part {part} FAILED (exit code {proc.returncode})")
        print(f"[{part}: {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}]", flush=True)
    print(f"\nall parts: {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
