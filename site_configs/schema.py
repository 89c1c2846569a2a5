"""The site profile schema: one YAML file describes a machine, and every key in it is checked.

pydantic v2 models with ``extra="forbid"`` everywhere (a misspelled key is an error, never a
silently ignored setting) and ``strict=True`` (``cores: "64"`` or ``default: yes`` is refused
rather than guessed at). Type errors come from pydantic; the rules that relate keys to each other
(a queue's limits, one default queue, the pilot policy against the queues) are checked in
:meth:`Site._check`, which reports every problem with its key path. The loader
(:mod:`.loader`) turns both kinds into one-line messages naming the file and the key.

This module imports only the core (``pilotfish.errors``): the launcher names are kept here and a
test keeps them equal to ``pilotfish.launcher.LAUNCHERS``.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      model_validator)

from pilotfish.errors import ValidationError
from pilotfish.validate import ENV_NAME_RE

#: Batch systems a pilot can be submitted to (``pbs`` is PBS Pro / OpenPBS).
SCHEDULERS = ("slurm", "pbs", "torque", "cobalt", "htcondor", "lsf", "local")
#: Launchers that start one agent per node; equal to ``sorted(pilotfish.launcher.LAUNCHERS)``.
LAUNCHERS = ("aprun", "jsrun", "local", "mpiexec", "mpirun", "pals", "srun")
#: Container runtimes a site offers to tasks (``none``: tasks run on the host).
CONTAINERS = ("none", "shifter", "singularity", "apptainer", "charliecloud", "podman-hpc")
#: How a queue is asked for: as the scheduler's queue (Slurm partition, PBS/Torque/Cobalt/LSF
#: queue) or, on Slurm, as a QOS (``--qos``; NERSC's "queues" and Frontier's debug are QOSes).
QUEUE_KINDS = ("queue", "qos")

WALLTIME_FORMS = "HH:MM:SS, HH:MM, D-HH:MM:SS or whole minutes such as 90"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ADDRESS_RE = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# an absolute path or SRC:DST, each part made of path characters or $VARS, never '..'
_ROOT_RE = re.compile(r"(?!.*(^|/)\.\.(/|$))(/|\$)[A-Za-z0-9_./${}+-]*")
_BIND_RE = re.compile(r"(?!.*\.\.)(/|\$)[A-Za-z0-9_./${}-]*(:/[A-Za-z0-9_./-]*)?")


class SiteError(ValidationError):
    """A site profile was refused. ``str(err)`` is one line; ``problems`` holds every line.

    ``where`` is the list of ``(key path, message)`` pairs before the loader names the file;
    :meth:`Site.model_validate` raises it (not a pydantic error) for the rules that relate keys.
    """

    def __init__(self, message: str, problems: list[str] | None = None,
                 where: list[tuple[tuple, str]] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]
        self.where = where or []

    @classmethod
    def from_lines(cls, lines: list[str], hint: str = "") -> "SiteError":
        """One error for many problem lines: the first, and how many more there are."""
        first = lines[0]
        if len(lines) > 1:
            first += f" (and {len(lines) - 1} more problem{'s' if len(lines) > 2 else ''}" \
                     f"{'; ' + hint if hint else ''})"
        return cls(first, problems=list(lines))


# -- walltimes and numbers --------------------------------------------------------------------
def parse_walltime(value: Any) -> float:
    """Minutes from ``HH:MM:SS``, ``HH:MM``, ``D-HH:MM:SS``, ``D-HH:MM`` or whole minutes.

    Raises ValueError with what is expected; a whole number of minutes comes back as an int.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a walltime as {WALLTIME_FORMS}, got {value!r}")
    if isinstance(value, int):
        minutes: float = value
    elif isinstance(value, str) and value.strip().isdigit():
        minutes = int(value.strip())
    elif isinstance(value, str):
        m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d)(?::(\d\d))?", value.strip())
        if not m:
            raise ValueError(f"expected a walltime as {WALLTIME_FORMS}, got {value!r}")
        days, hours, mins, secs = (int(g) if g is not None else None for g in m.groups())
        if mins >= 60 or (secs is not None and secs >= 60) or (days is not None and hours >= 24):
            raise ValueError(f"expected a walltime as {WALLTIME_FORMS}, with minutes and seconds "
                             f"below 60 (and hours below 24 after a day count), got {value!r}")
        minutes = (days or 0) * 1440 + hours * 60 + mins + (secs or 0) / 60
    else:
        raise ValueError(f"expected a walltime as {WALLTIME_FORMS}, got {value!r}")
    if minutes <= 0:
        raise ValueError(f"expected a positive walltime as {WALLTIME_FORMS}, got {value!r}")
    return int(minutes) if float(minutes).is_integer() else minutes


