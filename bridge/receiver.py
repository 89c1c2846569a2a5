"""The job receiver: job messages from a durable queue become jobs on the server.

A message whose body is one map with ``pilotfish_control`` is a federation control message
from the server that forwarded jobs here (``start`` a held forwarded job, ``cancel`` one; see
server/fence.py): done through ``forward_control`` in its turn, and confirmed on its job's
status routing key. A forward this site refuses (dead-lettered) is answered there too, as a
``FAILED`` status with ``refused`` and the reason, so that the forwarder does not wait forever.

A message whose body is one map with ``subjobs`` is a workflow (the seed's Argo job): it is
added alone with ``workflow_add``, under the same rules.

At least once, idempotent: a message is acknowledged only after the server has committed its
jobs (the reply comes after the commit), and every job carries an intake key (the message's id
and the job's index, see :mod:`.intake`) that the server remembers, so a message redelivered
after a crash adds nothing twice. A message that can never become jobs (not JSON, an unknown
app, a bad value, too big) goes to the dead-letter queue with the one-line reason in its
``x-pilotfish-error`` header, and the receiver goes on. When the server does not answer, the
receiver gives the messages it holds back to the broker, stops consuming and resumes once the
server answers; when the broker goes away, it reconnects with a growing wait.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple

from pilotfish.client import Client
from pilotfish.errors import Forbidden, PilotfishError, ServerUnavailable
from pilotfish.validate import cap

from .backoff import Backoff
from .config import _ROUTING_KEY, BridgeConfig, connection_parameters, parse_url
from .intake import (Poison, add_intake_keys, add_workflow_key, message_key, parse_body,
                     workflow_of)

log = logging.getLogger("pilotfish.bridge.receiver")
ERROR_HEADER = "x-pilotfish-error"
#: The longest error text put in a header (the server's errors are one line, at most 2,000).
MAX_HEADER_CHARS = 1000
#: A control message is small: a bigger body is a job message (or poison).
MAX_CONTROL_BYTES = 2048
CONTROL_KEYS = frozenset({"pilotfish_control", "argo_job_id", "job_status_routing_key"})


def control_of(body: bytes) -> dict | None:
    """The control message a body holds (a map with ``pilotfish_control``), else None."""
    if len(body) > MAX_CONTROL_BYTES or b"pilotfish_control" not in body:
        return None
    try:
        msg = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return msg if isinstance(msg, dict) and "pilotfish_control" in msg else None


def check_control(msg: dict, user: str | None, central_user: str | None) -> str | None:
    """Why a control message is refused (None: it is good). Pure."""
    if set(msg) - CONTROL_KEYS:
        return f"control message with unknown keys {sorted(map(str, set(msg) - CONTROL_KEYS))}"
    if msg.get("pilotfish_control") not in ("start", "cancel"):
        return "control must be start or cancel"
    mid, key = msg.get("argo_job_id"), msg.get("job_status_routing_key")
    if not (isinstance(mid, str) and mid.startswith("fwd:") and len(mid) <= 255
            and mid.isascii() and mid.isprintable() and " " not in mid):
        return "control message without a forwarded job's argo_job_id"
    if not (isinstance(key, str) and _ROUTING_KEY.fullmatch(key)):
        return "control message without a valid job_status_routing_key"
    if not user:
        return "control message without a broker-validated user_id"
    if central_user is not None and user != central_user:
        return f"control message from broker user {user!r}, not the central's"
    return None


class Delivery(NamedTuple):
    tag: int
    props: object   # pika.BasicProperties
    body: bytes


class ServerPaused(Exception):
    """The server cannot take jobs now (down, or it refuses this bridge's key): pause intake."""


class Receiver:
    def __init__(self, cfg: BridgeConfig, new_client: Callable[[], Client],
                 stop: threading.Event) -> None:
        self.cfg, self.new_client, self.stop = cfg, new_client, stop
        self.addr = parse_url(cfg.url)
        self.client: Client | None = None   # used by the pool's thread only
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="receiver-client")
        self.stats = {"messages": 0, "jobs": 0, "known": 0, "dead": 0}

    # -- the connection loop ----------------------------------------------------------------
    def run(self) -> None:
        """Consume until ``stop`` is set, reconnecting to the broker after every loss."""
        import pika.exceptions as pe
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                self._session(backoff)
            except (pe.AMQPError, OSError) as exc:
                wait = backoff.next()
                log.warning("receiver: AMQP connection to %s lost or refused (%s); "
                            "reconnecting in %.1f s", self.addr, _why(exc), wait)
                self.stop.wait(wait)
        self._drop_client()
        self.pool.shutdown()

    def _session(self, backoff: Backoff) -> None:
        import pika
        cfg = self.cfg
        self.conn = conn = pika.BlockingConnection(connection_parameters(cfg, "receiver"))
        try:
            ch = conn.channel()
            ch.confirm_delivery()  # a dead-lettered message is acked only once the DLQ has it
            ch.queue_declare(cfg.jobs_queue, durable=True)
            ch.queue_declare(cfg.dead_letter_queue, durable=True)
            ch.basic_qos(prefetch_count=cfg.prefetch)
            pending: list[Delivery] = []

            def on_message(_ch, method, props, body) -> None:
                pending.append(Delivery(method.delivery_tag, props, body))

            ctag = ch.basic_consume(cfg.jobs_queue, on_message)
            backoff.reset()
            log.info("receiver: consuming %s on %s (dead letters to %s)", cfg.jobs_queue,
                     self.addr, cfg.dead_letter_queue)
            while not self.stop.is_set():
                conn.process_data_events(time_limit=0.25)
                if not pending:
                    continue
                conn.process_data_events(time_limit=0)  # what else has arrived: one batch
                batch = pending[:]
                pending.clear()
                try:
                    self.handle(ch, batch)
                except ServerPaused as exc:
                    # ack nothing more: what we hold goes back to the queue, untouched
                    ch.basic_cancel(ctag)
                    ch.basic_nack(delivery_tag=0, multiple=True, requeue=True)
                    pending.clear()
                    log.warning("receiver: %s; intake paused (messages given back to %s)",
                                exc, cfg.jobs_queue)
                    if not self._wait_for_server(conn):
                        break
                    pending.clear()
                    ctag = ch.basic_consume(cfg.jobs_queue, on_message)
                    log.info("receiver: the server answers again; intake resumed")
        finally:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:  # closing a broken connection: nothing left to save
                pass

    def _wait_for_server(self, conn) -> bool:
        """Ping the server with a growing wait (the AMQP connection kept alive meanwhile);
        False when asked to stop."""
        backoff = Backoff(0.5, 10.0)
        while not self.stop.is_set():
            conn.sleep(backoff.next())
            try:
                self._call(lambda c: c.ping(timeout=5))
                return True
            except ServerUnavailable:
                self._drop_client()
        return False

    def _call(self, fn: Callable[[Client], Any]) -> Any:
        """``fn(client)`` in the one thread that owns the client, while this thread keeps the
        AMQP connection served (heartbeats): a 100,000-job add may take a while."""
        fut = self.pool.submit(lambda: fn(self._client()))
        while not fut.done():
            self.conn.sleep(0.01)  # (a busier wait takes CPU from the server beside us)
        return fut.result()

    def _client(self) -> Client:
        if self.client is None:
            self.client = self.new_client()  # re-reads the home: a restarted server's address
        return self.client

    def _drop_client(self) -> None:
        def drop() -> None:
            if self.client is not None:
                self.client.close()
                self.client = None
        self.pool.submit(drop).result()

    # -- messages -----------------------------------------------------------------------------
    def handle(self, ch, batch: list[Delivery]) -> None:
        """Parse each message (poison goes to the dead-letter queue), then add the jobs of
        several messages in one request of at most ``batch_jobs`` jobs (a message is never
        split: its jobs are added all or none)."""
        good: list[tuple[Delivery, Any]] = []
        for d in batch:
            ctl = control_of(d.body)
            if ctl is not None:
                good.append((d, ("control", ctl)))
                continue
            try:
                jobs = parse_body(d.body, self.cfg.max_body_bytes)
                key = message_key(d.props.message_id, d.body)
                wf = workflow_of(jobs)
                good.append((d, add_workflow_key(wf, key) if wf is not None
                             else add_intake_keys(jobs, key)))
            except Poison as exc:
                self.dead_letter(ch, d, str(exc))
        group: list[tuple[Delivery, list[dict]]] = []
        size = 0
        for item in good:
            if isinstance(item[1], tuple):  # a control message: in its turn, after the adds
                if group:
                    self._add(ch, group)
                    group, size = [], 0
                self._control(ch, item[0], item[1][1])
                continue
            if isinstance(item[1], dict):  # a workflow: alone, in its turn
                if group:
                    self._add(ch, group)
                    group, size = [], 0
                self._add_workflow(ch, item[0], item[1])
                continue
            if group and size + len(item[1]) > self.cfg.batch_jobs:
                self._add(ch, group)
                group, size = [], 0
            group.append(item)
            size += len(item[1])
        if group:
            self._add(ch, group)

    def _add(self, ch, group: list[tuple[Delivery, list[dict]]]) -> None:
        jobs = [j for _, js in group for j in js]
        try:
            r = self._call(lambda c: _again_safe(c, "job_add", {"jobs": jobs},
                                                 max(c.timeout, len(jobs) / 1000)))
        except ServerUnavailable as exc:
            self._drop_client()
            raise ServerPaused(f"the server does not answer ({exc})") from None
        except Forbidden as exc:
            if "intake_key" not in str(exc):  # the key's role: no message can pass
                raise ServerPaused(f"the server refuses this bridge's key ({exc})") from None
            self._refused(ch, group, exc)
            return
        except PilotfishError as exc:
            self._refused(ch, group, exc)
            return
        for d, _ in group:
            ch.basic_ack(d.tag)
        self.stats["messages"] += len(group)
        self.stats["jobs"] += len(jobs)
        self.stats["known"] += r.get("known", 0)
        if r.get("known"):
            log.info("receiver: %d of %d jobs were already added (a redelivered message): "
                     "not added again", r["known"], len(jobs))
        log.debug("receiver: %d jobs from %d messages added", len(jobs), len(group))

    def _add_workflow(self, ch, d: Delivery, workflow: dict) -> None:
        try:
            r = self._call(lambda c: _again_safe(c, "workflow_add", {"workflow": workflow}))
        except ServerUnavailable as exc:
            self._drop_client()
            raise ServerPaused(f"the server does not answer ({exc})") from None
        except Forbidden as exc:
            if "intake_key" not in str(exc):
                raise ServerPaused(f"the server refuses this bridge's key ({exc})") from None
            self.dead_letter(ch, d, str(exc))
            return
        except PilotfishError as exc:
            self.dead_letter(ch, d, str(exc))
            return
        ch.basic_ack(d.tag)
        self.stats["messages"] += 1
        self.stats["workflows"] = self.stats.get("workflows", 0) + 1
        if r.get("known"):
            log.info("receiver: workflow %s was already added (a redelivered message): not "
                     "added again", r["id"])

    def _control(self, ch, d: Delivery, msg: dict) -> None:
        """Start or cancel a forwarded job here; the answer goes on its status key."""
        why = check_control(msg, getattr(d.props, "user_id", None), self.cfg.central_user)
        if why is not None:
            self.dead_letter(ch, d, why)
            return
        action, mid = msg["pilotfish_control"], msg["argo_job_id"]
        try:
            r = self._call(lambda c: _again_safe(c, "forward_control",
                                                 {"action": action, "intake_key": mid}))
        except ServerUnavailable as exc:
            self._drop_client()
            raise ServerPaused(f"the server does not answer ({exc})") from None
        except Forbidden as exc:
            if "may change only" not in str(exc):  # the key's role: no message can pass
                raise ServerPaused(f"the server refuses this bridge's key ({exc})") from None
            self.dead_letter(ch, d, str(exc))
            return
        except PilotfishError as exc:
            self.dead_letter(ch, d, str(exc))
            return
        self._answer(ch, msg["job_status_routing_key"], {
            "kind": "control", "action": action, "argo_job_id": mid, "result": r["result"],
            "job_id": r["job"], "state": r["state"], "time": now_iso()})
        ch.basic_ack(d.tag)
        self.stats[action] = self.stats.get(action, 0) + 1
        log.info("receiver: %s of %s: %s", action, mid, r["result"])

    def _answer(self, ch, key: str, body: dict) -> None:
        """A message to the forwarding server on its status key (with our validated user)."""
        import pika
        if not self.cfg.exchange:
            log.warning("receiver: no exchange configured: cannot answer on %s", key)
            return
        ch.basic_publish(self.cfg.exchange, key, json.dumps(body).encode(),
                         pika.BasicProperties(delivery_mode=2, content_type="application/json",
                                              user_id=self.addr.user))

    def _refusal(self, ch, d: Delivery, error: str) -> None:
        """A forward refused here is answered as a failure with the reason (its forwarder
        would wait for it forever otherwise): only a forward's (message id ``fwd:...``,
        reply_to its status key, a validated user, the central's when configured)."""
        p = d.props
        mid, key, user = p.message_id, p.reply_to, getattr(p, "user_id", None)
        if not (isinstance(mid, str) and mid.startswith("fwd:") and len(mid) <= 255
                and isinstance(key, str) and _ROUTING_KEY.fullmatch(key) and user
                and (self.cfg.central_user is None or user == self.cfg.central_user)):
            return
        where = f"site {self.cfg.site_name}" if self.cfg.site_name else "the site"
        self._answer(ch, key, {"kind": "job", "argo_job_id": mid, "to": "FAILED",
                               "refused": True, "time": now_iso(),
                               "message": f"refused at {where}'s intake: {error}"})

    def _refused(self, ch, group, exc: PilotfishError) -> None:
        """A request refused: alone, its message is poison; in a group, each message is tried
        alone so that only the culprit goes to the dead-letter queue."""
        if len(group) > 1:
            for item in group:
                self._add(ch, [item])
            return
        self.dead_letter(ch, group[0][0], str(exc))

    def dead_letter(self, ch, d: Delivery, error: str) -> None:
        import pika
        error = cap(" ".join(error.split()), MAX_HEADER_CHARS)
        p = d.props
        headers = dict(p.headers or {})
        headers[ERROR_HEADER] = error
        headers["x-pilotfish-queue"] = self.cfg.jobs_queue
        headers["x-pilotfish-time"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        ch.basic_publish("", self.cfg.dead_letter_queue, d.body, pika.BasicProperties(
            delivery_mode=2, headers=headers, message_id=p.message_id,
            correlation_id=p.correlation_id, content_type=p.content_type,
            timestamp=p.timestamp, app_id=p.app_id), mandatory=True)
        self._refusal(ch, d, error)
        ch.basic_ack(d.tag)
        self.stats["dead"] += 1
        log.warning("receiver: message %s to %s: %s", _shown_id(p.message_id),
                    self.cfg.dead_letter_queue, error)


def _again_safe(c: Client, op: str, args: dict, timeout: float | None = None) -> Any:
    """A request the receiver may repeat (every job it adds carries an intake key; starts
    and cancels are idempotent): a server that dies with it fails it at once, not at its
    timeout (30 s of a stalled intake after a site server's kill -9)."""
    return c._call(op, args, timeout, lost_fails=True)


def _shown_id(message_id) -> str:
    if not message_id:
        return "(no message_id)"
    return repr(message_id[:80])


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return cap(" ".join(text.split()), 300)


def now_iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(
        timespec="milliseconds")
