"""Schema 6: a job's latest attempt in its row (jobs.run_*), earlier ones in job_attempts."""
import sqlalchemy as sa
from alembic import op

revision = "v06"
down_revision = "v05"

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("run_agent", sa.String(64)))
    op.add_column("jobs", sa.Column("run_hosts", sa.Text))
    op.add_column("jobs", sa.Column("run_leased", sa.Float))
    op.add_column("jobs", sa.Column("run_state", sa.String(24)))
    op.add_column("jobs", sa.Column("run_message", sa.Text))
    op.create_table(
        "job_attempts",
        sa.Column("job_id", ID, primary_key=True, autoincrement=False),
        sa.Column("attempt", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("agent", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255)),
        sa.Column("node", sa.String(255)),
        sa.Column("pilot", sa.String(128)),
        sa.Column("hosts", sa.Text),
        sa.Column("leased", sa.Float, nullable=False),
        sa.Column("started", sa.Float),
        sa.Column("ended", sa.Float),
        sa.Column("state", sa.String(24)),
        sa.Column("exit_code", sa.Integer),
        sa.Column("message", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("job_attempts")
    with op.batch_alter_table("jobs") as batch:
        for column in ("run_message", "run_state", "run_leased", "run_hosts", "run_agent"):
            batch.drop_column(column)
