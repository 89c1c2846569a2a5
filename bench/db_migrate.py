#!/usr/bin/env python3
"""What the schema check and the alembic upgrades cost at server start, on SQLite and PostgreSQL.

Each one JSON line, medians over ``--repeat`` runs with min and max:

- ``open_ms``: make_engine on an up-to-date database (the baseline, same run: every server
  start pays it), and whether alembic was imported (it must not be);
- ``upgrade_ms``: make_engine on a database at schema 1 and at SCHEMA_VERSION - 1 (made by
  replaying the revisions), alembic's import included in the first run only (as a server
  start pays it once).

Usage: bench/db_migrate.py [--repeat 5] [--tmp DIR] [--pg postgresql://postgres@127.0.0.1/test]
       [--open-only]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from pilotfish.server.db import SCHEMA_VERSION, make_engine  # noqa: E402


def _timed(url: str) -> float:
    t = time.perf_counter()
    make_engine(url).dispose()
    return (time.perf_counter() - t) * 1e3


def _pg_db(admin: str):
    import psycopg
    name = f"pilotfish_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)

    def drop():
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return f"{base}/{name}", drop


def measure_open(dialect: str, new_db, repeat: int) -> float:
    url, drop = new_db()
    try:
        make_engine(url).dispose()
        opens = [_timed(url) for _ in range(repeat)]
    finally:
        drop()
    C.emit("open_ms", statistics.median(opens), dialect=dialect, min=min(opens),
           max=max(opens), alembic_imported="alembic" in sys.modules)
    return statistics.median(opens)


def measure_upgrades(dialect: str, new_db, repeat: int, baseline: float) -> None:
    from pilotfish.server import migrations
    for version in (1, SCHEMA_VERSION - 1):
        runs = []
        for _ in range(repeat):
            url, drop = new_db()
            try:
                migrations.run(url, 0, version)
                runs.append(_timed(url))
            finally:
                drop()
        C.emit("upgrade_ms", statistics.median(runs), dialect=dialect, from_version=version,
               to_version=SCHEMA_VERSION, min=min(runs), max=max(runs),
               baseline_open_ms=baseline)


def main() -> int:
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--pg", default=os.environ.get("PILOTFISH_TEST_PG",
                                                  "postgresql://postgres@127.0.0.1:5432/test"),
                   help="PostgreSQL admin URL to make scratch databases with ('' to skip).")
    p.add_argument("--open-only", action="store_true",
                   help="Only open_ms (runs on a pilotfish without alembic too: a before/after "
                        "pair with PYTHONPATH=<older install>).")
    a = p.parse_args()
    C.set_bench("db_migrate")
    tmp = Path(tempfile.mkdtemp(prefix="pf-dbmig-", dir=a.tmp))

    def sqlite_db():
        path = tmp / f"{uuid.uuid4().hex[:8]}.db"
        return f"sqlite:///{path}", lambda: [f.unlink() for f in tmp.glob(f"{path.name}*")]
    dbs = [("sqlite", sqlite_db)] + ([("postgresql", lambda: _pg_db(a.pg))] if a.pg else [])
    try:
        # every open first: alembic is not imported yet, as at a server start
        baselines = [measure_open(dialect, new_db, a.repeat) for dialect, new_db in dbs]
        for (dialect, new_db), baseline in zip(dbs, [] if a.open_only else baselines):
            measure_upgrades(dialect, new_db, a.repeat, baseline)
    finally:
        if not a.keep:
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return 0


if __name__ == "__main__":
    C.run(main)
