"""A network cut on loopback, for the tests and bench/chaos.py: a TCP relay that can turn into a
black hole (a dead switch: no byte read, written or forwarded, nothing closed, no RST, no FIN)
and heal; and the scenario "an agent behind it is cut off longer than its lease".
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

import chaoslib as CL


class BlackholeRelay:
    """Forwards TCP connections from 127.0.0.1:``port`` to 127.0.0.1:``target``; ``blackhole()``
    stops all traffic without closing anything, ``heal()`` resumes it. Threads with bounded
    waits; ``close()`` stops them and closes every socket."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.stop = threading.Event()
        self.resetting = threading.Event()
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def blackhole(self) -> float:
        self.cut.set()
        return time.time()

    def heal(self, reset: bool = False) -> float:
        """Resume forwarding; ``reset``: first reset every open connection (RST both ways),
        as a switch that comes back after the hosts gave up on their connections."""
        if reset:
            self.resetting.set()
            for t in self.threads[1:]:
                t.join(5)
            self.resetting.clear()
        self.cut.clear()
        return time.time()

    def _accept(self) -> None:
        while not self.stop.is_set():
            if self.cut.is_set():  # a dead switch lets no new connection through either
                time.sleep(0.02)
                continue
            try:
                a, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                a.close()
                continue
            self.socks += [a, b]
            t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
            self.threads.append(t)
            t.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        out = {a: b"", b: b""}          # bytes waiting to be written to that socket
        eof = {a: False, b: False}      # that socket said FIN
        for s in (a, b):
            s.setblocking(False)
        while not self.stop.is_set() and not (eof[a] and eof[b]):
            if self.resetting.is_set():
                for s in (a, b):  # linger 0: close sends RST
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                break
            if self.cut.is_set():  # read nothing, write nothing, close nothing
                time.sleep(0.02)
                continue
            rd = [s for s in (a, b) if not eof[s] and len(out[peer[s]]) < 1 << 20]
            wr = [s for s in (a, b) if out[s]]
            r, w, _ = select.select(rd, wr, [], 0.05)
            if self.cut.is_set():
                continue
            for s in r:
                try:
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    out[peer[s]] += data
                else:
                    eof[s] = True
            for s in w:
                try:
                    n = s.send(out[s])
                    out[s] = out[s][n:]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    out[s], eof[s] = b"", True
            for s in (a, b):
                if eof[peer[s]] and not out[s]:
                    try:
                        s.shutdown(socket.SHUT_WR)  # pass the FIN on once all is written
                    except OSError:
                        pass
        for s in (a, b):
            s.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        for s in [self.listener, *self.socks]:
            s.close()


def cut_agent(world: "CL.World", task_seconds: float, cut_seconds: float,
              reset: bool = False) -> dict:
    """Agent A reaches the server through a relay; one job of ``task_seconds`` runs on it; the
    relay black-holes for ``cut_seconds``; agent B (started at the cut, directly connected) gets
    the requeued job; then the cut heals (``reset``: by resetting the old connections). The
    attempts' own logs say whether they overlapped. Times in seconds from the cut."""
    c = world.client()
    if not any(a["name"] == "attempt" for a in c.apps()):
        CL.add_attempt_app(c)
    relay = BlackholeRelay(int(world.address.rsplit(":", 1)[1]))
    try:
        a = world.start_agent(cores="0", server=relay.address)
        world.wait_agents(c, 1)
        aid = world.agent_ids(c)[a.pid]
        [job] = c.add_jobs([{"name": "cutme", "application": "attempt",
                             "parameters": {"d": task_seconds}, "max_retries": 5}])
        CL.wait_for(lambda: c.job(job)["state"] == "RUNNING", 30, what="RUNNING on agent A")
        time.sleep(0.3)
        t_cut = relay.blackhole()
        world.start_agent(cores="1" if len(os.sched_getaffinity(0)) > 1 else "0")
        CL.wait_for(lambda: c.job(job)["attempts"] >= 2, world.lease_timeout + 30,
                    what="attempt 2 leased")
        time.sleep(max(0.0, t_cut + cut_seconds - time.time()))
        t_heal = relay.heal(reset=reset)
        CL.wait_for(lambda: c.job(job)["state"] == "JOB_FINISHED", task_seconds + 60,
                    what="the job finished")
        t_done = time.time()
        a_back = bool(CL.wait_for(lambda: any(x["id"] == aid for x in c.agents()), 30,
                                  what="A welcomed again")) and a.poll() is None
        d = c.job(job)
        atts = CL.read_attempts(world.work).get(job, [])
        evs = [(e["to_state"], e["time"], e["message"]) for e in d["events"]]
        first = [x for x in atts if x.attempt == 1]
        second = [x for x in atts if x.attempt == 2]
        requeued = [t for to, t, _ in evs if to == "RESTART_READY"]
        out = {"task_seconds": task_seconds, "cut_seconds": round(t_heal - t_cut, 2),
               "lease_timeout": world.lease_timeout, "state": d["state"],
               "attempts": d["attempts"],
               "finish_events": sum(1 for to, _, _ in evs if to == "JOB_FINISHED"),
               "overlaps": len(CL.overlaps({job: atts})), "agent_a_back": a_back,
               "attempt_log": [(x.attempt, x.how, round(x.start - t_cut, 3),
                                None if x.end is None else round(x.end - t_cut, 3))
                               for x in atts],
               "attempt1_stopped": round(first[0].end - t_cut, 3)
               if first and first[0].end else None,
               "server_requeued": round(requeued[0] - t_cut, 3) if requeued else None,
               "attempt2_started": round(second[0].start - t_cut, 3) if second else None,
               "heal": round(t_heal - t_cut, 3), "finished": round(t_done - t_cut, 3),
               "events": [(to, round(t - t_cut, 3), m) for to, t, m in evs]}
        c.close()
        return out
    finally:
        relay.close()
