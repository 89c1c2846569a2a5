"""The usage cache of closed days (schema 15, server/usage_cache.py): a real server on a
database of jobs that ran over the last week (written into the tables, as bench/usage_queries
does: agents cannot run jobs days ago); every report from the cache must equal the same
report read from the jobs (cache=False), before and after a user's kill, retry, alter, rm,
a gc, and a job that was not final when its day was summed becoming final."""
from __future__ import annotations

import math
import random
import time

import pytest
from sqlalchemy import text

from conftest import ServerHandle
from pilotfish.server.db import make_engine

DAY = 86400.0
BYS = (["site", "day"], ["app", "month"], ["group"], ["site", "app", "group", "day"], [],
       ["site"], ["group", "month"])


def _fill(url: str, now: float) -> dict:
    """~300 jobs over the last 6 days and today: several sites, apps and groups, attempts
    across midnight, earlier attempts, jobs not final with an ended attempt, jobs never run."""
    eng = make_engine(url)
    rnd = random.Random(15)
    d0 = math.floor(now / DAY) - 6
    agents = [{"id": f"ag{i}", "host": f"h{i}", "pid": i + 1, "site": f"s{i % 3}",
               "pilot": f"p{i}", "cores": 8, "gpus": 0, "memory": 2**30, "started": d0 * DAY,
               "last_seen": now, "state": "EXITED", "tasks_done": 0, "node": f"n{i}"}
              for i in range(6)]
    apps = [{"id": i, "name": f"app{i}", "description": "", "executable": "/bin/true",
             "args": "[]", "parameters": "{}", "environment": "{}", "resources": "{}",
             "created": d0 * DAY} for i in (1, 2)]
    jobs, atts = [], []
    special = {}
    for j in range(1, 301):
        end = rnd.uniform(d0 * DAY, now - 60)
        start = end - rnd.uniform(60, 5 * 3600)  # many cross a midnight
        if j % 37 == 0:  # across midnight for sure
            mid = math.floor(end / DAY) * DAY
            start, end = mid - 1800, min(mid + 1800, now - 60)
        state = rnd.choice(["JOB_FINISHED"] * 6 + ["FAILED", "USER_KILLED"])
        agent = rnd.choice(agents + [None])
        attempts = 1
        if j % 10 == 0:
            state = "RESTART_READY"
        elif j % 23 == 0:
            state = "POSTPROCESSED"
        if j % 7 == 0:  # an earlier attempt
            attempts = 2
            atts.append({"job_id": j, "attempt": 1, "agent": rnd.choice(agents)["id"],
                         "host": "h", "node": "n", "pilot": "p", "leased": start - 900,
                         "started": start - 800, "ended": start - 100, "state": "RUN_FAILED"})
        never = j % 19 == 0
        if never:
            state, start, end, attempts, agent = "READY", None, None, 0, None
        jobs.append({"id": j, "name": f"j{j}", "description": "", "app_id": 1 + j % 2,
                     "site": rnd.choice([None, "asked"]), "num_nodes": 1,
                     "processes_per_node": 1, "cpus_per_process": rnd.choice((1, 2, 4)),
                     "gpus_per_process": 0, "parameters": "{}",
                     "group_identifier": rnd.choice(["gA", "gB", None]), "tags": "",
                     "priority": 0, "max_retries": 3, "retries": attempts - 1,
                     "attempts": attempts, "state": state, "state_time": end or now,
                     "created": (start or now) - 1000, "started": start, "ended": end,
                     "exit_code": 0, "workdir": f"w/{j}",
                     "run_agent": agent["id"] if agent and not never else None,
                     "run_leased": start, "run_state": state})
        if state == "RESTART_READY" and end and end < (math.floor(now / DAY) - 1) * DAY:
            special.setdefault("pending", j)
        if state == "FAILED" and end and end < (math.floor(now / DAY) - 1) * DAY:
            special.setdefault("failed", j)
        if state == "JOB_FINISHED" and end and end < (math.floor(now / DAY) - 1) * DAY:
            special.setdefault("finished", []).append(j)
    with eng.begin() as conn:
        conn.execute(text("INSERT INTO agents (id, host, pid, site, pilot, cores, gpus, memory, "
                          "started, last_seen, state, tasks_done, node) VALUES (:id, :host, "
                          ":pid, :site, :pilot, :cores, :gpus, :memory, :started, :last_seen, "
                          ":state, :tasks_done, :node)"), agents)
        conn.execute(text("INSERT INTO apps (id, name, description, executable, args, "
                          "parameters, environment, resources, created) VALUES (:id, :name, "
                          ":description, :executable, :args, :parameters, :environment, "
                          ":resources, :created)"), apps)
        cols = list(jobs[0])
        conn.execute(text(f"INSERT INTO jobs ({', '.join(cols)}) VALUES "
                          f"({', '.join(':' + c for c in cols)})"), jobs)
        cols = list(atts[0])
        conn.execute(text(f"INSERT INTO job_attempts ({', '.join(cols)}) VALUES "
                          f"({', '.join(':' + c for c in cols)})"), atts)
    eng.dispose()
    return special


