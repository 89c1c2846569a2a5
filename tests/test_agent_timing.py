"""When a node agent speaks: heartbeats drawn up to 20 % early (agents started together must
not beat in step), and an unanswered hello sent again after 2, 4, then every 8 heartbeats --
at once on a new connection.

A real agent process (``pilotfish pilot agent``) against a ROUTER socket of the test that
stands in for the server and answers as the server would (welcome, acknowledgements, "say
hello"), so the times between messages are the agent's own.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import zmq

from pilotfish import protocol as P
from pilotfish.pilot.agent import BEAT_JITTER, HELLO_BACKOFF

from test_partition import start_agent, stop

BEAT = 0.2  # the heartbeat our welcome sets


class FakeServer:
    """A ROUTER that records (arrival time, kind, message) of what the agent sends."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ctx = zmq.Context.instance()
        self.sock = self._bind()

    def _bind(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(self.address)
        return s

    def rebind(self) -> None:
        """A new server process on the same address: the agent's connection drops and a
        new one is made."""
        self.sock.close(linger=0)
        time.sleep(0.1)
        self.sock = self._bind()

    def recv(self, timeout: float) -> tuple[float, bytes, str, dict]:
        assert self.sock.poll(int(timeout * 1000)), f"the agent sent nothing in {timeout} s"
        ident, frame = self.sock.recv_multipart()
        kind, m = P.decode(frame)
        return time.monotonic(), ident, kind, m

    def send(self, ident: bytes, kind: str, **fields) -> None:
        self.sock.send_multipart([ident, P.encode(kind, **fields)])

    def welcome(self, ident: bytes, m: dict) -> None:
        self.send(ident, P.WELCOME, agent=m["agent"], heartbeat=BEAT, revoke=[], lease=None,
                  epoch=1, uack=m["useq"], output_cap=None, output_rate=None)

    def close(self) -> None:
        self.sock.close(linger=0)


@contextmanager
def welcomed_agent(tmp_path):
    """A real agent on cores 0, said hello to the stand-in and welcomed with heartbeat BEAT:
    (the stand-in, the agent's routing id); the agent is stopped after."""
    srv = FakeServer(f"ipc://{tmp_path}/srv")
    agent = start_agent(tmp_path / "home", srv.address, "0", tmp_path / "work",
                        tmp_path / "agent.log")
    try:
        _, ident, kind, m = srv.recv(30)
        assert kind == P.HELLO
        srv.welcome(ident, m)
        yield srv, ident
    finally:
        stop([agent])
        srv.close()


def test_heartbeats_come_up_to_a_fifth_early_never_late_and_not_in_step(tmp_path):
    with welcomed_agent(tmp_path) as (srv, ident):
        times = []
        while len(times) < 25:
            t, ident, kind, m = srv.recv(5)
            assert kind == P.UPDATE, kind
            srv.send(ident, P.TASKS, seq=0, tasks=[], refused=[], uack=m["useq"], epoch=1)
            if not m["updates"]:  # an idle agent: each update is a heartbeat
                times.append(t)
        gaps = [b - a for a, b in zip(times[1:], times[2:])]  # after the first, due at once
    print([round(g, 3) for g in gaps])
    # Arrival times carry the test's own wake-up delays, so the period is judged by the
    # mean (the whole span over the count) and the draw by the spread. Up to BEAT_JITTER
    # early, uniformly: a mean of 0.9 BEAT, never above the period (a loaded machine may wake
    # the agent a few ms late: that is the margin up to BEAT)
    mean = statistics.mean(gaps)
    assert BEAT * (1 - BEAT_JITTER) <= mean <= BEAT, (mean, gaps)
    # drawn anew each time: not one fixed period (agents started together would stay in step)
    assert statistics.stdev(gaps) > 0.005, gaps


def test_an_unanswered_hello_is_sent_again_ever_later_and_at_once_on_a_new_connection(tmp_path):
    with welcomed_agent(tmp_path) as (srv, ident):  # heartbeat BEAT from now on
        _, ident, kind, m = srv.recv(5)
        assert kind == P.UPDATE
        # a restarted server does not know the agent: it says hello again, and we never answer
        srv.send(ident, P.ERROR, error="unknown agent: say hello", rid=None)
        hellos = []
        while len(hellos) < 6:
            t, ident, kind, m = srv.recv(10)
            if kind == P.HELLO:
                hellos.append(t)
        gaps = [b - a for a, b in zip(hellos, hellos[1:])]
        print("gaps", [round(g, 3) for g in gaps])
        # 2, 4, 8, 8 heartbeats -- and maybe one more hello where the agent fences (its leases
        # were not renewed for 2.25 heartbeats: it says hello then, whatever the backoff).
        # Every heartbeat, as before, would have made these six in about a second.
        assert hellos[-1] - hellos[0] > BEAT * (2 + 4 + HELLO_BACKOFF) * (1 - BEAT_JITTER)
        for got in gaps[-2:]:  # the backoff's longest step, drawn up to a fifth early
            # (the arrival times carry the test's own wake-up delays: a few ms either way)
            assert BEAT * HELLO_BACKOFF * (1 - BEAT_JITTER) - 0.03 <= got \
                <= BEAT * HELLO_BACKOFF + 0.3, gaps
        # a new connection (the server process restarted): a hello at once, not after the
        # backoff of 8 heartbeats
        srv.rebind()
        bound = time.monotonic()
        t, ident, kind, m = srv.recv(5)
        while kind != P.HELLO:
            t, ident, kind, m = srv.recv(5)
        # (the next hello of the backoff is due >= 1.28 s after the last, 1.18 s after this bind)
        assert t - bound < 0.8, t - bound
        # and it is answered: the agent works on
        srv.welcome(ident, m)
        _, ident, kind, m = srv.recv(5)
        assert kind == P.UPDATE
