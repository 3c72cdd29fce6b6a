"""The whole pipeline: frames -> I(Q) -> background -> PDF -> NMF -> phases -> maps.

:func:`run` composes the stage functions. Integration, the only stage whose cost grows
with the frames, runs as one dask graph over chunks of scan points; each finished chunk
is checkpointed next to the output (``<output>.checkpoint/``), so a run that is killed
and started again recomputes only the chunks that were not finished. Everything after
integration is vectorised over all points at once and takes seconds.

The output path only ever holds a complete result: it is written to a temporary file
and renamed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from xrdmap._checksums import InputChecksums
from xrdmap.config import RunConfig
from xrdmap.errors import ComputeError, InputError, OutputError

__all__ = ["run", "RunOutputs", "integrate_checkpointed", "analyse", "bin_points", "demo_config"]

Log = Callable[[str], None]
CHUNKS_PER_WORKER = 4
ENGINE_DIR = "engine"  # in the checkpoint folder: the integration engine the workers share
Progress = Callable[[int, int], None]


@dataclass
class RunOutputs:
    """What a run wrote."""

    result: Path
    figures: list[Path] = field(default_factory=list)
    report: Path | None = None
    exports: list[Path] = field(default_factory=list)
    dataset: xr.Dataset | None = None


def _quiet(_: str) -> None:
    return None


def run(config: RunConfig, *, log: Log = _quiet, progress: Progress | None = None) -> RunOutputs:
    """Run every stage of ``config`` and write the result, figures and report.

    Parameters
    ----------
    config
        A validated :class:`xrdmap.config.RunConfig` (paths already resolved).
    log
        Called with one-line human-readable messages (the CLI prints them).
    progress
        Called as ``progress(done_chunks, total_chunks)`` during integration.
    """
    out_path = Path(config.output.path)
    if not out_path.parent.is_dir():
        raise OutputError(f"output.path {str(out_path)!r}: directory {str(out_path.parent)!r} does not exist")

    scan = _open_scan(config)
    log(f"scan: {scan.sizes['point']} frames of {scan.sizes['y']} x {scan.sizes['x']} px from {config.scan.source}")
    phases = _phase_library(config)  # a bad CIF fails now, not after the integration
    warm = _WarmUp(phases, config)
    checksums = InputChecksums(_provenance_inputs(config))
    heap = _OldObjects()
    try:
        return _run_stages(config, scan, out_path, warm, checksums, heap, log, progress)
    finally:
        heap.unfreeze()
        checksums.close()


class _OldObjects:
    """The objects that exist once the frames are integrated (modules, dask's client and
    scheduler state, the reference tables: ~350 000 after 500 frames), kept out of the
    cyclic garbage collector's collections while the analysis runs (:func:`gc.freeze`):
    a full collection of them held the GIL for ~0.2 s after the last frame. Nothing is
    done if the caller froze objects itself."""

    def __init__(self) -> None:
        self._frozen = False

    def freeze(self) -> None:
        if gc.get_freeze_count() == 0:
            gc.collect(1)  # the young garbage of the integration first (milliseconds)
            gc.freeze()
            self._frozen = True

    def unfreeze(self) -> None:
        if self._frozen:
            gc.unfreeze()
            self._frozen = False


def _run_stages(config: RunConfig, scan: xr.DataArray, out_path: Path, warm: _WarmUp, checksums: InputChecksums,
                heap: _OldObjects, log: Log, progress: Progress | None) -> RunOutputs:
    from xrdmap.cluster import dask_client

    c = config.compute
    background = _Background(config)  # a missing or unreadable background fails now
    cluster = contextlib.ExitStack()
    closing: threading.Thread | None = None
    figures: _Figures | None = None
    result: _ResultSaver | None = None
    try:
        client = cluster.enter_context(dask_client(
            workers=c.workers, threads_per_worker=c.threads_per_worker, scheduler=c.scheduler,
            cluster=c.cluster, slurm=c.slurm, jobs=c.jobs, memory_limit=c.memory_limit,
        ))
        if client is not None:
            log(f"dask dashboard: {client.dashboard_link}")

        def starting(q: np.ndarray) -> None:
            # the checkpoint folder (and its engine) is ready and the frames are about to
            # be submitted: the background goes to the workers with them, and the warm-up
            # thread starts beside them
            background.submit(client)
            warm.start(q)

        ds = integrate_checkpointed(scan, config, client=client, log=log, progress=progress, on_grid=starting)
        background_iq = background.result()
        heap.freeze()
        # The workers are done: the cluster shuts down beside the analysis and is waited
        # for at the very end (_close_quietly: local workers give back their memory, then
        # exit at the lowest priority). Only a normal exit gets here; an error or an
        # interrupt closes it below, in this thread, through dask_client's quiet teardown.
        local = client if client is not None and c.scheduler is None and c.cluster == "local" else None
        closing = threading.Thread(target=_close_quietly, args=(cluster, log, local),
                                   name="xrdmap-cluster-close", daemon=True)
        closing.start()
        ds = bin_points(ds, config.scan.time_bin, config.scan.time_window)
        phases = warm.result()
        figures = _Figures(config, out_path, phases)
        result = _ResultSaver(out_path, config.output.compression)
        # The patterns go into the result file (a helper thread: HDF5's optional
        # compression runs without the GIL) as soon as the PDF exists, and the figures of
        # I(Q), G(r), the fractions and each decomposition are drawn as soon as their
        # data exist, while the NMF components are named (this thread would only wait there).
        draw = config.output.figures
        ds = analyse(ds, config, background=background_iq, log=log, phases=phases, on_pdf=result.write_patterns,
                     on_fractions=figures.draw_early if draw else None,
                     on_components=figures.draw_components if draw else None)
    except BaseException:
        if closing is None:
            cluster.__exit__(*sys.exc_info())
        if figures is not None:
            figures.discard()  # no figures without the result they belong to
        if result is not None:
            result.discard()
        if closing is not None:
            closing.join()
        raise
    ds.attrs.update(_provenance(config, checksums))

    # The rest of the result file is written by a second thread while this one draws the
    # remaining figures.
    result.finish(ds)
    outputs = RunOutputs(result=out_path, dataset=ds)
    try:
        outputs.figures, outputs.report, outputs.exports = _write_products(ds, config, out_path, log, figures)
        result.result()  # waits; raises the save's error, if any
    except BaseException:
        # nothing that belongs to a result file that was not written
        figures.discard()
        result.discard()
        for path in (outputs.report, *outputs.exports):
            if path is not None:
                path.unlink(missing_ok=True)
        raise
    finally:
        closing.join()
    log(f"result: {out_path}")
    if not config.output.keep_checkpoints:
        shutil.rmtree(_checkpoint_dir(out_path), ignore_errors=True)
    return outputs


class _InThread:
    """``fn(*args)`` run by a thread started now; :meth:`result` waits and returns or raises."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str) -> None:
        self._fn, self._args = fn, args
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # re-raised by result(), in the caller's thread
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class _ResultSaver:
    """The run's result file (:class:`xrdmap.results.ResultFile`), written by helper
    threads: the patterns as soon as the PDF exists (:meth:`write_patterns`), the rest
    once the analysis is done (:meth:`finish`). :meth:`result` waits for both and raises
    their error; :meth:`discard` (after an error) removes the unfinished file."""

    def __init__(self, path: Path, compression: str) -> None:
        from xrdmap.results import ResultFile

        self._file = ResultFile(path, compression=compression)
        self._patterns: _InThread | None = None
        self._rest: _InThread | None = None

    def write_patterns(self, ds: xr.Dataset) -> None:
        self._patterns = _InThread(self._write_patterns, ds, name="xrdmap-save-patterns")

    def _write_patterns(self, ds: xr.Dataset) -> None:
        _lower_priority(19)  # nothing waits for this before the analysis ends: it fills idle cores
        self._file.write(ds, list(ds.data_vars))

    def finish(self, ds: xr.Dataset) -> None:
        self._rest = _InThread(self._close, ds, name="xrdmap-save-result")

    def _close(self, ds: xr.Dataset) -> None:
        if self._patterns is not None:
            self._patterns.result()
        self._file.close(ds)

    def result(self) -> None:
        for job in (self._patterns, self._rest):
            if job is not None:
                job.result()

    def discard(self) -> None:
        """Wait for the helper threads (their errors no longer matter), then remove the file."""
        for job in (self._patterns, self._rest):
            if job is not None:
                with contextlib.suppress(BaseException):
                    job.result()
        self._file.discard()