def format_minutes(minutes: float) -> str:
    """``H:MM:SS`` for a number of minutes (``inf`` for no limit)."""
    if minutes == math.inf:
        return "unlimited"
    secs = round(minutes * 60)
    return f"{secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}"


def _whole(v: Any) -> Any:
    """30.0 -> 30 when dumped (a return annotation of float would turn it back into 30.0)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _account(v: Any) -> Any:
    """Project ids are often numbers in YAML (``account: 12345``): take them as strings."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _env_value(v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return v


def _pattern(regex: re.Pattern, expected: str):
    def check(v: Any) -> Any:
        if isinstance(v, str) and not regex.fullmatch(v):
            raise ValueError(f"expected {expected}, got {v!r}")
        return v
    return BeforeValidator(check)


def _address(v: Any) -> Any:
    if isinstance(v, str):
        m = _ADDRESS_RE.fullmatch(v)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"expected tcp://HOST:PORT with a port from 1 to 65535, got {v!r}")
    return v


Minutes = Annotated[float, BeforeValidator(parse_walltime), PlainSerializer(_whole)]
Count = Annotated[int, Field(gt=0)]
Number = Annotated[float, Field(ge=0), PlainSerializer(_whole)]
PositiveNumber = Annotated[float, Field(gt=0), PlainSerializer(_whole)]
Name = Annotated[str, _pattern(_NAME_RE, "a name of letters, digits, '_', '.' and '-'")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


# -- the parts --------------------------------------------------------------------------------
class Node(_Model):
    """One compute node as a pilot gets it."""
    cores: Count = Field(description="physical cores a job may use per node")
    threads_per_core: Count = Field(1, description="hardware threads per core")
    gpus: Annotated[int, Field(ge=0)] = Field(0, description="GPUs (or GPU dies/GCDs) per node")
    memory_gb: Optional[PositiveNumber] = Field(None, description="memory per node, GB")

    def shape(self) -> str:
        s = f"{self.cores}x{self.threads_per_core}"
        if self.gpus:
            s += f" {self.gpus}gpu"
        if self.memory_gb:
            s += f" {_whole(self.memory_gb)}GB"
        return s


class Queue(_Model):
    """A queue (partition, QOS) and the limits it puts on one batch job."""
    min_nodes: Count = 1
    max_nodes: Optional[Count] = None
    min_walltime: Optional[Minutes] = None
    max_walltime: Optional[Minutes] = None
    default: bool = False
    kind: Literal[QUEUE_KINDS] = "queue"
    #: Extra scheduler directives written when a pilot goes to this queue.
    directives: list[str] = Field(default_factory=list)

    def misfit(self, nodes: int, minutes: float) -> str | None:
        """Which limit a request of ``nodes`` for ``minutes`` breaks, or None when it fits."""
        if self.max_nodes is not None and nodes > self.max_nodes:
            return f"{nodes} nodes exceeds max_nodes {self.max_nodes}"
        if nodes < self.min_nodes:
            return f"{nodes} nodes is below min_nodes {self.min_nodes}"
        if self.max_walltime is not None and minutes > self.max_walltime:
            return (f"walltime {format_minutes(minutes)} exceeds max_walltime "
                    f"{format_minutes(self.max_walltime)}")
        if self.min_walltime is not None and minutes < self.min_walltime:
            return (f"walltime {format_minutes(minutes)} is below min_walltime "
                    f"{format_minutes(self.min_walltime)}")
        return None


class Batch(_Model):
    """What a pilot's batch script carries besides the pilot head (written by the site's admin)."""
    directives: list[str] = Field(default_factory=list)
    modules: list[str] = Field(default_factory=list)
    #: Trusted shell lines run before the head (never from a job).
    setup: list[str] = Field(default_factory=list)
    env: dict[Annotated[str, _pattern(ENV_NAME_RE, "an environment variable name")],
              Annotated[str, BeforeValidator(_env_value)]] = Field(default_factory=dict)


class Pilot(_Model):
    """How many pilots of what size to keep in a site's queues."""
    #: Nodes per pilot: 10 is the size the LIGO runs on Blue Waters found best.
    nodes: Count = 10
    min_walltime: Minutes = 30
    max_walltime: Minutes = 120
    #: Pilots waiting in the batch queue at once.
    max_queued: Count = 2
    #: Nodes across all of this site's pilots (queued and running); null: no limit.
    max_nodes: Optional[Count] = None
    #: Seconds between submission rounds (the LIGO runs staggered pilot starts 30 min apart).
    submit_interval: Number = 1800
    max_submits_per_interval: Count = 1
    #: Seconds an agent waits without work before it leaves (and gives its node back).
    idle_timeout: PositiveNumber = 600
    #: When an agent leaves on the server's word that no queued or pending job fits it (before
    #: its idle timeout): always (the site agent submits again when work comes), after-work
    #: (only once it has run a task), never (only the idle timeout).
    leave_when_no_work: Literal["never", "after-work", "always"] = "always"
    #: null: every agent talks to the server; "mpi": only rank 0 does, for the others.
    relay: Optional[Literal["mpi"]] = None
    prefer_backfill: bool = False


class Keys(_Model):
    """CurveZMQ key files as the site's compute nodes see them (a shared file system). The pilot
    head checks them and hands them to every agent; ``$VAR`` and ``~`` are expanded there."""
    #: The server's public key: a copy of its home's keys/server.key.
    server_public: Optional[str] = None
    #: A client pair authorized on the server (``pilotfish keys init --client NAME`` makes
    #: NAME.key_secret); it must be owner-only (0600).
    client: Optional[str] = None

    def path(self, which: str) -> str | None:
        import os
        value = getattr(self, which)
        return os.path.expanduser(os.path.expandvars(value)) if value else None


def _size(v: Any) -> Any:
    """``100G``-style sizes as bytes (see pilotfish.settings.parse_size)."""
    from pilotfish.settings import parse_size
    if isinstance(v, (int, str)) and not isinstance(v, bool):
        return parse_size(v, "max_bytes")
    return v


class Staging(_Model):
    """Limits of one stage-in or stage-out step on this site's agents (each a child process)."""
    #: Seconds a step may take before it is stopped (the job fails with the reason).
    timeout: Optional[PositiveNumber] = None
    #: Bytes a step may copy: a whole number or with K, M, G, T (binary units), e.g. 100G.
    max_bytes: Optional[Annotated[int, BeforeValidator(_size), Field(gt=0)]] = None


_HOSTKEY_RE = re.compile(r"(\*|[a-z][a-z0-9+.-]*://\*|([a-z][a-z0-9+.-]*://)?"
                         r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9_.-]*))")
