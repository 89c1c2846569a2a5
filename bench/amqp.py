#!/usr/bin/env python3
"""The AMQP bridge against the real RabbitMQ on 127.0.0.1:5672 (guest/guest).

* ``amqp_intake``: N seed-format job messages (default 100,000 jobs) in lists of 1,000 wait in a
  durable queue; a bridge (``pilotfish bridge amqp --jobs-queue``) is started; the clock runs
  from the moment it says it consumes until the server holds all N jobs (committed). Baseline in
  the same run, on a fresh server each: ``Client.add_jobs`` with the same lists of 1,000, one
  call after another.
* ``amqp_status_latency``: jobs are added at about ``--rate`` per second (10 per request) for
  ``--seconds``; each add is a state change (None -> READY) whose event the bridge publishes to
  the topic exchange; a consumer in this process on a queue bound to it notes when each
  message arrives. Latency = arrival (``time.time()``) - the event's time (the server's clock
  when it made the change; one machine, one clock). p50 and p99 over all messages.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

URL = "amqp://guest@127.0.0.1:5672/"
TARGET_INTAKE = 10_000    # jobs/s
TARGET_P50, TARGET_P99 = 0.020, 0.200  # seconds
APP = {"name": "work", "executable": "/bin/echo", "args": ["{i}"],
       "parameters": {"i": {"type": "int"}}}


def seed_job(i: int) -> dict:
    return {"name": f"j{i}", "description": "", "site": None, "argo_job_id": i,
            "queue": "default", "project": "bench", "wall_time_minutes": 10, "num_nodes": 1,
            "processes_per_node": 1, "scheduler_config": "default", "application": "work",
            "config_file": {"i": i}, "input_url": None, "output_url": None,
            "job_status_routing_key": f"bench.status.{i % 16}"}


def broker():
    import pika
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0))


def start_bridge(env: C.Env, *args: str) -> tuple[subprocess.Popen, Path]:
    log = env.home / f"bridge-{uuid.uuid4().hex[:6]}.log"
    with open(log, "ab") as out:
        p = subprocess.Popen([*C.pilotfish_cmd(), "--home", str(env.home), "bridge", "amqp",
                              "--url", URL, *args], stdout=out, stderr=out,
                             stdin=subprocess.DEVNULL)
    return p, log


def stop_bridge(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_log(log: Path, words: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and words in log.read_text(errors="replace"):
            return
        time.sleep(0.005)
    raise RuntimeError(f"the bridge did not say {words!r} within {timeout} s: {log}")


def total(c) -> int:
    return sum(c.counts().values())


def intake_client(a) -> float:
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="amqp-client") as env:
        env.client.add_app(APP)
        lists = [[seed_job(i) for i in range(s, s + a.per_message)]
                 for s in range(0, a.n, a.per_message)]
        t = time.perf_counter()
        for jobs in lists:
            env.client.add_jobs(jobs)
        return a.n / (time.perf_counter() - t)


def intake_bridge(a) -> tuple[float, float]:
    import pika
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="amqp-bridge") as env:
        env.client.add_app(APP)
        queue = f"pfbench.{uuid.uuid4().hex[:8]}.jobs"
        conn = broker()
        ch = conn.channel()
        try:
            ch.queue_declare(queue, durable=True)
            for s in range(0, a.n, a.per_message):
                body = json.dumps([seed_job(i) for i in range(s, s + a.per_message)]).encode()
                ch.basic_publish("", queue, body, pika.BasicProperties(
                    delivery_mode=2, message_id=f"bench-{s}"))
            t_start = time.perf_counter()
            p, log = start_bridge(env, "--jobs-queue", queue)
            try:
                wait_log(log, "consuming")
                t0 = time.perf_counter()
                while total(env.client) < a.n:
                    if p.poll() is not None:
                        raise RuntimeError(f"the bridge ended: {log.read_text()[-2000:]}")
                    time.sleep(0.01)
                t1 = time.perf_counter()
            finally:
                stop_bridge(p)
            return a.n / (t1 - t0), a.n / (t1 - t_start)
        finally:
            ch.queue_delete(queue)
            ch.queue_delete(queue + ".dead")
            conn.close()


def status_latency(a) -> tuple[list[float], float, int]:
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep, label="amqp-status") as env:
        env.client.add_app(APP)
        tag = f"pfbench.{uuid.uuid4().hex[:8]}"
        exchange, watch = f"{tag}.status", f"{tag}.watch"
        conn = broker()
        ch = conn.channel()
        ch.exchange_declare(exchange, "topic", durable=True)
        ch.queue_declare(watch, durable=False, auto_delete=False)
        ch.queue_bind(watch, exchange, "#")
        arrivals: list[tuple[float, bytes]] = []
        done = threading.Event()

        def consume() -> None:
            c2 = broker()
            ch2 = c2.channel()
            for _m, _p, body in ch2.consume(watch, auto_ack=True, inactivity_timeout=0.2):
                if body is not None:
                    arrivals.append((time.time(), body))
                if done.is_set():
                    break
            ch2.cancel()
            c2.close()

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        p, log = start_bridge(env, "--exchange", exchange, "--state-dir",
                              str(env.home / "bridge-state"))
        try:
            wait_log(log, "publishing to exchange")
            n = 0
            per = 10
            interval = per / a.rate
            t0 = time.perf_counter()
            next_t = t0
            while time.perf_counter() - t0 < a.seconds:
                env.client.add_jobs([{"name": f"s{n + k}", "application": "work",
                                      "parameters": {"i": n + k}} for k in range(per)])
                n += per
                next_t += interval
                time.sleep(max(0.0, next_t - time.perf_counter()))
            rate = n / (time.perf_counter() - t0)
            deadline = time.monotonic() + 60
            while len(arrivals) < n and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            done.set()
            t.join(10)
            stop_bridge(p)
            ch.queue_delete(watch)
            ch.exchange_delete(exchange)
            conn.close()
        lat = []
        for at, body in arrivals:
            m = json.loads(body)
            lat.append(at - datetime.fromisoformat(m["time"]).timestamp())
        return lat, rate, n


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=100_000, help="Jobs taken in (default: %(default)s).")
    p.add_argument("--per-message", type=int, default=1000,
                   help="Jobs per message (default: %(default)s).")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="State changes per second for the latency figure (default: %(default)s).")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="How long changes are made (default: %(default)s).")
    p.add_argument("--skip-intake", action="store_true")
    p.add_argument("--skip-status", action="store_true")
    a = p.parse_args()
    C.set_bench("amqp")
    C.install_signal_handlers()
    try:
        broker().close()
    except Exception as exc:
        print(f"skipped: no RabbitMQ at 127.0.0.1:5672 for guest ({exc})", file=sys.stderr)
        return 2
    ctx = C.machine(a.tmp)
    if not a.skip_intake:
        client_v, bridge_v, bridge_all = [], [], []
        for r in range(a.repeat):
            client_v.append(intake_client(a))
            consume, whole = intake_bridge(a)
            bridge_v.append(consume)
            bridge_all.append(whole)
            C.log(f"repeat {r + 1}/{a.repeat}: bridge {consume:,.0f} jobs/s "
                  f"({whole:,.0f} incl. its start); Client.add_jobs {client_v[-1]:,.0f} jobs/s")
        med, base = C.median(bridge_v), C.median(client_v)
        C.emit("amqp_intake", med, unit="jobs/s", values=bridge_v,
               interval="bridge says it consumes -> the server holds all N jobs (committed); "
                        "the messages were queued before",
               incl_start=C.median(bridge_all), incl_start_values=bridge_all,
               baseline="Client.add_jobs, the same lists one call after another",
               baseline_value=base, baseline_values=client_v, ratio=C.ratio(med, base),
               target=TARGET_INTAKE, meets_target=med >= TARGET_INTAKE, n=a.n,
               per_message=a.per_message, db="sqlite", **ctx)
    if not a.skip_status:
        lat, rate, n = status_latency(a)
        common = dict(unit="s", n=n, received=len(lat), rate=rate, db="sqlite",
                      interval="event time (server, at the change) -> the message's arrival "
                               "at a consumer bound to the exchange", **ctx)
        p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
        C.emit("amqp_status_latency_p50", p50, target=TARGET_P50,
               meets_target=p50 is not None and p50 <= TARGET_P50, **common)
        C.emit("amqp_status_latency_p99", p99, target=TARGET_P99,
               meets_target=p99 is not None and p99 <= TARGET_P99, **common)
    return 0


if __name__ == "__main__":
    C.run(main)
