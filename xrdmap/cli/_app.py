"""The typer application, error handling and shared option helpers."""

from __future__ import annotations

import signal
import sys

import typer
from rich.console import Console
from rich.markup import escape

from xrdmap import __version__
from xrdmap.errors import XrdmapError

err_console = Console(stderr=True)

app = typer.Typer(
    name="xrdmap",
    help=(
        "From synchrotron total-scattering detector frames to phase maps.\n\n"
        "Typical line scan: `xrdmap calibrate` a CeO2 image -> `xrdmap integrate` the scan "
        "-> `xrdmap pdf` -> `xrdmap decompose` -> `xrdmap plot`; or all at once with "
        "`xrdmap run CONFIG.yaml`. Try `xrdmap demo` first."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"xrdmap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """From synchrotron total-scattering detector frames to phase maps."""


def parse_range(text: str | None, name: str) -> tuple[float, float] | None:
    """Parse ``"a,b"`` into a float pair, naming the option when it is malformed."""
    from xrdmap.errors import InputError

    if text is None:
        return None
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise InputError(f"{name} {text!r}: expected two numbers 'a,b' with a < b") from None
    if not lo < hi:
        raise InputError(f"{name} {text!r}: expected a < b")
    return lo, hi


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (what a batch system sends at its time limit)."""


#: The interrupting signal received, if any. Python swallows an exception raised by a
#: signal handler while it runs a weakref callback or ``__del__`` ("Exception ignored
#: in ..."), so the work would carry on as if nothing happened; long commands call
#: :func:`raise_if_interrupted` between steps to honour such a signal anyway.
_received: list[int] = []


def _on_signal(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _received.append(signum)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _unraisable(report) -> None:
    """``sys.unraisablehook`` of the CLI: an interrupt our handler raised where Python
    cannot propagate it (weakref callback, ``__del__``) is honoured by
    :func:`raise_if_interrupted`, not printed as a traceback; anything else is reported
    as Python would."""
    if isinstance(report.exc_value, (KeyboardInterrupt, Terminated)) and _received:
        return
    sys.__unraisablehook__(report)


def raise_if_interrupted() -> None:
    """Raise again for a SIGINT/SIGTERM whose first exception was swallowed."""
    if _received:
        raise Terminated if _received[-1] == signal.SIGTERM else KeyboardInterrupt


def main() -> None:
    """Entry point: run the app, turning xrdmap errors into one-line messages.

    Exit codes are those of :mod:`xrdmap.errors`; typer itself exits 2 on usage errors
    and 130 on Ctrl-C. SIGTERM (SLURM's time limit, ``kill``) unwinds like Ctrl-C --
    temporary output removed, checkpoints kept -- and exits 143 with a message.
    """
    _received.clear()
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable
    try:
        app()
    except XrdmapError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Terminated:
        err_console.print(
            "[bold red]error:[/] terminated (SIGTERM); finished work is kept: run the same command "
            "again to resume",
            highlight=False, soft_wrap=True,
        )
        sys.exit(143)
    finally:
        sys.unraisablehook = previous_hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)
