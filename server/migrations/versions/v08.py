"""Schema 8: what a production system sends with a job and wants back (argo_job_id,
scheduler_config, job_status_routing_key) and the producer's idempotency key of an intake,
unique where given (a partial index: jobs without a key, nearly all, cost it nothing)."""
import sqlalchemy as sa
from alembic import op

revision = "v08"
down_revision = "v07"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("argo_job_id", sa.String(128)))
    op.add_column("jobs", sa.Column("scheduler_config", sa.Text))
    op.add_column("jobs", sa.Column("job_status_routing_key", sa.String(255)))
    op.add_column("jobs", sa.Column("intake_key", sa.String(255)))
    op.create_index("ux_jobs_intake_key", "jobs", ["intake_key"], unique=True,
                    sqlite_where=sa.text("intake_key IS NOT NULL"),
                    postgresql_where=sa.text("intake_key IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ux_jobs_intake_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("intake_key", "job_status_routing_key", "scheduler_config",
                       "argo_job_id"):
            batch.drop_column(column)
