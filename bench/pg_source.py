#!/usr/bin/env python3
"""``pilotfish source pg``: how soon a pulse becomes a job, and how fast a backlog is caught up.

A fresh server (SQLite) and a scratch PostgreSQL database with a ``pulses`` table whose trigger
NOTIFYs ``row_to_json(NEW)``; a real source process (``--json``: one line per pulse added).

* ``notify_to_job_ms``: N pulses, one at a time: the clock starts before the INSERT (its
  commit sends the NOTIFY) and stops when the source prints the pulse's job line, which it
  does after the server answered ``job_add``. p50 is ``value``; p99 is given too. Baseline
  ``add_job_ms``: one ``Client.add_jobs([job])`` round trip of the same job, from this process.
* ``catch_up_rows_per_s``: with the source stopped, M rows are inserted in one transaction;
  the clock runs from the first caught-up line to the last (the source's start-up is left out).
  Each row is its own ``job_add`` plus two state-file writes (fsync'd): the price of "never
  twice".
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

APP = {"name": "efit", "executable": "/bin/true", "args": ["{shot}"],
       "parameters": {"shot": {"type": "int"}}}
TABLE_SQL = """
CREATE TABLE pulses (shot bigint PRIMARY KEY, note text);
CREATE FUNCTION pulse_notify() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN PERFORM pg_notify('pulse_end', row_to_json(NEW)::text); RETURN NEW; END $$;
CREATE TRIGGER pulse_end AFTER INSERT ON pulses FOR EACH ROW EXECUTE FUNCTION pulse_notify();
"""
TEMPLATE = {"source": "bench", "id": "shot", "fields": {"shot": "shot", "note": None},
            "example": {"shot": 1, "note": "x"}, "catch_up_table": "pulses",
            "job": {"application": "efit", "name": "efit-{shot}"}}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Source:
    def __init__(self, home: Path, dsn: str) -> None:
        tmpl = home / "efit.yaml"
        tmpl.write_text(json.dumps(TEMPLATE))
        self.cmd = [*C.pilotfish_cmd(), "--home", str(home), "source", "pg", "--dsn", dsn,
                    "--channel", "pulse_end", "--template", str(tmpl), "--json", "-q",
                    "--from-id", "-1"]  # the warm-up row 0 may land before the first read
        self.log = home / "source.log"
        self.p: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.p = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=err,
                                      stdin=subprocess.DEVNULL, text=True, bufsize=1)

    def line(self) -> dict:
        text = self.p.stdout.readline()
        if not text:
            raise RuntimeError(f"the source ended:\n{C._tail(self.log)}")
        return json.loads(text)

    def stop(self) -> None:
        if self.p and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def run_once(a) -> tuple[list[float], float, float]:
    import psycopg
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="pg-source") as env:
        env.client.add_app(APP)
        pulses = C.ScratchDB("postgres", env.home)
        src = Source(env.home, pulses.url.replace("postgresql+psycopg://", "postgresql://"))
        try:
            dsn = pulses.url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(TABLE_SQL)
                src.start()
                # the first pulse also waits for the source's start-up: not counted
                conn.execute("INSERT INTO pulses VALUES (0, 'warm-up')")
                src.line()
                lat = []
                for shot in range(1, a.n + 1):
                    t0 = time.perf_counter()
                    conn.execute("INSERT INTO pulses VALUES (%s, 'x')", (shot,))
                    got = src.line()
                    lat.append((time.perf_counter() - t0) * 1000)
                    assert got["id"] == shot and "job" in got, got
                src.stop()
                with conn.transaction():
                    with conn.cursor() as cur:
                        cur.executemany("INSERT INTO pulses VALUES (%s, 'y')",
                                        [(a.n + i,) for i in range(1, a.m + 1)])
                src.start()
                src.line()
                t0 = time.perf_counter()
                for _ in range(a.m - 1):
                    src.line()
                rate = (a.m - 1) / (time.perf_counter() - t0)
            base = []
            job = {"name": "base", "application": "efit", "parameters": {"shot": 1}}
            for _ in range(a.n):
                t0 = time.perf_counter()
                env.client.add_jobs([job])
                base.append((time.perf_counter() - t0) * 1000)
            return lat, rate, statistics.median(base)
        finally:
            src.stop()
            pulses.drop()


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=200, help="Live pulses (default: %(default)s).")
    p.add_argument("--m", type=int, default=2000, help="Rows to catch up (default: "
                   "%(default)s).")
    a = p.parse_args()
    C.set_bench("pg_source")
    C.install_signal_handlers()
    ctx = C.machine(a.tmp)
    runs = []
    for r in range(a.repeat):
        C.log(f"run {r + 1}/{a.repeat}: {a.n} live pulses, {a.m} rows to catch up")
        runs.append(run_once(a))
    p50s = [statistics.median(lat) for lat, _, _ in runs]
    p99s = [pct(lat, 0.99) for lat, _, _ in runs]
    bases = [b for _, _, b in runs]
    rates = [r for _, r, _ in runs]
    C.emit("notify_to_job_ms", statistics.median(p50s), unit="ms", values=p50s,
           p99=statistics.median(p99s), p99_values=p99s, baseline_add_job_ms=statistics.median(
               bases), n=a.n, repeat=a.repeat, db="sqlite", **ctx)
    C.emit("catch_up_rows_per_s", statistics.median(rates), unit="rows/s", values=rates,
           n=a.m, repeat=a.repeat, db="sqlite", **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
