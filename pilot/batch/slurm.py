"""Slurm: ``sbatch --parsable``, ``squeue``/``sacct``, ``scancel``, windows from ``sinfo`` and
``squeue --start``.

Status takes one ``squeue -t all`` call for all ids (slurmctld remembers ended jobs for
MinJobAge seconds), then ``sacct`` for the rest; where accounting storage is disabled (as on the
test cluster), ``sacct -c`` reads the jobcomp/filetxt log instead. ``scontrol show job`` would
only repeat what ``squeue -t all`` already said, so it is not asked.

Backfill windows: an idle node is free until its partition's time limit, or until the earliest
pending job the backfill scheduler has planned on it (``squeue --start``: expected start and
SCHEDNODES), whichever comes first. ``sbatch --test-only`` was tried for this and is too
pessimistic: with a 4-node job pending behind a 2-node one for 30 min, it said a 2-node job of
20 min would start in 30 min, while the backfill scheduler started it at once.
"""
from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import Sequence

from pilotfish.errors import ValidationError
from pilotfish.pilot.nodes import expand_hostlist

from .base import (BatchError, BatchSystem, PilotSpec, PilotState, PilotStatus, Submitted,
                   Window, run_command)
from .templating import (complete, missing, parse_clock, record_batch_id, render, unparsable,
                         write_script)

log = logging.getLogger("pilotfish.batch")

#: Slurm job states (squeue %T, sacct State) -> PilotState. A suspended job keeps its nodes but
#: its processes are stopped: it waits for the scheduler like a queued one, so QUEUED.
STATES = {
    "PENDING": PilotState.QUEUED, "REQUEUED": PilotState.QUEUED,
    "REQUEUE_HOLD": PilotState.QUEUED, "REQUEUE_FED": PilotState.QUEUED,
    "RESV_DEL_HOLD": PilotState.QUEUED, "SPECIAL_EXIT": PilotState.QUEUED,
    "SUSPENDED": PilotState.QUEUED, "STOPPED": PilotState.QUEUED,
    "CONFIGURING": PilotState.RUNNING, "RUNNING": PilotState.RUNNING,
    "COMPLETING": PilotState.RUNNING, "RESIZING": PilotState.RUNNING,
    "SIGNALING": PilotState.RUNNING, "STAGE_OUT": PilotState.RUNNING,
    "COMPLETED": PilotState.FINISHED,
    "FAILED": PilotState.FAILED, "NODE_FAIL": PilotState.FAILED,
    "BOOT_FAIL": PilotState.FAILED, "OUT_OF_MEMORY": PilotState.FAILED,
    "CANCELLED": PilotState.CANCELLED, "PREEMPTED": PilotState.CANCELLED,
    "REVOKED": PilotState.CANCELLED,
    "TIMEOUT": PilotState.TIMEOUT, "DEADLINE": PilotState.TIMEOUT,
}
_NO_NODES = ("", "(null)", "None assigned", "n/a")


def _job_id_ok(jid: str) -> bool:
    head, _, task = jid.partition("_")
    return head.isdigit() and (not task or task.isdigit()) and len(jid) < 40


def _nodes(text: str) -> tuple[str, ...]:
    text = text.strip()
    if text in _NO_NODES:
        return ()
    try:
        return tuple(expand_hostlist(text))
    except ValidationError:
        return (text,)


def _state(word: str, reason: str | None, nodes: str, raw: str) -> PilotStatus:
    base = word.split()[0] if word.split() else ""   # "CANCELLED by 1000" -> CANCELLED
    state = STATES.get(base.rstrip("+"))
    if state is None:
        return unparsable(raw, f"Slurm job state {word!r}")
    return PilotStatus(state, raw=word, reason=reason or None, nodes=_nodes(nodes))


def parse_squeue(out: str, ids: Sequence[str]) -> tuple[dict[str, PilotStatus], list[str]]:
    """``squeue -h -o "%i|%T|%r|%N"`` lines -> (statuses of the ids it lists, unreadable lines)."""
    got: dict[str, PilotStatus] = {}
    garbage: list[str] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 4 or parts[0] not in ids:
            garbage.append(line)
            continue
        jid, word, reason, nodes = parts
        got[jid] = _state(word, None if reason in ("None", "") else reason, nodes, line)
    return got, garbage


def parse_sacct(out: str, ids: Sequence[str]) -> tuple[dict[str, PilotStatus], list[str]]:
    """``sacct -X -n -P -o JobID,State,ExitCode,NodeList`` lines (the last record of an id wins:
    a requeued job has several) -> (statuses, unreadable lines)."""
    got: dict[str, PilotStatus] = {}
    garbage: list[str] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 4 or parts[0] not in ids:
            garbage.append(line)
            continue
        jid, word, code, nodes = parts
        reason = None
        if code and code != "0:0":
            rc, _, sig = code.partition(":")
            reason = f"signal {sig}" if sig not in ("", "0") else f"exit {rc}"
        got[jid] = _state(word, reason, nodes, line)
    return got, garbage



