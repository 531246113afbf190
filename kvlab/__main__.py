"""``python -m kvlab COMMAND ...``: the ``kvlab`` command (kvlab.cli)."""

from kvlab.cli import main

main()
