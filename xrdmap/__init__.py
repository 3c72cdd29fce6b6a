"""xrdmap: from synchrotron total-scattering detector frames to phase maps.

The public API is a set of stage functions over labelled arrays (xarray); each can be
used on its own in a notebook:

>>> import xrdmap
>>> scan = xrdmap.open_scan("scan.h5")                 # lazy (point, y, x) frames
>>> ds = xrdmap.integrate_scan(scan, "geometry.poni")  # iq, iq_sigma (point, q)
>>> xrdmap.save_result(ds, "result.h5")
>>> ds = xrdmap.open_result("result.h5")
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrdmap")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Public names, imported on first use so that `import xrdmap` stays fast for the CLI.
_LAZY = {
    "open_scan": "xrdmap.io",
    "integrate_scan": "xrdmap.integrate",
    "save_result": "xrdmap.results",
    "open_result": "xrdmap.results",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xrdmap' has no attribute {name!r}")
