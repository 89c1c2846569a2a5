#!/usr/bin/env python3
"""The event stream: how soon `job wait` returns after the last job ends, and how soon a
follower gets a state change, beside the 0.2 s polling that `job wait` did before.

Figures (seconds; each round is one value, ``value`` is their median):

* ``job_wait_latency`` (``mode`` stream): N jobs of ``sleep D`` on one agent per round;
  ``Client.wait({"ids": ...})`` is called as soon as they are added. Interval: the last job's
  end (``ended``, the agent's clock when the task exited) -> ``Client.wait`` returned in this
  process. Includes the agent's report of the end, the server's turn and commit, the pushed
  answer to the parked ``events`` request and one ``job_counts`` round trip. Also
  ``after_commit`` (the final event's time, the server's clock at the start of the turn that
  committed it -> returned). Baseline (``mode`` poll-0.2s, interleaved): what `job wait` did
  before, ``Client.counts`` every 0.2 s until all are final. Target <= 0.05 s.
* ``job_wait_cli_latency``: the same for the whole ``pilotfish job wait ID...`` command started
  while the jobs run (jobs of ``sleep 2``, so that it has started; its exit as seen by this
  process, so interpreter teardown included).
* ``follow_latency_p50`` / ``_p99`` / ``_max`` at ``--rates`` state changes per second: a
  producer process adds jobs (each addition is one event) at the rate for ``--seconds``;
  ``Client.follow`` in this process. Interval: the event's time (the server's clock at the
  start of the turn that made it, before its commit) -> follow yielded it here. Reference
  targets (the issue's AMQP status figure, whose first leg this is): p50 <= 0.02 s,
  p99 <= 0.2 s at 1,000 changes/s.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from pilotfish.client import FINAL_STATES  # noqa: E402

WAIT_TARGET = 0.05
P50_TARGET, P99_TARGET = 0.02, 0.2

PRODUCER = """
import sys, time
from pilotfish import Client
address, home, rate, seconds, batch = sys.argv[1], sys.argv[2], float(sys.argv[3]), \\
    float(sys.argv[4]), int(sys.argv[5])
c = Client(address, home, timeout=60)
period = batch / rate
n, t0 = 0, time.monotonic()
while time.monotonic() - t0 < seconds:
    c.add_jobs([{"name": f"e{n + i}", "application": "sleep"} for i in range(batch)])
    n += batch
    pause = t0 + n / rate - time.monotonic()
    if pause > 0:
        time.sleep(pause)