#: Priority (nice) of the analysis thread that runs the decompositions: the joint phase
#: fit beside it gates the figures and goes first (measured: ~0.2-0.3 s less after the
#: last frame of the 500-point benchmark than at equal priority).
_NMF_NICE = 5


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority to ``nice`` on Linux, which schedules
    threads one by one (elsewhere the id of a thread is no process id: nothing is done)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:  # not allowed: normal priority
        pass


def _lower_children_priority(nice: int) -> None:
    """Lower the CPU priority of this process's child processes (the local dask workers)
    to ``nice`` (Linux; elsewhere nothing is done)."""
    if not sys.platform.startswith("linux"):
        return
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            child.nice(nice)


def _close_quietly(cluster: contextlib.ExitStack, log: Log, local_client: Any = None) -> None:
    """Close the dask cluster; a failure there is reported, not raised (the results are complete).

    With ``local_client`` (a cluster of processes on this machine), the workers first drop
    their integration engines and freed heap (~0.1 s; ~0.25 GB left per worker), then
    exit at nice 19: their exit costs ~0.9 CPU-s, which the analysis beside it needs more.
    """
    try:
        if local_client is not None:
            from xrdmap.integrate import release_engines

            with contextlib.suppress(Exception):  # only memory and priority are at stake
                local_client.run(release_engines)
            _lower_children_priority(19)
        cluster.close()
    except Exception as exc:
        log(f"warning: the dask cluster did not shut down cleanly: {exc}")


