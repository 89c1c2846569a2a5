"""``python -m pilotfish``: the same as the ``pilotfish`` command."""
from pilotfish.cli import run

run()
