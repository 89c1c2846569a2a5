"""Schema 7: server_events, the event stream's rows that are not a job's state change (its ids
and job_events' ids are one sequence, see server/events.py)."""
import sqlalchemy as sa
from alembic import op

revision = "v07"
down_revision = "v06"

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "server_events",
        sa.Column("id", ID, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("job_id", ID),
        sa.Column("name", sa.String(128)),
        sa.Column("grp", sa.String(128)),
        sa.Column("agent", sa.String(64)),
        sa.Column("host", sa.String(255)),
        sa.Column("pilot", sa.String(128)),
        sa.Column("site", sa.String(128)),
        sa.Column("from_state", sa.String(24)),
        sa.Column("to_state", sa.String(24), nullable=False),
        sa.Column("message", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("server_events")
