"""Job messages: the keys a user may send, their checks, and the row a valid job becomes.

Keys are the seed's job message (Balsam/Argo) plus pilotfish's own; ``config_file`` is the seed's
name for the app's parameters and is accepted as an alias of ``parameters``. The seed's
``argo_job_id`` and ``scheduler_config`` and the bridge's ``job_status_routing_key`` are kept on
the job and given back in its status messages; ``intake_key`` is the producer's idempotency key:
a job whose key is already stored is not added again (see ``ops.job_add``).
"""
from __future__ import annotations

import json

import re
from typing import Any, Callable

from pilotfish.transfer.base import check_job_url
from pilotfish.dataroots import DataRoots
from pilotfish.errors import ValidationError
from pilotfish.validate import INT64, check_int, check_name, echo, echo_keys

from .apps import App, RESOURCE_KEYS, check_resources
from .containers import check_job_image

JOB_KEYS = frozenset({
    "name", "description", "site", "queue", "project", "wall_time_minutes", "num_nodes",
    "processes_per_node", "application", "config_file", "parameters", "input_url", "output_url",
    "group_identifier", "tags", "priority", "max_retries", "cpus_per_process",
    "gpus_per_process", "parents", "image", "argo_job_id", "scheduler_config",
    "job_status_routing_key", "intake_key", "held"})
#: Fields ``job alter`` may change on a job that no agent holds.
ALTERABLE = frozenset({"description", "site", "queue", "project", "wall_time_minutes",
                       "num_nodes", "processes_per_node", "cpus_per_process", "gpus_per_process",
                       "parameters", "input_url", "output_url", "group_identifier", "tags",
                       "priority", "max_retries"})
DEFAULT_MAX_RETRIES = 3


def check_url(value: Any, what: str, roots: DataRoots) -> str | None:
    """``file:///abs/path``, ``file://localhost/abs/path`` or ``/abs/path`` under one of the
    server's data roots and out of the home (:mod:`pilotfish.dataroots` has the rule), or a
    remote URL of a scheme :mod:`pilotfish.transfer` moves (checked, never fetched here);
    an unknown scheme is refused with the list of schemes."""
    return check_job_url(value, what, roots)


def _opt_name(value: Any, what: str) -> str | None:
    return None if value is None else check_name(value, what)


#: Ranges of the job message's own integers (their columns are 32-bit INTEGERs; the resource
#: fields are checked by apps.check_resources). ``job add`` and ``job alter`` use the same.
INT_RANGES = {"priority": (-1_000_000, 1_000_000), "max_retries": (0, 1000)}


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    return check_int(value, what, lo, hi)


#: Tags per job: enough to label, not a store (one LIKE scans them for `--tag`).
MAX_TAGS = 64


