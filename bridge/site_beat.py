"""A site's heartbeat (federation): every ``site_beat_seconds`` the AMQP bridge of a site server
publishes the site's backlog (jobs queued at its server) and capacity (cores of its live
agents) on ``site_beat_routing_key``, with the broker-validated ``user_id`` of its login. The
central server's forwarder (bridge/federate.py) routes jobs by them and calls a site that stops
beating silent. A beat is small and not persistent: a lost one is replaced by the next.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

from pilotfish.client import Client
from pilotfish.errors import PilotfishError

from .backoff import Backoff
from .config import BridgeConfig, connection_parameters, parse_url

log = logging.getLogger("pilotfish.bridge.site_beat")


def beat_message(site: str, status: dict, now: float) -> dict:
    """The heartbeat's body from the server's ``status`` (pure)."""
    return {"kind": "heartbeat", "site": site, "backlog": int(status.get("queued") or 0),
            "capacity": int(status.get("cores_alive") or 0), "time": now}


class SiteBeat:
    def __init__(self, cfg: BridgeConfig, new_client: Callable[[], Client],
                 stop: threading.Event) -> None:
        self.cfg, self.new_client, self.stop = cfg, new_client, stop
        self.addr = parse_url(cfg.url)
        self.client: Client | None = None

    def run(self) -> None:
        import pika
        import pika.exceptions as pe
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                conn = pika.BlockingConnection(connection_parameters(self.cfg, "site beat"))
                try:
                    ch = conn.channel()
                    ch.exchange_declare(self.cfg.exchange, "topic", durable=True)
                    backoff.reset()
                    log.info("site %s: heartbeats every %g s on %s", self.cfg.site_name,
                             self.cfg.site_beat_seconds, self.cfg.site_beat_routing_key)
                    while not self.stop.is_set():
                        self._beat(ch, pika)
                        conn.sleep(self.cfg.site_beat_seconds)
                finally:
                    if conn.is_open:
                        conn.close()
            except (pe.AMQPError, OSError) as exc:
                wait = backoff.next()
                log.warning("site beat: AMQP connection lost or refused (%s); again in %.1f s",
                            exc or type(exc).__name__, wait)
                self.stop.wait(wait)

    def _beat(self, ch, pika) -> None:
        try:
            if self.client is None:
                self.client = self.new_client()
            # a read: a server that dies with it fails it at once (no beat: the site is
            # silent), and a few seconds bound it, not the client's 30 (a restarted server
            # beats again at once)
            status = self.client._call("status", {}, max(2.0, 2 * self.cfg.site_beat_seconds),
                                       lost_fails=True)
        except PilotfishError as exc:  # the server is down: no beat (the site is silent)
            log.warning("site beat: the server does not answer (%s): no heartbeat", exc)
            if self.client is not None:
                self.client.close()
            self.client = None
            return
        body = json.dumps(beat_message(self.cfg.site_name, status, time.time())).encode()
        ch.basic_publish(self.cfg.exchange, self.cfg.site_beat_routing_key, body,
                         pika.BasicProperties(content_type="application/json",
                                              user_id=self.addr.user,
                                              timestamp=int(time.time())))
