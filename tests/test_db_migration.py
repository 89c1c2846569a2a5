"""A database made by an earlier schema is brought up to date in place, data kept: what each
version's rows become (test_db_alembic.py checks every version's schema on both dialects)."""
from __future__ import annotations

import sqlite3

import pytest

from pilotfish.errors import PilotfishError
from pilotfish.server import migrations, states
from pilotfish.server.db import SCHEMA_VERSION, make_engine


def _meta_only(path, version):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE pilotfish_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("INSERT INTO pilotfish_meta VALUES ('schema_version', ?)", (version,))
    con.commit()
    con.close()


def test_version_1_gains_the_agent_node_columns(tmp_path):
    db = tmp_path / "v1.db"
    migrations.run(f"sqlite:///{db}", 0, 1)  # as version 1 made it
    con = sqlite3.connect(db)
    con.execute("INSERT INTO agents VALUES ('a1','h',1,NULL,NULL,2,0,1,0,0,'EXITED',5)")
    con.commit()
    con.close()
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
    _meta_only(db, "99")
    with pytest.raises(PilotfishError, match="schema version 99"):
        make_engine(f"sqlite:///{db}")


def test_version_3_with_old_apps_and_jobs_tables_gains_the_container_columns(tmp_path):
    db = tmp_path / "v3.db"
    migrations.run(f"sqlite:///{db}", 0, 3)  # as version 3 made it
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    assert "container" in [r[1] for r in con.execute("PRAGMA table_info(apps)")]
    assert "image" in [r[1] for r in con.execute("PRAGMA table_info(jobs)")]


def test_version_4_gains_job_owners_and_agent_keys(tmp_path):
    """Schema 5: jobs.owner (old rows NULL: only an admin may change them) and agent_keys."""
    db = tmp_path / "v4.db"
    migrations.run(f"sqlite:///{db}", 0, 4)  # as version 4 made it
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs (id, name, description, app_id, num_nodes, "
                "processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, "
                "priority, max_retries, retries, attempts, state, state_time, created, "
                "workdir) VALUES (7, 'old', '', 1, 1, 1, 1, 0, '{}', '', 0, 3, 0, 0, 'READY', "
                "0, 0, 'w')")
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    assert "owner" in [r[1] for r in con.execute("PRAGMA table_info(jobs)")]
    assert con.execute("SELECT id, name, owner FROM jobs").fetchall() == [(7, "old", None)]
    assert {r[1] for r in con.execute("PRAGMA table_info(agent_keys)")} == {
        "agent_id", "public_key", "key_name", "bound"}
    assert con.execute("SELECT value FROM pilotfish_meta").fetchone()[0] == str(SCHEMA_VERSION)
    con.close()
    make_engine(f"sqlite:///{db}").dispose()  # and opening it again changes nothing


def test_version_5_gains_the_job_attempts_table(tmp_path):
    """Schema 6: job_attempts (where and when each attempt ran); jobs and agents kept."""
    db = tmp_path / "v5.db"
    migrations.run(f"sqlite:///{db}", 0, 5)  # as version 5 made it
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs (id, name, description, app_id, num_nodes, "
                "processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, "
                "priority, max_retries, retries, attempts, state, state_time, created, "
                "workdir, agent, owner) VALUES (9, 'done', '', 1, 1, 1, 1, 0, '{}', '', 0, 3, "
                "0, 1, 'JOB_FINISHED', 0, 0, 'w', NULL, 'alice')")
    con.execute("INSERT INTO agents (id, host, pid, cores, gpus, memory, started, last_seen, "
                "state, tasks_done) VALUES ('a5', 'h', 1, 2, 0, 1, 0, 0, 'EXITED', 1)")
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    cols = [r[1] for r in con.execute("PRAGMA table_info(job_attempts)")]
    assert cols == ["job_id", "attempt", "agent", "host", "node", "pilot", "hosts", "leased",
                    "started", "ended", "state", "exit_code", "message"]
    assert con.execute("SELECT COUNT(*) FROM job_attempts").fetchone()[0] == 0  # none known
    assert con.execute("SELECT id, state, owner FROM jobs").fetchall() == [
        (9, "JOB_FINISHED", "alice")]
    assert con.execute("SELECT id, tasks_done FROM agents").fetchall() == [("a5", 1)]
    assert con.execute("SELECT value FROM pilotfish_meta WHERE key='schema_version'"
                       ).fetchone()[0] == str(SCHEMA_VERSION)
    # schema 9 adds job_output (job log), empty
    assert con.execute("SELECT COUNT(*) FROM job_output").fetchone()[0] == 0
    make_engine(f"sqlite:///{db}").dispose()  # and opening it again changes nothing


