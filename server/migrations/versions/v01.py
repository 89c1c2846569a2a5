"""Schema 1: jobs, their parents and events, apps, agents and pilotfish_meta.

The first schema pilotfish recorded a version for: what schema 12's tables are without the
columns and tables revisions v02..v12 add. Frozen here, never edited: a later change is a new
revision.
"""
import sqlalchemy as sa
from alembic import op

revision = "v01"
down_revision = None

# SQLite's INTEGER PRIMARY KEY is the rowid; BigInteger keeps PostgreSQL ids 64-bit.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "apps",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("executable", sa.Text, nullable=False),
        sa.Column("args", sa.JSON, nullable=False),
        sa.Column("parameters", sa.JSON, nullable=False),
        sa.Column("preprocess", sa.JSON),
        sa.Column("postprocess", sa.JSON),
        sa.Column("environment", sa.JSON, nullable=False),
        sa.Column("resources", sa.JSON, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", ID, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("app_id", sa.Integer, nullable=False),
        sa.Column("site", sa.String(128)),
        sa.Column("queue", sa.String(128)),
        sa.Column("project", sa.String(128)),
        sa.Column("wall_time_minutes", sa.Float),
        sa.Column("num_nodes", sa.Integer, nullable=False),
        sa.Column("processes_per_node", sa.Integer, nullable=False),
        sa.Column("cpus_per_process", sa.Integer, nullable=False),
        sa.Column("gpus_per_process", sa.Integer, nullable=False),
        sa.Column("parameters", sa.JSON, nullable=False),
        sa.Column("input_url", sa.Text),
        sa.Column("output_url", sa.Text),
        sa.Column("group_identifier", sa.String(128)),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("max_retries", sa.Integer, nullable=False),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("state_time", sa.Float, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("started", sa.Float),
        sa.Column("ended", sa.Float),
        sa.Column("exit_code", sa.Integer),
        sa.Column("message", sa.Text),
        sa.Column("workdir", sa.Text, nullable=False),
        sa.Column("agent", sa.String(64)),
    )
    op.create_index("ix_jobs_state_id", "jobs", ["state", "id"])
    op.create_index("ix_jobs_group", "jobs", ["group_identifier"])
    op.create_index("ix_jobs_app", "jobs", ["app_id"])
    op.create_table(
        "job_parents",
        sa.Column("job_id", ID, primary_key=True),
        sa.Column("parent_id", ID, primary_key=True),
    )
    op.create_index("ix_job_parents_parent", "job_parents", ["parent_id"])
    op.create_table(
        "job_events",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("job_id", ID, nullable=False),
        sa.Column("from_state", sa.String(24)),
        sa.Column("to_state", sa.String(24), nullable=False),
        sa.Column("via", sa.Text),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("message", sa.Text),
    )
    op.create_index("ix_job_events_job", "job_events", ["job_id"])
    op.create_table(
        "agents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("site", sa.String(128)),
        sa.Column("pilot", sa.String(128)),
        sa.Column("cores", sa.Integer, nullable=False),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("memory", sa.BigInteger, nullable=False),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("tasks_done", sa.Integer, nullable=False),
    )
    op.create_table(
        "pilotfish_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("pilotfish_meta", "agents", "job_events", "job_parents", "jobs", "apps"):
        op.drop_table(table)
