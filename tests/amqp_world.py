"""A test world for the AMQP bridge: the real RabbitMQ on 127.0.0.1:5672 (queues and an exchange
of unique names, deleted afterwards), a real server, and real bridge processes.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

from conftest import pilotfish_cmd, wait_for
from externals import RABBITMQ

from pilotfish import keys

URL = f"amqp://guest@{RABBITMQ[0]}:{RABBITMQ[1]}/"
#: A job message as the seed's production system sends it (all its keys), for the app "echo".
SEED_JOB: dict[str, Any] = {
    "name": "seed", "description": "from a production system", "site": None,
    "argo_job_id": 4711, "queue": "default", "project": "atlas", "wall_time_minutes": 10,
    "num_nodes": 1, "processes_per_node": 1, "scheduler_config": "theta-default",
    "application": "echo", "config_file": {"msg": "hello"}, "input_url": None,
    "output_url": None, "job_status_routing_key": "argo.status.test"}
ECHO_APP = {"name": "echo", "executable": "/bin/echo", "args": ["{msg}"],
            "parameters": {"msg": {"type": "str", "default": "hi"}}}


def broker_connection():
    import pika
    # no heartbeat: a test's connection sits idle while it waits on the server
    return pika.BlockingConnection(pika.ConnectionParameters(
        *RABBITMQ, credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0,
        connection_attempts=3, retry_delay=1))


class World:
    def __init__(self, server, tmp: Path) -> None:
        self.server = server
        self.home = server.home
        self.tag = f"pftest.{uuid.uuid4().hex[:10]}"
        self.jobs_queue = f"{self.tag}.jobs"
        self.dead_queue = f"{self.jobs_queue}.dead"
        self.exchange = f"{self.tag}.status"
        self.default_key = f"{self.tag}.default"
        self.state_dir = tmp / "bridge-state"
        self.conn = broker_connection()
        self.ch = self.conn.channel()
        self.ch.queue_declare(self.jobs_queue, durable=True)
        self.ch.queue_declare(self.dead_queue, durable=True)
        self.ch.exchange_declare(self.exchange, "topic", durable=True)
        self.queues = [self.jobs_queue, self.dead_queue]
        self.bridges: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        _pub, self.key, _auth = keys.new_client(self.home, "bridge", keys.SUBMITTER)

    # -- the broker side ----------------------------------------------------------------------
    def publish(self, body: Any, message_id: str | None = None, raw: bool = False) -> None:
        import pika
        data = body if raw else json.dumps(body).encode()
        self.ch.basic_publish("", self.jobs_queue, data, pika.BasicProperties(
            delivery_mode=2, message_id=message_id, content_type="application/json"))

    def status_queue(self, binding: str = "#") -> str:
        """A durable queue bound to the status exchange (bound before jobs change: a topic
        exchange drops what no queue is bound for)."""
        name = f"{self.tag}.watch{len(self.queues)}"
        self.ch.queue_declare(name, durable=True)
        self.ch.queue_bind(name, self.exchange, binding)
        self.queues.append(name)
        return name

    def drain(self, queue: str) -> list[tuple[Any, Any, bytes]]:
        """Every message now in ``queue``: (method, properties, body), acknowledged."""
        out = []
        while True:
            method, props, body = self.ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((method, props, body))

    def ready(self, queue: str) -> int:
        return self.ch.queue_declare(queue, passive=True).method.message_count

    # -- bridges -------------------------------------------------------------------------------
    def bridge(self, *extra: str, status: bool = True, env: dict | None = None) \
            -> subprocess.Popen:
        args = ["--client-key", str(self.key), "bridge", "amqp", "--url", URL, "--jobs-queue",
                self.jobs_queue, "--state-dir", str(self.state_dir), "-v"]
        if status:
            args += ["--exchange", self.exchange, "--routing-key", self.default_key]
        log = self.home / f"bridge-{len(self.bridges)}.log"
        self.logs.append(log)
        with open(log, "ab") as out:
            p = subprocess.Popen(pilotfish_cmd(self.home, *args, *extra), stdout=out,
                                 stderr=out, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})})
        self.bridges.append(p)
        return p

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    @staticmethod
    def kill9(p: subprocess.Popen) -> None:
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    @staticmethod
    def stop(p: subprocess.Popen) -> int:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            return p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise AssertionError("the bridge did not stop within 30 s of SIGTERM")

    def close(self) -> None:
        for p in self.bridges:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            if not self.conn.is_open:
                self.conn = broker_connection()
                self.ch = self.conn.channel()
            for q in self.queues:
                self.ch.queue_delete(q)
            self.ch.exchange_delete(self.exchange)
            self.conn.close()
        except Exception:
            pass

    # -- the server side -----------------------------------------------------------------------
    def job_count(self) -> int:
        with self.server.client() as c:
            return sum(c.counts().values())

    def wait_jobs(self, n: int, timeout: float = 120) -> list[dict]:
        wait_for(lambda: self.job_count() >= n, timeout, 0.1, f"{n} jobs")
        with self.server.client() as c:
            return c.jobs(limit=0)


def close_bridge_connections(pid: int) -> int:
    """Close (rabbitmqctl close_connection) the broker connections of the bridge process
    ``pid`` (its connection_name ends with "pid N"); how many were closed."""
    r = subprocess.run(["rabbitmqctl", "-q", "--no-table-headers", "list_connections", "pid",
                        "client_properties"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    mine = [line.split("\t", 1)[0] for line in r.stdout.splitlines()
            if re.search(rf'"pilotfish bridge amqp \w+ pid {pid}"', line)]
    for cpid in mine:
        c = subprocess.run(["rabbitmqctl", "-q", "close_connection", cpid, "test: closed"],
                           capture_output=True, text=True, timeout=60)
        assert c.returncode == 0, c.stderr
    return len(mine)


def until(pred, timeout: float = 120, what: str = "condition"):
    return wait_for(pred, timeout, 0.1, what)



@contextlib.contextmanager
def world_of(server, tmp: Path):
    """A World with the app echo registered; RabbitMQ required (CI fails without it)."""
    from conftest import require
    from externals import rabbitmq_available
    require(rabbitmq_available(), "RabbitMQ at 127.0.0.1:5672 (guest/guest)")
    with server.client() as c:
        c.add_app(ECHO_APP)
    w = World(server, tmp)
    try:
        yield w
    finally:
        w.close()
