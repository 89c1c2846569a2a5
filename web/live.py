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

#: What of an event a page gets (all a reader may see anyway; nothing else).
FIELDS = ("id", "time", "kind", "job", "name", "group", "from", "to", "via", "message",
          "agent", "host", "pilot", "site")
QUEUE = 1000
KEEPALIVE = 15.0


def public(event: dict) -> dict:
    return {k: event.get(k) for k in FIELDS if event.get(k) is not None}


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
                r = client.events(since=self.cursor, wait=10.0, limit=500)
                self.cursor = r["cursor"]
                pause = 0.2
                if r["events"]:
                    batch = [public(e) for e in r["events"]]
                    self.loop.call_soon_threadsafe(self._deliver, batch)
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

    def _deliver(self, batch: list[dict]) -> None:
        for q in list(self.subscribers):
            try:
                q.put_nowait(batch)
            except asyncio.QueueFull:
                while not q.empty():
                    q.get_nowait()
                q.put_nowait([{"kind": "resync"}])

    async def stream(self, is_disconnected) -> AsyncIterator[bytes]:
        """The text/event-stream of one page: a batch of events per message."""
        q: asyncio.Queue = asyncio.Queue(QUEUE)
        self.subscribers.add(q)
        try:
            yield b"retry: 2000\n\n"
            last = time.monotonic()
            while not self.stopping.is_set():
                try:
                    batch = await asyncio.wait_for(q.get(), 1.0)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        return
                    if time.monotonic() - last > KEEPALIVE:
                        last = time.monotonic()
                        yield b": keepalive\n\n"
                    continue
                last = time.monotonic()
                yield b"data: " + json.dumps(batch, separators=(",", ":")).encode() + b"\n\n"
        finally:
            self.subscribers.discard(q)
