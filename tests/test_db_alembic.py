"""Schema migrations with alembic: every earlier schema version upgrades to the newest, on
SQLite and on PostgreSQL, and comes out the same as a database made new (tables, columns,
indexes); downgrading gives back exactly the older schema; data is kept."""
from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from conftest import require
from externals import PG_ADMIN_URL, pg_available
from pilotfish.errors import PilotfishError
from pilotfish.server import migrations
from pilotfish.server.db import SCHEMA_VERSION, make_engine

DIALECTS = ["sqlite", "postgresql"]


def _new_pg_db() -> str:
    import psycopg
    name = f"pilotfish_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def _drop_pg_db(url: str) -> None:
    import psycopg
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg_db():
    """One PostgreSQL database for the module; each test gets a schema of its own in it
    (CREATE SCHEMA is far cheaper than CREATE DATABASE, which copies a template)."""
    require(pg_available(), f"PostgreSQL at {PG_ADMIN_URL}")
    url = _new_pg_db()
    yield url
    _drop_pg_db(url)


def _pg_schema(db_url: str) -> tuple[str, str]:
    """A new empty schema in ``db_url`` and a URL whose connections use it (search_path)."""
    name = f"s_{uuid.uuid4().hex[:10]}"
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}"'))
    engine.dispose()
    return name, f"{db_url}?options=-csearch_path%3D{name}"


def _drop_pg_schema(db_url: str, name: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
    engine.dispose()


@pytest.fixture(params=DIALECTS)
def empty_url(request, tmp_path):
    """An empty database of each dialect (on PostgreSQL: an empty schema of its own)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pf.db'}"
        return
    db_url = request.getfixturevalue("pg_db")
    name, url = _pg_schema(db_url)
    yield url
    _drop_pg_schema(db_url, name)


def snapshot(url: str) -> dict:
    """Tables -> columns (type, nullable, default), primary key, unique constraints and indexes
    (with a partial index's condition), and on PostgreSQL the tables' storage settings, as
    reflected: what two schemas must agree on. (The get_multi_* calls: one catalog query per
    kind for all tables on PostgreSQL.)"""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            columns, indexes = insp.get_multi_columns(), insp.get_multi_indexes()
            pks, uniques = insp.get_multi_pk_constraint(), insp.get_multi_unique_constraints()
            out = {}
            for key in sorted(columns, key=lambda k: k[1]):
                out[key[1]] = {
                    "columns": {c["name"]: (str(c["type"]), c["nullable"], c.get("default"))
                                for c in columns[key]},
                    "pk": pks[key]["constrained_columns"],
                    "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]),
                                       str(i.get("dialect_options", {}).get("postgresql_where")))
                                      for i in indexes[key]),
                    "uniques": sorted(tuple(u["column_names"]) for u in uniques[key])}
            if engine.dialect.name == "postgresql":  # storage settings (fillfactor)
                out["reloptions"] = sorted((r[0], tuple(r[1])) for r in conn.execute(text(
                    "SELECT relname, reloptions FROM pg_class WHERE reloptions IS NOT NULL "
                    "AND relnamespace = current_schema()::regnamespace")))
            if engine.dialect.name == "sqlite":  # SQLite's index conditions, as written
                out["sqlite indexes"] = sorted(tuple(r) for r in conn.execute(text(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index'")))
    finally:
        engine.dispose()
    return out


@pytest.fixture(scope="module")
def heads(tmp_path_factory, request):
    """A database made new at the newest schema (by make_engine), per dialect: its snapshot."""
    made = {}

    def get(dialect):
        if dialect not in made:
            if dialect == "sqlite":
                url = f"sqlite:///{tmp_path_factory.mktemp('head') / 'head.db'}"
            else:
                url = _pg_schema(request.getfixturevalue("pg_db"))[1]
            make_engine(url).dispose()
            made[dialect] = snapshot(url)
        return made[dialect]
    return get


def version_row(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT value FROM pilotfish_meta "
                                     "WHERE key = 'schema_version'")).scalar_one()
    finally:
        engine.dispose()


def add_old_rows(url: str) -> None:
    """A job and an agent with schema 1's columns only (every later one is nullable)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, name, description, app_id, num_nodes, processes_per_node, "
            "cpus_per_process, gpus_per_process, parameters, tags, priority, max_retries, "
            "retries, attempts, state, state_time, created, workdir) VALUES (7, 'old', '', 1, "
            "1, 1, 1, 0, '{}', ',a,', 0, 3, 0, 1, 'JOB_FINISHED', 1.5, 1.0, 'w/7')"))
        conn.execute(text(
            "INSERT INTO agents (id, host, pid, cores, gpus, memory, started, last_seen, "
            "state, tasks_done) VALUES ('a1', 'h', 1, 2, 0, 1, 0, 0, 'EXITED', 5)"))
    engine.dispose()


