"""Schema 14: the federation fence (server/remote_sites.py, server/fence.py): at a site, when a
forwarded job was stored held until its forwarder's start (NULL: free to run); at the central,
the cancels of forwarded attempts its sites have not confirmed yet (a JSON list of [site,
attempt]; NULL: none), sent again after a restart. Partial indexes: the few such jobs are
found at start without a scan."""
import sqlalchemy as sa
from alembic import op

revision = "v14"
down_revision = "v13"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("fenced", sa.Float))
    op.add_column("jobs", sa.Column("remote_cancel", sa.Text))
    for name, col in (("ix_jobs_fenced", "fenced"), ("ix_jobs_remote_cancel", "remote_cancel")):
        where = sa.text(f"{col} IS NOT NULL")
        op.create_index(name, "jobs", ["id"], sqlite_where=where, postgresql_where=where)


def downgrade() -> None:
    op.drop_index("ix_jobs_remote_cancel", table_name="jobs")
    op.drop_index("ix_jobs_fenced", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("remote_cancel")
        batch.drop_column("fenced")
