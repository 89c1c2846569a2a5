#!/usr/bin/env python3
"""W2 with the AMQP bridge publishing every state change, beside W2 without it, in pairs.

Each pair runs W2 (N x /bin/true, one default agent, SQLite, workdirs on the disk of
``--tmp``; the clock from ``Client.add_jobs`` returning to all N JOB_FINISHED seen through
``Client.counts``, as ``bench/w2_true.py`` measures it) twice on fresh servers: once plain,
once with ``pilotfish bridge amqp --exchange X`` (default settings) running beside the server,
publishing to a queue bound to ``#`` on the real RabbitMQ (127.0.0.1:5672, guest/guest) that
keeps what it gets, counted by the broker (a consumer would be a production system elsewhere,
not on these two cores). The order alternates from pair to pair.

Figures: ``w2_with_bridge_ratio`` (geometric mean over pairs of rate with / rate without;
target >= 0.95), with both rates per pair, ``status_lag`` (the last job final -> the
queue holding a message for every job event) and the CPU seconds of the bridge, the broker and
this process, and of the server and agents, with and without.
"""
from __future__ import annotations

import math
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from amqp import broker, start_bridge, stop_bridge, wait_log  # noqa: E402

TARGET = 0.95


def w2(a, bridge: bool) -> dict:
    tag = f"pfw2.{uuid.uuid4().hex[:8]}"
    exchange, watch = f"{tag}.status", f"{tag}.watch"
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="w2-bridge" if bridge else "w2") \
            as env:
        c = env.client
        c.add_app({"name": "true", "executable": "/bin/true"})
        env.start_agent()
        env.wait_agents(1)
        p = conn = None
        if bridge:
            # the status messages wait in a bound queue, counted by the broker: a consumer
            # would be a production system on another machine, not on these two cores
            conn = broker()
            ch = conn.channel()
            ch.exchange_declare(exchange, "topic", durable=True)
            ch.queue_declare(watch, durable=True)
            ch.queue_bind(watch, exchange, "#")
            p, log = start_bridge(env, "--exchange", exchange, "--state-dir",
                                  str(env.home / "bridge-state"))
            wait_log(log, "publishing to exchange")
        try:
            jobs = [{"name": f"t{i}", "application": "true"} for i in range(a.n)]
            before = others(p)
            pids = {**C.env_pids(env), **({"bridge": p.pid} if p is not None else {})}
            with C.profile(a, "w2-bridge" if bridge else "w2", pids), C.CpuMeter(env) as cpu:
                c.add_jobs(jobs)
                t1 = time.perf_counter()
                t2, counts = C.wait_final(c, a.n, check=env.check_agents)
            after = others(p)
            extra = {k: round(after[k] - before[k], 3) for k in after if k in before}
            lag = None
            if conn is not None:  # every job event published (counted on the server after)
                want = job_events(c)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    got = ch.queue_declare(watch, durable=True, passive=True).method.message_count
                    if got >= want:
                        lag = time.perf_counter() - t2
                        break
                    time.sleep(0.01)
        finally:
            if p is not None:
                stop_bridge(p)
            if conn is not None:
                ch.queue_delete(watch)
                ch.exchange_delete(exchange)
                conn.close()
    finished = counts.get("JOB_FINISHED", 0)
    return {"tps": a.n / (t2 - t1), "finished": finished, "status_lag": lag,
            "cpu_s": extra, **cpu.summary()}


def job_events(c) -> int:
    """How many job state changes the server has recorded (each is one status message)."""
    n, since = 0, 0
    while True:
        page = c.events(since=since, limit=1000)
        n += sum(1 for e in page["events"] if e.get("job") is not None and e.get("to"))
        if not page["events"]:
            return n
        since = page["cursor"]


def others(bridge) -> dict[str, float]:
    """CPU seconds so far of the bridge, the broker (beam.smp) and this process (its status
    consumer thread; its polls of the job counts)."""
    import psutil

    def cpu(proc) -> float:
        t = proc.cpu_times()
        return t.user + t.system
    out = {"bench_process": cpu(psutil.Process())}
    if bridge is not None:
        out["bridge"] = cpu(psutil.Process(bridge.pid))
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "beam.smp":
            try:
                out["broker"] = out.get("broker", 0.0) + cpu(proc)
            except psutil.Error:
                pass
    return out


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=10_000, help="Tasks (default: %(default)s).")
    p.add_argument("--pairs", type=int, default=4, help="Pairs (default: %(default)s).")
    a = p.parse_args()
    C.set_bench("amqp_overhead")
    C.install_signal_handlers()
    try:
        broker().close()
    except Exception as exc:
        print(f"skipped: no RabbitMQ at 127.0.0.1:5672 for guest ({exc})", file=sys.stderr)
        return 2
    ctx = C.machine(a.tmp, workdirs=True)
    pairs = []
    for k in range(a.pairs):
        order = (False, True) if k % 2 == 0 else (True, False)
        got = {b: w2(a, b) for b in order}
        pairs.append(got)
        C.log(f"pair {k + 1}/{a.pairs}: without {got[False]['tps']:,.0f} tasks/s, with the "
              f"bridge {got[True]['tps']:,.0f} (status lag {got[True]['status_lag']})")
    ratios = [x[True]["tps"] / x[False]["tps"] for x in pairs]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    C.emit("w2_with_bridge_ratio", geo, ratios=ratios,
           with_bridge=[x[True]["tps"] for x in pairs],
           without=[x[False]["tps"] for x in pairs],
           status_lag=[x[True]["status_lag"] for x in pairs],
           cpu_s_with=[x[True]["cpu_s"] for x in pairs],
           cpu_s_without=[x[False]["cpu_s"] for x in pairs],
           server_agents_cpu_s_with=[(x[True]["server_cpu_s"] or 0) + (x[True]["agents_cpu_s"] or 0)
                                     for x in pairs],
           server_agents_cpu_s_without=[(x[False]["server_cpu_s"] or 0)
                                        + (x[False]["agents_cpu_s"] or 0) for x in pairs],
           idle_cores_with=[x[True]["machine_idle_cores"] for x in pairs],
           idle_cores_without=[x[False]["machine_idle_cores"] for x in pairs],
           finished=[x[True]["finished"] for x in pairs] + [x[False]["finished"] for x in pairs],
           target=TARGET, meets_target=geo >= TARGET, n=a.n, pairs=a.pairs, db="sqlite",
           interval="add_jobs returned -> all N JOB_FINISHED seen (Client.counts)", **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
