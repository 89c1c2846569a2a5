"""Schema 4: containers (an app's container spec, a job's own image)."""
import sqlalchemy as sa
from alembic import op

revision = "v04"
down_revision = "v03"


def upgrade() -> None:
    op.add_column("apps", sa.Column("container", sa.JSON))
    op.add_column("jobs", sa.Column("image", sa.String(512)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("image")
    with op.batch_alter_table("apps") as batch:
        batch.drop_column("container")
