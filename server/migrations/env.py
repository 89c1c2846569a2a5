"""Alembic's env script, run by ``alembic.command`` for pilotfish's schema revisions.

There is no alembic.ini: :mod:`pilotfish.server.migrations` builds the Config in code and
hands the open connection over in ``config.attributes``, so every step runs on the caller's
connection and in its transaction (see ``run`` there). Offline (SQL script) mode is not used.
"""
from alembic import context

from pilotfish.server.migrations import on_step

config = context.config
context.configure(connection=config.attributes["connection"],
                  # each step writes pilotfish_meta.schema_version, in the same transaction
                  on_version_apply=on_step,
                  # SQLite changes other than ADD COLUMN recreate the table (batch mode)
                  render_as_batch=True,
                  # SQLite's DDL is inside our transaction too (see _engine in __init__.py)
                  transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
