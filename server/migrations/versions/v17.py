"""Schema 17: on PostgreSQL the jobs table keeps half of each page free (fillfactor 50), so that
a lease is a HOT update (it writes no index entry).

A job's row is updated two or three times in its life (leased, started, ended). An update whose
new version fits on the row's own page and changes no indexed column (the lease: attempts,
agent, run_leased) is HOT: no new entry in any of the table's indexes. At fillfactor 100 (the
default, pages full from the jobs' COPY) 1 % of the updates were HOT and index inserts were over
half of PostgreSQL's CPU in a dispatch turn. 50,000 jobs leased and ended in turns of 512 (HOT,
tasks/s of the database's writes alone, runs alternated): fillfactor 100: 1 %, 18,300-20,700;
70: 21 %; 60: 31 %, 19,200-21,700; 50: 48 % (every lease), 20,200-25,700. The table of jobs that
have run ends smaller (3,015 pages against 3,806: a new version stays on its page instead of
going to the table's end); a backlog of queued jobs takes twice the pages until it runs. The
setting applies to pages written from now on; no row is moved. SQLite has no such setting."""
from alembic import op

revision = "v17"
down_revision = "v16"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs SET (fillfactor = 50)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs RESET (fillfactor)")
