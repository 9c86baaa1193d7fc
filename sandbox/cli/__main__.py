"""``python -m sandbox.cli``: the ``sandbox`` command."""

from . import main

main()
