#!/usr/bin/env python3
"""The AMQP bridge under chaos, against the real RabbitMQ on 127.0.0.1:5672 (guest/guest).

One server (SQLite) and one agent run N seed-format jobs of /bin/true (default 10,000) that
arrive through the bridge: a producer publishes them as persistent messages of ``--per-message``
jobs, one message every ``--interval`` seconds, so intake goes on while jobs run. One bridge
process consumes the jobs queue and publishes every state change to a topic exchange; a
consumer in this process, on a queue bound to ``#``, records every status message.

During the run the bridge is killed with SIGKILL ``--kills`` times (default 5), spread over the
run, and restarted each time (same state dir: its saved cursor); once, between two kills, its
broker connections are closed by the broker (``rabbitmqctl close_connection``).

Figures (one JSON line each):

* ``amqp_chaos_jobs``: jobs in the server at the end (must be N: a redelivered intake message
  adds nothing) and ``duplicates`` (names seen more than once, must be 0).
* ``amqp_chaos_final_status_missing``: jobs whose final status message (``to`` JOB_FINISHED,
  FAILED or USER_KILLED) never reached the consumer (must be 0), with the number of status
  messages received, how many were repeats (at least once: consumers dedupe by ``event_id``)
  and ``order_violations``: jobs whose first-seen messages were not in ``event_id`` order.
* ``amqp_chaos_makespan``: first publish to every final status received, beside the same run
  without chaos (``baseline``) when ``--baseline`` is given.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
from amqp import broker, start_bridge, stop_bridge, wait_log  # noqa: E402

FINAL = ("JOB_FINISHED", "FAILED", "USER_KILLED")


def seed_job(i: int) -> dict:
    return {"name": f"c{i}", "description": "", "site": None, "argo_job_id": i,
            "queue": "default", "project": "bench", "wall_time_minutes": 10, "num_nodes": 1,
            "processes_per_node": 1, "scheduler_config": "default", "application": "true",
            "config_file": None, "input_url": None, "output_url": None,
            "job_status_routing_key": f"chaos.status.{i % 16}"}


class Consumer(threading.Thread):
    """Every status message on the exchange, as (event_id, job_id, to)."""

    def __init__(self, queue: str) -> None:
        super().__init__(daemon=True)
        self.queue, self.stop, self.seen = queue, threading.Event(), []
        self.lock = threading.Lock()

    def run(self) -> None:
        conn = broker()
        ch = conn.channel()
        for _m, _p, body in ch.consume(self.queue, auto_ack=True, inactivity_timeout=0.2):
            if body is not None:
                m = json.loads(body)
                with self.lock:
                    self.seen.append((m["event_id"], m["job_id"], m["to"]))
            if self.stop.is_set():
                break
        ch.cancel()
        conn.close()

    def finals(self) -> set[int]:
        with self.lock:
            return {j for _e, j, to in self.seen if to in FINAL}


def close_connections(pid: int) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from amqp_world import close_bridge_connections
    return close_bridge_connections(pid)


def one_run(a, chaos: bool) -> dict:
    import pika
    tag = f"pfchaos.{uuid.uuid4().hex[:8]}"
    queue, exchange, watch = f"{tag}.jobs", f"{tag}.status", f"{tag}.watch"
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="amqp-chaos") as env:
        env.client.add_app({"name": "true", "executable": "/bin/true"})
        conn = broker()
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        ch.exchange_declare(exchange, "topic", durable=True)
        ch.queue_declare(watch, durable=True)
        ch.queue_bind(watch, exchange, "#")
        consumer = Consumer(watch)
        consumer.start()
        state = str(env.home / "bridge-state")
        args = ("--jobs-queue", queue, "--exchange", exchange, "--state-dir", state)
        bridge, log = start_bridge(env, *args)
        wait_log(log, "consuming")
        messages = (a.n + a.per_message - 1) // a.per_message
        t0 = time.perf_counter()

        def produce() -> None:
            pc = broker()
            pch = pc.channel()
            for k in range(messages):
                s = k * a.per_message
                body = json.dumps([seed_job(i) for i in range(s, min(a.n, s + a.per_message))])
                pch.basic_publish("", queue, body.encode(), pika.BasicProperties(
                    delivery_mode=2, message_id=f"{tag}-{k}"))
                time.sleep(a.interval)
            pc.close()

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        env.start_agent()
        kills = closes = 0
        try:
            if chaos:
                # spread the kills over the intake and the runs: every `gap` seconds
                gap = max(1.0, messages * a.interval / a.kills)
                for k in range(a.kills):
                    time.sleep(gap * (0.5 + 0.5 * (k % 2)))
                    if k == a.kills // 2:  # once, the broker closes the bridge's connections
                        closes += close_connections(bridge.pid)
                        time.sleep(gap / 2)
                    bridge.kill()
                    bridge.wait()
                    kills += 1
                    C.log(f"kill {kills}: {sum(env.client.counts().values())} jobs in, "
                          f"{len(consumer.finals())} final statuses seen")
                    bridge, log = start_bridge(env, *args)
                    wait_log(log, "consuming")
            producer.join()
            deadline = time.monotonic() + a.timeout
            while time.monotonic() < deadline:
                counts = env.client.counts()
                if sum(counts.values()) >= a.n and \
                        sum(counts.get(s, 0) for s in FINAL) >= a.n and \
                        len(consumer.finals()) >= a.n:
                    break
                time.sleep(0.1)
            t1 = time.perf_counter()
            time.sleep(1.0)  # late repeats
        finally:
            stop_bridge(bridge)
            consumer.stop.set()
            consumer.join(10)
        jobs = env.client.jobs(limit=0)
        ch.queue_delete(queue)
        ch.queue_delete(queue + ".dead")
        ch.queue_delete(watch)
        ch.exchange_delete(exchange)
        conn.close()
    names = Counter(j["name"] for j in jobs)
    seen = consumer.seen
    first: dict[tuple[int, int], int] = {}
    for pos, (e, j, _to) in enumerate(seen):
        first.setdefault((j, e), pos)
    per_job: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (j, e), pos in first.items():
        per_job[j].append((pos, e))
    violations = sum(1 for evs in per_job.values()
                     if [e for _p, e in sorted(evs)] != sorted(e for _p, e in evs))
    finals = consumer.finals()
    return {"jobs": len(jobs), "duplicates": sum(1 for v in names.values() if v > 1),
            "missing": len({j["id"] for j in jobs} - finals), "messages": len(seen),
            "repeats": len(seen) - len(first), "order_violations": violations,
            "kills": kills, "closes": closes, "seconds": t1 - t0}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=10_000, help="Jobs (default: %(default)s).")
    p.add_argument("--per-message", type=int, default=100,
                   help="Jobs per message (default: %(default)s).")
    p.add_argument("--interval", type=float, default=0.15,
                   help="Seconds between two messages (default: %(default)s).")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs of the bridge "
                   "(default: %(default)s).")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="Seconds to wait for the end after the last message (default: "
                        "%(default)s).")
    p.add_argument("--baseline", action="store_true", help="Also one run without chaos.")
    a = p.parse_args()
    C.set_bench("amqp_chaos")
    C.install_signal_handlers()
    try:
        broker().close()
    except Exception as exc:
        print(f"skipped: no RabbitMQ at 127.0.0.1:5672 for guest ({exc})", file=sys.stderr)
        return 2
    ctx = C.machine(a.tmp)
    for r in range(a.repeat):
        res = one_run(a, chaos=True)
        base = one_run(a, chaos=False) if a.baseline else None
        common = dict(n=a.n, per_message=a.per_message, kills=res["kills"],
                      closes=res["closes"], repeat=r + 1, db="sqlite", **ctx)
        C.emit("amqp_chaos_jobs", res["jobs"], duplicates=res["duplicates"], target=a.n,
               meets_target=res["jobs"] == a.n and res["duplicates"] == 0, **common)
        C.emit("amqp_chaos_final_status_missing", res["missing"], messages=res["messages"],
               repeats=res["repeats"], order_violations=res["order_violations"], target=0,
               meets_target=res["missing"] == 0 and res["order_violations"] == 0, **common)
        C.emit("amqp_chaos_makespan", res["seconds"], unit="s",
               baseline="the same run without kills" if base else None,
               baseline_value=base["seconds"] if base else None,
               ratio=C.ratio(res["seconds"], base["seconds"]) if base else None, **common)
    return 0


if __name__ == "__main__":
    C.run(main)
