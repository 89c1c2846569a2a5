"""The server loop: one ROUTER socket, one thread, one transaction per turn.

A turn: read every waiting message (up to a cap) -> handle each -> dispatch queued jobs to hungry
agents -> expire silent agents (only when caught up, so our own backlog never looks like their
silence) -> commit -> send the replies. Nothing is sent before it is committed.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import zmq

from pilotfish import protocol as P
from pilotfish import settings
from pilotfish.errors import PilotfishError, ProtocolError

from .core import JobServer
from .db import make_engine
from .ops import OPS

log = logging.getLogger("pilotfish.server")
MAX_MESSAGES_PER_TURN = 2000


class Service:
    def __init__(self, db_url: str, bind: str, home: Path,
                 heartbeat: float = settings.HEARTBEAT_SECONDS,
                 lease_timeout: float | None = None) -> None:
        self.home = home
        self.db_url = db_url
        self.heartbeat = heartbeat
        self.lease_timeout = lease_timeout or heartbeat * settings.LEASE_HEARTBEATS
        self.engine = make_engine(db_url)
        self.srv = JobServer(self.engine, heartbeat, self.lease_timeout)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 1000)
        # an agent that reconnects with its routing id takes over its old connection
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self._bind(bind)
        endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        host = endpoint.split("://", 1)[1].rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", "*"):
            endpoint = endpoint.replace(host, socket.getfqdn(), 1)
        self.address = endpoint
        self.stopping = False

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
            port = self.sock.bind_to_random_port(base)
            settings.last_port_path(self.home).write_text(f"{port}\n")
        except zmq.ZMQError as exc:
            raise PilotfishError(f"cannot bind {bind}: {exc}") from None

    def _write_info(self) -> None:
        info = {"address": self.address, "pid": os.getpid(), "started": time.time(),
                "db": self.engine.url.render_as_string(hide_password=True)}
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
        self._write_info()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("serving on %s with %s", self.address,
                 self.engine.url.render_as_string(hide_password=True))
        sock = self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_expire = time.time() + self.heartbeat
        try:
            while not self.stopping:
                poller.poll(250)
                self.turn(sock)
                now = time.time()
                if now >= next_expire:
                    next_expire = now + min(0.5, self.heartbeat / 2)
                    self.srv.expire(now)
                    self.finish_turn(sock)
        finally:
            self._remove_info()
            sock.close(linger=1000)
            self.ctx.term()
            self.srv.conn.close()
            self.engine.dispose()
            log.info("stopped")

    def turn(self, sock: zmq.Socket) -> None:
        now = time.time()
        n = 0
        recv = sock.recv_multipart
        while n < MAX_MESSAGES_PER_TURN:
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
            self.handle(frames, now)
        if n == 0 and not self.srv.hungry:
            return
        self.srv.resolve_children(now)  # children readied now can be dispatched now
        self.srv.dispatch(now)
        self.finish_turn(sock)

    def finish_turn(self, sock: zmq.Socket) -> None:
        srv = self.srv
        try:
            srv.commit()
        except Exception:
            log.exception("database write failed")
            self.reload()
            return
        if srv.stopping:
            self.stopping = True
        send = sock.send_multipart
        for identity, frame in srv.outbox:
            try:
                send([identity, frame], zmq.NOBLOCK)
            except zmq.ZMQError:  # peer gone or over its high-water mark: it will re-ask
                pass
        srv.outbox.clear()

    def reload(self) -> None:
        """Crash-only recovery: the database is the truth. Drop this turn's uncommitted work and
        replies (agents resend unacknowledged updates, clients time out) and rebuild."""
        log.error("rolling back this turn and reloading state from the database")
        try:
            self.srv.conn.rollback()
            self.srv.conn.close()
        except Exception:
            log.exception("rollback failed")
        self.srv = JobServer(self.engine, self.heartbeat, self.lease_timeout)
        self.srv.load()

    def handle(self, frames: list[bytes], now: float) -> None:
        srv = self.srv
        identity = frames[0]
        rid = None
        try:
            if len(frames) != 2:
                raise ProtocolError(f"expected one message frame, got {len(frames) - 1}")
            kind, m = P.decode(frames[1], (P.HELLO, P.UPDATE, P.BYE, P.REQUEST))
            if kind == P.REQUEST:
                rid = m["rid"]
                self.request(identity, m, now)
            elif kind == P.HELLO:
                srv.on_hello(identity, m, now)
            else:
                a = srv.agent_for(identity, m["agent"])
                if a is None:
                    srv.send(identity, P.encode(P.ERROR, error="unknown agent: say hello",
                                                rid=None))
                elif kind == P.UPDATE:
                    srv.on_update(a, m, now)
                else:
                    srv.on_bye(a, m, now)
        except ProtocolError as exc:
            srv.stats["bad_messages"] += 1
            log.warning("bad message from %s: %s", identity.hex()[:16], exc)
            srv.send(identity, P.encode(P.ERROR, error=str(exc), rid=rid))
        except Exception as exc:  # a bug of ours: never die of one message
            log.exception("internal error handling a message from %s", identity.hex()[:16])
            self.reload()
            self.srv.send(identity, P.encode(P.ERROR, error=f"internal server error: {exc}",
                                             rid=rid))

    def request(self, identity: bytes, m: dict, now: float) -> None:
        srv = self.srv
        fn = OPS.get(m["op"])
        try:
            if fn is None:
                raise ProtocolError(f"unknown op {m['op']!r}")
            result = fn(srv, m["args"], now)
        except PilotfishError as exc:
            srv.send(identity, P.encode(P.REPLY, rid=m["rid"], ok=False, result=None,
                                        error=str(exc), code=exc.code))
            return
        srv.send(identity, P.encode(P.REPLY, rid=m["rid"], ok=True, result=result, error=None,
                                    code=None))
