"""A database made by the previous schema is brought up to date in place, data kept."""
from __future__ import annotations

import sqlite3

import pytest

from pilotfish.errors import PilotfishError
from pilotfish.server.db import SCHEMA_VERSION, make_engine

V1_AGENTS = """CREATE TABLE agents (id VARCHAR(64) PRIMARY KEY, host VARCHAR(255) NOT NULL,
    pid INTEGER NOT NULL, site VARCHAR(128), pilot VARCHAR(128), cores INTEGER NOT NULL,
    gpus INTEGER NOT NULL, memory BIGINT NOT NULL, started FLOAT NOT NULL,
    last_seen FLOAT NOT NULL, state VARCHAR(16) NOT NULL, tasks_done INTEGER NOT NULL)"""


def _v1(path, version="1"):
    con = sqlite3.connect(path)
    con.execute(V1_AGENTS)
    con.execute("INSERT INTO agents VALUES ('a1','h',1,NULL,NULL,2,0,1,0,0,'EXITED',5)")
    con.execute("CREATE TABLE pilotfish_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("INSERT INTO pilotfish_meta VALUES ('schema_version', ?)", (version,))
    con.commit()
    con.close()


def test_version_1_gains_the_agent_node_columns(tmp_path):
    db = tmp_path / "v1.db"
    _v1(db)
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    cols = [r[1] for r in con.execute("PRAGMA table_info(agents)")]
    assert {"node", "node_cores", "launcher"} <= set(cols)
    assert con.execute("SELECT tasks_done, node FROM agents").fetchall() == [(5, None)]
    assert "container" in [r[1] for r in con.execute("PRAGMA table_info(apps)")]
    assert con.execute("SELECT value FROM pilotfish_meta").fetchone()[0] == str(SCHEMA_VERSION)
    make_engine(f"sqlite:///{db}").dispose()  # and opening it again changes nothing


def test_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "v99.db"
    _v1(db, "99")
    with pytest.raises(PilotfishError, match="schema version 99"):
        make_engine(f"sqlite:///{db}")


def test_version_3_with_old_apps_and_jobs_tables_gains_the_container_columns(tmp_path):
    db = tmp_path / "v3.db"
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)  # make it look like version 3: drop the new columns
    con.execute("ALTER TABLE apps DROP COLUMN container")
    con.execute("ALTER TABLE jobs DROP COLUMN image")
    con.execute("UPDATE pilotfish_meta SET value='3'")
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    assert "container" in [r[1] for r in con.execute("PRAGMA table_info(apps)")]
    assert "image" in [r[1] for r in con.execute("PRAGMA table_info(jobs)")]
