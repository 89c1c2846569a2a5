"""Slurm: ``sbatch --parsable``, ``squeue``/``sacct``, ``scancel``, windows from ``sinfo``.

Status takes one ``squeue -t all`` call for all ids (slurmctld remembers ended jobs for
MinJobAge seconds), then ``sacct`` for the rest; where accounting storage is disabled (as on the
test cluster), ``sacct -c`` reads the jobcomp/filetxt log instead. ``scontrol show job`` would
only repeat what ``squeue -t all`` already said, so it is not asked.
"""
from __future__ import annotations

import logging
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
        """Idle nodes per partition, each for its partition's time limit (None: infinite).
        Partitions may share nodes, so windows of different partitions can overlap."""
        r = run_command(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N|%R|%l|%t"])
        parts: dict[str, tuple[set[str], float | None]] = {}
        for line in r.stdout.splitlines():
            fields = line.strip().split("|")
            if len(fields) != 4 or fields[3].strip() != "idle":
                continue
            node, part, limit = (f.strip() for f in fields[:3])
            try:
                minutes = parse_clock(limit)
            except ValueError:
                log.warning("sinfo: unreadable time limit %r of partition %s", limit, part)
                continue
            parts.setdefault(part, (set(), minutes))[0].add(node)
        return [Window(len(nodes), minutes) for _, (nodes, minutes) in sorted(parts.items())]
