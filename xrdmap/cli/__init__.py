"""Command-line interface: ``xrdmap COMMAND --help`` for each command.

The CLI only parses arguments and calls library functions. Each command lives in a
module of this package and registers itself on :data:`app`.
"""

from __future__ import annotations

# Importing the command modules registers their commands on ``app``.
from xrdmap.cli import (  # noqa: F401,E402
    calibrate_cmd,
    decompose_cmd,
    integrate_cmd,
    pdf_cmd,
    phases_cmd,
    plot_cmd,
    run_cmd,
    series_cmd,
    simulate_cmd,
)
from xrdmap.cli._app import app, main

__all__ = ["app", "main"]
