"""The nodes of the batch allocation a pilot runs in, read from what the batch system left behind.

Sources and the documentation they follow:

- Slurm ``SLURM_JOB_NODELIST`` (older name ``SLURM_NODELIST``): the hostlist syntax of
  ``scontrol show hostnames``, documented in slurm_hostlist_create(3) and Slurm::Hostlist(3pm)
  ("tux[0-5,12,20-25]") and implemented in Slurm's src/common/hostlist.c: the width of a range's
  lower bound sets the zero padding, and with several bracket groups in one name
  (``rack[1-2]n[01-03]``) the left-most group varies slowest.
- PBS/Torque ``PBS_NODEFILE``: a file with one line per slot, so hosts repeat.
- Cobalt ``COBALT_NODEFILE`` (one host per line) and, on ALCF Theta, ``COBALT_PARTNAME``: a list
  of nid numbers and ranges (``3835-3837,3840``) naming nodes ``nid%05d``.
- LSF ``LSB_DJOB_HOSTFILE`` and ``LSB_HOSTS`` (OLCF Summit): one entry per slot; the first entry
  is the launch (batch) node, which is not a compute node there.

Pure on purpose: no scontrol and no subprocess, so discovery works the same on a login node, in a
container and in tests. Every name is checked, because it ends up in launcher options.
"""
from __future__ import annotations

import itertools
import math
import re
import socket
from collections.abc import Iterable, Iterator, Mapping

from pilotfish.errors import ValidationError

MAX_HOSTS = 100_000  # more than any machine has nodes; beyond this a typo expanded, not a job
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]*")
_RANGE = re.compile(r"([0-9]{1,18})(?:-([0-9]{1,18}))?")  # 18 digits: int() stays cheap
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_HOST_RULE = "letters, digits, '-', '_' and '.', starting with a letter or digit"


def _show(text: str, limit: int = 80) -> str:
    """repr() keeps a message on one line; long inputs are cut so the message stays readable."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _ranges(spec: str, what: str) -> list[tuple[int, int, int]]:
    """``1-3,07`` as (lo, hi, width) triples; the width of the lower bound is the zero padding."""
    out = []
    for part in spec.split(","):
        m = _RANGE.fullmatch(part)
        if not m:
            why = (f"{part!r} is not a number or a range like 1-4" if part
                   else "an empty entry (stray comma?)")
            raise ValidationError(f"{what}: {why}")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise ValidationError(f"{what}: reversed range {part!r} (the lower bound comes first)")
        out.append((lo, hi, len(m.group(1))))
    return out


def _split_items(text: str) -> list[str]:
    """Split at commas outside brackets, so ``nid[1,3],login`` is two items, not three."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            break
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValidationError(f"bad hostlist {_show(text)}: unbalanced brackets")
    return items + [text[start:]]


def expand_hostlist(text: str) -> list[str]:
    """Host names from Slurm hostlist syntax, in order, each once (the first time it appears).

    Slurm hands the allocation over in this compressed form; expanding it here rather than by
    calling ``scontrol show hostnames`` keeps the pilot free of Slurm's binaries. Anything that
    does not parse is refused rather than guessed at, since the names go to the launcher.
    """
    text = text.strip()
    if not text:
        raise ValidationError("empty hostlist: no host names given")
    hosts: dict[str, None] = {}
    total = 0
    for item in _split_items(text):
        what = f"bad hostlist item {_show(item)}"
        if not item:
            raise ValidationError(f"bad hostlist {_show(text)}: an empty item (stray comma?)")
        parts = _BRACKETS.split(item)  # literals at even indexes, bracket contents at odd ones
        choices: list[list[tuple[int, int, int]] | str] = []
        for i, part in enumerate(parts):
            if i % 2:
                if not part:
                    raise ValidationError(f"{what}: empty brackets []")
                choices.append(_ranges(part, what))
            elif "[" in part or "]" in part:
                raise ValidationError(f"{what}: nested or unbalanced brackets")
            elif not _NAME_CHARS.fullmatch(part):
                bad = next(c for c in part if not _NAME_CHARS.fullmatch(c))
                raise ValidationError(f"{what}: character {bad!r} is not allowed "
                                      f"(host names use {_HOST_RULE})")
            else:
                choices.append(part)
        total += math.prod(sum(hi - lo + 1 for lo, hi, _ in c)
                           for c in choices if not isinstance(c, str))
        if total > MAX_HOSTS:
            raise ValidationError(f"hostlist {_show(text)} expands to {total:,} hosts, more than "
                                  f"the {MAX_HOSTS:,} allowed (a typo in a range?)")
        expanded = [[c] if isinstance(c, str) else
                    [f"{n:0{w}d}" for lo, hi, w in c for n in range(lo, hi + 1)] for c in choices]
        for pieces in itertools.product(*expanded):
            host = "".join(pieces)
            if not _HOST.fullmatch(host):
                raise ValidationError(f"{what}: host name {host!r} must start with a letter "
                                      "or digit")
            hosts[host] = None
    return list(hosts)