def test_version_6_gains_the_server_events_table(tmp_path):
    """Schema 7: server_events (agents, pilots and removed jobs on the event stream); the job
    events kept, and the stream's ids go on after the highest one."""
    db = tmp_path / "v6.db"
    migrations.run(f"sqlite:///{db}", 0, 6)  # as version 6 made it
    con = sqlite3.connect(db)
    con.execute("INSERT INTO job_events (id, job_id, from_state, to_state, time) "
                "VALUES (41, 9, NULL, 'READY', 0)")
    con.commit()
    con.close()
    engine = make_engine(f"sqlite:///{db}")
    from pilotfish.server.db import event_ids
    with engine.connect() as conn:
        assert event_ids(conn) == (42, 0)
    engine.dispose()
    con = sqlite3.connect(db)
    cols = [r[1] for r in con.execute("PRAGMA table_info(server_events)")]
    assert cols == ["id", "kind", "time", "job_id", "name", "grp", "agent", "host", "pilot",
                    "site", "from_state", "to_state", "message", "workflow_id"]
    assert con.execute("SELECT id, to_state FROM job_events").fetchall() == [(41, "READY")]
    assert con.execute("SELECT value FROM pilotfish_meta WHERE key='schema_version'"
                       ).fetchone()[0] == str(SCHEMA_VERSION)


def test_version_7_gains_the_production_fields_and_the_intake_key_index(tmp_path):
    """Schema 8: jobs.argo_job_id, scheduler_config, job_status_routing_key and intake_key
    (unique where given); old rows keep their values and get NULLs."""
    db = tmp_path / "v7.db"
    migrations.run(f"sqlite:///{db}", 0, 7)  # as version 7 made it
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs (id, name, description, app_id, num_nodes, "
                "processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, "
                "priority, max_retries, retries, attempts, state, state_time, created, "
                "workdir) VALUES (3, 'old', '', 1, 1, 1, 1, 0, '{}', '', 0, 3, 0, 0, 'READY', "
                "0, 0, 'w')")
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    assert con.execute("SELECT id, argo_job_id, intake_key FROM jobs").fetchall() == [
        (3, None, None)]
    assert "ux_jobs_intake_key" in [r[1] for r in con.execute("PRAGMA index_list(jobs)")]
    assert con.execute("SELECT value FROM pilotfish_meta WHERE key='schema_version'"
                       ).fetchone()[0] == str(SCHEMA_VERSION)
    con.execute("UPDATE jobs SET intake_key='k1'")
    with pytest.raises(sqlite3.IntegrityError):  # the index is unique
        con.execute("INSERT INTO jobs (id, name, description, app_id, num_nodes, "
                    "processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, "
                    "priority, max_retries, retries, attempts, state, state_time, created, "
                    "workdir, intake_key) VALUES (4, 'dup', '', 1, 1, 1, 1, 0, '{}', '', 0, 3, "
                    "0, 0, 'READY', 0, 0, 'w', 'k1')")
    con.close()
    make_engine(f"sqlite:///{db}").dispose()  # and opening it again changes nothing


def test_version_9_gains_workflows(tmp_path):
    """Schema 10: the workflows table, jobs.workflow_id and subjob_index (indexed where
    given), server_events.workflow_id; old rows get NULLs."""
    db = tmp_path / "v9.db"
    migrations.run(f"sqlite:///{db}", 0, 9)  # as version 9 made it
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs (id, name, description, app_id, num_nodes, "
                "processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, "
                "priority, max_retries, retries, attempts, state, state_time, created, "
                "workdir) VALUES (3, 'old', '', 1, 1, 1, 1, 0, '{}', '', 0, 3, 0, 0, 'READY', "
                "0, 0, 'w')")
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    assert con.execute("SELECT id, workflow_id, subjob_index FROM jobs").fetchall() == [
        (3, None, None)]
    assert "ix_jobs_workflow" in [r[1] for r in con.execute("PRAGMA index_list(jobs)")]
    assert con.execute("SELECT COUNT(*) FROM workflows").fetchone()[0] == 0
    assert "workflow_id" in [r[1] for r in con.execute("PRAGMA table_info(server_events)")]
    assert con.execute("SELECT value FROM pilotfish_meta WHERE key='schema_version'"
                       ).fetchone()[0] == str(SCHEMA_VERSION)
    con.close()
    make_engine(f"sqlite:///{db}").dispose()