def check_tags(value: Any) -> str:
    """Tags as stored: ``",a,b,"`` so that one LIKE finds a tag."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = [t for t in value.split(",") if t]
    if not isinstance(value, list):
        raise ValidationError("tags must be a list of names")
    if len(value) > MAX_TAGS:
        raise ValidationError(f"{len(value):,} tags; a job carries at most {MAX_TAGS}")
    tags = [check_name(t, "tag") for t in value]
    return "," + ",".join(tags) + "," if tags else ""


#: A producer's texts we keep and give back: printable ASCII, no spaces (ids, keys), at most
#: their column's size. An AMQP routing key a topic exchange matches word by word: no ``*`` or
#: ``#`` (they are wildcards of bindings, not of keys).
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_ROUTING_KEY_RE = re.compile(r"[A-Za-z0-9_.:/@+-]+")
TEXT_LIMITS = {"argo_job_id": 128, "intake_key": 255, "job_status_routing_key": 255,
               "scheduler_config": 1024}


def check_token(value: Any, what: str, rx: re.Pattern = _TOKEN_RE) -> str | None:
    """An id or key from a producer: None, or a string of at most TEXT_LIMITS[what] printable
    ASCII characters without spaces; ``argo_job_id`` may also be a 64-bit integer (kept as its
    decimal digits: the seed's ids were integers)."""
    if value is None:
        return None
    if what == "argo_job_id" and type(value) is int:
        value = str(check_int(value, what))
    limit = TEXT_LIMITS[what]
    if not isinstance(value, str) or not 0 < len(value) <= limit or not rx.fullmatch(value):
        allowed = ("letters, digits and '_.:/@+-'" if rx is _ROUTING_KEY_RE
                   else "printable ASCII without spaces")
        raise ValidationError(f"{what} must be a string of 1..{limit} characters ({allowed}), "
                              f"got {echo(value)}")
    return value


def check_scheduler_config(value: Any) -> str | None:
    """The seed's scheduler config: a name or short text, kept as given (never run)."""
    if value is None:
        return None
    limit = TEXT_LIMITS["scheduler_config"]
    if not isinstance(value, str) or len(value) > limit or \
            any(c < " " or c == "\x7f" for c in value):
        raise ValidationError(f"scheduler_config must be a string of at most {limit} "
                              f"characters without control characters, got {echo(value)}")
    return value


def tags_list(stored: str) -> list[str]:
    return [t for t in stored.split(",") if t]


def build_job(msg: Any, app_by_name: Callable[[str], App], roots: DataRoots) -> dict:
    """Check one job message and return the column values (without id, state and times).

    ``roots``: the server's data roots, which ``input_url`` and ``output_url`` must lie under.

    Raises ValidationError naming the offending key; an unknown key is an error, not ignored.
    """
    if not isinstance(msg, dict):
        raise ValidationError("a job must be a map of job keys")
    unknown = msg.keys() - JOB_KEYS
    if unknown:
        raise ValidationError(f"unknown job key(s) {echo_keys(unknown)}; "
                              f"expected {', '.join(sorted(JOB_KEYS))}")
    name = check_name(msg.get("name"), "job name")
    app_name = msg.get("application")
    if not isinstance(app_name, str):
        raise ValidationError(f"job {name!r}: 'application' must name a registered app, "
                              f"got {echo(app_name)}")
    app = app_by_name(app_name)
    if "config_file" in msg and "parameters" in msg:
        raise ValidationError(f"job {name!r}: give 'parameters' or its alias 'config_file', "
                              "not both")
    params = app.check_params(msg.get("parameters", msg.get("config_file")))
    row = {"name": name, "app_id": app.id, "parameters": params}
    for k in RESOURCE_KEYS:
        row[k] = msg[k] if msg.get(k) is not None else app.resources[k]
    check_resources(row, f"job {name!r}")
    row["description"] = check_description(msg.get("description"), name)
    row["site"], row["site_choices"] = check_sites(msg.get("site"))
    row["queue"] = _opt_name(msg.get("queue"), "queue")
    row["project"] = _opt_name(msg.get("project"), "project")
    row["group_identifier"] = _opt_name(msg.get("group_identifier"), "group_identifier")
    row["tags"] = check_tags(msg.get("tags"))
    row["priority"] = _int(msg.get("priority", 0), "priority", *INT_RANGES["priority"])
    row["max_retries"] = _int(msg.get("max_retries", DEFAULT_MAX_RETRIES), "max_retries",
                              *INT_RANGES["max_retries"])
    row["input_url"] = check_url(msg.get("input_url"), "input_url", roots)
    row["output_url"] = check_url(msg.get("output_url"), "output_url", roots)
    parents = msg.get("parents") or []
    if not isinstance(parents, list) or not all(
            type(p) is int and 0 < p <= INT64[1] for p in parents):
        bad = next((p for p in parents if not (type(p) is int and 0 < p <= INT64[1])), None) \
            if isinstance(parents, list) else parents
        raise ValidationError(f"job {name!r}: parents must be a list of job ids (integers "
                              f"1..{INT64[1]}), got {echo(bad)}")
    row["parents"] = sorted(set(parents))
    row["image"] = check_job_image(app.container, msg.get("image"), app.name, name)
    row["argo_job_id"] = check_token(msg.get("argo_job_id"), "argo_job_id")
    row["scheduler_config"] = check_scheduler_config(msg.get("scheduler_config"))
    row["job_status_routing_key"] = check_token(msg.get("job_status_routing_key"),
                                                "job_status_routing_key", _ROUTING_KEY_RE)
    row["intake_key"] = check_token(msg.get("intake_key"), "intake_key")
    # held: stored, but not run before ``forward_control`` starts it (a forwarded job waits
    # for its forwarder's start: the federation fence, server/fence.py); the time is set when
    # the job is inserted
    held = msg.get("held", False)
    if type(held) is not bool:
        raise ValidationError(f"job {name!r}: held must be true or false, got {echo(held)}")
    row["fenced"] = True if held else None
    return row


#: Alternatives one job may name (``site: [mira, edison]``).
MAX_SITE_CHOICES = 8


def check_sites(value: Any) -> tuple[str | None, str | None]:
    """A job's ``site``: one name, or a list of alternatives (health-aware routing picks one,
    see server/routing.py). Returns the first site and the JSON list (None for one site)."""
    if not isinstance(value, list):
        return _opt_name(value, "site"), None
    if not 1 <= len(value) <= MAX_SITE_CHOICES:
        raise ValidationError(f"site: give 1..{MAX_SITE_CHOICES} alternative sites, "
                              f"got {len(value)}")
    names = [check_name(v, "site") for v in value]
    if len(set(names)) != len(names):
        raise ValidationError(f"site: a site is named twice in {echo(value)}")
    return names[0], (json.dumps(names) if len(names) > 1 else None)


def check_description(value: Any, name: str) -> str:
    desc = value or ""
    if not isinstance(desc, str) or len(desc) > 10_000 or "\x00" in desc:
        raise ValidationError(f"job {name!r}: description must be a string without NUL, "
                              "at most 10,000 characters")
    return desc


def workdir_for(job_id: int, name: str, group: str | None) -> str:
    """A job's workdir relative to an agent's work root; every part is a checked name."""
    return f"{group or 'default'}/{name}.{job_id}"