def _table(r: dict) -> dict:
    out = {}
    for x in r["rows"]:
        key = tuple(x.get(k) for k in r["by"])
        assert key not in out
        out[key] = x
    return out


def _same(c, by, since=None, until=None) -> dict:
    """The report from the cache equals the one from the jobs (core-hours to 1e-9)."""
    a = c.usage(by=by, since=since, until=until)
    b = c.usage(by=by, since=a["since"], until=a["until"], cache=False)
    ta, tb = _table(a), _table(b)
    assert ta.keys() == tb.keys(), by
    for k in ta:
        for m in ("jobs", "finished", "attempts"):
            assert ta[k][m] == tb[k][m], (by, k, m)
        assert ta[k]["core_hours"] == pytest.approx(tb[k]["core_hours"], rel=1e-9, abs=1e-9)
    return a


def _all_same(c, now):
    d = math.floor(now / DAY)
    for by in BYS:
        _same(c, by)
    # edges that are not midnights; a range all in the past; one of today only
    _same(c, ["site", "group", "day"], (d - 5.5) * DAY, now)
    _same(c, ["app", "day"], (d - 4.7) * DAY, (d - 1.3) * DAY)
    _same(c, ["site", "day"], d * DAY + 1, now)


def _cached_days(url: str) -> int:
    eng = make_engine(url)
    with eng.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM usage_days")).scalar()
    eng.dispose()
    return n


def _check(home, url):
    now = time.time()
    special = _fill(url, now)
    s = ServerHandle(home, url).start()
    try:
        c = s.client()
        _all_same(c, now)
        assert _cached_days(url) >= 5  # the closed days of the default range
        r = c.usage(by="site,day")  # from the cache: a request or two for the closed days
        assert r["requests"] <= 4
        _all_same(c, now)  # again, read back
        fin = special["finished"]
        c.remove_jobs({"ids": [fin[0]]})
        _all_same(c, now)
        c.retry_jobs({"ids": [special["failed"]]})
        _all_same(c, now)
        c.alter_jobs({"ids": [fin[1]]}, group_identifier="gZ", cpus_per_process=3)
        _all_same(c, now)
        c.kill_jobs({"ids": [special["pending"]]})
        _all_same(c, now)
        c.call("gc", before=time.time(), prune=True, limit=2000)
        _all_same(c, now)
    finally:
        s.stop()
    # a job not final when its day was summed becomes final without a user's change (a site
    # stager's stage-out, here written while the server is down): read from its row
    eng = make_engine(url)
    with eng.begin() as conn:
        pend = conn.execute(text("SELECT pending FROM usage_days WHERE pending NOT IN "
                                 "('[]', 'null')")).scalars().all()
        assert pend
        import json
        ids = [i for p in pend for i in json.loads(p)]
        conn.execute(text("UPDATE jobs SET state = 'JOB_FINISHED' WHERE id = :i"),
                     [{"i": i} for i in ids])
    eng.dispose()
    s = ServerHandle(home, url).start()
    try:
        _all_same(s.client(), now)
    finally:
        s.stop()


def test_usage_from_the_cache_equals_usage_from_the_jobs(home):
    _check(home, f"sqlite:///{home / 'pilotfish.db'}")


def test_usage_cache_on_postgresql(pg_url, home):
    _check(home, pg_url)
