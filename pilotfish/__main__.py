"""``python -m pilotfish``: the same as the ``pilotfish`` command."""
import sys

from pilotfish.cli import main

sys.exit(main())