print(n, time.monotonic() - t0)
"""


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def poll_wait(c, ids: list[int]) -> None:
    """The old `job wait`: counts every 0.2 s."""
    while True:
        counts = c.counts({"ids": ids})
        if all(s in FINAL_STATES for s in counts):
            return
        time.sleep(0.2)


def ends_of(c, ids: list[int]) -> tuple[float, float]:
    """(the last job's end, the time of the last final event) of ``ids``."""
    ended = max(j["ended"] for j in c.jobs({"ids": ids}, limit=len(ids)))
    return ended, max(c.job(j)["events"][-1]["time"] for j in ids)


def wait_round(env, a, mode: str, tag: str) -> dict:
    c = env.client
    ids = c.add_jobs([{"name": f"{tag}-{i}", "application": "sleep"} for i in range(a.n)])
    if mode == "stream":
        c.wait({"ids": ids}, timeout=600)
    else:
        poll_wait(c, ids)
    back = time.time()
    ended, committed = ends_of(c, ids)
    return {"latency": back - ended, "after_commit": back - committed}


def cli_round(env, a, tag: str) -> dict:
    c = env.client
    # long enough for the command to start and park before they end
    ids = c.add_jobs([{"name": f"{tag}-{i}", "application": "sleep-cli"} for i in range(a.n)])
    p = subprocess.Popen([*C.pilotfish_cmd(), "--home", str(env.home), "job", "wait", "-q",
                          *map(str, ids)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    p.wait(600)
    back = time.time()
    if p.returncode != 0:
        raise RuntimeError(f"job wait failed ({p.returncode}): {p.stderr.read()[-500:]}")
    ended, committed = ends_of(c, ids)
    return {"latency": back - ended, "after_commit": back - committed}


def follow_run(a, rate: float, label: str) -> dict:
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label=label) as env:
        c = env.client
        c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["1"]})
        start = c.status()["events"]["newest"]
        lat: list[float] = []
        stop = threading.Event()

        def follow():  # the loop of Client.follow, with a way out
            from pilotfish.client import Client
            with Client(env.address, env.home, timeout=60) as fc:
                cursor = start
                while not stop.is_set():
                    r = fc.events(since=cursor, wait=1.0)
                    now = time.time()
                    lat.extend(now - e["time"] for e in r["events"])
                    cursor = r["cursor"]

        t = threading.Thread(target=follow, daemon=True)
        t.start()
        time.sleep(0.3)  # the follower is parked
        batch = max(1, int(rate // 200))  # one request every 5 ms or more
        out = subprocess.run([sys.executable, "-c", PRODUCER, env.address, str(env.home),
                              str(rate), str(a.seconds), str(batch)],
                             capture_output=True, text=True, check=True)
        n, secs = out.stdout.split()
        deadline = time.monotonic() + 60
        while len(lat) < int(n) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        t.join(10)
        if len(lat) < int(n):
            raise RuntimeError(f"the follower got {len(lat)} of {n} events")
        return {"lat": lat, "n": int(n), "rate": int(n) / float(secs), "batch": batch}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=4, help="Jobs per wait round (default: %(default)s).")
    p.add_argument("--duration", type=float, default=0.3,
                   help="Seconds each job sleeps (default: %(default)s).")
    p.add_argument("--rounds", type=int, default=10,
                   help="Wait rounds per repeat and mode (default: %(default)s).")
    p.add_argument("--cli-rounds", type=int, default=3,
                   help="`pilotfish job wait` rounds per repeat (default: %(default)s).")
    p.add_argument("--rates", default="50,1000",
                   help="State changes per second for the follow figures (default: "
                        "%(default)s).")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="Seconds of changes per follow run (default: %(default)s).")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--only", choices=("wait", "follow"), help="One part only.")
    a = p.parse_args()
    C.set_bench("events")
    C.install_signal_handlers()
    ctx = C.machine(a.tmp)
    common = dict(db=a.db, repeat=a.repeat, **ctx)
    if a.only != "follow":
        res: dict[str, list[dict]] = {"stream": [], "poll-0.2s": [], "cli": []}
        for r in range(a.repeat):
            with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label=f"wait-r{r + 1}") as env:
                env.client.add_app({"name": "sleep", "executable": "/bin/sleep",
                                    "args": [repr(a.duration)]})
                env.client.add_app({"name": "sleep-cli", "executable": "/bin/sleep",
                                    "args": ["2"]})
                env.start_agent()
                env.wait_agents(1)
                for k in range(a.rounds):
                    for mode in ("poll-0.2s", "stream"):  # interleaved
                        res[mode].append(wait_round(env, a, mode, f"{mode}-{r}-{k}"))
                for k in range(a.cli_rounds):
                    res["cli"].append(cli_round(env, a, f"cli-{r}-{k}"))
            C.log(f"repeat {r + 1}/{a.repeat}: stream median "
                  f"{statistics.median(x['latency'] for x in res['stream']):.4f} s, poll "
                  f"{statistics.median(x['latency'] for x in res['poll-0.2s']):.4f} s")
        base = [x["latency"] for x in res["poll-0.2s"]]
        bmed = C.median(base)
        for figure, mode in (("job_wait_latency", "stream"), ("job_wait_cli_latency", "cli")):
            vals = [x["latency"] for x in res[mode]]
            med = C.median(vals)
            C.emit(figure, med, unit="s", values=vals, p90=pct(vals, 0.9), max=max(vals),
                   after_commit=C.median([x["after_commit"] for x in res[mode]]),
                   mode=mode, baseline="Client.counts every 0.2 s (job wait before the "
                   "event stream)", baseline_value=bmed, baseline_values=base,
                   ratio=C.ratio(med, bmed), target=WAIT_TARGET,
                   meets_target=med <= WAIT_TARGET,
                   interval="last job's end (agent clock) -> " + (
                       "Client.wait returned" if mode == "stream"
                       else "`pilotfish job wait` exited"),
                   n=a.n, duration=a.duration, rounds=len(vals), **common)
    if a.only != "wait":
        for rate in [float(x) for x in a.rates.split(",")]:
            runs = [follow_run(a, rate, f"follow-{rate:g}-r{r + 1}") for r in range(a.repeat)]
            for r, run in enumerate(runs):
                C.log(f"rate {rate:g}/s repeat {r + 1}: {run['n']} events at "
                      f"{run['rate']:.0f}/s, p50 {pct(run['lat'], 0.5):.4f} s, "
                      f"p99 {pct(run['lat'], 0.99):.4f} s")
            for q, figure, target in ((0.5, "follow_latency_p50", P50_TARGET),
                                      (0.99, "follow_latency_p99", P99_TARGET),
                                      (1.0, "follow_latency_max", None)):
                vals = [pct(run["lat"], q) for run in runs]
                med = C.median(vals)
                C.emit(figure, med, unit="s", values=vals, target=target,
                       meets_target=None if target is None else med <= target,
                       rate_asked=rate, rate_achieved=[run["rate"] for run in runs],
                       events=[run["n"] for run in runs], jobs_per_request=runs[0]["batch"],
                       interval="event time (server clock at the start of the turn that made "
                                "it, before its commit) -> Client.follow yielded it",
                       **common)
    return 0


if __name__ == "__main__":
    C.run(main)
