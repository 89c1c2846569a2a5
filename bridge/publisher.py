"""The status publisher: every job state change and every workflow state change, read from the
server's event stream, goes to a topic exchange as a persistent JSON message on the job's (or
the workflow's) ``job_status_routing_key``, or the bridge's default.

At least once, in order per job: messages are published in event order on one channel with
publisher confirms, and the saved cursor (:mod:`.cursor`) moves only past events whose messages
the broker has confirmed; after a crash, a lost connection or a nack the bridge publishes again
from the saved cursor (consumers dedupe by ``event_id``). Confirms are taken asynchronously
(pika's SelectConnection): waiting for each message's confirm in turn would bound the rate by
the broker's disk flushes.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pilotfish.client import Client
from pilotfish.errors import PilotfishError, Pruned, ServerUnavailable

from .backoff import Backoff
from .config import BridgeConfig, connection_parameters, parse_url
from .cursor import CursorFile

log = logging.getLogger("pilotfish.bridge.publisher")
#: Messages published and not yet confirmed, at most (then we wait for confirms).
WINDOW = 5000
#: Events asked for at once.
PAGE = 1000
#: Least seconds between two reads of the event stream while pages come back short: the
#: server answers a parked read after every turn that makes an event, so reading again at once
#: asked once per server turn -- under 1,000 changes/s that doubled the server's CPU per task
#: (W2 with the bridge ran at 0.57x). A full page is followed at once.
MIN_GAP = 0.025
#: Seconds between two writes of the cursor file (a crash republishes at most this much).
SAVE_EVERY = 0.2
#: Jobs whose routing key and argo id are remembered (they never change once added).
CACHE_JOBS = 200_000


def iso(t: float | str | None) -> str | None:
    if t is None or isinstance(t, str):
        return t
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def status_message(e: dict, meta: dict | None) -> dict:
    """The JSON body of one status message (the seed's names: group_identifier, job_id)."""
    meta = meta or {}
    if e.get("kind") == "workflow":
        return {"event_id": e["id"], "kind": "workflow", "workflow_id": e.get("workflow"),
                "name": e.get("name"), "group_identifier": e.get("group"),
                "user_id": meta.get("user_id"), "username": meta.get("username"),
                "from": e.get("from"), "to": e.get("to"), "time": iso(e.get("time")),
                "message": e.get("message")}
    return {"event_id": e["id"], "kind": "job", "job_id": e["job"], "name": e.get("name"),
            "group_identifier": e.get("group"), "argo_job_id": meta.get("argo_job_id"),
            "workflow_id": e.get("workflow"),
            "from": e.get("from"), "to": e.get("to"), "via": e.get("via"),
            "time": iso(e.get("time")), "message": e.get("message")}


class Publisher:
    def __init__(self, cfg: BridgeConfig, new_client: Callable[[], Client],
                 stop: threading.Event, state_dir: Path) -> None:
        self.cfg, self.new_client, self.stop = cfg, new_client, stop
        self.addr = parse_url(cfg.url)
        self.cursor_file = CursorFile(state_dir / "status.cursor")
        self.saved = self.cursor_file.load()
        self.client: Client | None = None
        self.meta: dict[int, dict] = {}
        self.wf_meta: dict[int, dict] = {}  # the same for workflows
        self.backoff = Backoff()
        self.stats = {"published": 0, "confirmed": 0}
        self.last_read, self.full = 0.0, False

    # -- the connection loop ----------------------------------------------------------------
    def run(self) -> None:
        while not self.stop.is_set():
            self._session()
            if self.stop.is_set():
                break
            wait = self.backoff.next()
            log.warning("publisher: AMQP connection to %s lost or refused (%s); reconnecting "
                        "in %.1f s from cursor %s", self.addr, self.why, wait, self.saved)
            self.stop.wait(wait)
        self._save(force=True)
        if self.client is not None:
            self.client.close()

    def _session(self) -> None:
        import pika
        self.why = "closed"
        # what this connection has sent and not yet seen confirmed: from the saved cursor
        self.fetched = self.saved
        self.next_tag = 1
        self.acked_upto = 0
        self.acked_single: set[int] = set()
        self.marks: deque[tuple[int, int]] = deque()  # (last tag of a page, cursor after it)
        self.confirmed_cursor = self.saved
        self.last_save = 0.0
        self.ch = None
        from .pika_batch import BatchingConnection
        try:
            self.conn = BatchingConnection(
                connection_parameters(self.cfg, "publisher"), on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_closed)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self.why = str(exc) or type(exc).__name__
            return
        self.conn.ioloop.start()  # until _on_closed stops it

    def _on_open_error(self, conn, exc) -> None:
        self.why = str(exc) or type(exc).__name__
        conn.ioloop.stop()

    def _on_closed(self, conn, reason) -> None:
        self.why = str(reason) or type(reason).__name__
        conn.ioloop.stop()

    def _on_open(self, conn) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, ch) -> None:
        self.ch = ch
        ch.add_on_close_callback(self._on_channel_closed)
        ch.exchange_declare(self.cfg.exchange, "topic", durable=True,
                            callback=lambda _f: ch.confirm_delivery(self._on_confirm,
                                                                    callback=self._on_ready))

    def _on_channel_closed(self, ch, reason) -> None:
        self.why = f"channel closed: {reason}"
        self._close()

    def _close(self) -> None:
        if self.conn.is_open:  # (not when it is already closing or closed)
            self.conn.close()

    def _on_ready(self, _frame) -> None:
        self.backoff.reset()
        log.info("publisher: publishing to exchange %s on %s from cursor %s", self.cfg.exchange,
                 self.addr, self.saved)
        self.conn.ioloop.call_later(0, self._pump)

    # -- events to messages -----------------------------------------------------------------
    def _pump(self) -> None:
        """One page of events published; then again (the ioloop sends and reads between)."""
        if self.stop.is_set():
            self._save(force=True)
            self._close()
            return
        if not self.conn.is_open or self.ch is None or not self.ch.is_open:
            return
        self._save()
        inflight = self.next_tag - 1 - self.acked_upto
        if inflight >= WINDOW:
            self.conn.ioloop.call_later(0.005, self._pump)
            return
        gap = self.last_read + MIN_GAP - time.monotonic()
        if not self.full and gap > 0:
            self.conn.ioloop.call_later(gap, self._pump)
            return
        self.last_read = time.monotonic()
        try:
            page = self._client().events(since=self.fetched or 0,
                                         wait=0.05 if inflight else 0.5, limit=PAGE)
            self.backoff.reset()
            events = [e for e in page["events"] if e.get("to") and (
                e.get("job") is not None or e.get("kind") == "workflow")]
            if events:
                # job events carry their routing key and argo id (an older server's do not:
                # ask for them)
                self._lookup({e["job"] for e in events
                              if e.get("kind") == "job" and "routing_key" not in e})
                self._lookup_workflows({e["workflow"] for e in events
                                        if e.get("kind") == "workflow"})
        except ServerUnavailable as exc:
            self._drop_client()
            log.warning("publisher: the server does not answer (%s); trying again", exc)
            self.conn.ioloop.call_later(self.backoff.next(), self._pump)
            return
        except Pruned as exc:
            self._pruned(exc)
            self.conn.ioloop.call_later(0, self._pump)
            return
        except PilotfishError as exc:  # the server refuses us (a key's role...): say so, retry
            log.error("publisher: the server refused the event stream: %s", exc)
            self.conn.ioloop.call_later(self.backoff.next(), self._pump)
            return
        self.full = len(page["events"]) >= PAGE
        if events:
            self._publish(events)
        self.fetched = page["cursor"]
        self.marks.append((self.next_tag - 1, page["cursor"]))
        self._advance()
        self.conn.ioloop.call_later(0, self._pump)

    def _pruned(self, exc: PilotfishError) -> None:
        """The server no longer keeps our cursor's events (pruned by age): say what was lost,
        loudly, and go on from the oldest it keeps."""
        log.error("publisher: %s", exc)
        try:
            oldest = self._client().events(since=0, wait=0, limit=1).get("oldest")
        except PilotfishError:
            return
        if isinstance(oldest, int):
            log.error("publisher: status messages for events after %s and before %d are LOST "
                      "(pruned on the server before the bridge published them); going on from "
                      "%d", self.fetched, oldest, oldest)
            self.fetched = max(0, oldest - 1)

    def _lookup(self, job_ids: set[int]) -> None:
        """Routing key and argo id of jobs not seen yet (one request for a page of events)."""
        missing = [j for j in job_ids if j not in self.meta]
        if not missing:
            return
        if len(self.meta) + len(missing) > CACHE_JOBS:
            self.meta.clear()
        rows = self._client().call("job_ls", filter={"ids": missing}, limit=len(missing),
                                   timeout=30)
        for r in rows:
            self.meta[r["id"]] = {"argo_job_id": r.get("argo_job_id"),
                                  "routing_key": r.get("job_status_routing_key")}
        for j in missing:
            self.meta.setdefault(j, {})  # removed since: the default routing key

    def _lookup_workflows(self, ids: set[int]) -> None:
        """Routing key, user id and name of workflows not seen yet (they never change)."""
        missing = [w for w in ids if w not in self.wf_meta]
        if not missing:
            return
        if len(self.wf_meta) + len(missing) > CACHE_JOBS:
            self.wf_meta.clear()
        rows = self._client().call("workflow_ls", filter={"ids": missing}, limit=len(missing),
                                   timeout=30)
        for r in rows:
            self.wf_meta[r["id"]] = {"routing_key": r.get("job_status_routing_key"),
                                     "user_id": r.get("user_id"),
                                     "username": r.get("username")}
        for w in missing:
            self.wf_meta.setdefault(w, {})

    def _publish(self, events: list[dict]) -> None:
        ch, default = self.ch, self.cfg.routing_key
        with self.conn.batch():  # one write for the page, not three per message
            self._publish_each(ch, default, events)
        self.stats["published"] += len(events)

    def _publish_each(self, ch, default: str, events: list[dict]) -> None:
        import pika
        for e in events:
            meta = self.wf_meta.get(e["workflow"]) if e.get("kind") == "workflow" \
                else e if "routing_key" in e else self.meta.get(e["job"])
            body = json.dumps(status_message(e, meta), separators=(",", ":")).encode()
            ch.basic_publish(self.cfg.exchange, (meta or {}).get("routing_key") or default,
                             body, pika.BasicProperties(
                                 delivery_mode=2, content_type="application/json",
                                 message_id=f"pilotfish-event-{e['id']}",
                                 # validated by RabbitMQ: who sent it (a federation's
                                 # central server trusts a site's status by it)
                                 user_id=self.addr.user,
                                 timestamp=int(time.time())))
            self.next_tag += 1

    # -- confirms and the cursor ------------------------------------------------------------
    def _on_confirm(self, frame) -> None:
        import pika
        m = frame.method
        if isinstance(m, pika.spec.Basic.Nack):
            # the broker lost a message: publish again from the last confirmed cursor
            self.why = f"the broker refused message {m.delivery_tag}"
            log.warning("publisher: %s; publishing again from cursor %s", self.why, self.saved)
            self._close()
            return
        if m.multiple:
            self.acked_upto = max(self.acked_upto, m.delivery_tag)
        else:
            self.acked_single.add(m.delivery_tag)
        while self.acked_upto + 1 in self.acked_single:
            self.acked_upto += 1
            self.acked_single.discard(self.acked_upto)
        if m.multiple and self.acked_single:
            self.acked_single = {t for t in self.acked_single if t > self.acked_upto}
        self._advance()

    def _advance(self) -> None:
        """The cursor after every page whose messages are all confirmed."""
        while self.marks and self.marks[0][0] <= self.acked_upto:
            self.confirmed_cursor = self.marks.popleft()[1]

    def _save(self, force: bool = False) -> None:
        c = getattr(self, "confirmed_cursor", None)
        if c is None or c == self.saved:
            return
        now = time.monotonic()
        if not force and now - self.last_save < SAVE_EVERY:
            return
        self.cursor_file.save(c)
        self.saved = c
        self.last_save = now

    def _client(self) -> Client:
        if self.client is None:
            self.client = self.new_client()
            # short: the ioloop (heartbeats, confirms) waits while a request does
            self.client.timeout = 10.0
        return self.client

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
