# The schema revisions, one file per schema version (vNN.py, revision "vNN"); alembic loads
# them by path. Packaged so they ship in the wheel.
