"""CLI commands (module reserved; commands are registered on xrdmap.cli._app.app)."""

from __future__ import annotations

from xrdmap.cli._app import app  # noqa: F401
