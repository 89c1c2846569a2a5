"""The AMQP bridge's settings: from flags, or from a YAML file (``server start --amqp``), and
the broker password from a file or the environment — never from a command line, where every
user of the machine can read it, and never in a log line.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pilotfish.errors import ValidationError
from pilotfish.validate import check_name, echo
from pilotfish.textfile import read_text

PASSWORD_ENV = "PILOTFISH_AMQP_PASSWORD"
#: Queue and exchange names: AMQP allows 255 bytes of almost anything; we take plain ones.
_AMQP_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_ROUTING_KEY = re.compile(r"[A-Za-z0-9_.:/@+-]{1,255}")


@dataclass
class BridgeConfig:
    url: str = "amqp://guest@127.0.0.1:5672/"
    jobs_queue: str | None = None          # None: no job receiver
    exchange: str | None = None            # None: no status publisher
    dead_letter_queue: str | None = None   # default: <jobs_queue>.dead
    routing_key: str = "pilotfish.status"  # for jobs without job_status_routing_key
    password_file: str | None = None
    state_dir: str | None = None           # default: HOME/bridge/amqp-<exchange>
    prefetch: int = 16                     # messages held unacknowledged at once
    max_body_bytes: int = 16 * 2**20
    batch_jobs: int = 10_000               # jobs of several messages added in one request
    heartbeat: int = 60                    # AMQP heartbeat seconds
    # how long a request to the server may go unanswered before intake pauses (the messages
    # go back to the queue until the server answers again)
    server_timeout: float = 30.0
    # CPU priority (added to the process's niceness): the bridge yields the cores to the
    # server and the agents beside it and catches up when they idle (0: as they are)
    nice: int = 10
    # a site served by this server for another (federation, bridge/site_beat.py): the site's
    # name and where its heartbeats (backlog and capacity) go on the exchange
    site_name: str | None = None
    site_beat_routing_key: str | None = None
    site_beat_seconds: float = 5.0
    # the broker user of the server that forwards jobs here: when set, its start and cancel
    # messages (and the refusal answers to its forwards) need that validated user_id
    central_user: str | None = None

    def check(self) -> "BridgeConfig":
        if not self.jobs_queue and not self.exchange:
            raise ValidationError("give --jobs-queue (job receiver), --exchange (status "
                                  "publisher) or both")
        for what in ("jobs_queue", "exchange", "dead_letter_queue"):
            v = getattr(self, what)
            if v is not None and not (isinstance(v, str) and _AMQP_NAME.fullmatch(v)):
                raise ValidationError(f"{what} {echo(v)}: use 1..200 letters, digits and '_.:-'")
        if not (isinstance(self.routing_key, str) and _ROUTING_KEY.fullmatch(self.routing_key)):
            raise ValidationError(f"routing_key {echo(self.routing_key)}: use 1..255 letters, "
                                  "digits and '_.:/@+-'")
        if self.jobs_queue and not self.dead_letter_queue:
            self.dead_letter_queue = f"{self.jobs_queue}.dead"
        for what, lo, hi in (("prefetch", 1, 10_000), ("max_body_bytes", 1024, 128 * 2**20),
                             ("batch_jobs", 1, 100_000), ("heartbeat", 0, 3600),
                             ("nice", 0, 19)):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValidationError(f"{what} must be an integer {lo}..{hi}, got {echo(v)}")
        if (self.site_name is None) != (self.site_beat_routing_key is None) or (
                self.site_name is not None and not self.exchange):
            raise ValidationError("site_name and site_beat_routing_key go together, with an "
                                  "exchange (the site's heartbeats are published there)")
        if self.site_name is not None:
            check_name(self.site_name, "site_name")
            if not _ROUTING_KEY.fullmatch(str(self.site_beat_routing_key)):
                raise ValidationError(f"site_beat_routing_key "
                                      f"{echo(self.site_beat_routing_key)}: use 1..255 "
                                      "letters, digits and '_.:/@+-'")
        if self.central_user is not None and not (
                isinstance(self.central_user, str) and _AMQP_NAME.fullmatch(self.central_user)):
            raise ValidationError(f"central_user {echo(self.central_user)}: a broker user name "
                                  "(letters, digits and '_.:-')")
        v = self.server_timeout
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 3600:
            raise ValidationError(f"server_timeout must be 1..3600 seconds, got {echo(v)}")
        v = self.site_beat_seconds
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.1 <= v <= 3600:
            raise ValidationError(f"site_beat_seconds must be 0.1..3600, got {echo(v)}")
        parse_url(self.url)  # a URL with a password stops here
        return self

    def state_path(self, home: Path) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        return home / "bridge" / f"amqp-{self.exchange or self.jobs_queue}"


def from_yaml(path: str) -> BridgeConfig:
    """A BridgeConfig from a YAML map with the same keys (``max_body_mb`` for the body cap)."""
    import yaml
    try:
        data = yaml.safe_load(read_text(path, 1 << 20))
    except OSError as exc:
        raise ValidationError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValidationError(f"{path}: must be a map of bridge settings")
    data = dict(data)
    if "max_body_mb" in data:
        mb = data.pop("max_body_mb")
        if isinstance(mb, bool) or not isinstance(mb, int) or not 0 < mb <= 128:
            raise ValidationError(f"{path}: max_body_mb must be an integer 1..128")
        data["max_body_bytes"] = mb * 2**20
    names = {f.name for f in fields(BridgeConfig)}
    unknown = set(data) - names
    if unknown:
        raise ValidationError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                              f"expected {', '.join(sorted(names | {'max_body_mb'}))}")
    if data.get("password_file"):  # relative to the YAML file
        data["password_file"] = str((Path(path).parent / data["password_file"]).resolve())
    try:
        return BridgeConfig(**data)
    except TypeError as exc:
        raise ValidationError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class BrokerAddress:
    scheme: str
    host: str
    port: int
    vhost: str
    user: str

    def __str__(self) -> str:  # what logs show: never a password
        return f"{self.scheme}://{self.user}@{self.host}:{self.port}/{self.vhost.lstrip('/')}"


def parse_url(url: str) -> BrokerAddress:
    """The broker's address; a URL that carries a password is refused (it would be on a
    command line or in a config shown to others)."""
    if not isinstance(url, str) or len(url) > 2000:
        raise ValidationError("the AMQP URL must be a string like amqp://user@host:5672/vhost")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise ValidationError(f"bad AMQP URL: {exc}") from None
    if u.scheme not in ("amqp", "amqps"):
        raise ValidationError(f"the AMQP URL must start with amqp:// or amqps://, got "
                              f"{echo(u.scheme + '://')}")
    if u.password is not None:
        raise ValidationError("the AMQP URL carries a password: a command line is readable by "
                              "every user of the machine. Give the URL without it "
                              "(amqp://user@host/vhost) and the password in --password-file FILE "
                              f"or ${PASSWORD_ENV}")
    if not u.hostname:
        raise ValidationError("the AMQP URL names no host")
    vhost = unquote(u.path[1:]) if len(u.path) > 1 else "/"
    return BrokerAddress(u.scheme, u.hostname, port or (5671 if u.scheme == "amqps" else 5672),
                         vhost, unquote(u.username) if u.username else "guest")


def password(cfg: BridgeConfig, user: str) -> str:
    """The broker password: ``password_file`` (its first line), else $PILOTFISH_AMQP_PASSWORD,
    else RabbitMQ's default ``guest`` for the user guest (which RabbitMQ admits on loopback
    only)."""
    if cfg.password_file:
        try:
            text = read_text(cfg.password_file, 1 << 16)
        except OSError as exc:
            raise ValidationError(f"cannot read the password file {cfg.password_file}: "
                                  f"{exc.strerror}") from None
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise ValidationError(f"the password file {cfg.password_file} is empty")
        return lines[0]
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if user == "guest":
        return "guest"
    raise ValidationError(f"no password for AMQP user {user!r}: give --password-file FILE or "
                          f"${PASSWORD_ENV}")


def connection_parameters(cfg: BridgeConfig, part: str):
    """pika's parameters for the broker (imports pika: only the bridge process does)."""
    import ssl

    import pika
    addr = parse_url(cfg.url)
    ssl_options = None
    if addr.scheme == "amqps":
        ssl_options = pika.SSLOptions(ssl.create_default_context(), addr.host)
    return pika.ConnectionParameters(
        host=addr.host, port=addr.port, virtual_host=addr.vhost,
        credentials=pika.PlainCredentials(addr.user, password(cfg, addr.user),
                                         erase_on_connect=True),
        heartbeat=cfg.heartbeat, blocked_connection_timeout=60, connection_attempts=1,
        socket_timeout=10, ssl_options=ssl_options,
        # how `rabbitmqctl list_connections user_provided_name` shows it
        client_properties={"connection_name": f"pilotfish bridge amqp {part} pid {os.getpid()}"})