def _check(host: str, where: str) -> str:
    if not _HOST.fullmatch(host):
        raise ValidationError(f"{where}: {_show(host)} is not a host name ({_HOST_RULE})")
    return host


def _unique(hosts: Iterable[str], where: str) -> list[str]:
    """First-seen order, each once; files list a host once per slot, launchers want it once."""
    seen: dict[str, None] = {}
    for h in hosts:
        seen[h] = None
        if len(seen) > MAX_HOSTS:
            raise ValidationError(f"{where} lists more than {MAX_HOSTS:,} hosts")
    return list(seen)


def _file_hosts(path: str, where: str) -> Iterator[str]:
    """Hosts of a node file, one a line, streamed (a PBS file has a line per slot: it can be
    large); blank lines and ``#`` comments are skipped so hand-written ``--nodes @file`` works."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    yield _check(line, f"{where} line {n}")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValidationError(f"{where}: cannot read the node file: {why}") from None


def _drop_launch_node(hosts: Iterable[str], where: str) -> list[str]:
    """LSF lists the launch node first on Summit; drop that first entry (one slot, so on a plain
    LSF cluster, where the first execution host has more slots, that host stays) unless it is
    all there is (a one-host allocation)."""
    it = iter(hosts)
    first = next(it, None)
    return _unique(it, where) or ([first] if first is not None else [])


def _node_file(path: str, where: str, drop_first: bool = False) -> list[str]:
    hosts = _file_hosts(path, where)
    found = _drop_launch_node(hosts, where) if drop_first else _unique(hosts, where)
    if not found:
        raise ValidationError(f"{where} lists no hosts")
    return found


def _expand_in(value: str, where: str) -> list[str]:
    try:
        return expand_hostlist(value)
    except ValidationError as e:
        raise ValidationError(f"{where}: {e}") from None


def _theta_nids(value: str) -> list[str]:
    what = f"COBALT_PARTNAME={_show(value)} (expected Theta nid numbers like 3835-3837,3840)"
    ranges = _ranges(value, what)
    return _unique((f"nid{n:05d}" for lo, hi, _ in ranges for n in range(lo, hi + 1)),
                   "COBALT_PARTNAME")


def discover(env: Mapping[str, str], explicit: str | None = None) -> tuple[list[str], str]:
    """The allocation's node names and where they came from (to tell the user).

    ``explicit`` (``--nodes``) wins: a hostlist, or ``@path`` of a file with one host per line.
    Then the batch systems in a fixed order; a variable set to an empty value counts as unset,
    since shells and module files export empty variables outside any job. With nothing at all
    the pilot runs on this host alone.
    """
    if explicit is not None:
        if explicit.startswith("@"):
            return _node_file(explicit[1:], f"--nodes {explicit}"), "--nodes"
        return _expand_in(explicit, "--nodes"), "--nodes"

    def var(name: str) -> str:
        return env.get(name, "").strip()

    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if var(name):
            return _expand_in(var(name), name), name
    for name in ("PBS_NODEFILE", "COBALT_NODEFILE"):
        if var(name):
            return _node_file(var(name), f"{name}={var(name)!r}"), name
    if var("COBALT_PARTNAME"):
        return _theta_nids(var("COBALT_PARTNAME")), "COBALT_PARTNAME"
    if var("LSB_DJOB_HOSTFILE"):
        path = var("LSB_DJOB_HOSTFILE")
        return _node_file(path, f"LSB_DJOB_HOSTFILE={path!r}", True), "LSB_DJOB_HOSTFILE"
    if var("LSB_HOSTS"):
        hosts = (_check(h, "LSB_HOSTS") for h in var("LSB_HOSTS").split())
        return _drop_launch_node(hosts, "LSB_HOSTS"), "LSB_HOSTS"
    return [_check(socket.gethostname(), "this host (socket.gethostname())")], "this host"
