"""Schema 12: federation (server/remote_sites.py): a job's alternative sites (a JSON list, NULL
for one site) and when the remote site it was forwarded to said it has the job."""
import sqlalchemy as sa
from alembic import op

revision = "v12"
down_revision = "v11"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("site_choices", sa.Text))
    op.add_column("jobs", sa.Column("remote_accepted", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("remote_accepted")
        batch.drop_column("site_choices")
