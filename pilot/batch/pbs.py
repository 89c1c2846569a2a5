"""PBS Professional / OpenPBS: ``qsub`` with ``select`` chunks, ``qstat -x -f -F json``, ``qdel``.

Directives follow the PBS Professional User's Guide: one chunk per node
(``-l select=N:ncpus=C[:ngpus=G][:mem=Mmb]``) placed one per host (``-l place=scatter``),
``-l walltime=HH:MM:SS``, ``-q``, ``-A``, ``-N``, ``-o``/``-e``.

Finished jobs (state F, kept while job history is enabled) carry ``Exit_status``: 0 is a normal
end, -29 (JOB_EXEC_KILL_WALLTIME) the walltime kill, other negative values PBS's own failures
(JOB_EXEC_*), and values above 256 a kill by signal (256 + signal number). ``substate`` 91 marks
a job deleted with qdel, 93 a failed one.
"""
from __future__ import annotations

import json
from typing import Sequence

from .base import (BatchError, BatchSystem, PilotSpec, PilotState, PilotStatus, Submitted,
                   Window, run_command)
from .templating import (PBS_ID_RE, check_id, complete, record_batch_id, render, split_ids,
                         unparsable, write_script)

#: job_state letters. W waits for its start time, T is moving between queues, S/U suspended:
#: all wait for the scheduler. E is exiting (still on its nodes), B an array job that began.
STATES = {"Q": PilotState.QUEUED, "H": PilotState.QUEUED, "W": PilotState.QUEUED,
          "T": PilotState.QUEUED, "S": PilotState.QUEUED, "U": PilotState.QUEUED,
          "R": PilotState.RUNNING, "E": PilotState.RUNNING, "B": PilotState.RUNNING}
WALLTIME_KILLED = -29
SUBSTATE_DELETED = 91
SUBSTATE_FAILED = 93


def exec_hosts(value: str) -> tuple[str, ...]:
    """``n1/0*8+n2/0*8`` -> ("n1", "n2")."""
    hosts = [part.split("/")[0] for part in value.split("+") if part.strip()]
    return tuple(dict.fromkeys(h.strip() for h in hosts if h.strip()))


def finished(exit_status, substate, comment: str, raw: str) -> PilotStatus:
    """The state of a job that ended (PBS Pro F/X, Torque C)."""
    note = comment or None
    try:
        code = int(exit_status) if exit_status is not None else None
    except (TypeError, ValueError):
        return unparsable(raw, f"exit status {exit_status!r}")
    text = (comment or "").lower()
    if code == WALLTIME_KILLED or ("walltime" in text and "exceeded" in text):
        return PilotStatus(PilotState.TIMEOUT, raw=raw, reason=note or "walltime exceeded")
    if str(substate) == str(SUBSTATE_DELETED) or "deleted" in text:
        return PilotStatus(PilotState.CANCELLED, raw=raw, reason=note or "deleted (qdel)")
    if code is None:
        state = PilotState.FAILED if str(substate) == str(SUBSTATE_FAILED) else \
            PilotState.FINISHED
        return PilotStatus(state, raw=raw, reason=note or "no exit status reported")
    if code == 0:
        return PilotStatus(PilotState.FINISHED, raw=raw, reason=note)
    if code == 256 + 15:
        return PilotStatus(PilotState.CANCELLED, raw=raw, reason="killed by SIGTERM (qdel)")
    if code > 256:
        return PilotStatus(PilotState.FAILED, raw=raw, reason=f"killed by signal {code - 256}")
    if code < 0:
        return PilotStatus(PilotState.FAILED, raw=raw,
                           reason=f"PBS could not run the job (Exit_status {code})")
    return PilotStatus(PilotState.FAILED, raw=raw, reason=f"exit {code}")


def _match(job_ids, wanted: str) -> str | None:
    """PBS answers with full ids (1234.server); we may hold 1234 or the full one."""
    if wanted in job_ids:
        return wanted
    short = wanted.split(".")[0]
    for jid in job_ids:
        if jid.split(".")[0] == short:
            return jid
    return None