def parse_windows(sinfo: str, planned: str, now: float) -> list[Window]:
    """Windows from ``sinfo -h -N -t idle -o '%N|%R|%l|%t'`` and ``squeue --start -h -t PD -o
    '%S|%Y'`` at time ``now``: per partition, one window per distinct end, holding every idle
    node free at least that long (whole minutes; None: no end), longest first."""
    ends: dict[str, float] = {}
    for line in planned.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != 2 or fields[0] in ("N/A", "Unknown", "") or fields[1] in (
                *_NO_NODES, "N/A"):
            continue
        try:
            start = datetime.fromisoformat(fields[0]).timestamp()  # Slurm prints local time
            hosts = expand_hostlist(fields[1])
        except (ValueError, ValidationError):
            log.warning("squeue --start: unreadable line %r", line)
            continue
        for host in hosts:
            ends[host] = min(ends.get(host, math.inf), start)
    parts: dict[str, dict[str, float | None]] = {}
    for line in sinfo.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != 4 or fields[3] not in ("idle", "plnd"):  # plnd: planned for a
            continue                                               # pending job, idle till then
        node, part, limit = fields[:3]
        try:
            minutes = parse_clock(limit)
        except ValueError:
            log.warning("sinfo: unreadable time limit %r of partition %s", limit, part)
            continue
        if node in ends:
            left = float(math.floor((ends[node] - now) / 60))
            minutes = left if minutes is None else min(minutes, left)
        if minutes is None or minutes >= 1:
            parts.setdefault(part, {})[node] = minutes
    def length(m: float | None) -> float:
        return math.inf if m is None else m

    windows = []
    for part in sorted(parts):
        free = list(parts[part].values())
        for end in sorted(set(free), key=length, reverse=True):
            windows.append(Window(sum(1 for m in free if length(m) >= length(end)), end))
    return windows


class SlurmBatch(BatchSystem):
    name = "slurm"

    def render(self, spec: PilotSpec) -> str:
        return render("slurm.sh.j2", spec)

    def submit(self, spec: PilotSpec) -> Submitted:
        script = write_script(spec, self.render(spec))
        r = run_command(["sbatch", "--parsable", str(script)], cwd=spec.workdir)
        first = r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""
        jid = first.split(";")[0].strip()
        if not jid.isdigit():
            raise BatchError(f"`sbatch --parsable {script}`: could not read a job id from "
                             f"{r.stdout.strip()!r}")
        record_batch_id(spec, jid)
        return Submitted(jid, script, spec.workdir / f"pilot-{jid}.out",
                         spec.workdir / f"pilot-{jid}.err",
                         extra={"cluster": first.split(";")[1]} if ";" in first else {})

    def status(self, batch_ids: Sequence[str]) -> dict[str, PilotStatus]:
        result: dict[str, PilotStatus] = {}
        ids = []
        for jid in dict.fromkeys(batch_ids):
            if _job_id_ok(jid):
                ids.append(jid)
            else:
                result[jid] = missing(f"{jid!r} is not a Slurm job id")
        if not ids:
            return result
        r = run_command(["squeue", "-h", "-t", "all", "-j", ",".join(ids),
                         "-o", "%i|%T|%r|%N"], ok_codes=(0, 1))
        if r.returncode == 1 and "Invalid job id" not in r.stderr:
            raise BatchError(f"`squeue -j {','.join(ids)}` failed (exit 1): "
                             f"{r.stderr.strip() or r.stdout.strip() or 'no output'}")
        got, garbage = parse_squeue(r.stdout if r.returncode == 0 else "", ids)
        rest = [j for j in ids if j not in got]
        if rest:
            more, garbage2 = self._from_accounting(rest)
            got.update(more)
            garbage += garbage2
        result.update(complete(ids, got, garbage, "squeue/sacct output",
                               "Slurm no longer knows this job (not in squeue, nor in sacct)"))
        return {jid: result[jid] for jid in dict.fromkeys(batch_ids)}

    def _from_accounting(self, ids: list[str]) -> tuple[dict[str, PilotStatus], list[str]]:
        argv = ["sacct", "-X", "-n", "-P", "-j", ",".join(ids),
                "-o", "JobID,State,ExitCode,NodeList"]
        try:
            r = run_command(argv)
        except BatchError as exc:
            if "accounting storage is disabled" not in str(exc).lower():
                log.warning("sacct failed, finished Slurm jobs show as MISSING: %s", exc)
                return {}, []
            try:   # no slurmdbd: the jobcomp/filetxt log still knows ended jobs
                r = run_command(argv[:1] + ["-c"] + argv[1:])
            except BatchError as exc2:
                log.warning("sacct -c failed too: %s", exc2)
                return {}, []
        return parse_sacct(r.stdout, ids)

    def cancel(self, batch_id: str) -> None:
        if not _job_id_ok(batch_id):
            raise BatchError(f"{batch_id!r} is not a Slurm job id")
        try:
            run_command(["scancel", batch_id])
        except BatchError as exc:
            if "already completing or completed" not in str(exc):
                raise

    def windows(self) -> list[Window]:
        """Free nodes x minutes per partition (see the module doc). Partitions may share nodes,
        so windows of different partitions can overlap."""
        idle = run_command(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N|%R|%l|%t"]).stdout
        planned = run_command(["squeue", "--start", "-h", "-t", "PD", "-o", "%S|%Y"]).stdout
        return parse_windows(idle, planned, datetime.now().timestamp())
