#!/usr/bin/env python3
"""What schema 13's sort indexes cost the dispatch path's writes, on a big SQLite database.

Two copies of one database of ``--total`` jobs that ran (bench/usage_queries.py's build):
"with" has schema 13's indexes, "without" has them dropped and (app_id) back: schema 12's
shape. On each, alternately (ABAB..., ``--rounds``), the writes a job's life makes on the
server, in turns of 1,000 jobs per transaction: insert, lease (attempts, agent, run_*),
six state changes (state, state_time) and the end (ended, exit_code, run_state) — the
columns the new indexes hold. One JSON line: the median time per job of each and their ratio
(without / with: 1.0 costs nothing; 0.8: the indexes add 25 %). The database only, not the
server's Python: an upper bound on what W2 can lose to them.

``--schema 15``: instead, "with" is schema 15 (ix_jobs_site_id (site, id) where a site is set,
ix_jobs_group_id (group, id)) and "without" schema 14's shape (ix_jobs_group (group)), the jobs
inserted with a site and a group (the case the two indexes cost something). Figure
``db_write_ms_per_job_schema15``.

Usage: bench/index_write_cost.py [--total 1000000] [--jobs 20000] [--rounds 3] [--tmp DIR]
"""
from __future__ import annotations

import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

NEW = ("ix_jobs_app_id", "ix_jobs_name_id", "ix_jobs_state_time_id", "ix_jobs_ended_id")
PATH = ("STAGED_IN", "PREPROCESSED", "RUNNING", "EXECUTION_FINISHED", "POSTPROCESSED",
        "STAGED_OUT")
TURN = 1000


def connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    for p in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-65536"):
        con.execute(f"PRAGMA {p}")
    return con


def life(con: sqlite3.Connection, first: int, n: int, placed: bool = False) -> float:
    """Seconds for n jobs' writes from id ``first``, a transaction per TURN jobs per step.
    ``placed``: the jobs have a site and a group (schema 15's indexes hold them)."""
    t0 = time.perf_counter()
    now = time.time()
    for base in range(first, first + n, TURN):
        ids = range(base, min(base + TURN, first + n))
        con.execute("BEGIN")
        con.executemany(
            "INSERT INTO jobs (id, name, description, app_id, num_nodes, processes_per_node, "
            "cpus_per_process, gpus_per_process, parameters, tags, priority, max_retries, "
            "retries, attempts, state, state_time, created, workdir, site, group_identifier) "
            "VALUES (?, ?, '', 1, 1, 1, 1, 0, '{}', '', 0, 3, 0, 0, 'READY', ?, ?, ?, ?, ?)",
            [(i, f"job{i}", now, now, f"w/{i}", f"s{i % 10}" if placed else None,
              f"g{i % 50}" if placed else None) for i in ids])
        con.execute("COMMIT")
        con.execute("BEGIN")
        con.executemany("UPDATE jobs SET attempts=1, agent='a1', run_agent='a1', "
                        "run_leased=? WHERE id=?", [(now, i) for i in ids])
        con.execute("COMMIT")
        for k, st in enumerate(PATH):
            con.execute("BEGIN")
            con.executemany("UPDATE jobs SET state=?, state_time=? WHERE id=?",
                            [(st, now + k, i) for i in ids])
            con.execute("COMMIT")
        con.execute("BEGIN")
        con.executemany("UPDATE jobs SET state='JOB_FINISHED', state_time=?, ended=?, "
                        "exit_code=0, run_state='JOB_FINISHED', agent=NULL WHERE id=?",
                        [(now + 9, now + 9, i) for i in ids])
        con.execute("COMMIT")
    return time.perf_counter() - t0


def main() -> int:
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--total", type=int, default=1_000_000)
    p.add_argument("--jobs", type=int, default=20_000, help="Jobs per measured run.")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--schema", type=int, choices=(13, 15), default=13, help="The indexes "
                   "compared: schema 13's sort indexes (default) or schema 15's site/group.")
    a = p.parse_args()
    C.set_bench("index_write_cost")
    from usage_queries import build
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="pilotfish-bench-ix-", dir=a.tmp))
    try:
        with_db, without_db = tmp / "with.db", tmp / "without.db"
        build(f"sqlite:///{with_db}", with_db, a.total, time.time())
        shutil.copy(with_db, without_db)
        con = connect(without_db)
        if a.schema == 15:
            con.execute("DROP INDEX ix_jobs_site_id")
            con.execute("DROP INDEX ix_jobs_group_id")
            con.execute("CREATE INDEX ix_jobs_group ON jobs (group_identifier)")
        else:
            for ix in NEW:
                con.execute(f"DROP INDEX {ix}")
            con.execute("CREATE INDEX ix_jobs_app ON jobs (app_id)")
        con.close()
        cons = {"with": connect(with_db), "without": connect(without_db)}
        times: dict[str, list[float]] = {"with": [], "without": []}
        first = a.total + 1
        for r in range(a.rounds):
            for name in (("with", "without") if r % 2 == 0 else ("without", "with")):
                times[name].append(life(cons[name], first, a.jobs, a.schema == 15) / a.jobs)
            first += a.jobs
        w, wo = statistics.median(times["with"]), statistics.median(times["without"])
        C.emit("db_write_ms_per_job" + ("_schema15" if a.schema == 15 else ""), w * 1000,
               compared="schema 15 (site, group indexes) vs schema 14's shape" if a.schema == 15
               else "schema 13's sort indexes vs schema 12's shape", unit="ms",
               baseline_without_ms=wo * 1000,
               ratio_without_over_with=wo / w, values_ms=[x * 1000 for x in times["with"]],
               baseline_values_ms=[x * 1000 for x in times["without"]], n=a.total,
               jobs=a.jobs, rounds=a.rounds, db="sqlite",
               interval="a job's writes (insert, lease, 6 state changes, end) in turns of "
               "1,000 jobs per transaction per step", machine=C.machine(a.tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    C.run(main)
