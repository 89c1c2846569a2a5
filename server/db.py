"""The job database: tables and engine. SQLite in WAL mode by default, PostgreSQL by URL.

The server is the only writer; it keeps in-memory indexes rebuilt from these tables at start.
Written with SQLAlchemy Core (no ORM): the hot paths are bulk ``executemany`` statements.
"""
from __future__ import annotations

import logging

from sqlalchemy import (JSON, BigInteger, Column, Float, Index, Integer, LargeBinary, MetaData,
                        String, Table, Text, create_engine, event, func, inspect, select, text)
from sqlalchemy.engine import Engine

from pilotfish.errors import PilotfishError

log = logging.getLogger(__name__)

#: The newest schema: the head of the alembic revisions in server/migrations/versions/ (vNN.py
#: makes version NN; a test holds the two equal). The database's own version is
#: pilotfish_meta's "schema_version" row; make_engine upgrades an older one in place.
#: To change the schema: see the recipe in server/migrations/README.
SCHEMA_VERSION = 17
metadata = MetaData()

# SQLite's INTEGER PRIMARY KEY is the rowid; BigInteger keeps PostgreSQL ids 64-bit.
_ID = BigInteger().with_variant(Integer(), "sqlite")

apps = Table(
    "apps", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("description", Text, nullable=False, default=""),
    Column("executable", Text, nullable=False),
    Column("args", JSON, nullable=False),          # argument template: one argv item each
    Column("parameters", JSON, nullable=False),    # name -> declared type and limits
    Column("preprocess", JSON),                    # argv or null
    Column("postprocess", JSON),
    Column("environment", JSON, nullable=False),
    Column("resources", JSON, nullable=False),     # default job resources
    Column("container", JSON),                     # {image, runtime, images} or null
    Column("created", Float, nullable=False),
)