def parse_qstat_json(out: str, ids: Sequence[str]) -> dict[str, PilotStatus]:
    """``qstat -x -f -F json`` -> statuses of ``ids`` (MISSING for ids it does not list)."""
    try:
        jobs = json.loads(out).get("Jobs", {}) if out.strip() else {}
        if not isinstance(jobs, dict):
            raise ValueError("Jobs is not an object")
    except (ValueError, AttributeError):
        return complete(ids, {}, [out], "qstat -F json output", "")
    got: dict[str, PilotStatus] = {}
    for wanted in ids:
        key = _match(jobs, wanted)
        if key is None:
            continue
        job = jobs[key]
        if not isinstance(job, dict):
            got[wanted] = unparsable(json.dumps(job), "qstat -F json job entry")
            continue
        letter = str(job.get("job_state", ""))
        raw = letter
        nodes = exec_hosts(str(job.get("exec_host", "")))
        if letter in ("F", "X"):
            st = finished(job.get("Exit_status"), job.get("substate"),
                          str(job.get("comment", "")), raw)
            got[wanted] = PilotStatus(st.state, st.raw, st.reason, nodes)
        elif letter == "M":
            got[wanted] = PilotStatus(PilotState.MISSING, raw=raw,
                                      reason="moved to another PBS server")
        elif letter in STATES:
            got[wanted] = PilotStatus(STATES[letter], raw=raw,
                                      reason=str(job["comment"]) if job.get("comment") else None,
                                      nodes=nodes)
        else:
            got[wanted] = unparsable(json.dumps({key: job}), f"PBS job_state {letter!r}")
    return complete(ids, got, [], "qstat -F json output",
                    "PBS no longer knows this job (not in qstat -x: history off or expired)")


def parse_pbsnodes_json(out: str) -> list[Window]:
    """Free nodes without jobs from ``pbsnodes -a -F json``: one window, end unknown."""
    try:
        nodes = json.loads(out).get("nodes", {})
    except (ValueError, AttributeError):
        return []
    free = sum(1 for n in nodes.values() if isinstance(n, dict)
               and str(n.get("state", "")).split(",")[0].strip() == "free" and not n.get("jobs"))
    return [Window(free, None)] if free else []


class PbsBatch(BatchSystem):
    name = "pbs"

    def render(self, spec: PilotSpec) -> str:
        return render("pbs.sh.j2", spec)

    def submit(self, spec: PilotSpec) -> Submitted:
        script = write_script(spec, self.render(spec))
        r = run_command(["qsub", str(script)], cwd=spec.workdir)
        jid = r.stdout.strip().splitlines()[-1].strip() if r.stdout.strip() else ""
        if not jid or not jid.split(".")[0].split("[")[0].isdigit():
            raise BatchError(f"`qsub {script}`: could not read a job id from {r.stdout!r}")
        record_batch_id(spec, jid)
        return Submitted(jid, script, spec.workdir / "pilot.out", spec.workdir / "pilot.err")

    def status(self, batch_ids: Sequence[str]) -> dict[str, PilotStatus]:
        ids, bad = split_ids(batch_ids, PBS_ID_RE, "PBS")
        if not ids:
            return bad
        # exit status is non-zero when any id is unknown; the others are still printed
        r = run_command(["qstat", "-x", "-f", "-F", "json", *ids], ok_codes=range(256))
        if r.returncode and not r.stdout.strip() and "Unknown Job Id" not in r.stderr:
            raise BatchError(f"`qstat -x -f -F json` failed (exit {r.returncode}): "
                             f"{r.stderr.strip() or 'no output'}")
        got = {**parse_qstat_json(r.stdout, ids), **bad}
        return {jid: got[jid] for jid in dict.fromkeys(batch_ids)}

    def cancel(self, batch_id: str) -> None:
        run_command(["qdel", check_id(batch_id, PBS_ID_RE, "PBS")])

    def windows(self) -> list[Window]:
        return parse_pbsnodes_json(run_command(["pbsnodes", "-a", "-F", "json"]).stdout)
