"""A federation on this machine: a central server and two site servers (each its own home,
SQLite database, agent and AMQP bridge), all over the real RabbitMQ with names of a random
prefix. Site B's broker user is its own (made with rabbitmqctl, removed afterwards); site A
logs in as guest. The site servers take the central's data directory as a data root (the
shared file system stand-in: the subjobs' hand-on folders are the central's). With
``slurm_b``, site B's agents are a pilot of the local Slurm (scripts/slurm_up: 4 fake nodes,
one agent each), as in the paper's Figure 1; else a local agent. Used by
tests/test_federation*.py and bench/federation.py.
"""
from __future__ import annotations

import json
import os
import sys
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

from conftest import SERVER_HOMES, ServerHandle, pilotfish_cmd, wait_for

from pilotfish import keys
from pilotfish.server import daemon

URL_HOST = "127.0.0.1:5672"
#: Lists its workdir (what it was handed) and leaves a file of its own.
STAMP_APP = {"name": "stamp", "executable": "/bin/sh",
             "args": ["-c", "ls -R > listing-{msg}.txt; echo {msg} > {msg}.out"],
             "parameters": {"msg": {"type": "str", "default": "hi"}}}
SILENT_AFTER = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FixedServer(ServerHandle):
    """A test server on a fixed port (a restarted site server is found at the same address)."""

    def __init__(self, home: Path, data_roots=(), federate: str | None = None,
                 amqp: str | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        super().__init__(home, f"sqlite:///{home}/pilotfish.db", data_roots=data_roots)
        self.bind = f"tcp://127.0.0.1:{free_port()}"
        self.federate = federate
        self.amqp = amqp

    def start(self) -> "FixedServer":
        self.info = daemon.start_background(self.home, self.db_url, self.bind, self.heartbeat,
                                            data_roots=self.data_roots, federate=self.federate,
                                            amqp=self.amqp)
        SERVER_HOMES[self.info["address"]] = self.home
        return self


def rabbitmqctl(*args: str) -> None:
    r = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


class Federation:
    def __init__(self, tmp: Path, silent_after: float = SILENT_AFTER,
                 slurm_b: bool = False, slurm_nodes: int = 4) -> None:
        self.tmp = tmp
        self.slurm_b, self.slurm_nodes = slurm_b, slurm_nodes
        self.slurm_jobs: list[str] = []
        self.tag = f"pffed.{uuid.uuid4().hex[:10]}"
        self.exchange = f"{self.tag}.x"
        self.procs: list[subprocess.Popen] = []
        self.servers: list[FixedServer] = []
        self.user_b, self.pw_b = f"{self.tag}-b", uuid.uuid4().hex
        # rabbitmqctl boots an Erlang VM each time (seconds): beside the servers' starts
        self.user_made = threading.Thread(target=lambda: (
            rabbitmqctl("add_user", self.user_b, self.pw_b),
            rabbitmqctl("set_permissions", "-p", "/", self.user_b, ".*", ".*", ".*")))
        self.user_made.start()
        (tmp / "b.pw").write_text(self.pw_b + "\n")
        os.chmod(tmp / "b.pw", 0o600)
        self.central_home = tmp / "central"
        self.data = self.central_home / "data"
        self.queues = {"A": f"{self.tag}.A.jobs", "B": f"{self.tag}.B.jobs"}
        fed = {"name": "central", "exchange": self.exchange,
               "status_queue": f"{self.tag}.central.status",
               "status_routing_key": f"{self.tag}.status",
               "site_beat_routing_key": f"{self.tag}.beat",
               "url": f"amqp://guest@{URL_HOST}/", "silent_after": silent_after,
               "resend_after": 2, "poll": 0.05,
               "sites": {"A": {"jobs_queue": self.queues["A"], "user": "guest"},
                         "B": {"jobs_queue": self.queues["B"], "user": self.user_b}}}
        self.fed_config = tmp / "federation.yaml"
        self.fed_config.write_text(json.dumps(fed))
        # the central's own bridge publishes its workflows' status (on their routing keys)
        central_amqp = tmp / "central-amqp.yaml"
        central_amqp.write_text(json.dumps({"url": f"amqp://guest@{URL_HOST}/",
                                            "exchange": self.exchange,
                                            "routing_key": f"{self.tag}.central.default"}))
        self.argo_key = f"{self.tag}.argo"
        self.watch = self._watch(self.argo_key)
        self.central = FixedServer(self.central_home, federate=str(self.fed_config),
                                   amqp=str(central_amqp)).start()
        self.servers.append(self.central)
        with self.central.client() as c:
            c.add_app(STAMP_APP)
        self.sites = {s: self._site(s) for s in ("A", "B")}

    def _watch(self, key: str) -> str:
        """A queue of this test on the exchange, bound to ``key``."""
        import pika
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest")))
        ch = conn.channel()
        ch.exchange_declare(self.exchange, "topic", durable=True)
        q = f"{self.tag}.watch"
        ch.queue_declare(q, durable=True)
        ch.queue_bind(q, self.exchange, key)
        conn.close()
        return q

    def drain_watch(self) -> list[dict]:
        import pika
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest")))
        ch = conn.channel()
        out = []
        while True:
            m, _p, body = ch.basic_get(self.watch, auto_ack=True)
            if m is None:
                break
            out.append(json.loads(body))
        conn.close()
        return out

    def _site(self, name: str) -> dict:
        home = self.tmp / f"site{name}"
        srv = FixedServer(home, data_roots=(str(self.data),)).start()
        self.servers.append(srv)
        with srv.client() as c:
            c.add_app(STAMP_APP)
        user = "guest" if name == "A" else self.user_b
        cfg = {"url": f"amqp://{user}@{URL_HOST}/", "jobs_queue": self.queues[name],
               "exchange": self.exchange, "routing_key": f"{self.tag}.{name}.default",
               "site_name": name, "site_beat_routing_key": f"{self.tag}.beat.{name}",
               "site_beat_seconds": 0.3, "prefetch": 64}
        if name == "B":
            cfg["password_file"] = str(self.tmp / "b.pw")
        path = self.tmp / f"bridge-{name}.yaml"
        path.write_text(json.dumps(cfg))
        _pub, key, _auth = keys.new_client(home, "bridge", keys.SUBMITTER)
        site = {"server": srv, "home": home, "config": path, "key": key, "bridge": None}
        if name == "B":
            self.user_made.join()
        self.start_bridge(site)
        if name == "B" and self.slurm_b:
            self.start_slurm_pilot(site)
        else:
            self.start_agent(site)
        return site

    def start_slurm_pilot(self, site: dict) -> str:
        """Site B's agents as a Slurm batch job: one agent per node (its Slurm job id)."""
        from conftest import sbatch
        home, srv = site["home"], site["server"]
        script = f"""#!/bin/bash
#SBATCH -N {self.slurm_nodes}
#SBATCH --exclusive
#SBATCH -t 10
#SBATCH -J pilotfish-fed-B
#SBATCH -o {home}/pilot-%j.out
exec {sys.executable} -m pilotfish --home {home} pilot run --server {srv.address} \\
    --data-root {self.data} -- --idle-timeout 0 --work-root {home}/work
"""
        jid = sbatch(script)
        self.slurm_jobs.append(jid)
        site["slurm_job"] = jid
        return jid

    def start_agent(self, site: dict) -> None:
        site["agent"] = site["server"].agent("--data-root", str(self.data), cores="0,1",
                                             work_root=site["home"] / "work")

    def start_bridge(self, site: dict) -> None:
        log = open(site["home"] / "bridge.log", "ab")
        p = subprocess.Popen(pilotfish_cmd(site["home"], "--server", site["server"].address,
                                           "--client-key", str(site["key"]), "bridge", "amqp",
                                           "--config", str(site["config"])),
                             stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(p)
        site["bridge"] = p

    @staticmethod
    def kill9(p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    def remote(self) -> dict[str, dict]:
        with self.central.client() as c:
            return {s["site"]: s for s in c.call("remote_sites")["sites"]}

    def wait_healthy(self, names, timeout: float = 30) -> None:
        wait_for(lambda: all(self.remote().get(n, {}).get("healthy") for n in names), timeout,
                 0.1, f"sites {names} healthy")

    def fed_log(self) -> str:
        p = self.central_home / "logs" / "federate.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def close(self) -> None:
        self.user_made.join()
        if self.slurm_jobs:
            from conftest import scancel, slurm_job_state
            for jid in self.slurm_jobs:
                scancel(jid)
        gone = subprocess.Popen(["rabbitmqctl", "-q", "delete_user", self.user_b],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        everyone = self.procs + [a for s in self.servers for a in s.agents]
        for p in everyone:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in everyone:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()

        def stop(s) -> None:
            try:
                s.stop()
            except Exception:  # a killed server: nothing to stop
                pass
        stops = [threading.Thread(target=stop, args=(s,)) for s in self.servers]
        for t in stops:
            t.start()
        for t in stops:
            t.join()
        for jid in self.slurm_jobs:  # (the pilot's agents hand their work back, then leave)
            deadline = time.monotonic() + 30
            while slurm_job_state(jid) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
        try:
            import pika
            conn = pika.BlockingConnection(pika.ConnectionParameters(
                "127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest")))
            ch = conn.channel()
            for q in [*self.queues.values(), *(f"{q}.dead" for q in self.queues.values()),
                      f"{self.tag}.central.status", f"{self.tag}.watch"]:
                ch.queue_delete(q)
            ch.exchange_delete(self.exchange)
            conn.close()
        finally:
            gone.wait(60)


def until(pred, timeout: float = 60, what: str = "condition"):
    return wait_for(pred, timeout, 0.1, what)


def sleep(s: float) -> None:
    time.sleep(s)