def _open_scan(config: RunConfig) -> xr.DataArray:
    from xrdmap.io import open_scan

    s = config.scan
    kwargs = dict(
        frames_path=s.frames_path, positions_path=s.positions_path, times_path=s.times_path,
        monitor_path=s.monitor_path, positions=s.positions, times=s.times,
    )
    scan = open_scan(s.source, chunk_frames=s.chunk_frames, **kwargs)
    if s.chunk_frames is None:
        # io sizes chunks by memory (~64 MB); small scans then fit in one chunk and would
        # leave workers idle. Ask for at least CHUNKS_PER_WORKER chunks per worker.
        workers = max(1, config.compute.workers, config.compute.jobs if config.compute.cluster == "slurm" else 1)
        by_memory = int(scan.chunks[0][0])
        wanted = max(1, -(-scan.sizes["point"] // (CHUNKS_PER_WORKER * workers)))
        if wanted < by_memory:
            scan = open_scan(s.source, chunk_frames=wanted, **kwargs)
    return scan


# --------------------------------------------------------------------------------------
# integration with checkpoints
# --------------------------------------------------------------------------------------


def demo_config(scan: Path, outdir: Path, *, workers: int = 2) -> RunConfig:
    """Configuration for a scan written by :func:`xrdmap.simulate.simulate_scan`.

    Uses the PONI and mask written beside the scan, the dark stored in the file (saved
    to ``<scan>.dark.npy``) and the Kapton-only frame stored in the file as background.
    """
    import h5py

    from xrdmap.config import validate_config
    from xrdmap.io import read_image

    scan = Path(scan)
    dark = read_image(scan, dataset="entry/instrument/detector/dark")  # compressed chunks checked
    with h5py.File(scan, "r") as fh:
        layout = str(fh["entry/truth"].attrs.get("layout", ""))
        has_time = "time" in fh["entry/data"]
    dark_path = scan.with_suffix(".dark.npy")
    np.save(dark_path, dark)
    compositions = {
        "hotspot": "Li3V2(PO4)3",
        "composite": "0.6 Li3V2(PO4)3 + 0.4 Li1.3Al0.3Ti1.7(PO4)3",
        "multilayer": "0.5 Li3V2(PO4)3 + 0.5 Li1.3Al0.3Ti1.7(PO4)3",
        "vitreous": "Li1.3Al0.3Ti1.7(PO4)3",
        "flash": "Li1.3Al0.3Ti1.7(PO4)3",
    }
    data = {
        "scan": {"source": str(scan)},
        "geometry": {"poni": str(scan.with_suffix(".poni")), "mask": str(scan.with_suffix(".mask.npy")),
                     "dark": str(dark_path)},
        "integration": {"npt": 1500, "q_range": [0.5, 20.0]},
        "background": {"file": str(scan), "frames_path": "/entry/background/data",
                       "monitor": "/entry/background/monitor", "scale": 1.0},
        "pdf": {"composition": compositions.get(layout, "Li3V2(PO4)3"), "qmax": 18.0, "qmaxinst": 19.0},
        "output": {"path": str(Path(outdir) / "result.h5"), "formats": ["png"]},
        "compute": {"workers": workers},
    }
    if has_time:
        data["series"] = {"enabled": True, "phase": "LATP", "lattice_q_range": [4.0, 16.0]}
    return validate_config(data, f"demo for {scan}")


def _checkpoint_dir(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".checkpoint")


def _file_signature(path: str | None) -> Any:
    """Cheap identity of an input file: size and modification time (not its content)."""
    if path is None or "://" in str(path):
        return path
    p = Path(path)
    if not p.exists():
        return str(p)
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _integration_key(scan: xr.DataArray, config: RunConfig) -> str:
    """Hash of everything that changes integrated numbers: inputs and parameters."""
    src = config.scan.source
    sources = src if isinstance(src, list) else [src]
    payload = {
        "scan": config.scan.model_dump(exclude={"time_bin", "time_window"}),
        "sources": [_file_signature(s) for s in sources],
        "geometry": {k: _file_signature(v) for k, v in config.geometry.model_dump().items()},
        "integration": config.integration.model_dump(),
        "shape": [int(v) for v in scan.shape],
        "chunks": [int(c) for c in scan.chunks[0]],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _integrate_kwargs(config: RunConfig) -> dict[str, Any]:
    g, i = config.geometry, config.integration
    return dict(
        mask=g.mask, dark=g.dark, flat=g.flat, npt=i.npt,
        q_range=tuple(i.q_range) if i.q_range else None,
        polarization_factor=i.polarization_factor, error_model=i.error_model,
        outlier_sigma=i.outlier_sigma, saturation=i.saturation,
    )


def integrate_checkpointed(
    scan: xr.DataArray,
    config: RunConfig,
    *,
    client: Any = None,
    log: Log = _quiet,
    progress: Progress | None = None,
    on_grid: Callable[[np.ndarray], None] | None = None,
) -> xr.Dataset:
    """Integrate every frame, saving each finished chunk under ``<output>.checkpoint/``.

    Chunks already present from an earlier, interrupted run with the same inputs and
    parameters are loaded instead of recomputed. The integration engine is built once, by
    the first worker, and saved under ``<output>.checkpoint/engine/`` where the other
    workers (and a resumed run) memory-map it. ``on_grid`` is called with the Q grid
    (A^-1) once it is known, before the frames are integrated.
    """
    import dask

    from xrdmap.integrate import integrate_scan

    ckpt = _checkpoint_dir(Path(config.output.path))
    key = _integration_key(scan, config)
    key_file = ckpt / "key.json"
    try:
        if ckpt.exists() and (not key_file.is_file() or json.loads(key_file.read_text()).get("key") != key):
            log(f"checkpoints in {ckpt} belong to other inputs or parameters: discarding them")
            shutil.rmtree(ckpt)
        ckpt.mkdir(exist_ok=True)
        for stale in ckpt.glob(".chunk_*.tmp.npz"):  # a run killed (SIGKILL) while saving one
            stale.unlink()
        if not key_file.is_file():
            key_file.write_text(json.dumps({"key": key}))
    except (OSError, ValueError) as exc:
        raise OutputError(f"checkpoint directory {str(ckpt)!r} cannot be written: {getattr(exc, 'strerror', None) or exc}") from None
    lazy = integrate_scan(scan, config.geometry.poni, **_integrate_kwargs(config), engine_dir=ckpt / ENGINE_DIR)

    if on_grid is not None:
        on_grid(np.asarray(lazy["q"].values, dtype=float))
    names = [n for n in ("iq", "iq_sigma", "masked_pixels", "rejected_fraction") if n in lazy.data_vars]
    point_chunks = lazy["iq"].chunks[0]
    bounds = np.concatenate([[0], np.cumsum(point_chunks)]).astype(int)
    n_chunks = len(point_chunks)

    def chunk_file(i: int) -> Path:
        return ckpt / f"chunk_{i:06d}.npz"

    pending = [i for i in range(n_chunks) if not chunk_file(i).is_file()]
    done = n_chunks - len(pending)
    if done:
        log(f"resuming: {done} of {n_chunks} chunks already integrated")
    if progress:
        progress(done, n_chunks)

    def block(i: int) -> list:
        sl = slice(int(bounds[i]), int(bounds[i + 1]))
        return [lazy[n].data[sl] for n in names]

    def save(i: int, arrays) -> None:
        tmp = ckpt / f".chunk_{i:06d}.tmp.npz"
        try:
            np.savez(tmp, **{n: np.asarray(a) for n, a in zip(names, arrays)})
            tmp.replace(chunk_file(i))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"checkpoint {str(chunk_file(i))!r} could not be written: {exc.strerror or exc}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    if client is None:
        for i in pending:
            save(i, dask.compute(*block(i), scheduler="sync"))
            done += 1
            if progress:
                progress(done, n_chunks)
    elif pending:
        from distributed import KilledWorker, as_completed

        # One future per chunk holding all its arrays (they share the frames' tasks), all
        # submitted as one graph: the scheduler then sees the frame reads as root tasks and
        # queues them, instead of reading chunks far ahead of the integration and holding
        # them in worker memory (one submission per chunk made peak memory grow with the scan).
        chunk_futures = client.compute([dask.delayed(list)(block(i)) for i in pending])
        futures = dict(zip(chunk_futures, pending))
        for fut in as_completed(list(futures)):
            i = futures[fut]
            try:
                arrays = fut.result()
            except KilledWorker as exc:
                raise ComputeError(
                    f"integration of frames {bounds[i]}..{bounds[i + 1] - 1} of {scan.attrs.get('source', 'the scan')} "
                    f"failed: the dask workers processing it died repeatedly ({exc}); "
                    "expected readable frames (a crash can come from corrupt compressed data)"
                ) from None
            save(i, arrays)
            done += 1
            if progress:
                progress(done, n_chunks)

    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(n_chunks):
        with np.load(chunk_file(i)) as f:  # one open file at a time, whatever the chunk count
            for n in names:
                parts[n].append(f[n])
    data = {n: np.concatenate(parts[n]) for n in names}
    ds = lazy.copy()
    for n in names:
        ds[n] = (lazy[n].dims, data[n], lazy[n].attrs)
    return ds


class _Background:
    """The background of ``config`` as I(Q): read from a 1-D pattern, or integrated from
    frames with the scan's geometry, on the dask workers beside the scan's frames.

    Created before the integration (a missing file fails then, not after the frames);
    :meth:`submit` once the checkpoint folder (where the workers share the engine) is
    ready; :meth:`result` waits for it (None without a background).
    """

    def __init__(self, config: RunConfig) -> None:
        self._config = config
        self._value: xr.DataArray | None = None
        self._frames: xr.DataArray | None = None  # set when the background is integrated
        self._lazy: xr.DataArray | None = None
        self._future: Any = None
        bg = config.background
        if bg.file is None:
            return
        path = Path(bg.file)
        if not path.is_file():
            raise InputError(f"background.file {str(path)!r} does not exist")
        if path.suffix.lower() in (".xy", ".chi", ".dat", ".txt", ".iq"):
            from xrdmap.textio import read_pattern

            self._value = read_pattern(path, wavelength_A=_wavelength_A(config))
            return
        self._frames = _background_frames(path, bg.frames_path, bg.monitor)

    def submit(self, client: Any) -> None:
        if self._frames is None or self._lazy is not None:
            return
        from xrdmap.integrate import integrate_scan

        engine_dir = _checkpoint_dir(Path(self._config.output.path)) / ENGINE_DIR
        integrated = integrate_scan(self._frames, self._config.geometry.poni, **_integrate_kwargs(self._config),
                                    engine_dir=engine_dir)
        self._lazy = integrated["iq"].mean("point")
        if client is not None:
            self._future = client.compute(self._lazy)

    def result(self) -> xr.DataArray | None:
        if self._frames is not None and self._value is None:
            self.submit(None)  # nothing if submitted already
            self._value = self._future.result() if self._future is not None else self._lazy.compute(scheduler="sync")
        return self._value


def _background_frames(path: Path, frames_path: str | None, monitor: float | str | None) -> xr.DataArray:
    """Background frames as a (point, y, x) array with a monitor coordinate."""
    import h5py

    from xrdmap.io import open_scan, read_image

    is_hdf5 = h5py.is_hdf5(path)
    if is_hdf5 and frames_path is not None:
        with h5py.File(path, "r") as fh:
            node = fh.get(frames_path)
            if not isinstance(node, h5py.Dataset):
                raise InputError(f"background.frames_path {frames_path!r} not found in {str(path)!r}")
            is_stack = node.ndim == 3
    else:
        is_stack = is_hdf5
    if is_stack:
        frames = open_scan(str(path), frames_path=frames_path)
    else:
        import dask
        import dask.array as da

        # read here to check it (and learn shape and dtype), then again where it is
        # integrated: the graph carries the path, not a detector-sized image
        image = read_image(path, dataset=frames_path)
        lazy = da.from_delayed(dask.delayed(_read_background_image)(str(path), frames_path),
                               shape=(1, *image.shape), dtype=image.dtype)
        frames = xr.DataArray(lazy, dims=("point", "y", "x"), coords={"monitor": ("point", [1.0])})
    if isinstance(monitor, str):
        if not is_hdf5:
            raise InputError(f"background.monitor {monitor!r} is a dataset path but {str(path)!r} is not HDF5")
        with h5py.File(path, "r") as fh:
            node = fh.get(monitor)
            if not isinstance(node, h5py.Dataset):
                raise InputError(f"background.monitor dataset {monitor!r} not found in {str(path)!r}")
            values = np.broadcast_to(np.asarray(node[()], dtype=float), (frames.sizes["point"],))
    elif monitor is not None:
        values = np.full(frames.sizes["point"], float(monitor))
    else:
        return frames
    if not np.all(values > 0):
        raise InputError(f"background.monitor of {str(path)!r} must be positive, got {values}")
    return frames.assign_coords(monitor=("point", values))


def _read_background_image(path: str, dataset: str | None) -> np.ndarray:
    """dask task: one background image as a (1, y, x) stack."""
    from xrdmap.io import read_image

    return read_image(path, dataset=dataset)[None]


def _wavelength_A(config: RunConfig) -> float:
    from xrdmap.geometry import read_poni

    return read_poni(config.geometry.poni)["wavelength"] * 1e10


# --------------------------------------------------------------------------------------
# after integration: vectorised over all points
# --------------------------------------------------------------------------------------


def bin_points(ds: xr.Dataset, time_bin: int = 1, time_window: tuple[float, float] | None = None) -> xr.Dataset:
    """Keep a time window and average every ``time_bin`` consecutive points.

    Intensities are averaged; uncertainties combine as ``sqrt(sum sigma^2) / n``;
    coordinates (time, position, monitor) are averaged; counts are summed.
    """
    if time_window is not None:
        if "time" not in ds.coords:
            raise InputError("scan.time_window needs a scan with a 'time' coordinate")
        t0, t1 = time_window
        keep = (ds["time"] >= t0) & (ds["time"] <= t1)
        if not bool(keep.any()):
            raise InputError(f"scan.time_window [{t0}, {t1}] s contains no point of the scan")
        ds = ds.isel(point=np.flatnonzero(keep.values))
    if time_bin <= 1:
        return ds
    n = ds.sizes["point"] // time_bin
    if n == 0:
        raise InputError(f"scan.time_bin {time_bin} is larger than the {ds.sizes['point']} points of the scan")
    ds = ds.isel(point=slice(0, n * time_bin))
    groups = np.repeat(np.arange(n), time_bin)
    ds = ds.assign_coords(point=groups)
    out = {}
    for name, var in ds.data_vars.items():
        if "point" not in var.dims:
            out[name] = var
        elif name.endswith("_sigma"):
            out[name] = np.sqrt((var**2).groupby("point").sum()) / time_bin
        elif var.dtype.kind in "iu":
            out[name] = var.groupby("point").sum()
        else:
            out[name] = var.groupby("point").mean()
    coords = {
        c: ("point", ds[c].groupby("point").mean().values)
        for c in ds.coords
        if c != "point" and ds[c].dims == ("point",)
    }
    binned = xr.Dataset(out, attrs=ds.attrs).assign_coords(point=np.arange(n), **coords)
    binned.attrs["time_bin"] = time_bin
    return binned


def analyse(
    ds: xr.Dataset,
    config: RunConfig,
    *,
    background: xr.DataArray | None = None,
    log: Log = _quiet,
    phases: dict[str, Any] | None = None,
    on_pdf: Callable[[xr.Dataset], None] | None = None,
    on_fractions: Callable[[xr.Dataset], None] | None = None,
    on_components: Callable[[str, xr.Dataset], None] | None = None,
) -> xr.Dataset:
    """Background, PDF, NMF, phase assignment and phase fractions on integrated data.

    ``phases``: the reference phases (default: the library ``config`` names).
    The callbacks run in this thread while the helper threads go on with the rest, each
    with a dataset of what exists then (e.g. to save or draw it early):
    ``on_pdf`` with the background-subtracted data and its PDF; ``on_fractions`` with
    those and the phase fractions; ``on_components(dim, ds)``, once the NMF components
    in ``dim`` ("q", then "r") are named, with those and every decomposition named so far.
    """

    if background is not None:
        from xrdmap.background import subtract_background

        sub = subtract_background(
            ds["iq"], background, scale=config.background.scale, iq_sigma=ds.get("iq_sigma")
        )
        ds = ds.assign(iq=sub["iq"])
        if "iq_sigma" in sub:
            ds["iq_sigma"] = sub["iq_sigma"]
        ds["background"] = background.interp(q=ds["q"]) if "q" in background.dims else background
        ds["background"].attrs["scale"] = sub.attrs.get("scale", config.background.scale)
        log(f"background: subtracted {config.background.file} (scale {ds['background'].attrs['scale']})")

    if phases is None:
        phases = _phase_library(config)
    with _short_gil_turns():
        return _analyse(ds, config, log, phases, on_pdf, on_fractions, on_components)


@contextlib.contextmanager
def _short_gil_turns(interval_s: float = 0.0005):
    """Let threads take turns with the GIL every ``interval_s`` (Python's default: 5 ms).

    The analysis threads run NMF, FFTs and NNLS: short stretches of compiled code without
    the GIL between a few Python lines that need it. Beside a thread running mostly
    Python (drawing figures, assembling datasets), such a thread waits up to a whole
    switch interval for the GIL after each stretch, and sits idle most of the time.
    """
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, interval_s))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _analyse(ds: xr.Dataset, config: RunConfig, log: Log, phases: dict[str, Any],
             on_pdf: Callable[[xr.Dataset], None] | None, on_fractions: Callable[[xr.Dataset], None] | None,
             on_components: Callable[[str, xr.Dataset], None] | None) -> xr.Dataset:
    decomp: dict[str, xr.Dataset] = {}
    d = config.decompose
    qmax_data = float(ds["q"].max())
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="xrdmap-analysis") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrdmap-nmf", initializer=_lower_priority,
                               initargs=(_NMF_NICE,)) as nmf_pool:
        # The joint fit of all points (per-point phase fractions) and the decompositions
        # need nothing from each other; each assignment needs its decomposition and the
        # joint fit (Q: it names the components; r: its peak width sets the references'
        # Q damping). Helper threads run them beside this one, which computes the PDF
        # meanwhile (NMF, FFTs and NNLS spend much of their time in compiled code that
        # releases the GIL): the two decompositions one after the other in a thread of
        # lower priority, the joint fit and the assignments in two others. A step waits
        # only for steps submitted before it, which have all started: no deadlock.
        joint_fit = pool.submit(_fractions, ds["iq"], phases, config)
        nmf = {}
        if d.q_ranges:
            nmf["q"] = nmf_pool.submit(_decompose, ds["iq"], "q", d.q_ranges, d)
        if config.pdf.enabled:
            ds = ds.merge(_pdf(ds, config))
            log(f"pdf: G(r) for {ds.sizes['point']} points, composition {config.pdf.composition}")
        if on_pdf is not None:
            on_pdf(ds)
        if d.r_ranges and "gr" in ds:
            nmf["r"] = nmf_pool.submit(_decompose, ds["gr"], "r", d.r_ranges, d)
        wanted = list(nmf)
        named = {dim: pool.submit(_assign_when_ready, nmf[dim], phases, dim, joint_fit, config, qmax_data)
                 for dim in wanted}
        if on_fractions is not None or on_components is not None:
            with_fractions = ds.merge(joint_fit.result(), compat="no_conflicts", join="outer")
            if on_fractions is not None:
                on_fractions(with_fractions)
        for dim in wanted:
            res = named[dim].result()
            decomp[dim] = res
            ds.attrs.update(res.attrs)  # nmf_{dim}_n_components, _criterion, _x_ranges, ...
            names = ", ".join(str(v) for v in res[f"{dim}_component_phase"].values)
            log(f"nmf in {dim}: {res.sizes['component']} components -> {names}")
            if on_components is not None:
                # every decomposition named so far: the figures colour phases by the
                # names of all components (xrdmap.maps.phase_colors), as the final result
                on_components(dim, with_fractions.merge(_combine_components(decomp), compat="override",
                                                        combine_attrs="override"))
        fractions = joint_fit.result()
    ds = ds.merge(_combine_components(decomp), compat="override", combine_attrs="override")

    ds = ds.merge(fractions, compat="no_conflicts", join="outer")
    log(f"phase fractions of {fractions.attrs.get('phase_fraction_selected', 'all library phases')}")

    sc = config.series
    if sc.enabled is True or (sc.enabled == "auto" and "time" in ds.coords):
        from xrdmap.series import describe_series

        phase = _resolve_phase(phases, sc.phase, "series.phase") if sc.phase else None
        desc = describe_series(
            ds, phase=phase, peaks=[tuple(p) for p in sc.peaks], q_range=tuple(sc.q_range),
            lattice_q_range=tuple(sc.lattice_q_range) if sc.lattice_q_range else None,
        )
        ds = ds.merge(desc, combine_attrs="no_conflicts")
        ds.attrs.update(desc.attrs)
        if "event_onset_point" in desc.attrs:
            log(f"series: amorphous interval from point {desc.attrs['event_onset_point']} "
                f"to {desc.attrs.get('event_end_point')}")
    return ds


