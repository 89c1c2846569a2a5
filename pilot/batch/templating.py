"""What every adapter shares: the one jinja2 environment, spec validation, small helpers.

Batch scripts are rendered from ``templates/<scheduler>.sh.j2``; each includes ``_body.sh.j2``,
the part every scheduler runs the same way (timestamp, cd, site setup, env, ``exec`` the head).
Every argv item of the head and every env value goes through the ``shquote`` filter
(:func:`shlex.quote`); names, queues, projects and the workdir are checked against narrow
character sets instead, because they end up in scheduler directives, where no quoting exists.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import shlex
from pathlib import Path

from pilotfish.errors import ValidationError
from pilotfish.validate import ENV_NAME_RE

from .base import PilotSpec, PilotState, PilotStatus

log = logging.getLogger("pilotfish.batch")

TEMPLATES = Path(__file__).parent / "templates"

#: Job names: a letter first (older PBS requires it), then letters, digits, '_', '.', '-'.
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
#: Queues/partitions (Slurm takes "a,b"; PBS takes "queue@server") and projects/accounts.
QUEUE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@,+-]{0,127}")
PROJECT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}")
#: The workdir goes into directives (#SBATCH --output=..., #PBS -o ...) and HTCondor submit
#: descriptions, none of which can quote: no spaces, no '%' (Slurm/LSF patterns), no ':' (PBS
#: host:path), no '$' (HTCondor macros), no quotes.
WORKDIR_RE = re.compile(r"/[A-Za-z0-9_./+,@-]*")
#: Batch ids that adapters pass back to the scheduler's commands (never starting with '-').
NUMERIC_ID_RE = re.compile(r"[0-9]{1,18}")
#: PBS/Torque ids: 1234, 1234.server.domain, 1234[].server (array).
PBS_ID_RE = re.compile(r"[0-9]{1,18}(\[[0-9]*\])?(\.[A-Za-z0-9_.-]+)?")


def shquote(value: object) -> str:
    """``shlex.quote`` for a template; NUL cannot live in a shell word, so it is refused."""
    text = str(value)
    if "\0" in text:
        raise ValidationError(f"a NUL byte cannot go into a shell script: {text[:40]!r}")
    return shlex.quote(text)


def _one_line(text: str, what: str) -> str:
    for ch, shown in (("\0", "NUL"), ("\r", "CR"), ("\n", "newline")):
        if ch in text:
            raise ValidationError(f"{what} {text[:60]!r} contains a {shown}; it must be one line")
    return text


def _matches(rx: re.Pattern, value: str, what: str, rule: str) -> str:
    if not isinstance(value, str) or not rx.fullmatch(value):
        raise ValidationError(f"{what} {value!r} refused: {rule} (it goes into scheduler "
                              "directives, which cannot quote)")
    return value


def _count(value: object, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValidationError(f"{what} must be a whole number >= {low}, not {value!r}")
    return value


def validate(spec: PilotSpec) -> PilotSpec:
    """Refuse a spec that cannot be written into a batch script safely (ValidationError)."""
    _matches(NAME_RE, spec.name, "pilot name",
             "letters, digits, '_', '.', '-', starting with a letter, at most 63 characters")
    _count(spec.nodes, "nodes", 1)
    _count(spec.walltime_minutes, "walltime_minutes", 1)
    _count(spec.cores_per_node, "cores_per_node", 1)
    _count(spec.gpus_per_node, "gpus_per_node", 0)
    if spec.memory_mb is not None:
        _count(spec.memory_mb, "memory_mb", 1)
    if spec.queue is not None:
        _matches(QUEUE_RE, spec.queue, "queue", "letters, digits and _ . @ , + - only")
    if spec.project is not None:
        _matches(PROJECT_RE, spec.project, "project", "letters, digits and _ . @ + - only")
    _matches(WORKDIR_RE, str(spec.workdir), "workdir",
             "an absolute path of letters, digits and _ . / + , @ - only")
    if not spec.head_argv:
        raise ValidationError("head_argv is empty: the pilot needs a head command")
    for item in spec.head_argv:
        if not isinstance(item, str) or "\0" in item:
            raise ValidationError(f"head argv item {item!r} is not a string without NUL bytes")
    for name, value in spec.env:
        _matches(ENV_NAME_RE, name, "environment variable name",
                 "letters, digits and '_', not starting with a digit")
        if not isinstance(value, str) or "\0" in value:
            raise ValidationError(f"environment value of {name} must be a string without NUL")
    for line in spec.setup:
        _one_line(line, "setup line")
    for line in spec.directives:
        _one_line(line, "directive")
    return spec


def hhmmss(minutes: int) -> str:
    """Walltime as PBS/Torque want it: ``90`` -> ``01:30:00`` (hours may exceed 24)."""
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def hhmm(minutes: int) -> str:
    """Walltime as LSF's -W wants it: ``90`` -> ``01:30``."""
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@functools.lru_cache(maxsize=None)
def environment():
    """The one jinja2 Environment every adapter renders with (made on first use, so importing
    the adapters does not import jinja2: the CLI's start stays light)."""
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["shquote"] = shquote
    env.filters["hhmmss"] = hhmmss
    env.filters["hhmm"] = hhmm
    return env


