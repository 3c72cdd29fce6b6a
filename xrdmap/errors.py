"""Exceptions with the CLI exit code each one maps to.

Every error names the input that is wrong and what was expected. The CLI turns an
``XrdmapError`` into a one-line message on stderr and exits with ``exit_code``:

====  ===========================================================
code  meaning
====  ===========================================================
0     success
1     unexpected internal error (a bug: please report it)
2     bad input: a file, dataset, array shape or value is not what was expected
3     bad configuration: unknown key, wrong type, out-of-range value
4     output cannot be written (permissions, disk full)
5     computation failed (for example dask workers lost beyond retries)
130   interrupted (SIGINT); finished work is kept for the next run
143   terminated (SIGTERM, e.g. a batch system's time limit); finished work is kept
====  ===========================================================
"""

from __future__ import annotations


class XrdmapError(Exception):
    """Base class of every error xrdmap reports to a user."""

    exit_code = 1


class InputError(XrdmapError, ValueError):
    """An input file, dataset, array or value is not what was expected."""

    exit_code = 2


class ConfigError(XrdmapError, ValueError):
    """The configuration is invalid (unknown key, wrong type, out-of-range value)."""

    exit_code = 3


class OutputError(XrdmapError, OSError):
    """An output could not be written."""

    exit_code = 4


class ComputeError(XrdmapError, RuntimeError):
    """A computation failed in a way retries could not repair."""

    exit_code = 5