def old_rows(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = [tuple(conn.execute(text("SELECT id, name, tags, state, workdir FROM jobs")).one()),
                tuple(conn.execute(text("SELECT id, tasks_done FROM agents")).one())]
    engine.dispose()
    return rows


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION + 1))
def test_every_version_upgrades_to_the_newest_and_back(empty_url, heads, version):
    """A database as schema ``version`` made it (revisions v01..vNN replayed from nothing,
    with no alembic table left, as pilotfish before alembic left one) opens at the newest
    schema, the same as one made new, its rows kept; downgrading it gives back exactly the
    schema it had."""
    assert migrations.run(empty_url, 0, version) == version
    old = snapshot(empty_url)
    assert "alembic_version" not in old and version_row(empty_url) == str(version)
    dialect = "sqlite" if empty_url.startswith("sqlite") else "postgresql"
    assert {"jobs", "agents", "pilotfish_meta"} <= set(old) and len(heads(dialect)) >= 13
    add_old_rows(empty_url)
    make_engine(empty_url).dispose()
    assert snapshot(empty_url) == heads(dialect)
    assert version_row(empty_url) == str(SCHEMA_VERSION)
    rows = [(7, "old", ",a,", "JOB_FINISHED", "w/7"), ("a1", 5)]
    assert old_rows(empty_url) == rows
    make_engine(empty_url).dispose()  # opening it again changes nothing
    assert version_row(empty_url) == str(SCHEMA_VERSION)
    migrations.run(empty_url, SCHEMA_VERSION, version)  # and back down
    assert snapshot(empty_url) == old and version_row(empty_url) == str(version)
    assert old_rows(empty_url) == rows


def test_a_newer_or_unknown_schema_is_refused_and_left_alone(empty_url):
    make_engine(empty_url).dispose()
    engine = create_engine(empty_url)
    for bad in (str(SCHEMA_VERSION + 1), "0", "-3", "twelve", "9" * 5000):
        with engine.begin() as conn:
            conn.execute(text("UPDATE pilotfish_meta SET value = :v "
                              "WHERE key = 'schema_version'"), {"v": bad})
        shown = bad if len(bad) <= 24 else bad[:24] + "..."
        with pytest.raises(PilotfishError, match=re.escape(
                f"schema version {shown} is not {SCHEMA_VERSION}; this pilotfish cannot use it")):
            make_engine(empty_url)
        assert version_row(empty_url) == bad
    engine.dispose()


