"""Schema 3: the pilots and sites tables (pilots submitted; site agents and their pause)."""
import sqlalchemy as sa
from alembic import op

revision = "v03"
down_revision = "v02"


def upgrade() -> None:
    op.create_table(
        "pilots",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("site", sa.String(128)),
        sa.Column("scheduler", sa.String(32)),
        sa.Column("batch_id", sa.String(128)),
        sa.Column("nodes", sa.Integer, nullable=False),
        sa.Column("walltime_minutes", sa.Float),
        sa.Column("queue", sa.String(128)),
        sa.Column("project", sa.String(128)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("workdir", sa.Text),
        sa.Column("submitted", sa.Float, nullable=False),
        sa.Column("state_time", sa.Float, nullable=False),
    )
    op.create_table(
        "sites",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("paused", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("updated", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("sites")
    op.drop_table("pilots")
