"""On-disk cache of the reference phases' reflection and pair tables.

Building the tables of the shipped library takes ~1.5 CPU-s (structure factors of every
reflection to Q ~ 25 A^-1, all pairs to ~30 A) and gives the same arrays for every run
with the same phases and grids, so they are kept between runs, like matplotlib's font
cache. A table is stored under a digest of everything it is computed from (the cell,
every atom, the Laue group, the limit and :data:`FORMAT`): a changed CIF gets new
tables, never stale ones. Unreadable or inconsistent files are ignored and rebuilt;
a cache that cannot be written is skipped. Nothing here is needed for correctness.

Location: ``$XRDMAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/xrdmap``, else
``~/.cache/xrdmap``; ``XRDMAP_CACHE_DIR=off`` disables it. At most :data:`MAX_BYTES` are
kept; the least recently used tables go first.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

#: Bumped whenever the way a table is computed changes (old files are then never read).
FORMAT = "xrdmap-tables/1"
#: Size limit of the cache folder (bytes).
MAX_BYTES = 512 * 1024**2
_DISABLED = ("", "0", "off", "none", "false", "no")

_log = logging.getLogger("xrdmap")


def cache_dir() -> Path | None:
    """The folder of the table cache, or None when disabled (``XRDMAP_CACHE_DIR=off``)."""
    env = os.environ.get("XRDMAP_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in _DISABLED else Path(env).expanduser() / "tables"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "xrdmap" / "tables"


def digest(kind: str, limit: float, parts: Mapping[str, np.ndarray | str]) -> str:
    """Key of a table: its kind, its limit and the (sorted) named inputs it depends on."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{FORMAT}|{kind}|{float(limit)!r}".encode())
    for name in sorted(parts):
        value = parts[name]
        if isinstance(value, str):
            h.update(f"|{name}=s:{value}".encode())
        else:
            a = np.ascontiguousarray(value)
            h.update(f"|{name}={a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return f"{kind}-{h.hexdigest()}"


def load(key: str, fields: Mapping[str, tuple[str, int]], rows: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
    """The arrays stored under ``key``, or None.

    ``fields``: name -> (dtype kind, ndim) each array must have; the arrays named in
    ``rows`` must share their first dimension. A file that fails these checks is deleted.
    """
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in fields}
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or unreadable: rebuild
        _log.debug("table cache: ignoring %s (%s)", path, exc)
        _discard(path)
        return None
    lengths = {arrays[name].shape[0] if arrays[name].ndim else -1 for name in rows}
    if len(lengths) > 1 or any(
        a.dtype.kind != kind or a.ndim != ndim for a, (kind, ndim) in zip(arrays.values(), fields.values())
    ):
        _log.debug("table cache: ignoring %s (unexpected arrays)", path)
        _discard(path)
        return None
    try:
        os.utime(path)  # recently used: pruned last
    except OSError:
        pass
    return arrays


def store(key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Keep ``arrays`` under ``key`` (atomically: readers see the old file or the new one)."""
    folder = cache_dir()
    if folder is None:
        return
    from xrdmap.results import atomic_output

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(folder / f"{key}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        _prune(folder)
    except OSError as exc:  # OutputError included: atomic_output removed the partial file
        _log.debug("table cache: not written to %s (%s)", folder, exc)


def _prune(folder: Path, max_bytes: int | None = None) -> None:
    """Delete the least recently used tables until the folder holds at most ``max_bytes``."""
    limit = MAX_BYTES if max_bytes is None else max_bytes
    files = []
    for p in folder.glob("*.npz"):
        try:
            st = p.stat()
        except OSError:
            continue
        files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files, key=lambda f: f[0]):
        if total <= limit:
            break
        _discard(p)
        total -= size


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
