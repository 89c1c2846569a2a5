"""An agent whose hellos go unanswered backs off (pilot/agent.py hello_every): ten thousand agents
joining a swamped server at a fixed period each re-sent every hello before its welcome came
(a welcome to an older hello is ignored), so none was welcomed and the hellos were the load."""
from __future__ import annotations

import os
import time

import zmq

from pilotfish import protocol as P
from pilotfish.pilot.agent import HELLO_BACKOFF_MAX, Agent, hello_every
from pilotfish.pilot.resources import Resources


def test_hello_every_doubles_up_to_the_cap():
    assert hello_every(2.0, 1, rand=lambda: 0.5) == 2.0
    assert hello_every(2.0, 2, rand=lambda: 0.5) == 4.0
    assert hello_every(2.0, 3, rand=lambda: 0.5) == 8.0
    assert hello_every(2.0, 60, rand=lambda: 0.5) == 2.0 * HELLO_BACKOFF_MAX  # no overflow
    assert hello_every(2.0, 1, rand=lambda: 0.0) == 1.5   # jitter: 0.75 .. 1.25 of it
    assert hello_every(2.0, 1, rand=lambda: 1.0) == 2.5


def test_unanswered_hellos_back_off_and_a_welcome_resets(tmp_path):
    """A real Agent against a ROUTER that never answers: at a 0.1 s heartbeat a fixed period
    sends ~16 hellos in 1.6 s; backing off sends about five."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/srv"
    router.bind(address)
    agent = Agent(address, Resources([sorted(os.sched_getaffinity(0))[0]], [], 2**30, None),
                  tmp_path / "work", heartbeat=0.1, idle_timeout=1.6, fake_exec=True)
    t0 = time.monotonic()
    agent.run()  # leaves after its idle timeout, never welcomed
    assert time.monotonic() - t0 < 3
    hellos = []
    while router.poll(100):
        identity, frame = router.recv_multipart()
        kind, m = P.decode(frame)
        if kind == P.HELLO:
            hellos.append(m["useq"])
    assert 3 <= len(hellos) <= 7, hellos
    # a welcome to the newest hello resets the backoff
    agent2 = Agent(address, Resources([0], [], 2**30, None), tmp_path / "work2", heartbeat=0.1,
                   fake_exec=True)
    try:
        for _ in range(3):
            agent2.hello()
        assert agent2.unanswered == 3 and agent2.hello_wait >= 0.3
        agent2.on_message(P.encode(P.WELCOME, agent=agent2.id, heartbeat=0.1, revoke=[],
                                   lease=0.3, epoch=1, uack=agent2.hello_useq), time.time())
        assert agent2.welcomed and agent2.unanswered == 0
    finally:
        agent2.close()
        router.close(linger=0)
