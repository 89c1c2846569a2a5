"""The server loop: one ROUTER socket, one thread, one transaction per turn.

A turn: read every waiting message (up to a cap) -> handle each -> dispatch queued jobs to hungry
agents -> expire silent agents (only when caught up, so our own backlog never looks like their
silence) -> commit -> send the replies. Nothing is sent before it is committed.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import zmq
from zmq.utils import z85

from pilotfish import dataroots, keys
from pilotfish import protocol as P
from pilotfish import settings
from pilotfish.errors import Forbidden, PilotfishError, ProtocolError
# every error text we send or log is capped (it may quote input)
from pilotfish.validate import cap, echo

from .core import JobServer
from .db import make_engine
from .site_agents import SiteAgents, bridge_key, federate_key, mail_key
from . import pilot_ops  # noqa: F401  (registers the pilot and site ops)
from . import gc_ops  # noqa: F401  (registers the gc op)
from . import events  # (registers the events ops)
from . import output_ops  # noqa: F401  (registers the job_log op)
from . import workflow_ops  # noqa: F401  (registers the workflow ops)
from . import staging_ops  # noqa: F401  (registers the site stager's ops, transfer_ls)
from . import usage_ops  # noqa: F401  (registers the utilization and usage ops)
from . import federation_ops  # noqa: F401  (registers the federation ops)
from .ops import AGENT_ROLES, LOCAL_ADMIN, OPS, Caller, check_call, who

log = logging.getLogger("pilotfish.server")
MAX_MESSAGES_PER_TURN = 2000


#: Where the kernel takes the source ports of outgoing connections, and its default.
EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")


def listen_ports(ephemeral: str | None = None) -> tuple[int, int]:
    """The range (low inclusive, high exclusive) a server picks its random port from: below
    the kernel's ephemeral ports (``ephemeral``: the text of ip_local_port_range), or above
    them when there is no room below (20000-29999 when the kernel does not say; pyzmq's own
    49152-65535 when there is no room either side). A port from the ephemeral range, freed by
    a kill -9, can be taken by any outgoing connection on the host before the server comes
    back, and the agents would then not find it again; pyzmq's default range lies inside
    Linux's (32768-60999)."""
    try:
        lo, hi = (int(x) for x in (ephemeral if ephemeral is not None
                                   else EPHEMERAL_PORTS.read_text()).split())
    except (OSError, ValueError):
        return 20000, 30000
    if lo - 1024 >= 2000:
        return max(1024, lo - 10000), lo
    if 65535 - hi >= 2000:
        return hi + 1, 65536
    return 49152, 65536  # no room outside: pyzmq's own default


#: Seconds between two log lines about refused connections of one kind (a refused agent
#: reconnects every few seconds; the first refusal is always logged).
REFUSAL_LOG_EVERY = 60.0


class _Throttle:
    """Say a thing once, then at most once per ``every`` seconds, with how often it recurred."""

    def __init__(self, every: float = REFUSAL_LOG_EVERY, size: int = 10_000) -> None:
        self.every, self.size = every, size
        self.seen: dict = {}  # key -> [last logged, recurrences since]

    def __call__(self, key) -> int | None:
        """None: stay quiet; else the number of recurrences not logged since the last line."""
        now = time.monotonic()
        entry = self.seen.get(key)
        if entry is None:
            if len(self.seen) >= self.size:
                self.seen.clear()
            self.seen[key] = [now, 0]
            return 0
        if now - entry[0] < self.every:
            entry[1] += 1
            return None
        quiet, entry[0], entry[1] = entry[1], now, 0
        return quiet


