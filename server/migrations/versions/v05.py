"""Schema 5: jobs.owner (the key that added a job; older rows NULL, which only an admin may
change) and agent_keys (which CurveZMQ key an agent id belongs to)."""
import sqlalchemy as sa
from alembic import op

revision = "v05"
down_revision = "v04"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", sa.String(64)))
    op.create_table(
        "agent_keys",
        sa.Column("agent_id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.String(40), nullable=False),
        sa.Column("key_name", sa.String(64)),
        sa.Column("bound", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agent_keys")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("owner")
