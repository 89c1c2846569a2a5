"""Schema 13: indexes for keyset paging of `job ls --sort` and the web's job table by each
sortable column (the id breaks ties, so a page boundary is one index seek) and for the
utilization and usage scans' lower bound (ix_jobs_ended_id); (app_id, id) replaces (app_id):
on PostgreSQL equal keys are not in id order."""
from alembic import op

revision = "v13"
down_revision = "v12"


def upgrade() -> None:
    op.create_index("ix_jobs_app_id", "jobs", ["app_id", "id"])
    op.drop_index("ix_jobs_app", table_name="jobs")
    op.create_index("ix_jobs_name_id", "jobs", ["name", "id"])
    op.create_index("ix_jobs_state_time_id", "jobs", ["state_time", "id"])
    op.create_index("ix_jobs_ended_id", "jobs", ["ended", "id"])


def downgrade() -> None:
    for name in ("ix_jobs_ended_id", "ix_jobs_state_time_id", "ix_jobs_name_id"):
        op.drop_index(name, table_name="jobs")
    op.create_index("ix_jobs_app", "jobs", ["app_id"])
    op.drop_index("ix_jobs_app_id", table_name="jobs")