class ZapHandler:
    """The ZAP handler (RFC 27) of the server's context, in a thread of its own.

    It admits a CURVE client only when its public key is in the authorized-keys directory
    (re-read when that changes: a revoked key is refused from its next connection on) and logs
    every refusal, throttled: ZAP denials with the client's key and address, and, through a
    monitor of the ROUTER, handshakes that fail before ZAP (a client without keys). The ROUTER
    sets ZAP_ENFORCE_DOMAIN, so should this handler be gone, handshakes fail instead of passing.
    """

    ENDPOINT = "inproc://zeromq.zap.01"

    def __init__(self, ctx: zmq.Context, authorized: keys.AuthorizedKeys) -> None:
        self.authorized = authorized
        self.zap = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(self.ENDPOINT)
        self.ctx = ctx
        self.mon: zmq.Socket | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pilotfish-zap", daemon=True)
        self.throttle = _Throttle()
        self.denied = 0

    def start(self, router: zmq.Socket) -> None:
        endpoint = f"inproc://pilotfish.monitor.{id(self)}"
        router.monitor(endpoint, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.mon = self.ctx.socket(zmq.PAIR)
        self.mon.setsockopt(zmq.LINGER, 0)
        self.mon.connect(endpoint)
        self.thread.start()

    def stop(self) -> None:
        """After the ROUTER is closed: end the thread and close its sockets."""
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(5)
        if not self.thread.is_alive():
            for s in (self.zap, self.mon):
                if s is not None:
                    s.close(linger=0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.zap, zmq.POLLIN)
        if self.mon is not None:
            poller.register(self.mon, zmq.POLLIN)
        while not self.stop_event.is_set():
            try:
                ready = dict(poller.poll(50))  # stop() joins within 50 ms
                if self.zap in ready:
                    self.handle(self.zap.recv_multipart())
                if self.mon is not None and self.mon in ready:
                    self.on_monitor(self.mon.recv_multipart())
            except zmq.ContextTerminated:
                return
            except Exception:  # never leave a handshake unanswered for a bug of ours
                log.exception("ZAP handler error")

    def handle(self, msg: list[bytes]) -> None:
        if len(msg) < 6:  # not a ZAP request: answer so the REP socket stays usable
            self.zap.send_multipart([b"1.0", b"", b"500", b"malformed ZAP request", b"", b""])
            return
        version, rid, _domain, address, _identity, mechanism = msg[:6]
        creds = msg[6:]
        name = None
        reason = "not an authorized key"
        key = b""
        try:
            if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
                reason = f"mechanism {mechanism.decode(errors='replace')} (only CURVE is served)"
            else:
                key = z85.encode(creds[0])
                name = self.authorized.lookup(key)
        except Exception:
            log.exception("ZAP: checking a key failed; refusing it")
            name, reason = None, "internal error while checking the key"
        if name is not None:
            log.debug("ZAP: admitted key %r (%s) from %s", name, key.decode(),
                      address.decode(errors="replace"))
            # the user id is the public key, not its name: the server maps it to a name and a
            # role at every message, so a key revoked (or a name given to another key) while
            # its connection is open gets nothing from its next message on
            self.zap.send_multipart([version, rid, b"200", b"OK", key, b""])
            return
        self.denied += 1
        peer = address.decode(errors="replace")
        quiet = self.throttle(("zap", key, peer))
        if quiet is not None:
            log.warning("ZAP: denied CURVE key %s from %s: %s (keys/authorized/ in %s)%s",
                        key.decode() or "-", peer, reason, self.authorized.directory.parent,
                        f"; {quiet} more refusals since" if quiet else "")
        self.zap.send_multipart([version, rid, b"400", reason.encode()[:200], b"", b""])

    def on_monitor(self, frames: list[bytes]) -> None:
        from zmq.utils.monitor import parse_monitor_message
        ev = parse_monitor_message(frames)
        if ev["event"] not in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                               zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            return
        self.denied += 1
        quiet = self.throttle(("handshake", ev["event"], ev["value"]))
        if quiet is None:
            return
        if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            level, hint = logging.WARNING, keys.handshake_hint(ev["event"], ev["value"])
        else:  # the peer hung up first (a plain-text client that saw our CURVE greeting)
            level, hint = logging.INFO, ("the peer closed the connection during the handshake "
                                         "(a client without CurveZMQ keys? a port scan?)")
        log.log(level, "ZAP: denied a connection on %s before authentication: %s%s",
                ev["endpoint"].decode(errors="replace"), hint,
                f"; {quiet} more refusals since" if quiet else "")


#: Allocations between two young collections of the cyclic garbage collector (Python's default
#: is 700). A server turn allocates tens of thousands of short-lived dicts and rows, nearly none
#: in cycles: at 700, collections took 7 % of the server's CPU in the dispatch bench.
GC_YOUNG = 50_000


def settle_heap(loaded: bool) -> None:
    """Tune the garbage collector for serving: young collections far less often, and (once the
    queue is read) what start-up made -- the queue, the apps, the modules -- moved out of the
    collector's sight, so full collections no longer walk it (``gc.freeze``)."""
    gc.set_threshold(GC_YOUNG, 20, 20)
    if loaded:
        gc.collect()
        gc.freeze()


class Service:
    def __init__(self, db_url: str, bind: str, home: Path,
                 heartbeat: float = settings.HEARTBEAT_SECONDS,
                 lease_timeout: float | None = None, insecure: bool = False,
                 sites: list[str] | None = None, site_poll: float = 10.0,
                 data_roots: list[str] | None = None, events_keep: float | None = None,
                 amqp: str | None = None, mail: str | None = None,
                 web: str | None = None, federate: str | None = None) -> None:
        self.home = home
        #: prune events older than this many seconds as we run (None: keep them)
        self.events_keep = events_keep
        self.next_prune = 0.0
        # the roots jobs' URLs may name: given (--data-root, the sites' data_roots) and
        # $PILOTFISH_DATA_ROOTS; none: the home's data directory, made owner-only
        self.data_roots = dataroots.make(home, list(data_roots or []) + dataroots.from_env())
        dataroots.ensure_data_dir(self.data_roots)
        self.db_url = db_url
        self.heartbeat = heartbeat
        self.lease_timeout = lease_timeout or heartbeat * settings.LEASE_HEARTBEATS
        # CURVE on every endpoint that can leave the machine; plain text only when asked for
        # and only on loopback; ipc:// is guarded by the socket file's permissions instead
        self.curve = keys.uses_curve(bind) and not insecure
        if insecure and not keys.is_loopback_bind(bind):
            raise PilotfishError(f"--insecure is refused for {bind}: plain text is only served "
                                 "on loopback (tcp://127.0.0.1:PORT) or ipc://")
        settings.make_private(home)
        settings.private_sqlite(db_url)
        self.public_key: bytes | None = None
        if self.curve:
            keys.ensure_home_keys(home)
            self.public_key, secret = keys.server_keys(home)
        # the bridge beside the server gets a submitter key of its own (not the home's admin)
        self.site_agents = SiteAgents(home, sites or [], site_poll, amqp, bridge_key(home)
                                      if amqp and self.curve else None, mail,
                                      mail_key(home) if mail and self.curve else None, web=web,
                                      federate=federate, federate_client_key=federate_key(home)
                                      if federate and self.curve else None)
        try:  # the task output limits and the stop grace (told to agents): a bad setting
            settings.output_limits()  # stops the start
            self.stop_grace = settings.agent_stop_grace()
        except ValueError as exc:
            raise PilotfishError(str(exc)) from None
        self.engine = make_engine(db_url)
        self.srv = JobServer(self.engine, heartbeat, self.lease_timeout, self.data_roots)
        #: ``events`` requests waiting for an event (answered after the commit that makes it)
        self.waiters = events.Waiters()
        self.ctx = zmq.Context()
        self.zap: ZapHandler | None = None
        #: who a CURVE caller is: its key's name and role, re-checked at every message
        self.key_roles = keys.KeyRoles(home) if self.curve else None
        self.refusals = _Throttle()
        self.sock = self.ctx.socket(zmq.ROUTER)
        if self.curve:
            # the handler is bound before the ROUTER is, so no connection ever skips it
            self.zap = ZapHandler(self.ctx, keys.AuthorizedKeys(keys.authorized_dir(home)))
            self.sock.setsockopt(zmq.CURVE_SERVER, 1)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            self.sock.setsockopt(zmq.ZAP_DOMAIN, b"pilotfish")
            self.sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
            self.zap.start(self.sock)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 1000)
        # an agent that reconnects with its routing id takes over its old connection
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self._bind(bind)
        endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        if endpoint.startswith("ipc://"):
            settings.make_private(Path(endpoint[len("ipc://"):]))
        host = endpoint.split("://", 1)[1].rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", "*"):
            endpoint = endpoint.replace(host, socket.getfqdn(), 1)
        self.address = endpoint
        self.stopping = False
        if self.curve:
            log.info("CurveZMQ on: clients need this server's public key %s and a key in %s",
                     self.public_key.decode(), keys.authorized_dir(home))
        elif insecure:
            log.warning("INSECURE: serving plain text without authentication on %s (asked for "
                        "with --insecure); any local user can connect", self.address)

    def _bind(self, bind: str) -> None:
        """Bind; a '*' port reuses this home's last port when it is free, so agents that were
        connected before a restart find the server again, else any free port."""
        try:
            if not (bind.endswith(":*") or bind.endswith(":0")):
                self.sock.bind(bind)
                return
            base = bind.rsplit(":", 1)[0]
            try:
                last = int(settings.last_port_path(self.home).read_text())
                self.sock.bind(f"{base}:{last}")
                return
            except (OSError, ValueError, zmq.ZMQError):
                pass
            low, high = listen_ports()
            port = self.sock.bind_to_random_port(base, min_port=low, max_port=high,
                                                 max_tries=1000)
            settings.last_port_path(self.home).write_text(f"{port}\n")
        except zmq.ZMQError as exc:
            raise PilotfishError(f"cannot bind {bind}: {exc}") from None

    def _write_info(self) -> None:
        info = {"address": self.address, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.time(),
                "db": self.engine.url.render_as_string(hide_password=True),
                # whether clients must use CurveZMQ, and the key they need (never the secret)
                "curve": self.curve,
                "public_key": self.public_key.decode() if self.public_key else None,
                "secure": self.curve or self.address.startswith(keys.LOCAL_TRANSPORTS),
                "security": ("curve" if self.curve else "ipc (owner-only socket file)"
                             if self.address.startswith(keys.LOCAL_TRANSPORTS)
                             else "insecure (plain text on loopback, --insecure)")}
        path = settings.server_info_path(self.home)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.chmod(tmp, 0o600)
        tmp.replace(path)
        settings.pid_path(self.home).write_text(f"{os.getpid()}\n")

    def _remove_info(self) -> None:
        for path in (settings.server_info_path(self.home), settings.pid_path(self.home)):
            try:
                info = path.read_text()
                if str(os.getpid()) in info:
                    path.unlink()
            except OSError:
                pass

    def _on_signal(self, signum, _frame) -> None:
        log.info("signal %d: stopping", signum)
        self.stopping = True

    def run(self) -> None:
        self.srv.load()
        settle_heap(self.srv.loading is None)
        self._write_info()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("serving on %s with %s; data roots: %s", self.address,
                 self.engine.url.render_as_string(hide_password=True),
                 self.data_roots.allowed())
        self.site_agents.start(self.address)
        sock = self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_expire = time.time() + self.heartbeat
        try:
            while not self.stopping:
                # while the queue is still being read, read a range between turns, no sleep
                poller.poll(0 if self.srv.loading is not None else self.poll_ms())
                read_all = self.turn(sock)
                if self.srv.loading is not None:
                    self.load_step(sock)
                if self.waiters.due():  # a parked events request's time is up
                    self.finish_turn(sock)
                now = time.time()
                # a few times a second, off the dispatch path: idle agents no job fits are told
                # so, and their pilots leave (server/drain.py)
                if self._drain(now) and not self.finish_turn(sock):
                    self.reload()
                if now >= next_expire and self.caught_up(sock, read_all):
                    next_expire = now + min(0.5, self.heartbeat / 2)
                    self.srv.expire(now)
                    if not self.finish_turn(sock):
                        self.reload()
                    self.site_agents.check()
                    if self.events_keep is not None and now >= self.next_prune:
                        self.prune_events(sock, now)
            self.say_stopping(sock)
        finally:
            self.site_agents.stop()
            self._remove_info()
            sock.close(linger=1000)
            if self.zap is not None:
                self.zap.stop()
            self.ctx.term()
            self.srv.close()
            self.engine.dispose()
            log.info("stopped")

    def load_step(self, sock: zmq.Socket) -> None:
        """Read the next range of queued jobs in a turn of its own (after the last turn's
        commit); once all are read, dispatch to the agents that waited."""
        srv = self.srv
        try:
            srv.load_more()
            if srv.loading is None:
                settle_heap(True)
                now = time.time()
                srv.resolve_children(now)
                srv.dispatch(now)
        except Exception:
            log.exception("internal error reading the queue")
            self.reload()
            return
        if not self.finish_turn(sock):
            self.reload()

    def prune_events(self, sock: zmq.Socket, now: float) -> None:
        """One bounded chunk of ``--events-keep`` pruning in a turn of its own; the next chunk
        half a second later while more is due, else after a tenth of the time kept (at most
        an hour)."""
        try:
            r = events.events_prune(self.srv, {"before": now - self.events_keep}, now)
        except Exception:
            log.exception("pruning events failed")
            self.reload()
            self.next_prune = now + min(3600.0, self.events_keep / 10)
            return
        if not self.finish_turn(sock):
            self.reload()
        elif r["pruned"]:
            log.info("pruned %d events older than %.0f s; the stream starts at id %d",
                     r["pruned"], self.events_keep, r["oldest"])
        self.next_prune = now + (0.5 if r["more"] else min(3600.0, self.events_keep / 10))

    def _drain(self, now: float) -> int:
        try:
            return self.srv.drain.check(now)
        except Exception:  # a bug of ours: agents then leave at their idle timeout
            log.exception("internal error telling idle agents no work is left")
            try:  # its query may have left the transaction failed; nothing else is in it
                self.srv.conn.rollback()
            except Exception:
                log.exception("rollback failed")
            return 0

    def poll_ms(self) -> int:
        """How long the loop may sleep: 250 ms, or less when a parked request is due sooner."""
        deadline = self.waiters.next_deadline()
        if deadline is None:
            return 250
        return max(0, min(250, int((deadline - time.monotonic()) * 1000) + 1))

    def say_stopping(self, sock: zmq.Socket) -> None:
        """We stop on purpose (the shutdown op, SIGTERM, SIGINT): tell the agents, so they
        leave after a grace unless a server welcomes them again (``server stop; server start``
        keeps them). Not on a crash: this runs only when the loop ended by itself."""
        grace = max(self.stop_grace, 3 * self.heartbeat)
        told = self.srv.tell_stopping(grace)
        if told:
            log.info("told %d agents we are stopping: they leave in %.0f s unless a server "
                     "welcomes them again", told, grace)
        self.finish_turn(sock)  # sends them (the socket lingers a second on close)

    def caught_up(self, sock: zmq.Socket, read_all: float | None) -> bool:
        """May leases be counted out now? Only when every message waiting has been read: a
        message of an agent's still in our socket will renew its leases, and the agent counts
        on that while its link stays up (see pilotfish.pilot.agent). So: nothing waits now, or
        this turn read everything a moment ago (``read_all``: when its reading ran dry)."""
        if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return True
        return read_all is not None and time.monotonic() - read_all < self.heartbeat / 2

    def turn(self, sock: zmq.Socket) -> float | None:
        """One turn; returns when (time.monotonic) its reading found nothing more waiting, or
        None when it stopped at MAX_MESSAGES_PER_TURN with more to read."""
        now = time.time()
        read_all = None
        recv = self.recv
        # kept until the turn is committed: after an internal error the turn is handled again
        # without the message that caused it (see _recover)
        batch: list[tuple[list[bytes], Caller]] = []
        while len(batch) < MAX_MESSAGES_PER_TURN:
            try:
                frames, caller = recv(sock)
            except zmq.Again:
                read_all = time.monotonic()
                break
            batch.append((frames, caller))
            if not self.handle(frames, now, caller):
                self._recover(sock, batch, now)
                return None
        if not batch and not self.srv.hungry:
            return read_all
        try:
            self.srv.resolve_children(now)  # children readied now can be dispatched now
            self.srv.dispatch(now)
        except Exception:  # a write of this turn that fails here: never die of it either
            log.exception("internal error dispatching")
            self._recover(sock, batch, now, dispatch_failed=True)
            return None
        if not self.finish_turn(sock):
            self._recover(sock, batch, now)
            return None
        return read_all

    def finish_turn(self, sock: zmq.Socket) -> bool:
        """Commit the turn, then send its replies; False (nothing sent) if the commit failed."""
        srv = self.srv
        try:
            srv.commit()
        except Exception:
            log.exception("database write failed")
            return False
        if srv.stopping:
            self.stopping = True
        if self.waiters:
            try:
                self.waiters.release(srv)
            except Exception:  # a bug of ours: the parked requests wait for the next turn
                log.exception("internal error answering parked events requests")
                try:
                    srv.conn.rollback()
                except Exception:
                    log.exception("rollback failed")
        else:
            srv.batch.turn_events.clear()
        send = sock.send_multipart
        for identity, frame in srv.outbox:
            try:
                send([identity, frame], zmq.NOBLOCK)
            except zmq.ZMQError:  # peer gone or over its high-water mark: it will re-ask
                pass
        srv.outbox.clear()
        return True

    def _recover(self, sock: zmq.Socket, batch: list[tuple[list[bytes], Caller]], now: float,
                 dispatch_failed: bool = False) -> None:
        """One bad message must fail alone. Something in this turn failed (a handler, the
        dispatch or the commit) and nothing of it was committed or sent: drop the turn, rebuild
        from the database, and handle its messages again one by one, each in a transaction of
        its own, so the culprit is answered with an error and every other message is handled
        as if it had been alone -- no acknowledged or in-flight work of others is lost."""
        self.reload()
        for frames, caller in batch:
            if not self.handle(frames, now, caller):
                self.reload()  # its half-done changes are gone; the others' are committed
                self._internal_error(frames, "handling it failed")
            elif not self.finish_turn(sock):
                self.reload()
                self._internal_error(frames, "storing its result failed")
                self.finish_turn(sock)
        if dispatch_failed:
            return  # a bug in dispatching: the next turn tries again with fresh state
        try:
            self.srv.resolve_children(now)
            self.srv.dispatch(now)
        except Exception:
            log.exception("internal error dispatching")
            self.reload()
            return
        if not self.finish_turn(sock):
            self.reload()

    def _internal_error(self, frames: list[bytes], why: str) -> None:
        """Answer the one message that caused an internal error (its reply was dropped)."""
        rid = None
        try:
            kind, m = P.decode(frames[1], (P.REQUEST,))
            rid = m["rid"]
        except Exception:
            pass
        log.error("refused a message from %s alone: %s", frames[0].hex()[:16], why)
        self.srv.send(frames[0], P.encode(P.ERROR, error=f"internal server error: {why}; "
                                          "nothing of this request was stored", rid=rid))

    def reload(self) -> None:
        """Crash-only recovery: the database is the truth. Drop this turn's uncommitted work and
        replies and rebuild (see _recover for what becomes of the turn's messages)."""
        log.error("rolling back this turn and reloading state from the database")
        self.waiters.drop_pending()
        try:
            self.srv.batch.settle()  # writes streamed this turn: an error among them is
        except Exception:            # what failed it, logged already or raised again here
            pass
        try:
            self.srv.conn.rollback()
        except Exception:
            log.exception("rollback failed")
        self.srv.close()
        epoch = self.srv.epoch
        self.srv = JobServer(self.engine, self.heartbeat, self.lease_timeout, self.data_roots)
        self.srv.load(epoch)

    def recv(self, sock: zmq.Socket) -> tuple[list[bytes], Caller]:
        """One message and who sent it. The key comes from the ZAP user id that libzmq
        attaches to every frame of a CURVE connection (the routing id is the peer's choice
        and proves nothing); without CURVE there is no key and the caller is admin."""
        if self.key_roles is None:
            return sock.recv_multipart(zmq.NOBLOCK), LOCAL_ADMIN
        frames = [sock.recv(zmq.NOBLOCK)]  # the routing id, which the ROUTER prepends
        body = None
        while sock.getsockopt(zmq.RCVMORE):
            body = sock.recv(copy=False)  # a zmq.Frame: it carries the connection's metadata
            frames.append(body.bytes)
        try:
            key = body.get("User-Id")
        except (zmq.ZMQError, AttributeError):  # no ZAP user id (cannot happen with
            # ZAP_ENFORCE_DOMAIN on): no key, no rights
            return frames, Caller(None, None, None, "its connection has no CurveZMQ key")
        name, role = self.key_roles.lookup(key.encode())
        if name is None:
            return frames, Caller(None, None, key, "its key is no longer authorized")
        if role is None:
            return frames, Caller(name, None, key, self.key_roles.error or
                                  "its name in keys/authorized/ is not a valid key name")
        return frames, Caller(name, role, key)

    def refuse(self, caller: Caller, what: str, exc: Exception) -> None:
        """Log a refused message, at most once a minute per key and kind (an agent with the
        wrong key retries every few seconds)."""
        quiet = self.refusals(("refused", caller.key, what))
        if quiet is not None:
            log.warning("refused %s from key %s (%s): %s%s", what, caller.name or caller.key,
                        caller.role or "no role", exc,
                        f"; {quiet} more refusals since" if quiet else "")

    def handle(self, frames: list[bytes], now: float, caller: Caller = LOCAL_ADMIN) -> bool:
        """Handle one message; False after an internal error (a bug of ours), whose partial
        changes the caller must drop (see _recover)."""
        srv = self.srv
        identity = frames[0]
        rid = None
        try:
            if len(frames) != 2:
                raise ProtocolError(f"expected one message frame, got {len(frames) - 1}")
            kind, m = P.decode(frames[1], (P.HELLO, P.UPDATE, P.BYE, P.REQUEST))
            if kind == P.REQUEST:
                rid = m["rid"]
                self.request(identity, m, now, caller)
                return True
            if caller.role not in AGENT_ROLES:
                exc = Forbidden(f"{who(caller)} may not speak as a node agent: give the agent "
                                "a key with the role agent" if caller.role else
                                f"{f'key {caller.name!r}' if caller.name else 'this key'} "
                                f"may do nothing: {caller.why}")
                self.refuse(caller, kind, exc)
                srv.send(identity, P.encode(P.ERROR, error=str(exc), rid=None))
            elif kind == P.HELLO:
                try:
                    srv.on_hello(identity, m, now, caller.key, caller.name)
                except Forbidden as exc:
                    self.refuse(caller, f"hello as agent {m['agent']}", exc)
                    srv.send(identity, P.encode(P.ERROR, error=str(exc), rid=None))
            else:
                a = srv.agent_for(identity, m["agent"], m.get("epoch"))
                if a is None:
                    srv.send(identity, P.encode(P.ERROR, error="unknown agent: say hello",
                                                rid=None))
                elif caller.key is not None and a.key != caller.key:
                    # its routing id was taken over (ROUTER_HANDOVER) by another key: nothing
                    # of this agent's (its leases, its results) is this caller's to change
                    exc = Forbidden(f"agent {a.id} belongs to another key; key "
                                    f"{caller.name!r} may not {kind} for it")
                    self.refuse(caller, f"{kind} as agent {a.id}", exc)
                    srv.send(identity, P.encode(P.ERROR, error=str(exc), rid=None))
                elif kind == P.UPDATE:
                    srv.on_update(a, m, now)
                else:
                    srv.on_bye(a, m, now)
        except ProtocolError as exc:
            srv.stats["bad_messages"] += 1
            log.warning("bad message from %s: %s", identity.hex()[:16], cap(str(exc)))
            srv.send(identity, P.encode(P.ERROR, error=cap(str(exc)), rid=rid))
        except Exception:  # a bug of ours: never die of one message, nor fail others with it
            log.exception("internal error handling a message from %s", identity.hex()[:16])
            return False
        return True

    def request(self, identity: bytes, m: dict, now: float,
                caller: Caller = LOCAL_ADMIN) -> None:
        srv = self.srv
        fn = OPS.get(m["op"])
        try:
            if fn is None:
                raise ProtocolError(f"unknown op {echo(m['op'])}")
            try:
                check_call(m["op"], fn, m["args"], caller)
            except Forbidden as exc:
                self.refuse(caller, m["op"], exc)
                raise
            if fn.wants_caller:
                result = fn(srv, m["args"], now, caller)
            else:
                result = fn(srv, m["args"], now)
            if isinstance(result, events.Park):  # answered when an event comes, or at its time
                self.waiters.park(identity, m["rid"], result)
                return
        except PilotfishError as exc:
            srv.send(identity, P.encode(P.REPLY, rid=m["rid"], ok=False, result=None,
                                        error=cap(str(exc)), code=exc.code))
            return
        srv.send(identity, P.encode(P.REPLY, rid=m["rid"], ok=True, result=result, error=None,
                                    code=None))