def render(template: str, spec: PilotSpec, **extra) -> str:
    """Validate ``spec`` and render ``templates/<template>`` with it (pure)."""
    validate(spec)
    extra.setdefault("cd_optional", False)
    return environment().get_template(template).render(spec=spec, workdir=str(spec.workdir),
                                                        **extra)


def write_script(spec: PilotSpec, text: str, name: str = "pilot.sh", mode: int = 0o755) -> Path:
    """Write a script (or, with mode 0o644, a plain file) into the workdir, created if needed."""
    spec.workdir.mkdir(parents=True, exist_ok=True)
    path = spec.workdir / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)
    return path


def record_batch_id(spec: PilotSpec, batch_id: str) -> None:
    (spec.workdir / "batch_id").write_text(batch_id + "\n")


def unparsable(raw: str, what: str) -> PilotStatus:
    """MISSING with the raw text, and a warning in the log: never an exception."""
    shown = raw.strip()
    log.warning("could not parse %s: %r", what, shown[:300])
    return PilotStatus(PilotState.MISSING, raw=shown, reason=f"could not parse {what}")


def missing(reason: str, raw: str = "") -> PilotStatus:
    return PilotStatus(PilotState.MISSING, raw=raw, reason=reason)


def split_ids(batch_ids, rx: re.Pattern, kind: str) -> tuple[list[str], dict[str, PilotStatus]]:
    """(ids that look like ``kind`` ids, MISSING statuses for the rest): nothing that could
    be read as an option ever reaches a scheduler command."""
    good: list[str] = []
    bad: dict[str, PilotStatus] = {}
    for jid in dict.fromkeys(batch_ids):
        if isinstance(jid, str) and rx.fullmatch(jid):
            good.append(jid)
        else:
            bad[jid] = missing(f"{jid!r} is not a {kind} job id")
    return good, bad


def check_id(batch_id: str, rx: re.Pattern, kind: str) -> str:
    from .base import BatchError
    if not isinstance(batch_id, str) or not rx.fullmatch(batch_id):
        raise BatchError(f"{batch_id!r} is not a {kind} job id")
    return batch_id


def complete(ids, got: dict[str, PilotStatus], garbage: list[str], what: str,
             gone: str) -> dict[str, PilotStatus]:
    """Every id once, in order: its parsed status; else MISSING with the lines that could not
    be parsed (they may have been about it); else MISSING because the scheduler does not know
    it (``gone`` says so)."""
    out: dict[str, PilotStatus] = {}
    for jid in dict.fromkeys(ids):
        if jid in got:
            out[jid] = got[jid]
        elif garbage:
            out[jid] = unparsable("\n".join(garbage), what)
        else:
            out[jid] = missing(gone)
    return out


def parse_clock(text: str) -> float | None:
    """Minutes from ``[D-]HH:MM:SS``, ``HH:MM:SS``, ``MM:SS``, ``MM`` or ``DD:HH:MM:SS``;
    None for unlimited ("infinite", "UNLIMITED", "INFINITY"). ValueError when unreadable."""
    t = text.strip()
    if t.lower() in ("infinite", "unlimited", "infinity", "none"):
        return None
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
    parts = [int(p) for p in t.split(":")]
    if any(p < 0 for p in parts) or not 1 <= len(parts) <= 4:
        raise ValueError(text)
    if len(parts) == 1:
        return days * 1440 + parts[0]
    if len(parts) == 2:
        m, s = parts
        return days * 1440 + m + s / 60
    if len(parts) == 4:
        days, parts = days + parts[0], parts[1:]
    h, m, s = parts
    return days * 1440 + h * 60 + m + s / 60
