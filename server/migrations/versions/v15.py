"""Schema 15: the usage cache, job_tags and the site filter's index. usage_days/usage_sums hold the
usage of closed UTC days (server/usage_cache.py), so a report over months reads a row per day
and (site, app, group) instead of every job; ix_jobs_site_id (partial: jobs with a site) lets
the job table filtered by site seek instead of reading every job; ix_jobs_group becomes
ix_jobs_group_id (group, id), so PostgreSQL reads a group's newest jobs in order (SQLite's
index held the rowid already) instead of every job of the group; job_tags (tag, job_id), filled
from the jobs' tags, so a rare tag's jobs are a seek instead of a LIKE on every row."""
import sqlalchemy as sa
from alembic import op

revision = "v15"
down_revision = "v14"


def upgrade() -> None:
    op.create_table(
        "job_tags",
        sa.Column("tag", sa.String(128), primary_key=True),
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  primary_key=True, autoincrement=False))
    # the tags of the jobs there are (stored ",a,b,"), a batch at a time
    conn = op.get_bind()
    t = sa.table("job_tags", sa.column("tag"), sa.column("job_id"))
    last = 0
    while True:
        rows = conn.execute(sa.text(
            "SELECT id, tags FROM jobs WHERE id > :last AND tags IS NOT NULL AND tags != '' "
            "ORDER BY id LIMIT 10000"), {"last": last}).all()
        if not rows:
            break
        pairs = [{"tag": tag, "job_id": i} for i, tags in rows
                 for tag in dict.fromkeys(x for x in tags.split(",") if x)]
        if pairs:
            conn.execute(t.insert(), pairs)
        last = rows[-1][0]
    op.create_table(
        "usage_days",
        sa.Column("day", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("built", sa.Float, nullable=False),
        sa.Column("pending", sa.Text, nullable=False))
    op.create_table(
        "usage_sums",
        sa.Column("day", sa.Integer, nullable=False),
        sa.Column("site", sa.String(128)),
        sa.Column("app_id", sa.Integer),
        sa.Column("group_identifier", sa.String(128)),
        sa.Column("jobs", sa.Integer, nullable=False),
        sa.Column("finished", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("core_seconds", sa.Float, nullable=False))
    op.create_index("ix_usage_sums_day", "usage_sums", ["day"])
    op.drop_index("ix_jobs_group", table_name="jobs")
    op.create_index("ix_jobs_group_id", "jobs", ["group_identifier", "id"])
    where = sa.text("site IS NOT NULL")
    op.create_index("ix_jobs_site_id", "jobs", ["site", "id"], sqlite_where=where,
                    postgresql_where=where)


def downgrade() -> None:
    op.drop_table("job_tags")
    op.drop_index("ix_jobs_site_id", table_name="jobs")
    op.drop_index("ix_jobs_group_id", table_name="jobs")
    op.create_index("ix_jobs_group", "jobs", ["group_identifier"])
    op.drop_index("ix_usage_sums_day", table_name="usage_sums")
    op.drop_table("usage_sums")
    op.drop_table("usage_days")
