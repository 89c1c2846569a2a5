"""Schema 16: lighter writes per finished job. job_events.via stores a letter per state passed
through (server/states.py VIA_CODE) instead of comma-joined names: a successful attempt's event
row shrinks from about 140 to 70 bytes. ix_jobs_ended_id becomes partial (jobs that have
ended): a job no longer leaves a NULL entry at the index's front when it ends, where those
deletes, one per job, dirtied pages in every dispatch turn; every query on ended (a range, or
the ended sort) excludes NULL anyway."""
import sqlalchemy as sa
from alembic import op

revision = "v16"
down_revision = "v15"

#: frozen copy of states.VIA_CODE at schema 16
LETTER = {
    "CREATED": "A", "AWAITING_PARENTS": "B", "READY": "C", "STAGED_IN": "D",
    "PREPROCESSED": "E", "RUNNING": "F", "EXECUTION_FINISHED": "G", "POSTPROCESSED": "H",
    "STAGED_OUT": "I", "JOB_FINISHED": "J", "STAGE_IN_FAILED": "K", "PREPROCESS_FAILED": "L",
    "RUN_FAILED": "M", "RUN_TIMEOUT": "N", "POSTPROCESS_FAILED": "O", "STAGE_OUT_FAILED": "P",
    "RESTART_READY": "Q", "FAILED": "R", "USER_KILLED": "S",
}
NAME = {c: s for s, c in LETTER.items()}


def _recode(mapping) -> None:
    """Rewrite every via through ``mapping`` (old text -> new): one pass over the events, one
    CASE arm per distinct path (a handful: the agents' usual paths)."""
    conn = op.get_bind()
    olds = [r[0] for r in conn.execute(sa.text(
        "SELECT DISTINCT via FROM job_events WHERE via IS NOT NULL"))]
    pairs = [(old, new) for old in olds if (new := mapping(old)) != old]
    for i in range(0, len(pairs), 200):  # (bound parameters per statement stay few)
        part = pairs[i:i + 200]
        arms = " ".join(f"WHEN :o{k} THEN :n{k}" for k in range(len(part)))
        params = {f"o{k}": o for k, (o, _) in enumerate(part)}
        params.update({f"n{k}": n for k, (_, n) in enumerate(part)})
        conn.execute(sa.text(
            f"UPDATE job_events SET via = CASE via {arms} END WHERE via IN "
            f"({', '.join(f':o{k}' for k in range(len(part)))})"), params)


def _to_letters(text: str) -> str:
    names = text.split(",")
    if all(n in LETTER for n in names):
        return "".join(LETTER[n] for n in names)
    return text  # (not a path of states: left as it is)


def _to_names(code: str) -> str:
    if all(c in NAME for c in code):
        return ",".join(NAME[c] for c in code)
    return code


def upgrade() -> None:
    _recode(_to_letters)
    op.drop_index("ix_jobs_ended_id", table_name="jobs")
    where = sa.text("ended IS NOT NULL")
    op.create_index("ix_jobs_ended_id", "jobs", ["ended", "id"], sqlite_where=where,
                    postgresql_where=where)


def downgrade() -> None:
    op.drop_index("ix_jobs_ended_id", table_name="jobs")
    op.create_index("ix_jobs_ended_id", "jobs", ["ended", "id"])
    _recode(_to_names)