_LOGIN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_FILE_RE = re.compile(r"(?!.*(^|/)\.\.(/|$))[~$/][A-Za-z0-9_./${}+~-]*")


class TransferCredential(_Model):
    """How this site's transfers log in to one host (paths to files, never the secrets)."""
    #: The ssh login (a URL's user@ wins).
    user: Optional[Annotated[str, _pattern(_LOGIN_RE, "a login name not starting with '-'")]] = \
        None
    #: The ssh private key, the known_hosts file (host keys are always checked) and the port.
    key_file: Optional[Annotated[str, _pattern(_FILE_RE, "a path (~, $VAR or /) without ..")]] = \
        None
    known_hosts: Optional[Annotated[str, _pattern(_FILE_RE, "a path (~, $VAR or /) without "
                                                            "..")]] = None
    port: Optional[Annotated[int, Field(gt=0, lt=65536)]] = None
    #: A file whose first line is a bearer token (https, Globus).
    token_file: Optional[Annotated[str, _pattern(_FILE_RE, "a path (~, $VAR or /) without "
                                                           "..")]] = None
    #: https: the certificates of a private CA (else the system's).
    ca_file: Optional[Annotated[str, _pattern(_FILE_RE, "a path (~, $VAR or /) without "
                                                        "..")]] = None
    #: gsiftp: the X.509 proxy certificate (handed over as X509_USER_PROXY).
    x509_proxy: Optional[Annotated[str, _pattern(_FILE_RE, "a path (~, $VAR or /) without "
                                                           "..")]] = None
    #: globus: the UUID of the Globus collection that sees this site's file system.
    local_endpoint: Optional[Annotated[str, _pattern(re.compile(r"[0-9a-fA-F-]{32,36}"),
                                                     "a Globus collection UUID")]] = None


