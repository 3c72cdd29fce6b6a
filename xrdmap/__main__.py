"""``python -m xrdmap``: the same as the ``xrdmap`` command."""

from xrdmap.cli import main

main()
