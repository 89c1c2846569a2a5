"""The job_tags table (schema 15): a row per (tag, job), kept in step with ``jobs.tags``.

``jobs.tags`` (",a,b,") stays the record and what ``LIKE`` matches; job_tags is its index: a
tag held by few jobs is found by a seek on (tag, job_id) instead of a LIKE on every row (a
tag on 100 of 1M jobs: 70-240 ms per page before). A tag held by many is still read with the
LIKE from the newest row on (the first page's rows are near the top; an IN over a million
ids would be built whole first). Written at submit (ops.insert_jobs), by a user's alter of
tags and by job rm, in the request's own transaction; the dispatch never writes tags.
"""
from __future__ import annotations

from sqlalchemy import bindparam, delete, func, select

from .db import job_tags, jobs
from .jobs import tags_list

#: Up to this many jobs a tag filter is the job_tags seek; past it, the LIKE.
SEEK_MAX = 5_000


def pairs(job_id: int, stored: str | None) -> list[dict]:
    return [{"tag": t, "job_id": job_id} for t in dict.fromkeys(tags_list(stored or ""))]


def add(conn, rows: list[dict]) -> None:
    if not rows:
        return
    # the driver's executemany with plain tuples: SQLAlchemy's insert of dicts cost ~0.015 ms
    # a row, a third of a whole job's submit (bench/tag_write_cost.py)
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    conn.exec_driver_sql(f"INSERT INTO job_tags (tag, job_id) VALUES ({mark}, {mark})",
                         [(r["tag"], r["job_id"]) for r in rows])


def remove(conn, rows: list[dict]) -> None:
    """Delete these (tag, job_id) rows, on the primary key (no index on job_id to keep)."""
    if rows:
        conn.execute(delete(job_tags).where(job_tags.c.tag == bindparam("b_tag"),
                                            job_tags.c.job_id == bindparam("b_job")),
                     [{"b_tag": r["tag"], "b_job": r["job_id"]} for r in rows])


def held(conn, tag: str) -> int:
    """How many jobs hold the tag, counted up to SEEK_MAX + 1 (on the primary key)."""
    return conn.execute(select(func.count()).select_from(
        select(job_tags.c.job_id).where(job_tags.c.tag == tag).limit(SEEK_MAX + 1)
        .subquery())).scalar()


def condition(conn, tag: str):
    """The SQL condition "the job has this tag", by the cheaper road for it."""
    if held(conn, tag) <= SEEK_MAX:
        return jobs.c.id.in_(select(job_tags.c.job_id).where(job_tags.c.tag == tag))
    # autoescape: '_' is a name character and a LIKE wildcard ("m_x" found "mAx" too)
    return jobs.c.tags.contains("," + tag + ",", autoescape=True)
