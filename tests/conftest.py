"""Shared test set-up."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _table_cache(tmp_path_factory):
    """Reference tables are cached in a folder of this session, never in the user's
    ``~/.cache`` (subprocesses started by the tests inherit it)."""
    old = os.environ.get("XRDMAP_CACHE_DIR")
    os.environ["XRDMAP_CACHE_DIR"] = str(tmp_path_factory.mktemp("xrdmap-cache"))
    yield
    if old is None:
        os.environ.pop("XRDMAP_CACHE_DIR", None)
    else:
        os.environ["XRDMAP_CACHE_DIR"] = old
