"""Schema migrations: alembic revisions shipped in the package, run in code (no alembic.ini).

One revision per schema version, ``versions/vNN.py`` with revision id ``"vNN"``; v01 makes the
first schema from nothing. ``pilotfish_meta``'s ``schema_version`` row stays the version of
record (server/db.py reads it with one query at start and imports this module, and alembic,
only when it is behind). For a run, alembic's own ``alembic_version`` table is stamped from
that row, every step writes the row in the same transaction (:func:`on_step`), and the table
is dropped at the end: one version record, and databases made before alembic need nothing.

SQLite runs the whole upgrade in one transaction too (pysqlite's own transaction handling
leaves DDL outside; :func:`_engine` takes it over), so a failed step changes nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import create_engine, event, text

HERE = Path(__file__).resolve().parent


def rev(version: int) -> str:
    """The alembic revision id of a schema version (0: before the first, alembic's base)."""
    return f"v{version:02d}" if version else "base"


def version_of(revision: str | None) -> int:
    return int(revision[1:]) if revision else 0


def script():
    """The revisions, read from this package's versions/ directory (a wheel's too)."""
    from alembic.script import ScriptDirectory
    return ScriptDirectory(str(HERE))


def head() -> int:
    return version_of(script().get_current_head())


def pending(version: int) -> list[dict]:
    """The revisions a database at ``version`` lacks, oldest first: version and summary."""
    revs = script().iterate_revisions("heads", rev(version))
    return [{"version": version_of(r.revision), "summary": _summary(r.module.__doc__ or "")}
            for r in reversed(list(revs))]


def _summary(doc: str) -> str:
    """A revision's docstring's first paragraph on one line."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def on_step(ctx, step, heads, run_args) -> None:
    """After each revision (alembic's on_version_apply): record the version reached."""
    version = version_of(next(iter(heads), None))
    if version == 0:
        return  # below v01 there is no pilotfish_meta
    conn = ctx.connection
    conn.execute(text("DELETE FROM pilotfish_meta WHERE key = 'schema_version'"))
    conn.execute(text("INSERT INTO pilotfish_meta (key, value) VALUES ('schema_version', :v)"),
                 {"v": str(version)})


def _engine(url):
    """A short-lived engine for one migration run; on SQLite it emits BEGIN itself so DDL is
    inside the transaction (SQLAlchemy's documented pysqlite recipe)."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # no implicit BEGIN/COMMIT by pysqlite
            dbapi_conn.execute("PRAGMA busy_timeout=10000")

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


def run(url, version: int, target: int | None = None) -> int:
    """Bring the database at ``url`` (now at ``version``, 0 for empty) to ``target`` (default:
    the newest), up or down, in one transaction; return the version reached."""
    # the server log keeps alembic's "Running upgrade vNN -> vMM" lines, not its plugin setup
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    engine = _engine(url)
    goal = head() if target is None else target
    try:
        with engine.begin() as conn:
            if version:
                # another process may have upgraded it since the caller looked: read the
                # version again under a lock (SQLite: BEGIN IMMEDIATE holds the write lock)
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql("LOCK TABLE pilotfish_meta IN ACCESS EXCLUSIVE MODE")
                from pilotfish.server.db import check_version, schema_version
                version = schema_version(conn)
                check_version(version)
            if version == goal:
                return goal
            cfg.attributes["connection"] = conn
            command.stamp(cfg, rev(version), purge=True)
            if goal < version:
                command.downgrade(cfg, rev(goal))
            else:
                command.upgrade(cfg, rev(goal))
            conn.execute(text("DROP TABLE alembic_version"))
    finally:
        engine.dispose()
    return goal
