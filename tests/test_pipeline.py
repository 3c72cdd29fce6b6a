"""The whole pipeline on simulated scans: resume after SIGKILL, dask modes, time binning."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from xrdmap.config import validate_config
from xrdmap.errors import InputError
from xrdmap.pipeline import bin_points, demo_config, integrate_checkpointed, run
from xrdmap.results import open_result


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory) -> Path:
    from xrdmap.simulate import simulate_scan

    folder = tmp_path_factory.mktemp("scan")
    return simulate_scan("composite", folder / "scan.h5", points=12, size=128, seed=3)


def _config(scan: Path, out: Path, **over):
    cfg = demo_config(scan, out.parent, workers=0)
    data = cfg.model_dump()
    data["output"]["path"] = str(out)
    data["scan"]["chunk_frames"] = 2
    for dotted, value in over.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return validate_config(data)


def test_integration_resumes_after_sigkill_without_recomputing(small_scan, tmp_path):
    out = tmp_path / "result.h5"
    cfg = _config(small_scan, out)
    # a separate process integrates and is SIGKILLed by its own progress callback after
    # two of six chunks are checkpointed
    script = textwrap.dedent(
        f"""
        import os, signal
        from xrdmap.config import RunConfig
        from xrdmap.pipeline import _open_scan, integrate_checkpointed
        cfg = RunConfig.model_validate_json({cfg.model_dump_json()!r})
        def progress(done, total):
            if done == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        integrate_checkpointed(_open_scan(cfg), cfg, progress=progress)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = out.with_name(out.name + ".checkpoint")
    chunks = sorted(ckpt.glob("chunk_*.npz"))
    assert len(chunks) == 2
    assert not out.exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in chunks}

    starts = []
    resumed = integrate_checkpointed(
        _scan(cfg), cfg, progress=lambda done, total: starts.append((done, total))
    )
    assert starts[0] == (2, 6)  # two chunks reused, four computed
    assert {p.name: p.stat().st_mtime_ns for p in chunks} == stamps

    fresh_cfg = _config(small_scan, tmp_path / "fresh.h5")
    fresh = integrate_checkpointed(_scan(fresh_cfg), fresh_cfg)
    np.testing.assert_array_equal(resumed["iq"].values, fresh["iq"].values)
    np.testing.assert_array_equal(resumed["iq_sigma"].values, fresh["iq_sigma"].values)


def _scan(cfg):
    from xrdmap.pipeline import _open_scan

    return _open_scan(cfg)


def test_checkpoints_of_other_parameters_are_discarded(small_scan, tmp_path):
    out = tmp_path / "result.h5"
    cfg = _config(small_scan, out)
    integrate_checkpointed(_scan(cfg), cfg)
    other = _config(small_scan, out, integration__npt=700)
    messages = []
    ds = integrate_checkpointed(_scan(other), other, log=messages.append)
    assert ds.sizes["q"] == 700
    assert any("discarding" in m for m in messages)


@pytest.mark.slow
def test_local_cluster_gives_the_same_numbers_as_in_process(small_scan, tmp_path):
    a = _config(small_scan, tmp_path / "a.h5")
    b = _config(small_scan, tmp_path / "b.h5", compute__workers=2)
    from xrdmap.cluster import dask_client

    in_process = integrate_checkpointed(_scan(a), a)
    with dask_client(workers=2) as client:
        distributed = integrate_checkpointed(_scan(b), b, client=client)
    np.testing.assert_array_equal(in_process["iq"].values, distributed["iq"].values)
    np.testing.assert_array_equal(in_process["iq_sigma"].values, distributed["iq_sigma"].values)


@pytest.mark.slow
def test_local_workers_use_glibc_allocation_defaults(monkeypatch):
    # distributed's default MALLOC_TRIM_THRESHOLD_ would switch off glibc's adaptive
    # mmap threshold in the workers (every frame buffer mapped and faulted in anew).
    # A cluster started earlier in the process leaves it in os.environ, where workers
    # would inherit it: as here.
    import os

    from xrdmap.cluster import dask_client

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with dask_client(workers=1) as client:
        env = next(iter(client.run(lambda: {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}).values()))
        threads = next(iter(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values()))
        assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
    assert env == {}
    assert threads == "1"
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment is restored


