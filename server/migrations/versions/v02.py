"""Schema 2: where an agent runs (its node, the node's CPUs, its pilot's launcher)."""
import sqlalchemy as sa
from alembic import op

revision = "v02"
down_revision = "v01"


def upgrade() -> None:
    op.add_column("agents", sa.Column("node", sa.String(255)))
    op.add_column("agents", sa.Column("node_cores", sa.Integer))
    op.add_column("agents", sa.Column("launcher", sa.String(32)))


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        for column in ("launcher", "node_cores", "node"):
            batch.drop_column(column)