def test_a_failing_step_changes_nothing(empty_url):
    """The whole upgrade is one transaction, SQLite included: a step that fails (here v10,
    whose workflows table is in the way) leaves the database at its version, steps before it
    undone too."""
    migrations.run(empty_url, 0, 7)
    engine = create_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE workflows (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    before = snapshot(empty_url)
    with pytest.raises(PilotfishError, match=f"from schema version 7 to {SCHEMA_VERSION} "
                       r"\(nothing was changed\): .*workflows.* already exists"):
        make_engine(empty_url)
    assert snapshot(empty_url) == before and version_row(empty_url) == "7"


def test_an_upgrade_another_process_made_first_is_not_made_again(empty_url):
    """Two servers on one database, both seeing version 5: the second reads the version again
    under the lock and finds nothing to do (instead of failing on columns already there)."""
    migrations.run(empty_url, 0, 5)
    make_engine(empty_url).dispose()
    before = snapshot(empty_url)
    assert migrations.run(empty_url, 5) == SCHEMA_VERSION  # the stale caller
    assert snapshot(empty_url) == before and version_row(empty_url) == str(SCHEMA_VERSION)


def test_the_revisions_are_one_file_per_version_in_a_chain():
    """vNN.py has revision "vNN" after v(NN-1); the newest is SCHEMA_VERSION, so the server's
    one-query check at start and alembic agree (and a new migration is one more file)."""
    assert migrations.head() == SCHEMA_VERSION
    files = sorted(p.stem for p in (Path(migrations.__file__).parent / "versions").glob("v*.py"))
    assert files == [f"v{v:02d}" for v in range(1, SCHEMA_VERSION + 1)]
    script = migrations.script()
    for v in range(1, SCHEMA_VERSION + 1):
        r = script.get_revision(f"v{v:02d}")
        assert Path(r.path).stem == r.revision
        assert r.down_revision == (f"v{v - 1:02d}" if v > 1 else None)
    assert [p["version"] for p in migrations.pending(9)] == list(range(10, SCHEMA_VERSION + 1))


def test_an_up_to_date_database_opens_without_alembic(tmp_path):
    """Server start on a current database costs one query and never imports alembic."""
    url = f"sqlite:///{tmp_path / 'pf.db'}"
    code = ("import sys; from pilotfish.server.db import make_engine; "
            f"make_engine({url!r}).dispose(); make_engine({url!r}).dispose(); "
            "print('alembic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def _db_status(home, url, *args):
    return subprocess.run([str(Path(sys.executable).parent / "pilotfish"), "--home", str(home),
                           "server", "db-status", "--db", url, *args],
                          capture_output=True, text=True, timeout=60)


def test_db_status_says_the_version_and_what_is_pending(empty_url, tmp_path):
    """`server db-status` reads the version and lists the pending revisions, changing nothing;
    a newer database is an exit code 1; a missing SQLite file is not created. (Two runs of
    the command; the other cases call what it prints.)"""
    import json
    from pilotfish.server.db_status import db_status
    if empty_url.startswith("sqlite"):
        assert db_status(empty_url)["version"] is None
        assert not (tmp_path / "pf.db").exists()
    migrations.run(empty_url, 0, 9)
    st = db_status(empty_url)
    assert (st["version"], st["head"], st["up_to_date"]) == (9, SCHEMA_VERSION, False)
    assert [p["version"] for p in st["pending"]] == list(range(10, SCHEMA_VERSION + 1))
    assert st["pending"][0]["summary"].startswith("Schema 10: workflows")
    r = _db_status(tmp_path, empty_url)
    assert r.returncode == 0, r.stderr
    assert f"schema version: 9 (this pilotfish: {SCHEMA_VERSION})" in r.stdout
    assert "workflows" in r.stdout
    assert version_row(empty_url) == "9"  # only read
    make_engine(empty_url).dispose()
    st = db_status(empty_url)
    assert st["up_to_date"] and st["pending"] == []
    engine = create_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE pilotfish_meta SET value = '{SCHEMA_VERSION + 1}' "
                          "WHERE key = 'schema_version'"))
    engine.dispose()
    r = _db_status(tmp_path, empty_url, "--json")
    assert r.returncode == 1 and "use a newer pilotfish" in json.loads(r.stdout)["note"]


def test_db_status_refuses_a_bad_url_in_one_line(tmp_path):
    r = _db_status(tmp_path, "nosuchdb://x")
    assert r.returncode != 0 and "bad database URL" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
