"""Where the work runs: in-process, a local dask cluster, a running scheduler, or SLURM.

The same configuration runs in all four places; only :func:`dask_client` differs. Stage
functions never see dask clients: the pipeline builds one graph over scan points and
hands it to whatever client this returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from xrdmap.errors import ConfigError

__all__ = ["dask_client"]


@contextlib.contextmanager
def dask_client(
    *,
    workers: int = 2,
    threads_per_worker: int = 1,
    scheduler: str | None = None,
    cluster: str = "local",
    slurm: dict[str, Any] | None = None,
    jobs: int = 2,
    memory_limit: str | None = "auto",
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` (or ``None`` for in-process work) and clean up.

    Parameters
    ----------
    workers
        Processes of a local cluster; ``0`` runs everything in this process.
    scheduler
        Address of a running scheduler (``tcp://host:8786``); overrides ``workers``.
    cluster
        ``"local"`` or ``"slurm"`` (dask-jobqueue's ``SLURMCluster(**slurm)`` scaled to
        ``jobs`` jobs).

    When the work inside fails or is interrupted (Ctrl-C), logging is switched off while
    the client and cluster close: otherwise distributed and tornado log tracebacks and
    "Couldn't gather keys" messages from their event loop during the teardown, which are
    harmless but bury the one-line error the CLI prints. Logging is restored afterwards,
    so a notebook session carries on as before. An error of the teardown itself does not
    replace the error of the work.
    """
    previous: int | None = None
    failed: BaseException | None = None
    try:
        with _open_client(
            workers=workers, threads_per_worker=threads_per_worker, scheduler=scheduler,
            cluster=cluster, slurm=slurm, jobs=jobs, memory_limit=memory_limit,
        ) as client:
            try:
                yield client
            except BaseException as exc:
                failed = exc
                previous = logging.root.manager.disable
                logging.disable(logging.CRITICAL)
                raise
    except Exception as exc:
        # A teardown after a failure can fail too (distributed: a nanny still restarting
        # a worker that died raises AssertionError while its cluster closes): the error
        # of the work is the one to report.
        if failed is not None and exc is not failed:
            raise failed from None
        raise
    finally:
        if previous is not None:
            logging.disable(previous)


@contextlib.contextmanager
def _open_client(
    *, workers: int, threads_per_worker: int, scheduler: str | None, cluster: str,
    slurm: dict[str, Any] | None, jobs: int, memory_limit: str | None,
) -> Iterator[Any]:
    """The client of :func:`dask_client`, without the quiet teardown."""
    if scheduler:
        from distributed import Client

        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise ConfigError(f"compute.scheduler {scheduler!r}: cannot connect ({exc})") from None
        try:
            yield client
        finally:
            client.close()
        return
    if cluster == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ConfigError(
                "compute.cluster 'slurm' needs dask-jobqueue: pip install 'xrdmap[cluster]'"
            ) from None
        from distributed import Client

        with SLURMCluster(**(slurm or {})) as slurm_cluster:
            slurm_cluster.scale(jobs=jobs)
            with _closing(Client(slurm_cluster)) as client:
                yield client
        return
    if cluster != "local":
        raise ConfigError(f"compute.cluster {cluster!r}: expected 'local' or 'slurm'")
    if workers == 0:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    # distributed sets MALLOC_TRIM_THRESHOLD_ (64 kB) in its worker processes by default.
    # That switches off glibc's adaptive mmap threshold, so every array above 128 kB
    # (each decoded frame and its float copies) is mapped and unmapped again, page
    # faults included: integration took ~15 % more CPU per frame. With glibc's defaults
    # the freed frame buffers are reused; the engine keeps the workers' memory flat.
    # The nanny also writes the variables into this process's environment (which every
    # later worker inherits): a cluster started earlier here, by xrdmap or not, leaves
    # them behind, so they are lifted from it while this cluster lives.
    defaults = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    environ = {k: v for k, v in defaults.items() if not k.startswith("MALLOC_")}
    lifted = {k: os.environ.pop(k) for k, v in defaults.items()
              if k.startswith("MALLOC_") and v is not None and os.environ.get(k) == str(v)}
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=":0",
        ) as local, _closing(Client(local)) as client:
            yield client
    finally:
        os.environ.update(lifted)


@contextlib.contextmanager
def _closing(client: Any) -> Iterator[Any]:
    """``client``, closed on exit (before its cluster: it gives back every result it holds).

    Not ``with Client(...)``: that also makes it the context's current client, which only
    the thread that entered it can undo, and the pipeline closes the cluster in a thread
    of its own (distributed then raised in ``Client.__exit__`` and left the client open).
    """
    try:
        yield client
    finally:
        client.close()
