"""Schema 11: jobs.staged, a remote input the site stager placed in its site's staging
directory for the agent that takes the job (JSON: site, name, bytes, sha256; NULL else)."""
import sqlalchemy as sa
from alembic import op

revision = "v11"
down_revision = "v10"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("staged", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("staged")
