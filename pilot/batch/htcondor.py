"""HTCondor: glidein pilots from a submit description, condor_q/condor_history, condor_rm.

A pilot here is one glidein into a pool: one slot on one machine per submit. A spec with
``nodes > 1`` is refused rather than submitted as ``queue N``: N procs would be N independent
one-node jobs that start at different times on unrelated machines, not the one N-node
allocation the spec (and the server's multi-node job placement) means. Ask for N one-node pilots
instead.

The submit description (``pilot.sub``, keys from the condor_submit manual): ``universe =
vanilla``, ``executable``, ``request_cpus``/``request_memory`` (MB)/``request_gpus``,
``+MaxRuntime`` (read by glidein-aware pools) and a ``periodic_remove`` that enforces the walltime
anywhere, ``output``/``error``/``log``, ``queue 1``. HTCondor has no queues: a spec with a queue is
refused (site profile directives can add requirements instead).

JobStatus: 1 idle, 2 running, 3 removed, 4 completed, 5 held, 6 transferring output,
7 suspended.
"""
from __future__ import annotations

import re
from typing import Sequence

from pilotfish.errors import ValidationError

from .base import (BatchError, BatchSystem, PilotSpec, PilotState, PilotStatus, Submitted,
                   run_command)
from .templating import (NUMERIC_ID_RE, check_id, complete, record_batch_id, render,
                         split_ids, unparsable, validate, write_script)

#: -af:t puts a tab between values, so free-text reasons (last) keep their spaces.
ATTRS = ["ClusterId", "ProcId", "JobStatus", "ExitCode", "HoldReason", "RemoveReason"]
_UNDEF = "undefined"


def _check(spec: PilotSpec) -> PilotSpec:
    validate(spec)
    if spec.nodes != 1:
        raise ValidationError(f"HTCondor pilots are glideins of one node each; nodes={spec.nodes} "
                              "refused (submit that many one-node pilots instead)")
    if spec.queue:
        raise ValidationError(f"HTCondor has no queues (queue={spec.queue!r}); use site "
                              "directives such as requirements instead")
    return spec


def _status(code: str, exit_code: str, hold: str, remove: str, raw: str) -> PilotStatus:
    hold = "" if hold == _UNDEF else hold
    remove = "" if remove == _UNDEF else remove
    if code == "1":
        return PilotStatus(PilotState.QUEUED, raw="Idle")
    if code == "5":
        return PilotStatus(PilotState.QUEUED, raw="Held", reason=hold or None)
    if code == "7":
        return PilotStatus(PilotState.QUEUED, raw="Suspended")
    if code in ("2", "6"):
        return PilotStatus(PilotState.RUNNING,
                           raw="Running" if code == "2" else "TransferringOutput")
    if code == "3":
        if "PeriodicRemove" in remove or "periodic_remove" in remove.lower():
            return PilotStatus(PilotState.TIMEOUT, raw="Removed", reason=remove)
        return PilotStatus(PilotState.CANCELLED, raw="Removed", reason=remove or None)
    if code == "4":
        if exit_code == "0":
            return PilotStatus(PilotState.FINISHED, raw="Completed")
        if exit_code == _UNDEF:
            return PilotStatus(PilotState.FAILED, raw="Completed", reason="killed by a signal")
        return PilotStatus(PilotState.FAILED, raw="Completed", reason=f"exit {exit_code}")
    return unparsable(raw, f"HTCondor JobStatus {code!r}")


def parse_af(out: str, ids: Sequence[str]) -> tuple[dict[str, PilotStatus], list[str]]:
    """``-af:t ClusterId ProcId JobStatus ExitCode HoldReason RemoveReason`` lines."""
    got: dict[str, PilotStatus] = {}
    garbage: list[str] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        f = line.lstrip("\t").split("\t")
        if len(f) != len(ATTRS) or f[0].strip() not in ids or f[1].strip() != "0":
            garbage.append(line)
            continue
        got[f[0].strip()] = _status(*(x.strip() for x in f[2:]), raw=line)
    return got, garbage


class HTCondorBatch(BatchSystem):
    name = "htcondor"

    def render(self, spec: PilotSpec) -> str:
        return render("htcondor.sh.j2", _check(spec), cd_optional=True)

    def render_submit(self, spec: PilotSpec) -> str:
        """The submit description (pure)."""
        return render("htcondor.sub.j2", _check(spec))

    def submit(self, spec: PilotSpec) -> Submitted:
        script = write_script(spec, self.render(spec))
        sub = write_script(spec, self.render_submit(spec), "pilot.sub", mode=0o644)
        r = run_command(["condor_submit", "-terse", str(sub)], cwd=spec.workdir)
        m = re.match(r"\s*(\d+)\.\d+\s*-\s*\d+\.\d+", r.stdout)
        if not m:
            raise BatchError(f"`condor_submit -terse {sub}`: could not read a cluster id from "
                             f"{r.stdout.strip()!r}")
        jid = m.group(1)
        record_batch_id(spec, jid)
        return Submitted(jid, script, spec.workdir / "pilot.out", spec.workdir / "pilot.err",
                         extra={"submit_description": str(sub),
                                "log": str(spec.workdir / "pilot.log")})

    def status(self, batch_ids: Sequence[str]) -> dict[str, PilotStatus]:
        ids, bad = split_ids(batch_ids, NUMERIC_ID_RE, "HTCondor")
        got: dict[str, PilotStatus] = {}
        garbage: list[str] = []
        if ids:
            r = run_command(["condor_q", *ids, "-af:t", *ATTRS])
            got, garbage = parse_af(r.stdout, ids)
            rest = [j for j in ids if j not in got]
            if rest:   # left the queue: the history file knows how it ended
                constraint = " || ".join(f"ClusterId == {j}" for j in rest)
                r = run_command(["condor_history", "-constraint", constraint,
                                 "-limit", str(len(rest)), "-af:t", *ATTRS])
                more, garbage2 = parse_af(r.stdout, rest)
                got.update(more)
                garbage += garbage2
        result = {**complete(ids, got, garbage, "condor_q/condor_history output",
                             "HTCondor knows no such job (not in condor_q nor condor_history)"),
                  **bad}
        return {jid: result[jid] for jid in dict.fromkeys(batch_ids)}

    def cancel(self, batch_id: str) -> None:
        run_command(["condor_rm", check_id(batch_id, NUMERIC_ID_RE, "HTCondor")])
