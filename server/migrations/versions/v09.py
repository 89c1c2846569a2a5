"""Schema 9: job_output, the tasks' output pieces `pilotfish job log` reads."""
import sqlalchemy as sa
from alembic import op

revision = "v09"
down_revision = "v08"

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "job_output",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("job_id", ID, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("stream", sa.String(3), nullable=False),
        sa.Column("pos", sa.BigInteger, nullable=False),
        sa.Column("nbytes", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("eof", sa.Integer, nullable=False),
        sa.Column("path", sa.Text),
        sa.Column("time", sa.Float, nullable=False),
    )
    op.create_index("ix_job_output_job", "job_output", ["job_id", "stream", "attempt"])


def downgrade() -> None:
    op.drop_table("job_output")