def _assign_when_ready(res: Future, phases: dict[str, Any], dim: str, fractions: Future, config: RunConfig,
                       qmax_data: float) -> xr.Dataset:
    """:func:`_assign` of the results of two earlier steps."""
    return _assign(res.result(), phases, dim, fractions.result(), config, qmax_data)


def _assign(res: xr.Dataset, phases: dict[str, Any], dim: str, fractions: xr.Dataset, config: RunConfig,
            qmax_data: float) -> xr.Dataset:
    """Name the components of the decomposition ``res`` along ``dim``; returns ``res`` with
    the assignment variables (``{dim}_component_phase``, ...) added."""
    from xrdmap.assign import assign_components

    gr_kwargs = scan_fit = None
    if dim == "q":
        # components are named with the phases the joint fit of all points found
        scan_fit = fractions
    if dim == "r":
        # references terminated and damped as the data: the run's Q range and Lorch
        # window, and the Q resolution found by the Q-space fit (qdamp = sigma_Q)
        gr_kwargs = _gr_settings(qmax_data, config, fractions)
    assigned = assign_components(
        res[f"nmf_{dim}_components"], phases, dim=dim, stretch_range=config.phases.stretch_range,
        max_phases_per_component=MAX_PHASES_PER_COMPONENT, gr_kwargs=gr_kwargs,
        diffuse_window_A=res.attrs.get("nmf_q_diffuse_window_A"), scan_fit=scan_fit,
    )
    return res.merge(assigned.rename({v: f"{dim}_{v}" for v in assigned.data_vars}))


