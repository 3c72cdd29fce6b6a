"""Cost of checking bitshuffle chunks before hdf5plugin decodes them.

Run on demand (not part of the tests)::

    .venv/bin/python benchmarks/read.py --frames 16

It writes 2048 x 2048 frames (rings on a background with Poisson noise, float32 and uint32)
as Bitshuffle-LZ4 stacks with one frame per HDF5 chunk, then times per frame, interleaved:

1. ``decode``: h5py + hdf5plugin reading one frame of the open dataset (no check),
2. ``check``: xrdmap's block-structure check of that frame's chunk alone
   (``read_direct_chunk`` + walking the block sizes),
3. ``xrdmap read``: what a dask task does per frame (open the file, check, decode).

It prints the median of each and the ratio of 3 to 1. Absolute numbers depend on the CPU
and on whatever else the machine is doing; compare ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from xrdmap import io

SIZE = 2048


def make_frames(n: int, size: int, dtype: str, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2 + 13, xx - size / 2 - 7)
    base = 300 + 900 * np.exp(-r / size)
    for c in (180, 310, 365, 520, 610, 740, 930):
        base += 2500 * np.exp(-0.5 * ((r - c) / 2.5) ** 2) * 180 / c
    rng = np.random.default_rng(seed)
    return np.stack([rng.poisson(base * (1 + 0.01 * k)) for k in range(n)]).astype(dtype)


def write(path: Path, frames: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "entry/data/data",
            data=frames,
            chunks=(1, *frames.shape[1:]),
            **hdf5plugin.Bitshuffle(cname="lz4"),
        )


def measure(path: Path, n: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"decode": [], "check": [], "xrdmap read": []}
    everything = (slice(None), slice(None))
    with h5py.File(path, "r", locking=False) as f:  # as xrdmap opens it
        ds = f["entry/data/data"]
        shape = ds.shape
        for _ in range(repeats):
            for i in range(n):
                t0 = time.perf_counter()
                ds[i]
                t1 = time.perf_counter()
                io._check_compressed_chunks(ds, (np.array([i]), *everything), "benchmark")
                t2 = time.perf_counter()
                io._read_hdf5_frames(str(path), ds.name, shape, np.array([i]), everything)
                t3 = time.perf_counter()
                times["decode"].append(t1 - t0)
                times["check"].append(t2 - t1)
                times["xrdmap read"].append(t3 - t2)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=16, help="frames per stack")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the stack")
    args = parser.parse_args()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{os.cpu_count()} CPUs, load average {load}; h5py {h5py.__version__}, "
        f"hdf5plugin {hdf5plugin.version}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "uint32"):
            path = Path(tmp) / f"{dtype}.h5"
            frames = make_frames(args.frames, SIZE, dtype)
            write(path, frames)
            ratio = path.stat().st_size / frames.nbytes
            del frames
            t = measure(path, args.frames, args.repeats)
            print(
                f"{SIZE} x {SIZE} {dtype}, Bitshuffle-LZ4 (stored {ratio:.0%} of raw), "
                f"median per frame: "
                + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items())
                + f"; xrdmap read / decode = {t['xrdmap read'] / t['decode']:.2f}"
            )


if __name__ == "__main__":
    main()
