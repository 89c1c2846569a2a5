"""Sorting the job list (job_ls ``sort``, `job ls --sort`) with keyset paging, and the
utilization/usage scans' lower bound, on a real server over a database written directly
(jobs with ends, ties, a retried attempt, old jobs still queued): every sort paged through in small pages gives the
rows Python's sort gives; bad sorts and cursors get one-line errors; the bounded scan answers
what the whole scan answers with fewer requests."""
from __future__ import annotations

import json
import random
import time

import pytest

from conftest import ServerHandle, run_cli
from pilotfish.errors import ValidationError
from pilotfish.job_sort import SORTS, cursor_of

NOW = time.time()
DAY = 86400.0
N = 240


def _fill(url: str) -> dict:
    """N jobs in the database (the server stopped): apps zeta (id 1) and alpha (id 2), names
    with repeats, state_times with ties, ended for the finished ones (older ids ended
    earlier, days ago to now), job 230 with an earlier attempt, every 40th queued (never
    run: they must not hold the usage scans back)."""
    from pilotfish.server.db import apps, job_attempts, jobs, make_engine
    rnd = random.Random(13)
    engine = make_engine(url)
    rows, att = [], []
    for i in range(1, N + 1):
        state = ("READY" if i % 40 == 0 else "USER_KILLED" if i % 7 == 0
                 else "FAILED" if i % 11 == 0 else "JOB_FINISHED")
        ran = state != "READY"
        end = NOW - (N - i) / N * 10 * DAY if ran else None
        rows.append(dict(
            id=i, name=f"n{rnd.randrange(30):02d}", description="", app_id=1 + i % 2,
            site="s1", num_nodes=1, processes_per_node=1, cpus_per_process=1 + i % 3,
            gpus_per_process=0, parameters={}, group_identifier=f"g{i % 3}", tags="",
            priority=0, max_retries=0, retries=0, attempts=1 if ran else 0, state=state,
            state_time=float(round(NOW - i // 4 * 60)),  # four jobs per state_time
            created=NOW - 11 * DAY + i, started=end - 300 if ran else None, ended=end,
            workdir=f"w/{i}", run_agent="a1" if ran else None,
            run_leased=end - 301 if ran else None))
    # job 230: its first attempt ended an hour ago, its second a minute ago
    rows[229].update(attempts=2, state="JOB_FINISHED", ended=NOW - 60, started=NOW - 400,
                     run_leased=NOW - 401)
    att.append(dict(job_id=230, attempt=1, agent="a1", leased=NOW - 3700, started=NOW - 3650,
                    ended=NOW - 3600, state="RUN_FAILED"))
    with engine.begin() as conn:
        conn.execute(apps.insert(), [dict(id=k, name=n, description="", executable="/bin/true",
                                          args=[], parameters={}, environment={},
                                          resources={}, created=NOW)
                                     for k, n in ((1, "zeta"), (2, "alpha"))])
        conn.execute(jobs.insert(), rows)
        conn.execute(job_attempts.insert(), att)
    engine.dispose()
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def sorted_world(request, tmp_path_factory):
    home = tmp_path_factory.mktemp("sort") / "home"
    home.mkdir()
    if request.param == "sqlite":
        url = f"sqlite:///{home / 'pilotfish.db'}"
    else:
        url = request.getfixturevalue("pg_module_url")
    rows = _fill(url)
    srv = ServerHandle(home, url).start()
    try:
        with srv.client() as c:
            yield srv, c, rows
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def pg_module_url():
    """A PostgreSQL database for this module (the fixture in conftest is per test)."""
    import uuid

    from conftest import PG_ADMIN_URL, pg_available, require
    require(pg_available(), f"PostgreSQL at {PG_ADMIN_URL}")
    import psycopg
    name = f"pilotfish_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _expected(rows: dict, sort: str, flt=lambda r: True) -> list[int]:
    name, desc = sort.lstrip("-"), sort.startswith("-")
    apps = {1: "zeta", 2: "alpha"}
    key = {"id": lambda r: (r["id"],), "state": lambda r: (r["state"], r["id"]),
           "app": lambda r: (apps[r["app_id"]], r["id"]), "name": lambda r: (r["name"], r["id"]),
           "updated": lambda r: (r["state_time"], r["id"]),
           "ended": lambda r: (r["ended"], r["id"])}[name]
    keep = [r for r in rows.values() if flt(r) and (name != "ended" or r["ended"] is not None)]
    return [r["id"] for r in sorted(keep, key=key, reverse=desc)]


def _page_through(c, sort: str, per: int, flt: dict | None = None) -> list[int]:
    got, after = [], None
    for _ in range(N):
        page = c.jobs(flt, limit=per, sort=sort, after=after)
        got += [r["id"] for r in page]
        if len(page) < per:
            return got
        after = cursor_of(page[-1], sort)
    raise AssertionError("paging did not end")


def test_every_sort_pages_through_like_pythons_sort(sorted_world):
    srv, c, rows = sorted_world
    for name in SORTS:
        for sort in (name, "-" + name):
            assert _page_through(c, sort, 17) == _expected(rows, sort), sort
    # with a filter; the whole list in one page; the old newest flag still works
    fin = lambda r: r["state"] == "JOB_FINISHED"  # noqa: E731
    assert _page_through(c, "-ended", 9, {"state": "JOB_FINISHED"}) == \
        _expected(rows, "-ended", fin)
    assert [r["id"] for r in c.jobs({"group": "g1"}, limit=0, sort="app")] == \
        _expected(rows, "app", lambda r: r["group_identifier"] == "g1")
    assert [r["id"] for r in c.jobs(limit=3, newest=True)] == [N, N - 1, N - 2]


def test_a_big_state_walks_the_sort_index_with_the_same_answer(sorted_world):
    """Past SORT_WALK jobs in the filter's states, job_ls makes the state condition
    unindexed (``state || ''``: a plan choice only). The server takes that path on a million
    jobs (bench/web_pages.py); here the same SQL is run on this database directly, paged."""
    from sqlalchemy import create_engine, select

    from pilotfish.server import job_sort
    from pilotfish.server.db import jobs
    from pilotfish.server.ops import where_of
    srv, c, rows = sorted_world
    engine = create_engine(srv.db_url)
    try:
        with engine.connect() as conn:
            q = select(jobs.c.id, jobs.c.state_time)
            for cond in where_of({"state": ["JOB_FINISHED", "FAILED"]}, None, walk_state=True):
                q = q.where(cond)
            assert "||" in str(q)
            got, after = [], None
            while True:
                page = job_sort.by_column(lambda qq: list(conn.execute(qq)), q, "-updated",
                                          after, 25)
                got += [r.id for r in page]
                if len(page) < 25:
                    break
                after = [page[-1].state_time, page[-1].id]
    finally:
        engine.dispose()
    assert got == _expected(rows, "-updated", lambda r: r["state"] in ("JOB_FINISHED",
                                                                       "FAILED"))
    assert got == [r["id"] for r in c.jobs({"state": ["JOB_FINISHED", "FAILED"]}, limit=0,
                                           sort="-updated")]


def test_bad_sorts_and_cursors_get_one_line_errors(sorted_world):
    srv, c, rows = sorted_world
    for sort in ("priority", "--id", "", "id; DROP TABLE jobs", "-", 5, ["id"]):
        with pytest.raises(ValidationError, match="sort") as e:
            c.call("job_ls", sort=sort)
        assert "\n" not in str(e.value)
    bad = [("name", 3), ("name", ["n01"]), ("name", ["n01", "x"]), ("name", ["n01", 2**64]),
           ("ended", ["soon", 3]), ("ended", [float("inf"), 3]), ("ended", [True, 3]),
           ("id", [1, 2]), ("id", -1), ("name", ["x" * 129, 1]), ("state", ["A\x00", 1])]
    for sort, after in bad:
        with pytest.raises(ValidationError) as e:
            c.call("job_ls", sort=sort, after=after)
        assert "\n" not in str(e.value)
    with pytest.raises(ValidationError, match="sort or newest"):
        c.call("job_ls", sort="name", newest=True)
    with pytest.raises(ValidationError, match="offset"):
        c.call("job_ls", sort="app", offset=3)


def test_job_ls_sort_on_the_command_line(sorted_world):
    srv, c, rows = sorted_world
    r = run_cli(srv.home, "job", "ls", "--sort", "-ended", "--limit", "5", "--json",
                check=True)
    assert [j["id"] for j in json.loads(r.stdout)] == _expected(rows, "-ended")[:5]
    r = run_cli(srv.home, "job", "ls", "--sort", "size")
    assert r.returncode == 2 and "size" in r.stderr


def test_bounded_scans_answer_as_the_whole_scan(sorted_world):
    """Utilization and usage start at the first job that can have run in the range: the same
    answer as reading every job, in fewer requests for a recent range (job 230's earlier
    attempt, an hour ago, is found through its row)."""
    srv, c, rows = sorted_world
    for since in (NOW - 2 * 3600, NOW - 2 * DAY, NOW - 20 * DAY):
        u = c.utilization(since=since, until=NOW + 60, chunk=10)
        whole = c.utilization(since=since, until=NOW + 60, chunk=10, scan_all=True)
        assert {k: v for k, v in u.items() if k != "requests"} == \
            {k: v for k, v in whole.items() if k != "requests"}
        us = c.usage(by="app,day", since=since, until=NOW + 60, chunk=10)
        usw = c.usage(by="app,day", since=since, until=NOW + 60, chunk=10, scan_all=True)
        assert us["rows"] == usw["rows"]
        if since > NOW - DAY:  # jobs 230..240: two requests of 10, not 24; 230 twice, 239
            assert u["requests"] <= 2 < whole["requests"] and u["attempts"] >= 3, (u, whole)
