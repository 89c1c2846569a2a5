"""``pilotfish federate``: the central server's forwarder and mirror (an edge process, a client
of the server with an admin key; ``server start --federate CONFIG.yaml`` runs it beside it).

Forward: it takes the jobs the server routed to remote sites (``forward_take``: a lease, as
an agent's) and publishes each, persistent and confirmed by the broker, to its site's jobs
queue -- the queue the site server's AMQP receiver consumes -- with a stable message id and
intake key ``fwd:<name>:<job>:<attempt>``: a job published twice (the forwarder died before
the site acknowledged it, so the server hands it out again) is added once at the site. The
message expires in the site's queue after ``silent_after`` seconds: a site that was down that
long never runs a job the server has routed elsewhere meanwhile. A forward is stored ``held``
at the site, and runs only once a ``start`` control message follows it (the fence, see
server/fence.py); a job killed here, or routed elsewhere, gets a ``cancel`` instead. Control
messages go to the same queue, after the forward (FIFO), authenticated the same way (the
broker-validated ``user_id`` of this forwarder's login, which a site may require:
``central_user`` in its bridge config); the site's bridge confirms each on the status key.

Mirror: it consumes its status queue, bound on the exchange to the sites' status and heartbeat
routing keys. A message's sender is its ``user_id`` property, which RabbitMQ validates against
the connection's login: each site has a broker user of its own (``sites.NAME.user``). A
message without one, or from a user of no site, is refused (logged, dropped); a site's status
of a job that was not forwarded to it is refused by the server (``forward_report``), logged.
Status messages are acknowledged after the server applied them (at least once; the server
skips repeats); heartbeats go to ``site_beat``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from pilotfish.client import Client
from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.textfile import read_text
from pilotfish.validate import check_name, echo

from .backoff import Backoff
from .config import _AMQP_NAME, _ROUTING_KEY, BridgeConfig, connection_parameters, parse_url

log = logging.getLogger("pilotfish.federate")
#: Jobs taken from the server at once.
TAKE = 200
#: Seconds to finish after SIGTERM before leaving anyway.
STOP_GRACE = 1.0


@dataclass
class Site:
    name: str
    jobs_queue: str
    user: str          # the broker user the site's bridge logs in as (user_id of its messages)


@dataclass
class FederateConfig:
    name: str                          # this server in message ids (fwd:<name>:<job>:<attempt>)
    exchange: str                      # where the sites publish status and heartbeats
    status_queue: str                  # this server's durable queue on that exchange
    status_routing_key: str            # forwarded jobs' status goes to <this>.<site>
    site_beat_routing_key: str         # sites' heartbeats come on <this> (or <this>.<site>)
    sites: dict[str, Site] = field(default_factory=dict)
    url: str = "amqp://guest@127.0.0.1:5672/"
    password_file: str | None = None
    silent_after: float = 60.0
    resend_after: float = 30.0
    poll: float = 0.2
    data_url: str | None = None        # prefix making local paths URLs for the sites
    heartbeat: int = 60

    def bridge(self) -> BridgeConfig:
        """The broker settings in the bridge's shape (url, password, heartbeat)."""
        return BridgeConfig(url=self.url, exchange=self.exchange,
                            password_file=self.password_file, heartbeat=self.heartbeat)


def from_yaml(path: str) -> FederateConfig:
    import yaml
    try:
        data = yaml.safe_load(read_text(path, 1 << 20))
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    return check_config(data, Path(path).parent)


