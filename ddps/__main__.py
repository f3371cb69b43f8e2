"""``python -m ddps``: the ``ddps`` command."""

from ddps.cli import main

main()