class Transfers(_Model):
    """Remote inputs and outputs (scp, sftp, http(s), gsiftp, globus URLs) on this site."""
    #: Transfers in flight at once (the site stager), in all and per endpoint host.
    max_concurrent: Optional[Count] = None
    per_endpoint: dict[Annotated[str, _pattern(_HOSTKEY_RE, "a host, or scheme://host")],
                       Count] = Field(default_factory=dict)
    #: Files moved in one session where the protocol batches (sftp, Globus).
    batch_size: Optional[Count] = None
    #: Seconds and bytes per transfer (defaults: the staging limits).
    timeout: Optional[PositiveNumber] = None
    max_bytes: Optional[Annotated[int, BeforeValidator(_size), Field(gt=0)]] = None
    #: By host (``data.example.org``), ``scheme://host`` or ``*``.
    credentials: dict[Annotated[str, _pattern(_HOSTKEY_RE, "a host, scheme://host or *")],
                      TransferCredential] = Field(default_factory=dict)
    #: Seconds without a byte moved before a transfer is stopped (default 120).
    stall: Optional[PositiveNumber] = None
    #: Where the site stager puts staged inputs for the agents: a directory the login node
    #: and the compute nodes share, at the same path ($VARS expand where used); null:
    #: ``<scratch>/pilotfish-staging``, or the pilotfish home's ``staging/`` without scratch.
    staging_dir: Optional[Annotated[str, _pattern(_ROOT_RE, "an absolute path (or $VAR/...) "
                                                            "without ..")]] = None
    #: The site stager computes each staged file's SHA-256 (kept with the job's events).
    checksum: bool = False
    #: Jobs whose inputs may be staged ahead of the site's agents at least (the window is
    #: also the agents' cores plus their idle cores); default: max_concurrent.
    lookahead: Optional[Count] = None
    #: Seconds between the site stager's sweeps of the staging directory for leftovers (files
    #: of jobs killed, removed, finished or retried; default 30).
    sweep: Optional[PositiveNumber] = None

    def limit_for(self, scheme: str, host: str) -> int:
        """Transfers at once to one endpoint: ``per_endpoint`` by ``scheme://host``, else by
        ``host``, else ``*``, else ``max_concurrent`` (default 8)."""
        pe = self.per_endpoint
        for key in (f"{scheme}://{host}", host, "*"):
            if key in pe:
                return pe[key]
        return self.max_concurrent or 8


