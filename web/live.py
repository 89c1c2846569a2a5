"""Live updates: one follower of the server's event stream, fanned out to every open page.

A thread of the web process follows the stream (``Client.follow``: parked requests at the
server, nothing polled) with the web's own reader key, from the newest event at start, and
hands each event to the asyncio queues of the open Server-Sent-Events responses. However many
browsers are open, the server sees one follower. A page that cannot keep up (its queue full)
is told to reload its data once instead of being sent every event.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import AsyncIterator

from pilotfish.errors import PilotfishError

log = logging.getLogger("pilotfish.web")

#: Job ids a page is told at most per helping; past that it hears "many" (and refreshes).
MAX_JOBS = 2000
QUEUE = 1000
KEEPALIVE = 15.0
#: After a helping of events, wait this long before asking for the next: pages refresh at
#: most once a second anyway, and a busy server then answers one request per PACE with all
#: that came meanwhile instead of one after every turn it commits.
PACE = 0.5
LIMIT = 5000


def summary(events: list[dict]) -> dict:
    """What pages need of a helping of events to know whether what they show changed: the
    kinds, which jobs and which workflows (a page draws its data from the server again,
    escaped, itself)."""
    jobs = sorted({e["job"] for e in events if e.get("kind") == "job" and e.get("job")})
    out: dict = {"kinds": sorted({e.get("kind") or "" for e in events}),
                 "cursor": events[-1]["id"]}
    # the workflows whose state moved (a workflow page also follows its subjobs' ids)
    wfs = sorted({e["workflow"] for e in events
                  if e.get("kind") == "workflow" and type(e.get("workflow")) is int})
    if len(wfs) <= MAX_JOBS:
        out["workflows"] = wfs
    if len(jobs) > MAX_JOBS:
        out["many"] = True
    else:
        out["jobs"] = jobs
    return out


class EventHub:
    def __init__(self, pool, key: str | None) -> None:
        self.pool = pool
        self.key = key
        self.subscribers: set[asyncio.Queue] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = threading.Event()
        self.cursor = 0
        self.thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="web-events", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def _run(self) -> None:
        client = None
        pause = 0.2
        while not self.stopping.is_set():
            try:
                if client is None:
                    client = self.pool.new(self.key, timeout=10)
                    if not self.cursor:
                        self.cursor = client.status()["events"]["newest"]
                r = client.events(since=self.cursor, wait=10.0, limit=LIMIT)
                self.cursor = r["cursor"]
                pause = 0.2
                if r["events"]:
                    self.loop.call_soon_threadsafe(self._deliver, summary(r["events"]))
                    self.stopping.wait(PACE)
            except PilotfishError as exc:  # server down, restarted, key refused: try again
                if client is not None:
                    client.close()
                    client = None
                log.warning("event stream: %s (trying again in %.1f s)", exc, pause)
                if getattr(exc, "code", "") == "pruned":
                    self.cursor = 0
                self.stopping.wait(pause)
                pause = min(pause * 2, 5.0)
            except Exception:  # never let the live thread die silently
                log.exception("event stream")
                self.stopping.wait(2.0)
        if client is not None:
            client.close()

    def _deliver(self, change: dict) -> None:
        for q in list(self.subscribers):
            try:
                q.put_nowait(change)
            except asyncio.QueueFull:
                while not q.empty():
                    q.get_nowait()
                q.put_nowait({"kinds": ["resync"], "many": True})

    async def stream(self, is_disconnected) -> AsyncIterator[bytes]:
        """The text/event-stream of one page: one summary (see :func:`summary`) per helping."""
        q: asyncio.Queue = asyncio.Queue(QUEUE)
        self.subscribers.add(q)
        try:
            yield b"retry: 2000\n\n"
            last = time.monotonic()
            while not self.stopping.is_set():
                try:
                    change = await asyncio.wait_for(q.get(), 1.0)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        return
                    if time.monotonic() - last > KEEPALIVE:
                        last = time.monotonic()
                        yield b": keepalive\n\n"
                    continue
                last = time.monotonic()
                yield b"data: " + json.dumps(change, separators=(",", ":")).encode() + b"\n\n"
        finally:
            self.subscribers.discard(q)