def check_config(data: Any, base: Path) -> FederateConfig:
    if not isinstance(data, dict):
        raise ValidationError("the federation config must be a map")
    known = set(FederateConfig.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ValidationError(f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                              f"expected {', '.join(sorted(known))}")
    d = dict(data)
    sites = d.pop("sites", None)
    if not isinstance(sites, dict) or not sites:
        raise ValidationError("sites: a map of remote sites (NAME: {jobs_queue, user})")
    try:
        cfg = FederateConfig(**{**d, "sites": {}})
    except TypeError as exc:
        raise ValidationError(str(exc)) from None
    check_name(cfg.name, "name")
    for k in ("exchange", "status_queue"):
        if not (isinstance(getattr(cfg, k), str) and _AMQP_NAME.fullmatch(getattr(cfg, k))):
            raise ValidationError(f"{k} {echo(getattr(cfg, k))}: use 1..200 letters, digits "
                                  "and '_.:-'")
    for k in ("status_routing_key", "site_beat_routing_key"):
        v = getattr(cfg, k)
        if not (isinstance(v, str) and _ROUTING_KEY.fullmatch(v) and len(v) < 200):
            raise ValidationError(f"{k} {echo(v)}: use letters, digits and '_.:/@+-'")
    for k, lo, hi in (("silent_after", 1, 86_400), ("resend_after", 1, 86_400),
                      ("poll", 0.01, 60)):
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValidationError(f"{k} must be {lo}..{hi} seconds, got {echo(v)}")
    if cfg.data_url is not None and not (isinstance(cfg.data_url, str)
                                         and cfg.data_url.split("://")[0] in
                                         ("sftp", "scp", "http", "https", "gsiftp", "globus")
                                         and "://" in cfg.data_url
                                         and not cfg.data_url.endswith("/")):
        raise ValidationError("data_url must be a remote URL prefix without a trailing '/', "
                              "e.g. sftp://central.example.org")
    users: set[str] = set()
    for name, s in sites.items():
        check_name(name, "site")
        if not isinstance(s, dict) or set(s) - {"jobs_queue", "user"} or \
                not all(isinstance(s.get(k), str) for k in ("jobs_queue", "user")):
            raise ValidationError(f"sites.{name}: give jobs_queue and user (the site's broker "
                                  "user), nothing else")
        if not _AMQP_NAME.fullmatch(s["jobs_queue"]):
            raise ValidationError(f"sites.{name}.jobs_queue {echo(s['jobs_queue'])}: use "
                                  "letters, digits and '_.:-'")
        if s["user"] in users:
            raise ValidationError(f"sites.{name}: the broker user {echo(s['user'])} is another "
                                  "site's too (a site is known by its user)")
        users.add(s["user"])
        cfg.sites[name] = Site(name, s["jobs_queue"], s["user"])
    if cfg.password_file:
        cfg.password_file = str((base / cfg.password_file).resolve())
    cfg.bridge().check()
    return cfg


def message_id(name: str, job: int, attempt: int) -> str:
    return f"fwd:{name}:{job}:{attempt}"


def parse_argo_id(name: str, value: Any) -> tuple[int, int] | None:
    """(job, attempt) of a status message of a job this server forwarded, else None."""
    if not isinstance(value, str):
        return None
    parts = value.split(":")
    if len(parts) != 4 or parts[0] != "fwd" or parts[1] != name:
        return None
    try:
        job, attempt = int(parts[2]), int(parts[3])
    except ValueError:
        return None
    return (job, attempt) if 0 < job < 2**63 and 0 < attempt < 2**31 else None


def to_url(prefix: str | None, value: str | None) -> str | None:
    """A local path (or file:// URL) as the site sees it: under ``prefix`` (else unchanged)."""
    if prefix is None or value is None:
        return value
    for head in ("file://localhost", "file://", ""):
        if value.startswith(head + "/"):
            return prefix + value[len(head):]
    return value


def output_folder(msg: dict, job: int) -> str | None:
    """Where a forwarded job's workdir lands: the folder this server's own stager would have
    made (``<output_url>/<name>.<job id>``, the path a workflow's next subjob stages in from);
    the site's stager puts its workdir (named by the site's job id) inside it."""
    url = msg.get("output_url")
    return None if url is None else f"{url.rstrip('/')}/{msg['name']}.{job}"


def forward_body(cfg: FederateConfig, f: dict) -> dict:
    """The job message a site's receiver gets (pure; golden-tested)."""
    msg = dict(f["message"])
    mid = message_id(cfg.name, f["job"], f["attempt"])
    msg["input_url"] = to_url(cfg.data_url, msg.get("input_url"))
    msg["output_url"] = to_url(cfg.data_url, output_folder(msg, f["job"]))
    msg.update(argo_job_id=mid, intake_key=mid, held=True,
               job_status_routing_key=f"{cfg.status_routing_key}.{f['site']}")
    return {k: v for k, v in msg.items() if v is not None}


def control_body(cfg: FederateConfig, c: dict) -> dict:
    """A start or cancel of a forwarded attempt, for the site's receiver (pure)."""
    return {"pilotfish_control": c["action"],
            "argo_job_id": message_id(cfg.name, c["job"], c["attempt"]),
            "job_status_routing_key": f"{cfg.status_routing_key}.{c['site']}"}


def _make_output_parent(url: str | None) -> None:
    """A local output_url made (one level, as this server's stager would), so that the site's
    stager can make the job's folder in it (it makes one level only). Remote URLs: the site's
    transfer makes them."""
    if url is None:
        return
    path = url[len("file://"):] if url.startswith("file://") else url
    if path.startswith("localhost/"):
        path = path[len("localhost"):]
    if not path.startswith("/"):
        return
    try:
        os.mkdir(path, 0o755)
    except OSError:  # there already, or its parent is not: the site's stage-out says so
        pass


def _epoch(t: Any) -> float | None:
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    if isinstance(t, str):
        try:
            return datetime.fromisoformat(t).timestamp()
        except ValueError:
            return None
    return None


class Federate:
    def __init__(self, cfg: FederateConfig, new_client: Callable[[], Client],
                 stop: threading.Event) -> None:
        self.cfg, self.new_client, self.stop = cfg, new_client, stop
        self.by_user = {s.user: s.name for s in cfg.sites.values()}
        self.client: Client | None = None
        self.stats = {"forwarded": 0, "status": 0, "beats": 0, "refused": 0}

    def run(self) -> None:
        import pika.exceptions as pe
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                self._session(backoff)
            except (pe.AMQPError, OSError) as exc:
                wait = backoff.next()
                log.warning("federate: AMQP connection lost or refused (%s); again in %.1f s",
                            exc or type(exc).__name__, wait)
                self.stop.wait(wait)
            except PilotfishError as exc:
                wait = backoff.next()
                log.warning("federate: the server does not answer (%s); again in %.1f s",
                            exc, wait)
                self._drop_client()
                self.stop.wait(wait)

    def _session(self, backoff: Backoff) -> None:
        import pika
        cfg = self.cfg
        conn = pika.BlockingConnection(connection_parameters(cfg.bridge(), "federate"))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.exchange_declare(cfg.exchange, "topic", durable=True)
            ch.queue_declare(cfg.status_queue, durable=True)
            for key in (f"{cfg.status_routing_key}.*", cfg.site_beat_routing_key,
                        f"{cfg.site_beat_routing_key}.*"):
                ch.queue_bind(cfg.status_queue, cfg.exchange, key)
            for s in cfg.sites.values():
                ch.queue_declare(s.jobs_queue, durable=True)  # as the site's receiver does
            ch.basic_qos(prefetch_count=1000)
            pending: list = []
            ch.basic_consume(cfg.status_queue,
                             lambda _c, m, p, b: pending.append((m.delivery_tag, p, b)))
            backoff.reset()
            log.info("federate %s: forwarding to %s; status from %s on %s", cfg.name,
                     ", ".join(sorted(cfg.sites)), cfg.status_queue, parse_url(cfg.url))
            while not self.stop.is_set():
                conn.process_data_events(time_limit=cfg.poll)
                if pending:
                    batch = pending[:]
                    pending.clear()
                    self._mirror(batch)
                    ch.basic_ack(batch[-1][0], multiple=True)
                self._forward(ch, pika)
        finally:
            if conn.is_open:
                conn.close()

    # -- forward ----------------------------------------------------------------------------
    def _forward(self, ch, pika) -> None:
        cfg = self.cfg
        r = self._client().call("forward_take", sites=sorted(cfg.sites), limit=TAKE,
                                silent_after=cfg.silent_after, resend_after=cfg.resend_after)
        user = parse_url(cfg.url).user
        for f in r["forwards"]:
            site = cfg.sites.get(f["site"])
            if site is None:  # a site this config no longer names: the server resends it
                log.warning("federate: job %s is for site %s, not in this config", f["job"],
                            f["site"])
                continue
            mid = message_id(cfg.name, f["job"], f["attempt"])
            _make_output_parent(f["message"].get("output_url"))
            body = json.dumps(forward_body(cfg, f), separators=(",", ":")).encode()
            ch.basic_publish("", site.jobs_queue, body, pika.BasicProperties(
                delivery_mode=2, content_type="application/json", message_id=mid,
                expiration=str(int(cfg.silent_after * 1000)), timestamp=int(time.time()),
                user_id=user, reply_to=f"{cfg.status_routing_key}.{site.name}"),
                mandatory=True)
            self.stats["forwarded"] += 1
            log.info("federate: job %s attempt %s forwarded to site %s (%s)", f["job"],
                     f["attempt"], site.name, mid)
        for c in r.get("controls", ()):
            site = cfg.sites.get(c["site"])
            if site is None:
                continue
            body = json.dumps(control_body(cfg, c), separators=(",", ":")).encode()
            # no expiration: a cancel must reach a site that was down for long
            ch.basic_publish("", site.jobs_queue, body, pika.BasicProperties(
                delivery_mode=2, content_type="application/json",
                message_id=f"{c['action']}:{message_id(cfg.name, c['job'], c['attempt'])}",
                timestamp=int(time.time()), user_id=user), mandatory=True)
            self.stats[c["action"]] = self.stats.get(c["action"], 0) + 1
            log.info("federate: %s of job %s attempt %s sent to site %s", c["action"],
                     c["job"], c["attempt"], site.name)

    # -- mirror -----------------------------------------------------------------------------
    def _mirror(self, batch: list) -> None:
        by_site: dict[str, list[dict]] = {}
        for _tag, props, body in batch:
            user = getattr(props, "user_id", None)
            site = self.by_user.get(user) if user else None
            try:
                msg = json.loads(body)
            except ValueError:
                msg = None
            if site is None:
                self.stats["refused"] += 1
                log.warning("federate: message refused: from %s, which is no site's user",
                            echo(user) if user else "a sender without a validated user_id")
                continue
            if not isinstance(msg, dict):
                log.warning("federate: message from site %s refused: not a JSON map", site)
                continue
            if msg.get("kind") == "heartbeat":
                if msg.get("site") != site:
                    self.stats["refused"] += 1
                    log.warning("federate: heartbeat refused: site %s's user sent one for %s",
                                site, echo(msg.get("site")))
                    continue
                try:
                    self._client().call("site_beat", site=site, backlog=msg.get("backlog"),
                                        capacity=msg.get("capacity"))
                    self.stats["beats"] += 1
                except ValidationError as exc:
                    log.warning("federate: heartbeat of site %s refused: %s", site, exc)
                continue
            key = parse_argo_id(self.cfg.name, msg.get("argo_job_id"))
            if key is None:
                continue  # not one of ours (a workflow event, another server's job)
            if msg.get("kind") == "control" and msg.get("action") in ("start", "cancel"):
                by_site.setdefault(site, []).append(
                    {"job": key[0], "attempt": key[1], "control": msg["action"],
                     "result": msg.get("result") if isinstance(msg.get("result"), str)
                     else None})
                continue
            if msg.get("kind") != "job":
                continue
            item = {"job": key[0], "attempt": key[1], "to": msg.get("to"),
                    "time": _epoch(msg.get("time")), "msg": msg.get("message")}
            if msg.get("refused") is True:
                item["refused"] = True
            by_site.setdefault(site, []).append(item)
        for site, items in by_site.items():
            r = self._client().call("forward_report", site=site, updates=items)
            self.stats["status"] += r["applied"]
            for bad in r["refused"]:
                self.stats["refused"] += 1
                log.warning("federate: status from site %s refused: %s", site, bad["why"])

    def _client(self) -> Client:
        if self.client is None:
            self.client = self.new_client()
        return self.client

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None


def run(cfg: FederateConfig, new_client: Callable[[], Client]) -> int:
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()
        # a stopping server does not answer a request in flight: leave after a moment. Safe
        # at any point: unacknowledged status is redelivered (repeats are skipped) and a
        # forward not yet acknowledged by its site is handed out again (same message id).
        t = threading.Timer(STOP_GRACE, lambda: (logging.shutdown(), os._exit(0)))
        t.daemon = True
        t.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Federate(cfg, new_client, stop).run()
    log.info("federate stopped")
    return 0