class Site(_Model):
    """A machine: its scheduler, launcher, node shape, queues, and the pilot policy on it."""
    name: Name
    description: str = ""
    extends: Optional[Name] = None
    scheduler: Literal[SCHEDULERS]
    launcher: Literal[LAUNCHERS]
    #: PMI flavour for ``srun --mpi`` (pmi2, pmix, cray_shasta, ...); null: the site's default.
    mpi: Optional[Annotated[str, _pattern(_WORD_RE, "a PMI type such as pmi2 or pmix")]] = None
    container: Literal[CONTAINERS] = "none"
    #: Host paths bound into every task's container besides its workdir (and scratch), as
    #: SRC or SRC:DST; $VARS expand on the compute node.
    binds: list[Annotated[str, _pattern(_BIND_RE, "an absolute path, or SRC:DST, without ..")]] = \
        Field(default_factory=list)
    #: null: agents report what they find on the node.
    node: Optional[Node] = None
    queues: dict[Name, Queue] = Field(default_factory=dict)
    account: Optional[Annotated[str, BeforeValidator(_account)]] = None
    batch: Batch = Field(default_factory=Batch)
    #: The server as compute nodes reach it (tcp://host:port).
    server_address: Optional[Annotated[str, BeforeValidator(_address)]] = None
    #: Where compute nodes find the server's public key and their client pair; null: in the
    #: pilotfish home (or $PILOTFISH_SERVER_KEY / $PILOTFISH_CLIENT_KEY).
    keys: Optional[Keys] = None
    #: A path; ``$USER``-style variables are kept as written and expanded where it is used.
    scratch: Optional[str] = None
    #: Directories jobs' input_url/output_url may name (absolute or starting with a $VAR,
    #: expanded where used); none: the pilotfish home's data/ directory.
    data_roots: list[Annotated[str, _pattern(_ROOT_RE, "an absolute path (or $VAR/...) "
                                                       "without ..")]] = Field(
        default_factory=list)
    staging: Optional[Staging] = None
    transfers: Optional[Transfers] = None
    pilot: Pilot = Field(default_factory=Pilot)

    # -- queries --------------------------------------------------------------------------
    @property
    def default_queue(self) -> str | None:
        return next((n for n, q in self.queues.items() if q.default), None)

    def queue_for(self, nodes: int, walltime_minutes: float) -> str | None:
        """The queue for a pilot of ``nodes`` nodes for ``walltime_minutes``.

        The default queue when it fits, else the first queue (in file order) whose limits fit,
        else a :class:`SiteError` naming, for each queue, the limit the request exceeds. A site
        that lists no queues leaves the choice to the scheduler: None.
        """
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise SiteError(f"site {self.name}: a pilot needs a whole number of nodes >= 1, "
                            f"got {nodes!r}")
        if isinstance(walltime_minutes, bool) or not isinstance(walltime_minutes, (int, float)) \
                or not walltime_minutes > 0:
            raise SiteError(f"site {self.name}: a pilot needs a positive walltime in minutes, "
                            f"got {walltime_minutes!r}")
        if not self.queues:
            return None
        default = self.default_queue
        order = ([default] if default else []) + [n for n in self.queues if n != default]
        reasons = []
        for name in order:
            why = self.queues[name].misfit(nodes, walltime_minutes)
            if why is None:
                return name
            reasons.append(f"{name}: {why}")
        raise SiteError(f"site {self.name}: no queue takes a pilot of {nodes} nodes for "
                        f"{format_minutes(walltime_minutes)} ({'; '.join(reasons)})")

    def queue_request(self, name: str | None) -> tuple[str | None, list[str]]:
        """How to ask the scheduler for queue ``name``: (its queue option, extra directives).

        A ``kind: qos`` queue is not a partition: the batch job names no queue and carries
        ``--qos=NAME`` instead (then the queue's own directives). None or a queue the profile
        does not list is passed through as it is.
        """
        q = self.queues.get(name) if name is not None else None
        if q is None:
            return name, []
        if q.kind == "qos":
            return None, [f"--qos={name}", *q.directives]
        return name, list(q.directives)

    def longest_walltime(self, nodes: int) -> float:
        """The longest walltime any queue allows for ``nodes`` (inf: no limit; 0: no queue)."""
        if not self.queues:
            return math.inf
        fits = [q for q in self.queues.values()
                if q.min_nodes <= nodes and (q.max_nodes is None or nodes <= q.max_nodes)]
        return max((q.max_walltime if q.max_walltime is not None else math.inf
                    for q in fits), default=0)

    # -- the rules that relate keys ---------------------------------------------------------
    @model_validator(mode="after")
    def _check_rules(self) -> "Site":
        where = self._check()
        if where:
            lines = [f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in where]
            err = SiteError.from_lines(lines)
            err.where = where
            raise err  # not a ValueError: pydantic lets it through with its key paths intact
        return self

    def _check(self) -> list[tuple[tuple, str]]:
        out: list[tuple[tuple, str]] = []
        defaults = [n for n, q in self.queues.items() if q.default]
        for n in defaults[1:]:
            out.append((("queues", n, "default"),
                        f"only one queue may be the default, and {defaults[0]!r} already is"))
        for n, q in self.queues.items():
            if q.max_nodes is not None and q.min_nodes > q.max_nodes:
                out.append((("queues", n, "min_nodes"), f"expected at most max_nodes "
                            f"({q.max_nodes}), got {q.min_nodes}"))
            if q.min_walltime is not None and q.max_walltime is not None \
                    and q.min_walltime > q.max_walltime:
                out.append((("queues", n, "min_walltime"), f"expected at most max_walltime "
                            f"({format_minutes(q.max_walltime)}), got "
                            f"{format_minutes(q.min_walltime)}"))
            if q.kind == "qos" and self.scheduler != "slurm":
                out.append((("queues", n, "kind"), f"expected 'queue': a QOS is a Slurm notion "
                            f"and the scheduler is {self.scheduler}"))
        if self.mpi is not None and self.launcher != "srun":
            out.append((("mpi",), f"only srun takes --mpi, and the launcher is {self.launcher}: "
                        "remove mpi"))
        p = self.pilot
        if p.min_walltime > p.max_walltime:
            out.append((("pilot", "min_walltime"), f"expected at most pilot.max_walltime "
                        f"({format_minutes(p.max_walltime)}), got "
                        f"{format_minutes(p.min_walltime)}"))
        if p.max_nodes is not None and p.max_nodes < p.nodes:
            out.append((("pilot", "max_nodes"), f"expected at least pilot.nodes ({p.nodes}), "
                        f"got {p.max_nodes}"))
        if self.scheduler == "local" and p.nodes != 1:
            out.append((("pilot", "nodes"), f"expected 1: the local scheduler runs a pilot on "
                        f"this machine, got {p.nodes}"))
        if p.relay == "mpi" and self.launcher == "local":
            out.append((("pilot", "relay"), "expected null: relay mpi needs an MPI launcher and "
                        "the launcher is local"))
        if out or not self.queues:
            return out
        default = self.default_queue
        dq = self.queues[default] if default else None
        if dq is not None and dq.max_nodes is not None and p.nodes > dq.max_nodes:
            out.append((("pilot", "nodes"), f"expected at most {dq.max_nodes} (max_nodes of the "
                        f"default queue {default!r}), got {p.nodes}"))
            return out
        longest = self.longest_walltime(p.nodes)
        if longest == 0:
            out.append((("pilot", "nodes"), f"no queue takes {p.nodes} nodes: expected a pilot "
                        f"size within some queue's min_nodes..max_nodes"))
        elif p.max_walltime > longest:
            out.append((("pilot", "max_walltime"), f"expected at most {format_minutes(longest)} "
                        f"(the longest walltime a queue allows for {p.nodes} nodes), got "
                        f"{format_minutes(p.max_walltime)}"))
        else:
            try:
                self.queue_for(p.nodes, p.min_walltime)
            except SiteError as exc:
                out.append((("pilot", "min_walltime"), str(exc).split(": ", 1)[1]))
        return out

    def expanded_data_roots(self) -> list[str]:
        """``data_roots`` with ``$VARS`` expanded here; an unset variable is an error."""
        import os
        out = []
        for root in self.data_roots:
            value = os.path.expandvars(root)
            if "$" in value:
                raise SiteError(f"site {self.name}: data_roots item {root!r}: a variable in it "
                                "is not set here")
            out.append(value)
        return out

    def summary(self) -> dict:
        """What ``site ls`` shows of a profile."""
        return {"name": self.name, "scheduler": self.scheduler, "launcher": self.launcher,
                "container": self.container,
                "node": self.node.shape() if self.node else None,
                "queues": list(self.queues), "default_queue": self.default_queue,
                "description": self.description}


#: Which model holds the keys at a key path (``*`` is a queue's name): for "did you mean".
MODELS_AT: dict[tuple, type[BaseModel]] = {
    (): Site, ("node",): Node, ("batch",): Batch, ("pilot",): Pilot, ("queues", "*"): Queue,
    ("keys",): Keys, ("staging",): Staging, ("transfers",): Transfers,
    ("transfers", "credentials", "*"): TransferCredential}


def model_at(loc: tuple) -> type[BaseModel] | None:
    if len(loc) >= 2 and loc[0] == "queues":
        loc = ("queues", "*") + tuple(loc[2:])
    if len(loc) >= 3 and tuple(loc[:2]) == ("transfers", "credentials"):
        loc = ("transfers", "credentials", "*") + tuple(loc[3:])
    return MODELS_AT.get(tuple(loc))


__all__ = ["CONTAINERS", "LAUNCHERS", "QUEUE_KINDS", "SCHEDULERS", "Batch", "Keys", "Node",
           "Pilot", "Queue", "Site", "SiteError", "Staging", "format_minutes", "parse_walltime"]