def _decompose(data: xr.DataArray, dim: str, ranges: list, d: Any) -> xr.Dataset:
    """NMF of ``data`` (point, ``dim``) with the ``decompose`` settings ``d``."""
    from xrdmap.decompose import decompose

    return decompose(
        data, dim=dim, bragg_window_A=d.q_diffuse_window_A if dim == "q" and d.q_diffuse == "subtract" else None,
        x_ranges=[tuple(r) for r in ranges],
        n_components=d.components, min_components=d.min_components,
        max_components=d.max_components, random_state=d.random_state, smoothness=d.smoothness,
        init=d.q_init if dim == "q" else "nndsvd", solver=d.solver,
    )


#: Phases per NMF component tried by the assignment: components of graded or layered
#: samples are end-member mixtures of three or four phases.
MAX_PHASES_PER_COMPONENT = 4


def _fractions(iq: xr.DataArray, phases: dict[str, Any], config: RunConfig) -> xr.Dataset:
    """Per-point weight fractions (:func:`xrdmap.assign.scan_phase_fractions`).

    With ``phases.names`` set, exactly those phases are fitted; otherwise the phases the
    scan needs are selected from the library first.
    """
    from xrdmap.assign import scan_phase_fractions

    return scan_phase_fractions(
        iq, phases, stretch_range=config.phases.stretch_range, select=config.phases.names is None
    )


