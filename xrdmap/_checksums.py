"""SHA-256 of input files in a child process (:class:`InputChecksums`).

The child, ``python -m xrdmap._checksums < paths.json``, reads a JSON list of paths on
stdin (a series of thousands of TIFF files would not fit on a command line) and prints
one JSON object ``{path: hex digest}`` on stdout; an input that cannot be read gives its
one-line error message on stderr and exit code 2. It lowers its own scheduling priority
(nice 19, where the OS has it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from xrdmap.errors import ComputeError, InputError, XrdmapError


class InputChecksums:
    """sha256 of the input files, computed from construction on by a child process at
    the lowest scheduling priority (:func:`main`).

    Started with a run or an integration, the hashing (~1 s per GB) takes CPU time the
    integration leaves idle and reads the scan while the workers read it, instead of
    running after the last frame. :meth:`result` waits for it; :meth:`close` (or leaving
    a ``with`` block) stops it early.
    """

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths
        self._proc: Any = None
        if paths and sys.executable:
            # the child imports this xrdmap even when it was put on sys.path by hand
            package_root = str(Path(__file__).resolve().parent.parent)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "xrdmap._checksums"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True, env=env,
            )
            # the list on stdin: any length (a command line holds a few thousand paths)
            stdin, self._proc.stdin = self._proc.stdin, None  # communicate() has nothing more to send
            with stdin:
                stdin.write(json.dumps(paths))

    def result(self) -> dict[str, str]:
        if self._proc is None:  # no interpreter to start (embedded Python): hash here
            from xrdmap.io import file_checksum

            return {p: file_checksum(p) for p in self._paths}
        out, err = self._proc.communicate()
        if self._proc.returncode == 2:
            raise InputError(err.strip())
        if self._proc.returncode:
            raise ComputeError(f"checksums of the inputs {self._paths} failed (exit code "
                               f"{self._proc.returncode}): {err.strip()[-500:]}")
        return json.loads(out)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()

    def __enter__(self) -> InputChecksums:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    if hasattr(os, "nice"):
        try:
            os.nice(19)
        except OSError:
            pass
    from xrdmap.io import file_checksum

    paths = json.loads(sys.stdin.read()) if argv is None else argv
    try:
        sums = {p: file_checksum(p) for p in paths}
    except XrdmapError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(json.dumps(sums))
    return 0


if __name__ == "__main__":
    sys.exit(main())
