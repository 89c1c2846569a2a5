"""``python -m pilotfish.pilot``: run one node agent (``pilotfish pilot agent``)."""
import sys

from pilotfish.cli import main

sys.exit(main(["pilot", "agent", *sys.argv[1:]]))