def test_input_checksums_match_hashlib_and_name_a_missing_file(tmp_path):
    import hashlib

    from xrdmap._checksums import InputChecksums

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(np.random.default_rng(0).bytes(3 * 2**20 + 17))
    b.write_bytes(b"abc")
    sums = InputChecksums([str(a), str(b)]).result()
    assert sums == {str(a): hashlib.sha256(a.read_bytes()).hexdigest(),
                    # sha256("abc") from FIPS 180-2, appendix B.1
                    str(b): "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    with pytest.raises(InputError, match=r"missing\.bin.*does not exist"):
        InputChecksums([str(b), str(tmp_path / "missing.bin")]).result()
    many = [str(tmp_path / f"f{i:05d}_{'x' * 60}.tif") for i in range(3000)]  # ~250 kB of paths
    for name in many:
        Path(name).write_bytes(name.encode())
    assert InputChecksums(many).result() == {n: hashlib.sha256(n.encode()).hexdigest() for n in many}
    running = InputChecksums([str(a)] * 50)
    running.close()  # stopped early (a run that failed): the child is gone
    assert running._proc.poll() is not None


def test_warm_up_error_is_raised_where_the_analysis_needs_the_phases(small_scan, tmp_path):
    from xrdmap.pipeline import _WarmUp

    class Broken:
        def prepare(self, **_):
            raise InputError("phase 'Broken': bad structure")

    cfg = _config(small_scan, tmp_path / "w.h5")
    warm = _WarmUp({"Broken": Broken()}, cfg)
    warm.start(np.linspace(0.5, 20.0, 100))
    with pytest.raises(InputError, match="Broken"):
        warm.result()


def test_warm_up_runs_at_the_lowest_priority_in_its_own_thread(small_scan, tmp_path, monkeypatch):
    # it uses only CPU the workers integrating beside it leave idle
    import os
    import threading

    import xrdmap.pipeline as pipeline

    if not sys.platform.startswith("linux"):
        pytest.skip("threads have their own priority on Linux only")
    seen = {}

    class Phase:
        def prepare(self, **_):
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            seen["thread"] = threading.current_thread().name

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    cfg = _config(small_scan, tmp_path / "w.h5", output__figures=False)
    warm = pipeline._WarmUp({"P": Phase()}, cfg)
    warm.start(np.linspace(0.5, 20.0, 100))
    warm.result()
    assert seen == {"nice": 19, "thread": "xrdmap-warm-up"}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_full_run_writes_a_complete_result(small_scan, tmp_path):
    out = tmp_path / "result.h5"
    cfg = _config(small_scan, out, output__figures=False, output__report=False)
    outputs = run(cfg)
    ds = open_result(outputs.result)
    for name in ("iq", "iq_sigma", "gr", "sq", "fq", "phase_fraction", "nmf_q_weights", "nmf_r_weights",
                 "coherence_length"):
        assert name in ds, name
    assert ds.sizes["point"] == 12
    np.testing.assert_allclose(ds["phase_fraction"].sum("phase"), 1.0, atol=1e-6)
    assert ds.attrs["configuration"]["pdf"]["composition"] == cfg.pdf.composition
    assert not out.with_name(out.name + ".checkpoint").exists()


def test_missing_background_fails_before_the_integration(small_scan, tmp_path, monkeypatch):
    import xrdmap.pipeline as pipeline

    out = tmp_path / "result.h5"
    cfg = _config(small_scan, out, background__file=str(tmp_path / "kapton.h5"))
    monkeypatch.setattr(pipeline, "integrate_checkpointed", lambda *a, **k: pytest.fail("integration started"))
    with pytest.raises(InputError, match="kapton.h5.*does not exist"):
        run(cfg)
    assert not out.exists()


def test_figures_drawn_early_are_removed_when_the_analysis_fails(small_scan, tmp_path, monkeypatch):
    # the figures of I(Q), G(r) and the fractions are written while the NMF components are
    # being named; a failure after them leaves neither figures nor a result file
    import xrdmap.pipeline as pipeline

    out = tmp_path / "result.h5"
    cfg = _config(small_scan, out, output__report=False)
    drawn = []

    def early(self, ds):
        original(self, ds)
        drawn.extend(self.written)

    def broken(*_a, **_k):
        raise RuntimeError("assignment failed")

    original = pipeline._Figures.draw_early
    monkeypatch.setattr(pipeline._Figures, "draw_early", early)
    monkeypatch.setattr(pipeline, "_assign_when_ready", broken)
    with pytest.raises(RuntimeError, match="assignment failed"):
        run(cfg)
    assert {p.stem for p in drawn} >= {"iq_map", "gr_map", "phase_fractions"}
    assert not any(p.exists() for p in drawn)
    assert not out.exists()
    # the patterns were being saved when it failed: no partial result file is left either
    assert not list(tmp_path.glob(".result.h5.*"))


def test_patterns_are_saved_before_the_analysis_ends(small_scan, tmp_path, monkeypatch):
    # the result file gets the patterns while the components are still being named, and
    # then the rest; the file equals the run's dataset
    import xrdmap.pipeline as pipeline
    from xrdmap.results import ResultFile, open_result

    out = tmp_path / "result.h5"
    steps = []
    write, close = ResultFile.write, ResultFile.close
    monkeypatch.setattr(ResultFile, "write", lambda self, ds, names: (steps.append(("write", sorted(names))),
                                                                        write(self, ds, names))[1])
    monkeypatch.setattr(ResultFile, "close", lambda self, ds: (steps.append(("close",)), close(self, ds))[1])
    patterns, analyse = pipeline._ResultSaver.write_patterns, pipeline.analyse

    def saving(self, ds):
        steps.append(("patterns",))
        patterns(self, ds)

    def analysed(*args, **kwargs):
        result = analyse(*args, **kwargs)
        steps.append(("analysed",))
        return result

    monkeypatch.setattr(pipeline._ResultSaver, "write_patterns", saving)
    monkeypatch.setattr(pipeline, "analyse", analysed)
    outputs = run(_config(small_scan, out, output__report=False))
    kinds = [s[0] for s in steps]
    assert kinds.index("patterns") < kinds.index("analysed") < kinds.index("close") == len(kinds) - 1
    assert kinds.count("write") == 1
    written = steps[kinds.index("write")][1]
    assert {"iq", "iq_sigma", "gr", "fq", "sq"} <= set(written) and "phase_fraction" not in written
    back = open_result(out)
    for name in outputs.dataset.data_vars:
        np.testing.assert_array_equal(back[name].values, outputs.dataset[name].values)
    assert not list(tmp_path.glob(".result.h5.*"))


def test_a_failed_save_removes_the_figures(small_scan, tmp_path, monkeypatch):
    from xrdmap.errors import OutputError
    from xrdmap.results import ResultFile

    out = tmp_path / "result.h5"

    def full_disk(self, ds):
        raise OutputError("output 'result.h5' could not be written: No space left on device")

    monkeypatch.setattr(ResultFile, "close", full_disk)
    with pytest.raises(OutputError, match="No space left"):
        run(_config(small_scan, out))
    assert not out.exists() and not list(tmp_path.glob(".result.h5.*"))
    assert not list((tmp_path / "result_figures").glob("*.png"))
    assert not (tmp_path / "result_report.html").exists()


def test_run_draws_every_figure_once_in_the_usual_order(small_scan, tmp_path):
    from xrdmap.maps import FIGURES

    out = tmp_path / "result.h5"
    outputs = run(_config(small_scan, out, output__report=False))
    names = [p.stem for p in outputs.figures]
    expected = [n for group in FIGURES.values() for n in group]
    assert names == [n for n in expected if n in names] and len(set(names)) == len(names)
    assert {"iq_map", "gr_map", "components_q", "components_r", "phase_fractions", "quality"} <= set(names)
    assert all(p.is_file() for p in outputs.figures) and out.is_file()
    # the run draws its figures in rounds as their data appear; each must be the figure
    # `xrdmap figures` draws from the finished result file (the heatmaps in the Q and r
    # windows the NMF was fitted on, the same zone boundaries); the components are drawn
    # with the run's references there, with the library here
    from xrdmap.maps import nmf_ranges, save_figures

    ds = open_result(out)
    assert nmf_ranges(ds, "q") == [(1.0, 15.0)]
    redrawn = save_figures(ds, tmp_path / "redrawn", formats=("png",),
                           what=[n for n in names if not n.startswith("components")])
    assert len(redrawn) == len(names) - 2
    for path in redrawn:
        assert (outputs.figures[0].parent / path.name).read_bytes() == path.read_bytes(), path.name


def test_bin_points_averages_and_combines_uncertainties():
    n, nq = 10, 4
    iq = np.arange(n * nq, dtype=float).reshape(n, nq)
    sigma = np.ones((n, nq))
    ds = xr.Dataset(
        {"iq": (("point", "q"), iq), "iq_sigma": (("point", "q"), sigma),
         "masked_pixels": (("point",), np.ones(n, dtype=np.int64))},
        coords={"point": np.arange(n), "q": np.arange(nq), "time": ("point", np.arange(n) * 0.001)},
    )
    binned = bin_points(ds, time_bin=3)
    assert binned.sizes["point"] == 3  # the incomplete last bin is dropped
    np.testing.assert_allclose(binned["iq"][0], iq[:3].mean(0))
    np.testing.assert_allclose(binned["iq_sigma"][0], np.sqrt(3) / 3)
    np.testing.assert_allclose(binned["time"], [0.001, 0.004, 0.007])
    np.testing.assert_array_equal(binned["masked_pixels"], [3, 3, 3])
    window = bin_points(ds, time_window=(0.0025, 0.0065))
    np.testing.assert_allclose(window["time"], [0.003, 0.004, 0.005, 0.006])
    with pytest.raises(InputError, match="time_window"):
        bin_points(ds, time_window=(1.0, 2.0))
    with pytest.raises(InputError, match="time_bin"):
        bin_points(ds, time_bin=50)


def test_cli_run_reports_bad_config_with_exit_code_3(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("scan: {source: s.h5}\ngeometry: {poni: g.poni}\nintegration: {npt: lots}\n")
    proc = subprocess.run([sys.executable, "-m", "xrdmap", "run", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "integration.npt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def test_a_checkpoint_half_saved_by_a_killed_run_is_removed(small_scan, tmp_path):
    out = tmp_path / "result.h5"
    cfg = _config(small_scan, out)
    ckpt = out.with_name(out.name + ".checkpoint")
    integrate_checkpointed(_scan(cfg), cfg)
    half = ckpt / ".chunk_000003.tmp.npz"
    half.write_bytes(b"PK\x03\x04 cut short by SIGKILL")
    (ckpt / "chunk_000003.npz").unlink()
    ds = integrate_checkpointed(_scan(cfg), cfg)
    assert not half.exists()
    assert (ckpt / "chunk_000003.npz").is_file()
    assert ds.sizes["point"] == 12


@pytest.mark.slow
def test_cli_run_with_worker_processes_ends_quietly(small_scan, tmp_path):
    # the cluster closes in a thread of its own beside the analysis: its client must close
    # there too (not through the calling thread's context) and give back what it holds
    # before the workers go, so distributed logs nothing and xrdmap warns of nothing
    import json

    import yaml

    out = tmp_path / "result.h5"
    cfg = _config(small_scan, out, compute__workers=2, output__report=False, output__figures=False)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    proc = subprocess.run([sys.executable, "-m", "xrdmap", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for noise in ("did not shut down", "WARNING", "ERROR", "Traceback"):
        assert noise not in text, text
    assert out.is_file()


def test_lower_priority_applies_to_the_calling_thread_only():
    import os
    import threading

    from xrdmap.pipeline import _lower_priority

    if not sys.platform.startswith("linux"):
        pytest.skip("threads have their own priority on Linux only")
    seen = {}

    def helper():
        _lower_priority(7)
        seen["helper"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=helper)
    t.start()
    t.join()
    assert seen["helper"] == max(7, before)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # this thread unchanged


def test_lower_children_priority_lowers_child_processes_only():
    # the run's local dask workers shut down at the lowest priority, beside the analysis
    import os

    from xrdmap.pipeline import _lower_children_priority

    if not sys.platform.startswith("linux"):
        pytest.skip("process priorities are set on Linux only")
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                              "subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"])
    try:
        import psutil

        deadline = time.monotonic() + 20
        while len(psutil.Process(child.pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        grandchild = psutil.Process(child.pid).children()[0]
        before = os.getpriority(os.PRIO_PROCESS, 0)
        _lower_children_priority(19)
        assert psutil.Process(child.pid).nice() == 19
        assert grandchild.nice() == 19  # the workers of a nanny too
        assert os.getpriority(os.PRIO_PROCESS, 0) == before  # this process unchanged
    finally:
        for p in psutil.Process(child.pid).children(recursive=True):
            p.kill()
        child.kill()
        child.wait()


def test_close_quietly_releases_local_workers_then_lowers_them(monkeypatch):
    # after the integration the local workers give back their memory, then exit at nice 19
    import contextlib

    from xrdmap import pipeline
    from xrdmap.integrate import release_engines

    steps = []

    class Client:
        def run(self, fn):
            steps.append(("run", fn))

    stack = contextlib.ExitStack()
    stack.callback(lambda: steps.append(("closed",)))
    monkeypatch.setattr(pipeline, "_lower_children_priority", lambda nice: steps.append(("nice", nice)))
    pipeline._close_quietly(stack, print, Client())
    assert steps == [("run", release_engines), ("nice", 19), ("closed",)]
    # a remote cluster (no local client): closed as it is
    steps.clear()
    stack = contextlib.ExitStack()
    stack.callback(lambda: steps.append(("closed",)))
    pipeline._close_quietly(stack, print)
    assert steps == [("closed",)]


def test_old_objects_are_frozen_during_the_analysis_only(small_scan, tmp_path, monkeypatch):
    # the objects that exist after the integration stay out of the garbage collector's
    # collections while the analysis runs; the run leaves the collector as it found it,
    # also when it fails
    import gc

    import xrdmap.pipeline as pipeline

    seen = []
    analyse = pipeline.analyse

    def watched(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return analyse(*args, **kwargs)

    monkeypatch.setattr(pipeline, "analyse", watched)
    assert gc.get_freeze_count() == 0
    run(_config(small_scan, tmp_path / "result.h5", output__figures=False, output__report=False))
    assert seen[0] > 1000 and gc.get_freeze_count() == 0

    def broken(*_a, **_k):
        raise RuntimeError("analysis failed")

    monkeypatch.setattr(pipeline, "analyse", broken)
    with pytest.raises(RuntimeError, match="analysis failed"):
        run(_config(small_scan, tmp_path / "again.h5", output__figures=False, output__report=False))
    assert gc.get_freeze_count() == 0
    # objects a caller froze itself stay frozen, and the run freezes nothing more
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        monkeypatch.setattr(pipeline, "analyse", watched)
        run(_config(small_scan, tmp_path / "third.h5", output__figures=False, output__report=False))
        # (frozen objects can still be freed by reference counting: the count only falls)
        assert seen[-1] <= mine and 0 < gc.get_freeze_count() <= mine
    finally:
        gc.unfreeze()
