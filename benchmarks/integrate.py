"""Throughput of xrdmap's batched integration against plain pyFAI loops.

Run on demand (not part of the tests)::

    .venv/bin/python benchmarks/integrate.py --frames 48

It integrates the same 2048 x 2048 float32 frames (npt 3000, Q in A^-1, solid angle,
polarization 0.99, mask, Poisson errors) with

1. a loop of pyFAI ``integrate1d(method=("bbox", "csr", "cython"))``,
2. a loop of pyFAI ``integrate1d_legacy`` (same method, no error model: its fastest form),
3. xrdmap's engine in this process (``integrate_scan(...).compute(scheduler="sync")``),
4. ``integrate_scan`` on a dask ``LocalCluster`` of 1 and of 2 worker processes reading the
   frames from an HDF5 file themselves (``xrdmap.open_scan``),

all single-threaded (OpenMP/BLAS threads = 1, one thread per worker). It prints frames/s,
the ratios measured within this run, the agreement with pyFAI, peak RSS and the machine.
Ratios are what to compare between machines; absolute numbers depend on the CPU and on
whatever else the machine is doing.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

SIZE = 2048
PIXEL = 200e-6  # m
POL = 0.99


def poni(size: int) -> dict:
    return {
        "dist": 0.35, "poni1": size * PIXEL / 2 + 1.3e-3, "poni2": size * PIXEL / 2 - 0.7e-3,
        "rot1": 0.002, "rot2": -0.001, "rot3": 0.0, "wavelength": 0.161669e-10,
        "detector": "Detector",
        "detector_config": {"pixel1": PIXEL, "pixel2": PIXEL, "max_shape": [size, size]},
    }


def make_frames(ai, n: int, size: int, seed: int = 0) -> np.ndarray:
    """Frames of a few rings on a smooth background with Poisson-like noise (float32)."""
    q = np.linspace(0, 30, 3001)
    pattern = 200 + 800 * np.exp(-q / 4)
    for c in (1.6, 2.7, 3.1, 4.4, 5.2, 6.3, 7.9, 9.4):
        pattern += 3000 * np.exp(-0.5 * ((q - c) / 0.03) ** 2) / c
    base = ai.calcfrom1d(q, pattern, shape=(size, size), dim1_unit="q_A^-1",
                         polarization_factor=POL).astype(np.float32)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((size, size), dtype=np.float32)
    frames = np.empty((n, size, size), np.float32)
    for k in range(n):
        shift = (k * 7919) % (size * size)
        frames[k] = base * (1 + 0.01 * k) + np.sqrt(base) * np.roll(noise.ravel(), shift).reshape(size, size)
    return frames


def make_mask(size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[:, size // 2 - 4: size // 2 + 4] = True  # a module gap
    mask[size // 2 - 30: size // 2 + 30, : size // 2] = True  # beamstop arm
    return mask


def _single_thread() -> None:
    """Run on each worker: one BLAS/OpenMP thread (the environment is inherited too)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _build_engine(spec) -> None:
    """Run on each worker: build (and cache) the engine the integration tasks will use."""
    from xrdmap.integrate import get_engine

    get_engine(spec)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux VmHWM (reset by exec, unlike getrusage's ru_maxrss, which a spawned dask worker
    inherits from the process that started it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pyfai_loop(ai, frames, mask, npt, legacy: bool):
    """A callable integrating every frame with pyFAI (its CSR matrix is built here, untimed)."""
    kw = dict(unit="q_A^-1", method=("bbox", "csr", "cython"), correctSolidAngle=True,
              polarization_factor=POL, mask=mask)
    if legacy:
        fn = ai.integrate1d_legacy
    else:
        fn = ai.integrate1d
        kw["error_model"] = "poisson"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(frames[0], npt, **kw)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [fn(f, npt, **kw) for f in frames]

    return run


def best_times(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall time of each callable over ``repeats`` interleaved rounds, and last outputs.

    Interleaving (A B C A B C ...) and keeping the best exposes every method to the same
    background load of a shared machine."""
    best = {name: float("inf") for name in runs}
    outputs = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--npt", type=int, default=3000)
    parser.add_argument("--chunk", type=int, default=16, help="frames per dask task")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; best time kept")
    parser.add_argument("--no-cluster", action="store_true", help="skip the dask worker runs")
    args = parser.parse_args()

    import logging

    import dask.array as da
    import pyFAI
    import xarray as xr
    from threadpoolctl import threadpool_limits

    from xrdmap.geometry import make_integrator
    from xrdmap.integrate import get_engine, integrate_scan, make_spec

    threadpool_limits(1)
    logging.getLogger("pyFAI").setLevel(logging.ERROR)  # integrate1d_legacy deprecation notes
    n, size, npt = args.frames, args.size, args.npt
    geo = poni(size)
    ai = make_integrator(geo)
    mask = make_mask(size)
    frames = make_frames(ai, n, size)
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores, load average "
          f"{os.getloadavg()[0]:.1f}; python {platform.python_version()}, pyFAI {pyFAI.version}")
    print(f"frames: {n} x {size} x {size} float32, npt {npt}, q in A^-1, polarization {POL}, mask, "
          f"Poisson errors; all single-threaded")

    spec = make_spec(geo, (size, size), mask=mask, npt=npt, polarization_factor=POL)
    t0 = time.perf_counter()
    engine = get_engine(spec)
    t_build = time.perf_counter() - t0
    scan = xr.DataArray(da.from_array(frames, chunks=(args.chunk, -1, -1)), dims=("point", "y", "x"))
    lazy = integrate_scan(scan, geo, mask=mask, npt=npt, polarization_factor=POL)
    runs = {
        "ng": pyfai_loop(ai, frames, mask, npt, legacy=False),
        "legacy": pyfai_loop(ai, frames, mask, npt, legacy=True),
        "engine": lambda: lazy.compute(scheduler="sync"),
    }
    best, outputs = best_times(runs, args.repeats)
    t_ng, t_legacy, t_engine = best["ng"], best["legacy"], best["engine"]
    ref, ours = outputs["ng"], outputs["engine"]
    rss = peak_rss_mb()

    iq_ref = np.array([r.intensity for r in ref])
    sg_ref = np.array([r.sigma for r in ref])
    sel = np.abs(iq_ref) > 0.01 * np.abs(iq_ref).max(axis=1, keepdims=True)
    rel_i = np.max(np.abs(ours["iq"].values - iq_ref)[sel] / np.abs(iq_ref[sel]))
    rel_s = np.max(np.abs(ours["iq_sigma"].values - sg_ref)[sel] / np.abs(sg_ref[sel]))

    print(f"\nengine build (pyFAI CSR + folding, once per process): {t_build:.2f} s, "
          f"nnz {engine.nnz / 1e6:.1f} M")
    print(f"best of {args.repeats} interleaved rounds")
    print(f"{'method':44s} {'frames/s':>9s} {'ms/frame':>9s}")
    rows = [("pyFAI integrate1d bbox/csr/cython (poisson)", t_ng),
            ("pyFAI integrate1d_legacy bbox/csr/cython", t_legacy),
            ("xrdmap integrate_scan, in-process (poisson)", t_engine)]
    for name, t in rows:
        print(f"{name:44s} {rate(n, t):9.1f} {1000 * t / n:9.1f}")
    print(f"\nratio engine / integrate1d        : {t_ng / t_engine:5.1f}x   (target >= 5)")
    print(f"ratio engine / integrate1d_legacy : {t_legacy / t_engine:5.1f}x   (target >= 2)")
    print(f"agreement with integrate1d where I > 1% of max: max rel diff I {rel_i:.1e}, sigma {rel_s:.1e}")
    print(f"peak RSS of this process {rss:.0f} MB (frames in memory: {frames.nbytes / 2**20:.0f} MB, "
          f"pyFAI integrator and xrdmap engine both built)")

    if args.no_cluster:
        return
    from distributed import Client, LocalCluster

    from xrdmap.io import open_scan

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        import h5py

        path = Path(tmp) / "frames.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("entry/data/data", data=frames, chunks=(1, size, size))
        del frames, ours, ref, outputs, runs
        ai.reset()
        times = {}
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=":0", memory_limit=None) as cluster, Client(cluster) as client:
                client.run(_single_thread)
                scan = open_scan(str(path), frames_path="entry/data/data", chunk_frames=args.chunk)
                lazy = integrate_scan(scan, geo, mask=mask, npt=npt, polarization_factor=POL)
                client.run(_build_engine, spec)  # each worker builds its engine once, untimed
                times[workers] = float("inf")
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    client.compute(lazy).result()
                    times[workers] = min(times[workers], time.perf_counter() - t0)
                rss = client.run(peak_rss_mb)
            print(f"dask LocalCluster {workers} worker process(es), frames read from HDF5: "
                  f"{rate(n, times[workers]):6.1f} frames/s, worker peak RSS "
                  f"{', '.join(f'{v:.0f}' for v in rss.values())} MB")
        print(f"ratio 2 workers / 1 worker        : {times[1] / times[2]:5.2f}x  (target >= 1.7; "
              f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
