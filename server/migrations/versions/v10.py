"""Schema 10: workflows (the seed's Argo jobs); a subjob's job names its workflow and its
index there (indexed where given); a workflow's events are server_events rows naming it."""
import sqlalchemy as sa
from alembic import op

revision = "v10"
down_revision = "v09"

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "workflows",
        sa.Column("id", ID, primary_key=True, autoincrement=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("user_id", sa.BigInteger),
        sa.Column("username", sa.String(128)),
        sa.Column("email", sa.Text),
        sa.Column("group_identifier", sa.String(128)),
        sa.Column("input_url", sa.Text),
        sa.Column("output_url", sa.Text),
        sa.Column("job_status_routing_key", sa.String(255)),
        sa.Column("intake_key", sa.String(255)),
        sa.Column("owner", sa.String(64)),
        sa.Column("subjobs", sa.Integer, nullable=False),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("state_time", sa.Float, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("message", sa.Text),
    )
    op.create_index("ux_workflows_intake_key", "workflows", ["intake_key"], unique=True)
    op.create_index("ix_workflows_state", "workflows", ["state"])
    op.add_column("jobs", sa.Column("workflow_id", ID))
    op.add_column("jobs", sa.Column("subjob_index", sa.Integer))
    op.add_column("server_events", sa.Column("workflow_id", ID))
    op.create_index("ix_jobs_workflow", "jobs", ["workflow_id"],
                    sqlite_where=sa.text("workflow_id IS NOT NULL"),
                    postgresql_where=sa.text("workflow_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_jobs_workflow", table_name="jobs")
    with op.batch_alter_table("server_events") as batch:
        batch.drop_column("workflow_id")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("subjob_index")
        batch.drop_column("workflow_id")
    op.drop_table("workflows")