def test_version_10_gains_the_staged_column(tmp_path):
    """Schema 11: jobs.staged (a remote input the site stager placed); old rows get NULL."""
    db = tmp_path / "v10.db"
    migrations.run(f"sqlite:///{db}", 0, 10)  # as version 10 made it
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs (id, name, description, app_id, num_nodes, "
                "processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, "
                "priority, max_retries, retries, attempts, state, state_time, created, "
                "workdir) VALUES (3, 'old', '', 1, 1, 1, 1, 0, '{}', '', 0, 3, 0, 0, 'READY', "
                "0, 0, 'w')")
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    assert con.execute("SELECT id, staged FROM jobs").fetchall() == [(3, None)]
    assert con.execute("SELECT value FROM pilotfish_meta WHERE key='schema_version'"
                       ).fetchone()[0] == str(SCHEMA_VERSION)
    con.close()


def test_version_11_gains_the_federation_columns(tmp_path):
    """Schema 12: jobs.site_choices (a job's alternative sites) and jobs.remote_accepted (when
    the remote site it was forwarded to said it has it); old rows get NULLs."""
    db = tmp_path / "v11.db"
    migrations.run(f"sqlite:///{db}", 0, 11)  # as version 11 made it
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs (id, name, description, app_id, num_nodes, "
                "processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, "
                "priority, max_retries, retries, attempts, state, state_time, created, "
                "workdir) VALUES (3, 'old', '', 1, 1, 1, 1, 0, '{}', '', 0, 3, 0, 0, 'READY', "
                "0, 0, 'w')")
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    assert con.execute("SELECT id, site_choices, remote_accepted FROM jobs").fetchall() == [
        (3, None, None)]
    assert con.execute("SELECT value FROM pilotfish_meta WHERE key='schema_version'"
                       ).fetchone()[0] == str(SCHEMA_VERSION)
    con.close()


def test_version_13_gains_the_fence_columns(tmp_path):
    """Schema 14: jobs.fenced (a forwarded job held at its site until its forwarder's start)
    and jobs.remote_cancel (cancels a central has not had confirmed); old rows get NULLs."""
    db = tmp_path / "v13.db"
    migrations.run(f"sqlite:///{db}", 0, 13)  # as version 13 made it
    con = sqlite3.connect(db)
    con.execute("INSERT INTO jobs (id, name, description, app_id, num_nodes, "
                "processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, "
                "priority, max_retries, retries, attempts, state, state_time, created, "
                "workdir) VALUES (3, 'old', '', 1, 1, 1, 1, 0, '{}', '', 0, 3, 0, 0, 'READY', "
                "0, 0, 'w')")
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    make_engine(f"sqlite:///{db}").dispose()  # and again: nothing more to do
    con = sqlite3.connect(db)
    assert con.execute("SELECT id, fenced, remote_cancel FROM jobs").fetchall() == [
        (3, None, None)]
    assert {"ix_jobs_fenced", "ix_jobs_remote_cancel"} <= {
        r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert con.execute("SELECT value FROM pilotfish_meta WHERE key='schema_version'"
                       ).fetchone()[0] == str(SCHEMA_VERSION)
    con.close()


def test_version_14_gains_job_tags_from_the_jobs_tags(tmp_path):
    """Schema 15: job_tags is filled from the jobs' stored tags (",a,b,"), a row per tag and
    job; the usage cache's tables start empty; ix_jobs_group becomes (group, id)."""
    db = tmp_path / "v14.db"
    migrations.run(f"sqlite:///{db}", 0, 14)
    con = sqlite3.connect(db)
    con.executemany(
        "INSERT INTO jobs (id, name, description, app_id, num_nodes, processes_per_node, "
        "cpus_per_process, gpus_per_process, parameters, tags, priority, max_retries, retries, "
        "attempts, state, state_time, created, workdir) VALUES (?, 'old', '', 1, 1, 1, 1, 0, "
        "'{}', ?, 0, 3, 0, 0, 'READY', 0, 0, 'w')",
        [(1, ",a,b,"), (2, ""), (3, ","), (4, ",b,array:4,"), (5, ",a,a,")])
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    assert con.execute("SELECT tag, job_id FROM job_tags ORDER BY tag, job_id").fetchall() == [
        ("a", 1), ("a", 5), ("array:4", 4), ("b", 1), ("b", 4)]
    assert con.execute("SELECT count(*) FROM usage_days").fetchone()[0] == 0
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"ix_jobs_group_id", "ix_jobs_site_id"} <= names and "ix_jobs_group" not in names
    con.close()