def _gr_settings(qmax_data: float, config: RunConfig, fractions: xr.Dataset) -> dict[str, Any]:
    p = config.pdf
    qmaxinst = min(p.qmaxinst or qmax_data, qmax_data)
    out: dict[str, Any] = {"qmax": min(p.qmax, qmaxinst), "qmin": p.qmin, "lorch": p.lorch}
    width = fractions["phase_width"].values
    width = width[np.isfinite(width)]
    if width.size:
        out["qdamp"] = float(np.median(width)) / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    return out


def _resolve_phase(phases: Any, name: str, what: str) -> Any:
    """``phases[name]`` through the library's own case-insensitive, alias-aware lookup."""
    try:
        return phases[name]
    except (InputError, KeyError) as exc:
        raise InputError(f"{what}: {exc}") from None


def _pdf(ds: xr.Dataset, config: RunConfig) -> xr.Dataset:
    from xrdmap.pdf import coherence_length, low_r_ripple, transform

    p = config.pdf
    qmax_data = float(ds["q"].max())
    qmaxinst = min(p.qmaxinst or qmax_data, qmax_data)
    out = transform(
        ds["iq"], composition=p.composition, qmin=p.qmin, qmax=min(p.qmax, qmaxinst),
        qmaxinst=qmaxinst, rpoly=p.rpoly, rmin=p.rmin, rmax=p.rmax, rstep=p.rstep,
        lorch=p.lorch, iq_sigma=ds.get("iq_sigma"),
    )
    out["coherence_length"] = coherence_length(out["gr"])
    out["low_r_ripple"] = low_r_ripple(out["gr"])
    return out


