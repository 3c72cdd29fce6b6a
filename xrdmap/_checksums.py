"""SHA-256 of input files in a child process: ``python -m xrdmap._checksums < paths.json``.

Reads a JSON list of paths on stdin (a series of thousands of TIFF files would not fit on
a command line) and prints one JSON object ``{path: hex digest}`` on stdout. An input that cannot be read
gives its one-line error message on stderr and exit code 2. The process lowers its own
scheduling priority (nice 19, where the OS has it): the pipeline starts it with the run,
so the hashing uses CPU time the integration leaves idle and reads the files while the
workers do, instead of adding ~1 s per GB after the last frame.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    if hasattr(os, "nice"):
        try:
            os.nice(19)
        except OSError:
            pass
    from xrdmap.errors import XrdmapError
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