SORT_INDEXES = {"ix_jobs_app_id", "ix_jobs_name_id", "ix_jobs_state_time_id", "ix_jobs_ended_id"}


def _indexes(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index' "
                                      "AND tbl_name='jobs'")}


def test_version_12_gains_the_sort_and_range_indexes(tmp_path):
    """Schema 13: indexes only: (app_id, id) replaces (app_id); (name, id), (state_time, id)
    and (ended, id) for sorting the job table and bounding usage scans; rows kept."""
    db = tmp_path / "v12.db"
    migrations.run(f"sqlite:///{db}", 0, 12)  # as version 12 made it
    con = sqlite3.connect(db)
    assert "ix_jobs_app" in _indexes(con)
    con.execute("INSERT INTO jobs (id, name, description, app_id, num_nodes, "
                "processes_per_node, cpus_per_process, gpus_per_process, parameters, tags, "
                "priority, max_retries, retries, attempts, state, state_time, created, "
                "workdir, ended) VALUES (3, 'old', '', 1, 1, 1, 1, 0, '{}', '', 0, 3, 0, 1, "
                "'JOB_FINISHED', 5, 0, 'w', 4)")
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    assert SORT_INDEXES <= _indexes(con) and "ix_jobs_app" not in _indexes(con)
    assert con.execute("SELECT id, name, ended FROM jobs").fetchall() == [(3, "old", 4.0)]
    assert con.execute("SELECT value FROM pilotfish_meta WHERE key='schema_version'"
                       ).fetchone()[0] == str(SCHEMA_VERSION)
    plan = " ".join(r[3] for r in con.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE ended IS NOT NULL "
        "ORDER BY ended DESC, id DESC LIMIT 5"))
    assert "ix_jobs_ended_id" in plan
    con.close()
    make_engine(f"sqlite:///{db}").dispose()  # and opening it again changes nothing


def test_version_15_stores_via_as_letters_and_indexes_only_ended_jobs(tmp_path):
    """Schema 16: every event's via (comma-joined names) becomes a letter per state, and back
    on a downgrade; (ended, id) holds only jobs that have ended, and the ended sort and a
    range on ended still use it."""
    db = tmp_path / "v15.db"
    migrations.run(f"sqlite:///{db}", 0, 15)
    con = sqlite3.connect(db)
    done = "STAGED_IN,PREPROCESSED,RUNNING,EXECUTION_FINISHED,POSTPROCESSED,STAGED_OUT"
    con.executemany("INSERT INTO job_events (id, job_id, from_state, to_state, via, time) "
                    "VALUES (?, 1, ?, ?, ?, 1)",
                    [(1, None, "READY", "CREATED"), (2, "READY", "JOB_FINISHED", done),
                     (3, "RUNNING", "RESTART_READY", "RUN_FAILED"), (4, "READY", "STAGED_IN",
                                                                      None)])
    con.commit()
    con.close()
    make_engine(f"sqlite:///{db}").dispose()
    con = sqlite3.connect(db)
    got = con.execute("SELECT id, via FROM job_events ORDER BY id").fetchall()
    assert got == [(1, "A"), (2, "DEFGHI"), (3, "M"), (4, None)]
    assert [states.via_text(v) for _, v in got] == ["CREATED", done, "RUN_FAILED", None]
    assert states.via_names("no,path") == ["no", "path"]  # a text no path: shown as stored
    sql = con.execute("SELECT sql FROM sqlite_master WHERE name='ix_jobs_ended_id'").fetchone()
    assert "ended IS NOT NULL" in sql[0]
    for q in ("SELECT id FROM jobs WHERE ended IS NOT NULL ORDER BY ended DESC, id DESC "
              "LIMIT 5", "SELECT count(*) FROM jobs WHERE ended >= 7"):
        plan = " ".join(r[3] for r in con.execute("EXPLAIN QUERY PLAN " + q))
        assert "ix_jobs_ended_id" in plan, (q, plan)
    con.close()
    migrations.run(f"sqlite:///{db}", 16, 15)
    con = sqlite3.connect(db)
    assert con.execute("SELECT via FROM job_events ORDER BY id").fetchall() == [
        ("CREATED",), (done,), ("RUN_FAILED",), (None,)]
    con.close()