def _phase_library(config: RunConfig) -> dict[str, Any]:
    from xrdmap.phases import PhaseLibrary, load_library

    lib = load_library(extra=config.phases.extra or None, folder=config.phases.folder)
    if config.phases.names is None:
        return lib
    chosen = PhaseLibrary()
    for name in [*config.phases.names, *config.phases.extra]:
        phase = _resolve_phase(lib, name, "phases.names")
        chosen[phase.name] = phase
    return chosen


def _combine_components(decomp: dict[str, xr.Dataset]) -> xr.Dataset:
    """Put the Q and r decompositions on one ``component`` axis.

    They may have different numbers of components (e.g. 3 in Q, 2 in r); the shorter
    one is padded with NaN (and "" for names); the attribute ``nmf_{q,r}_n_components``
    of the result records how many are real.
    """
    if not decomp:
        return xr.Dataset()
    k = max(res.sizes.get("component", 0) for res in decomp.values())
    out = []
    for res in decomp.values():
        padded = res.reindex(component=np.arange(k), fill_value={
            v: ("" if res[v].dtype.kind in "OUS" else np.nan) for v in res.data_vars if "component" in res[v].dims
        })
        out.append(padded)
    return xr.merge(out, compat="override", combine_attrs="drop_conflicts")


def _provenance_inputs(config: RunConfig) -> list[str]:
    """The input files whose checksums the result records, each once."""
    src = config.scan.source
    inputs = [p for p in ([*src] if isinstance(src, list) else [src]) if Path(p).is_file()]
    small = [config.geometry.poni, config.geometry.mask, config.geometry.dark, config.geometry.flat,
             config.background.file]
    inputs += [p for p in small if p and Path(p).is_file()]
    # each file once: the background is often the scan file itself, and a checksum reads
    # the whole file (seconds for a scan of a few GB)
    return list(dict.fromkeys(str(p) for p in inputs))


class _WarmUp:
    """Work the analysis will need, done in a background thread during the integration.

    Started (:meth:`start`) once the Q grid is known: imports the NMF and plotting
    modules, draws a throwaway figure (:func:`xrdmap.maps.warm_up`: ~0.2 s less after
    the last frame) and builds the reference phases' reflection and pair lists to the Q
    and r the analysis reaches (~3 s for the shipped library, otherwise paid after the
    last frame). It runs at nice 19, on the CPU the integrating workers leave idle
    (~15 %: it still ends within ~2.5 s, and the run's integration no longer takes ~1 s
    longer than the integration alone). :meth:`result` waits for it and returns the
    phases; an error is re-raised there.
    """

    def __init__(self, phases: dict[str, Any], config: RunConfig) -> None:
        self._phases = phases
        self._config = config
        self._job: _InThread | None = None

    def start(self, q: np.ndarray) -> None:
        if self._job is None:
            self._job = _InThread(self._run, float(np.max(q)), name="xrdmap-warm-up")

    def _run(self, q_max: float) -> None:
        _lower_priority(19)  # idle CPU only: the workers integrating beside it go first
        import scipy.optimize  # noqa: F401
        import sklearn.decomposition  # noqa: F401

        import xrdmap.assign  # noqa: F401
        import xrdmap.decompose  # noqa: F401

        if self._config.output.figures:
            from xrdmap.maps import warm_up

            warm_up(self._config.output.formats)

        from xrdmap.assign import _DIRECT_FWHM_Q

        # the assignment simulates peaks up to _DIRECT_FWHM_Q wide (wider ones are
        # drawn at that width and convolved), on the Q grid and the r ranges decomposed
        r_ranges = self._config.decompose.r_ranges
        r_max = max(hi for _, hi in r_ranges) if self._config.pdf.enabled and r_ranges else None
        for phase in dict(self._phases).values():
            phase.prepare(q_max=q_max, r_max=r_max, fwhm_q=_DIRECT_FWHM_Q,
                          stretch_range=self._config.phases.stretch_range)

    def result(self) -> dict[str, Any]:
        if self._job is not None:
            self._job.result()
        return self._phases