jobs = Table(
    "jobs", metadata,
    Column("id", _ID, primary_key=True, autoincrement=False),  # the server assigns ids
    Column("name", String(128), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("app_id", Integer, nullable=False),
    Column("site", String(128)),
    Column("queue", String(128)),
    Column("project", String(128)),
    Column("wall_time_minutes", Float),
    Column("num_nodes", Integer, nullable=False),
    Column("processes_per_node", Integer, nullable=False),
    Column("cpus_per_process", Integer, nullable=False),
    Column("gpus_per_process", Integer, nullable=False),
    Column("parameters", JSON, nullable=False),
    Column("input_url", Text),
    Column("output_url", Text),
    Column("group_identifier", String(128)),
    Column("tags", Text, nullable=False, default=""),  # ",a,b," so a tag filter is one LIKE
    Column("priority", Integer, nullable=False, default=0),
    Column("max_retries", Integer, nullable=False),
    Column("retries", Integer, nullable=False, default=0),   # failed attempts retried so far
    Column("attempts", Integer, nullable=False, default=0),  # times handed to an agent
    Column("state", String(24), nullable=False),
    Column("state_time", Float, nullable=False),
    Column("created", Float, nullable=False),
    Column("started", Float),
    Column("ended", Float),
    Column("exit_code", Integer),
    Column("message", Text),                      # the last event's message
    Column("workdir", Text, nullable=False),       # relative to the agent's work root
    Column("agent", String(64)),                   # lease holder, null when not leased
    Column("image", String(512)),                  # the job's own container image, if any
    Column("owner", String(64)),                   # the key name that added it (null: admin's)
    # The latest attempt (number: attempts): the agent it was leased to (a gang's first node;
    # its host, node and pilot are in its agents row), a multi-node job's nodes (a JSON list),
    # when it was leased, how it ended (a job_attempts state; null while it runs) and why.
    # Its start, end and exit code are started, ended and exit_code. Earlier: job_attempts.
    Column("run_agent", String(64)),
    Column("run_hosts", Text),
    Column("run_leased", Float),
    Column("run_state", String(24)),
    Column("run_message", Text),
    Column("staged", Text),  # see migrations/versions/v11.py and server/staging.py
    Column("argo_job_id", String(128)),            # the producer's id of the job (kept as text)
    Column("scheduler_config", Text),              # the seed's scheduler config name (kept)
    Column("job_status_routing_key", String(255)),  # where the AMQP bridge sends its status
    Column("intake_key", String(255)),             # the producer's idempotency key (unique)
    Column("workflow_id", _ID),                    # the workflow of a subjob (else null)
    Column("subjob_index", Integer),               # its index in the workflow's subjobs
    Column("site_choices", Text),                  # alternative sites, a JSON list (or null)
    Column("remote_accepted", Float),              # when its remote site said it has it
    Column("fenced", Float),                       # held for its forwarder's start, since
    Column("remote_cancel", Text),                 # unconfirmed cancels at sites (JSON)
    Index("ix_jobs_state_id", "state", "id"),
    # (group, id) since schema 15: a group's newest jobs in order on PostgreSQL too (SQLite's
    # index ends in the rowid anyway), for its page and its bounded counts
    Index("ix_jobs_group_id", "group_identifier", "id"),
    Index("ix_jobs_app_id", "app_id", "id"),  # (see migrations/versions/v13.py for these four)
    Index("ix_jobs_name_id", "name", "id"),
    Index("ix_jobs_state_time_id", "state_time", "id"),
    # partial (schema 16): a job's end adds an entry and removes none; ended NULL sorts nowhere
    Index("ix_jobs_ended_id", "ended", "id", sqlite_where=text("ended IS NOT NULL"),
          postgresql_where=text("ended IS NOT NULL")),
    Index("ux_jobs_intake_key", "intake_key", unique=True,
          sqlite_where=text("intake_key IS NOT NULL"),
          postgresql_where=text("intake_key IS NOT NULL")),
    Index("ix_jobs_workflow", "workflow_id", sqlite_where=text("workflow_id IS NOT NULL"),
          postgresql_where=text("workflow_id IS NOT NULL")),
    # read at every server start; nearly every row is NULL in both, so they cost nothing
    Index("ix_jobs_fenced", "id", sqlite_where=text("fenced IS NOT NULL"),
          postgresql_where=text("fenced IS NOT NULL")),
    Index("ix_jobs_remote_cancel", "id", sqlite_where=text("remote_cancel IS NOT NULL"),
          postgresql_where=text("remote_cancel IS NOT NULL")),
    # the job table filtered by site (schema 15); jobs without a site are not in it, and a
    # state change never writes it
    Index("ix_jobs_site_id", "site", "id", sqlite_where=text("site IS NOT NULL"),
          postgresql_where=text("site IS NOT NULL")),
    # PostgreSQL: room on each page for its rows' next versions, so that an update changing
    # no indexed column (the lease) is HOT, writing no index entry (schema 17; see v17.py)
    postgresql_with={"fillfactor": 50},
)

#: Each job's tags, a row per (tag, job) (schema 15; server/job_tags.py): a tag filter held
#: by few jobs is a seek here, where ``jobs.tags LIKE '%,t,%'`` read every row to find them.
#: Written at submit and when a user alters tags or removes jobs; never by the dispatch.
job_tags = Table(
    "job_tags", metadata,
    Column("tag", String(128), primary_key=True),
    Column("job_id", _ID, primary_key=True, autoincrement=False),
)

#: Usage of closed UTC days (schema 15), written by the usage query itself
#: (server/usage_cache.py), never by the job server's dispatch: a day once summed is read
#: back instead of its jobs. usage_days: the days summed and the ids of jobs then not final
#: (summed from their rows at each query: their counts can still change); usage_sums: per
#: day, the sums of each (site, app, group).
usage_days = Table(
    "usage_days", metadata,
    Column("day", Integer, primary_key=True, autoincrement=False),  # UTC days since 1970
    Column("built", Float, nullable=False),
    Column("pending", Text, nullable=False),  # a JSON list of job ids
)
usage_sums = Table(
    "usage_sums", metadata,
    Column("day", Integer, nullable=False),
    Column("site", String(128)),
    Column("app_id", Integer),
    Column("group_identifier", String(128)),
    Column("jobs", Integer, nullable=False),
    Column("finished", Integer, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("core_seconds", Float, nullable=False),
    Index("ix_usage_sums_day", "day"),
)

#: Workflows: the seed's Argo jobs, ordered (or DAG-shaped) subjobs that are jobs of their own
#: (jobs.workflow_id). The state is derived from the subjobs' states by server/workflows.py.
workflows = Table(
    "workflows", metadata,
    Column("id", _ID, primary_key=True, autoincrement=False),  # the server assigns ids
    Column("name", String(128), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("user_id", BigInteger),
    Column("username", String(128)),
    Column("email", Text),                         # comma-joined checked addresses
    Column("group_identifier", String(128)),
    Column("input_url", Text),
    Column("output_url", Text),
    Column("job_status_routing_key", String(255)),
    Column("intake_key", String(255)),             # the producer's idempotency key (unique)
    Column("owner", String(64)),                   # the key name that added it
    Column("subjobs", Integer, nullable=False),    # how many
    Column("done", Integer, nullable=False, default=0),  # subjob completions counted so far
    Column("state", String(32), nullable=False),
    Column("state_time", Float, nullable=False),
    Column("created", Float, nullable=False),
    Column("message", Text),
    Index("ux_workflows_intake_key", "intake_key", unique=True),
    Index("ix_workflows_state", "state"),
)

job_parents = Table(
    "job_parents", metadata,
    Column("job_id", _ID, primary_key=True),
    Column("parent_id", _ID, primary_key=True),
    Index("ix_job_parents_parent", "parent_id"),
)

job_events = Table(
    "job_events", metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("job_id", _ID, nullable=False),
    Column("from_state", String(24)),
    Column("to_state", String(24), nullable=False),
    Column("via", Text),                           # states passed straight through, a letter each
    Column("time", Float, nullable=False),
    Column("message", Text),
    Index("ix_job_events_job", "job_id"),
)

#: The event stream's other rows: what is not a job's state change but a subscriber follows as
#: well (agents that joined, came back, were lost or left; pilots recorded or changed; jobs
#: removed). Their ids and job_events' ids are one sequence, given by the server (see
#: server/events.py), so one cursor orders both tables.
server_events = Table(
    "server_events", metadata,
    Column("id", _ID, primary_key=True, autoincrement=False),
    Column("kind", String(16), nullable=False),    # agent, pilot or job (a removal)
    Column("time", Float, nullable=False),
    Column("job_id", _ID),                         # a removed job
    Column("name", String(128)),                   # the removed job's name
    Column("grp", String(128)),                    # the removed job's group_identifier
    Column("agent", String(64)),
    Column("host", String(255)),
    Column("pilot", String(128)),
    Column("site", String(128)),
    Column("from_state", String(24)),
    Column("to_state", String(24), nullable=False),
    Column("message", Text),
    Column("workflow_id", _ID),                    # kind workflow: the workflow
)

#: Where and how each earlier attempt of a job ran: the latest attempt lives in the job's row
#: (``jobs.run_*``, written with the lease and with the end the server writes anyway); it moves
#: here when the job is leased again. Most jobs run once and so cost no write here at all.
#: ``jobs.agent`` names only the lease holder of now.
job_attempts = Table(
    "job_attempts", metadata,
    Column("job_id", _ID, primary_key=True, autoincrement=False),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("agent", String(64), nullable=False),   # the agent leased to (a gang's first node)
    Column("host", String(255)),
    Column("node", String(255)),
    Column("pilot", String(128)),
    Column("hosts", Text),                         # a multi-node job's nodes: a JSON list
    Column("leased", Float, nullable=False),
    Column("started", Float),
    Column("ended", Float),
    # how the attempt ended: JOB_FINISHED, a *_FAILED state, RUN_TIMEOUT, USER_KILLED, LOST
    # (its agent went silent or left), HANDED_BACK (its agent stopped and gave it back); null
    # while it runs
    Column("state", String(24)),
    Column("exit_code", Integer),
    Column("message", Text),
    # (the primary key's index serves lookups by job_id: no second index to write)
)

#: Tasks' output for ``pilotfish job log``: the pieces of job.out ("out") and job.err ("err")
#: agents ship (see pilotfish.pilot.output and server/output.py), at most the server's cap per
#: stream, of each job's newest attempt only. A table and not files under the home: the
#: server writes them in the turn's transaction with the updates they ride on (nothing acked
#: before it is stored), removes them with the job in the same transaction (job rm, gc), and
#: never touches a file system in its loop; PostgreSQL serves them like every other row.
job_output = Table(
    "job_output", metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("job_id", _ID, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("stream", String(3), nullable=False),       # "out" or "err"
    Column("pos", BigInteger, nullable=False),         # byte offset of data in the file
    Column("nbytes", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("size", BigInteger, nullable=False),        # the file's size when this was read
    Column("eof", Integer, nullable=False),            # 1: the agent's last piece of the file
    Column("path", Text),                              # the file on the agent's node
    Column("time", Float, nullable=False),
    Index("ix_job_output_job", "job_id", "stream", "attempt"),
)

agents = Table(
    "agents", metadata,
    Column("id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("site", String(128)),
    Column("pilot", String(128)),
    Column("cores", Integer, nullable=False),
    Column("gpus", Integer, nullable=False),
    Column("memory", BigInteger, nullable=False),
    Column("started", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("state", String(16), nullable=False),   # ALIVE, LOST, EXITED
    Column("tasks_done", Integer, nullable=False, default=0),
    Column("node", String(255)),                   # the name the pilot's launcher uses
    Column("node_cores", Integer),                 # CPUs on the node (affinity self-check)
    Column("launcher", String(32)),
)

#: Which CurveZMQ key an agent id belongs to: the key of its first hello. Hellos, updates and
#: byes for that id from any other key are refused, across server restarts too.
agent_keys = Table(
    "agent_keys", metadata,
    Column("agent_id", String(64), primary_key=True),
    Column("public_key", String(40), nullable=False),  # Z85
    Column("key_name", String(64)),                    # its name then, for people
    Column("bound", Float, nullable=False),
)

pilots = Table(
    "pilots", metadata,
    Column("id", String(128), primary_key=True),   # the pilot id its agents report
    Column("site", String(128)),
    Column("scheduler", String(32)),
    Column("batch_id", String(128)),
    Column("nodes", Integer, nullable=False),
    Column("walltime_minutes", Float),
    Column("queue", String(128)),
    Column("project", String(128)),
    Column("state", String(16), nullable=False),   # pilotfish.pilotstate.PilotState
    Column("reason", Text),
    Column("workdir", Text),                       # script, stdout/stderr, batch id (login node)
    Column("submitted", Float, nullable=False),
    Column("state_time", Float, nullable=False),
)

sites = Table(
    "sites", metadata,
    Column("name", String(128), primary_key=True),
    Column("host", String(255)),                   # where its site agent runs
    Column("pid", Integer),
    Column("paused", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("updated", Float, nullable=False),
)

meta = Table(
    "pilotfish_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


#: SQLite's page cache per connection (KiB). The server reads its queued jobs at start with a
#: small one instead (see JobServer.load), so that pass over the whole table does not leave
#: the cache full of pages no request needs (64 MB of the server's memory).
SQLITE_CACHE_KIB = 65536
SQLITE_LOAD_CACHE_KIB = 2048


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer. NORMAL: durable across a process crash (our failure
    # model); only an OS crash can lose the last transactions.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine with the tables created, or upgraded to SCHEMA_VERSION; a clear error if the
    database cannot be reached or is newer than this pilotfish."""
    kwargs: dict = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False}
    try:
        engine = create_engine(url, **kwargs)
    except Exception as exc:
        raise PilotfishError(f"bad database URL {url!r}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    # PostgreSQL keeps its own durability: every commit waits for the WAL flush (~5 ms a turn
    # on a plain disk), so an acknowledged job survives a crash of the database server too. A
    # URL may trade that for speed: ?options=-csynchronous_commit%3Doff (the last turns may
    # be lost when PostgreSQL or the OS crashes; the database stays consistent).
    try:
        with engine.begin() as conn:
            version = schema_version(conn)
            if version is None:  # a new database: made at the newest schema at once
                metadata.create_all(conn)
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                return engine
        if version != SCHEMA_VERSION:
            check_version(version)
            # only now alembic is imported: an up-to-date database costs one query above
            from pilotfish.server import migrations
            log.warning("upgrading database schema from version %s to %s", version,
                        SCHEMA_VERSION)
            try:
                migrations.run(engine.url, version)
            except PilotfishError:
                raise
            except Exception as exc:  # one transaction: rolled back, nothing changed
                raise PilotfishError(
                    f"cannot upgrade database {engine.url!r} from schema version {version} to "
                    f"{SCHEMA_VERSION} (nothing was changed): {str(exc).splitlines()[0]}"
                ) from None
    except PilotfishError:
        raise
    except Exception as exc:
        raise PilotfishError(f"cannot open database {engine.url!r}: "
                             f"{str(exc).splitlines()[0]}") from None
    return engine


def schema_version(conn) -> int | str | None:
    """The database's schema version (pilotfish_meta's row; the raw text if it is not a
    number), or None for a database pilotfish has not made yet."""
    if not inspect(conn).has_table(meta.name):
        return None
    row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
    if row is None:
        return None
    value = row[0]
    return int(value) if value.isascii() and value.isdigit() and len(value) < 10 else value


def check_version(version) -> None:
    """Refuse a database this pilotfish has no upgrade for (newer, or not a version)."""
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        shown = str(version) if len(str(version)) <= 24 else f"{str(version)[:24]}..."
        raise PilotfishError(f"database schema version {shown} is not {SCHEMA_VERSION}; "
                             "this pilotfish cannot use it")


def max_job_id(conn) -> int:
    return conn.execute(select(func.coalesce(func.max(jobs.c.id), 0))).scalar_one()


def next_epoch(conn) -> int:
    """Count one more server start in ``pilotfish_meta`` (key "epoch") and return it, in the
    caller's transaction. Each start of the server is a new epoch: what an agent was told by an
    earlier one (a task batch still in a socket buffer) is told apart by it."""
    row = conn.execute(select(meta.c.value).where(meta.c.key == "epoch")).first()
    epoch = int(row[0]) + 1 if row is not None else 1
    if row is None:
        conn.execute(meta.insert().values(key="epoch", value=str(epoch)))
    else:
        conn.execute(meta.update().where(meta.c.key == "epoch").values(value=str(epoch)))
    return epoch


#: pilotfish_meta's key for the newest event id pruned (see server/events.py).
PRUNED_KEY = "events_pruned_through"


def event_ids(conn) -> tuple[int, int]:
    """(the next event id, the newest id pruned), at server start: after every id in either
    event table and after every id ever pruned, so no id is handed out twice."""
    row = conn.execute(select(meta.c.value).where(meta.c.key == PRUNED_KEY)).first()
    pruned = int(row[0]) if row else 0
    top = max(conn.execute(select(func.coalesce(func.max(t.c.id), 0))).scalar_one()
              for t in (job_events, server_events))
    return max(top, pruned) + 1, pruned