def _provenance(config: RunConfig, checksums: InputChecksums) -> dict[str, Any]:
    from xrdmap.results import provenance

    return provenance(json.loads(config.model_dump_json()), checksums=checksums.result())


class _Figures:
    """The run's figures, in ``<output stem>_figures/``, drawn in rounds as their data
    appear: those that need only I(Q), G(r) and the phase fractions (:data:`_EARLY_FIGURES`,
    :meth:`draw_early`), those of each decomposition once its components are named
    (:meth:`draw_components`), the rest with the whole result (:meth:`draw_rest`).
    Components are drawn with the run's references (user CIFs included)."""

    def __init__(self, config: RunConfig, out_path: Path, phases: Any) -> None:
        stem = out_path.with_suffix("")
        self.dir = stem.parent / f"{stem.name}_figures"
        self._formats = tuple(config.output.formats)
        self._phases = phases
        # the NMF ranges, as the decompositions record them (the heatmaps show the Q and r
        # windows the NMF was fitted on): the first round is drawn before they exist
        d = config.decompose
        self._nmf_ranges = {f"nmf_{dim}_x_ranges": np.asarray(ranges, dtype=float).ravel()
                            for dim, ranges in (("q", d.q_ranges), ("r", d.r_ranges)) if ranges}
        self.written: list[Path] = []
        self._drawn: set[str] = set()
        self._zones: tuple[np.ndarray, list[float]] | None = None

    def _draw(self, ds: xr.Dataset, names: list[str]) -> None:
        from xrdmap.maps import save_figures

        self.dir.mkdir(exist_ok=True)
        self.written += save_figures(self._drawn_from(ds), self.dir, formats=self._formats, what=names,
                                     phases=self._phases)
        self._drawn.update(names)  # a figure without data in ds is not drawn later either

    def _drawn_from(self, ds: xr.Dataset) -> xr.Dataset:
        """What a round draws from: ``ds`` with the NMF ranges of the configuration where it
        has none yet, and the zone boundaries of its phase fractions as stored ones
        (:func:`xrdmap.maps.zone_boundaries`, which prefers boundaries ``ds`` already
        stores): every round draws them, and the fractions do not change between rounds
        (found once)."""
        from xrdmap.maps import zone_boundaries

        missing = {k: v for k, v in self._nmf_ranges.items() if k not in ds.attrs}
        if missing:
            ds = ds.assign_attrs(missing)
        if "phase_fraction" not in ds:
            return ds
        fractions = ds["phase_fraction"].values
        if self._zones is None or not np.array_equal(self._zones[0], fractions, equal_nan=True):
            self._zones = (fractions.copy(), zone_boundaries(ds))
        return ds.assign_attrs(zone_boundaries=np.asarray(self._zones[1], dtype=float))

    def draw_early(self, ds: xr.Dataset) -> None:
        from xrdmap.maps import FIGURES

        self._draw(ds, [name for group in _EARLY_FIGURES for name in FIGURES[group]])

    def draw_components(self, dim: str, ds: xr.Dataset) -> None:
        """The figures of the decomposition in ``dim`` (its weights and components)."""
        self._draw(ds, [f"weights_{dim}", f"components_{dim}"])

    def draw_rest(self, ds: xr.Dataset) -> None:
        from xrdmap.maps import FIGURES

        order = [name for names in FIGURES.values() for name in names]  # as one round would draw them
        rest = [name for name in order if name not in self._drawn]
        if rest:
            self._draw(ds, rest)
        self.written.sort(key=lambda p: order.index(p.stem) if p.stem in order else len(order))

    def discard(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written = []


#: Figure groups (xrdmap.maps.FIGURES) that need nothing from the NMF.
_EARLY_FIGURES = ("iq", "gr", "fractions", "quality")


def _write_products(ds: xr.Dataset, config: RunConfig, out_path: Path, log: Log, figures: _Figures):
    report_figures = None
    report = None
    exports: list[Path] = []
    stem = out_path.with_suffix("")
    if config.output.figures:
        fig_dir = figures.dir
        figures.draw_rest(ds)
        # the report embeds these files instead of drawing every figure a second time
        report_figures = [p for p in figures.written if p.suffix.lower() in (".png", ".svg")] or None
        if "crystallinity" in ds:
            from xrdmap.results import atomic_output
            from xrdmap.series_plots import plot_series

            fig = plot_series(ds, title=f"{out_path.name}: series descriptors")
            for fmt in config.output.formats:
                target = fig_dir / f"series.{fmt}"
                with atomic_output(target) as tmp:
                    fig.savefig(tmp, dpi=120, format=fmt)
                figures.written.append(target)
            import matplotlib.pyplot as plt

            plt.close(fig)
        log(f"figures: {fig_dir} ({len(figures.written)} files)")
    if config.output.report:
        from xrdmap.report import write_report

        report = write_report(ds, stem.parent / f"{stem.name}_report.html", figures=report_figures)
        log(f"report: {report}")
    if config.output.export:
        from xrdmap.results import export_columns

        exp_dir = stem.parent / f"{stem.name}_columns"
        exp_dir.mkdir(exist_ok=True)
        for kind in config.output.export:
            exports += export_columns(ds, exp_dir, kind=kind)
        log(f"text exports: {exp_dir} ({len(exports)} files)")
    return list(figures.written), report, exports
