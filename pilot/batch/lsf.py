"""IBM Spectrum LSF: ``bsub < script``, ``bjobs -o``, ``bkill``, windows from ``bslots``.

Two ways to ask for nodes, both from the bsub manual: ``#BSUB -nnodes N`` on CSM clusters such
as OLCF Summit (whole nodes, launched with jsrun; the default here because the pilot head's
default LSF launcher is jsrun), or classic slots ``-n N*C`` with ``-R "span[ptile=C]"`` (one
host per C slots), ``-gpu "num=G"`` and ``-R "rusage[mem=...MB]"`` per slot:
``LsfBatch(nnodes=False)`` or ``get("lsf", nnodes=False)``. ``-W HH:MM``, ``-q``, ``-P``, ``-J``,
``-o``/``-e`` with ``%J`` (the job id).

Status: ``bjobs -a -noheader -o "jobid stat exit_code exit_reason exec_host delimiter='|'"``.
An EXIT job's termination reason (TERM_RUNLIMIT, TERM_OWNER, ...) tells a walltime kill and a
bkill from a failure.
"""
from __future__ import annotations

import re
import shutil
from typing import Sequence

from .base import (BatchError, BatchSystem, PilotSpec, PilotState, PilotStatus, Submitted,
                   Window, run_command)
from .templating import (NUMERIC_ID_RE, check_id, complete, record_batch_id, render, split_ids,
                         unparsable, write_script)

FORMAT = "jobid stat exit_code exit_reason exec_host delimiter='|'"
STATES = {"PEND": PilotState.QUEUED, "WAIT": PilotState.QUEUED, "PSUSP": PilotState.QUEUED,
          "PROV": PilotState.QUEUED, "USUSP": PilotState.QUEUED, "SSUSP": PilotState.QUEUED,
          "RUN": PilotState.RUNNING, "DONE": PilotState.FINISHED}
_CANCEL_WORDS = ("TERM_OWNER", "TERM_ADMIN", "TERM_FORCE_OWNER", "TERM_FORCE_ADMIN",
                 "TERM_PREEMPT", "killed by owner", "killed by root", "preempted")
_TIMEOUT_WORDS = ("TERM_RUNLIMIT", "TERM_DEADLINE", "run time limit", "deadline")


def _hosts(value: str) -> tuple[str, ...]:
    """``1*batch1:42*a01n01:42*a01n02`` (or space separated) -> host names, each once."""
    if value.strip() in ("", "-"):
        return ()
    items = re.split(r"[:\s]+", value.strip())
    return tuple(dict.fromkeys(i.split("*")[-1] for i in items if i))


def parse_bjobs(out: str, ids: Sequence[str]) -> tuple[dict[str, PilotStatus], list[str]]:
    got: dict[str, PilotStatus] = {}
    garbage: list[str] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        f = [x.strip() for x in line.split("|")]
        if len(f) != 5 or f[0] not in ids:
            garbage.append(line)
            continue
        jid, stat, code, why, hosts = f
        why = "" if why == "-" else why
        nodes = _hosts(hosts)
        if stat == "EXIT":
            lowered = why.lower()
            if any(w.lower() in lowered for w in _TIMEOUT_WORDS):
                state = PilotState.TIMEOUT
            elif any(w.lower() in lowered for w in _CANCEL_WORDS):
                state = PilotState.CANCELLED
            else:
                state = PilotState.FAILED
            reason = why or (f"exit {code}" if code not in ("", "-") else None)
            got[jid] = PilotStatus(state, raw=stat, reason=reason, nodes=nodes)
        elif stat in STATES:
            got[jid] = PilotStatus(STATES[stat], raw=stat, reason=why or None, nodes=nodes)
        elif stat in ("UNKWN", "ZOMBI"):
            got[jid] = PilotStatus(PilotState.MISSING, raw=stat,
                                   reason="LSF lost contact with the job's host" if stat == "UNKWN"
                                   else "killed, but LSF cannot reach its host (ZOMBI)")
        else:
            got[jid] = unparsable(line, f"LSF job state {stat!r}")
    return got, garbage


def parse_bslots(out: str, slots_per_node: int) -> list[Window]:
    """``bslots`` rows: SLOTS and RUNTIME ("UNLIMITED" or "N hours M minutes S seconds")."""
    wins = []
    for line in out.splitlines():
        f = line.split(None, 1)
        if len(f) != 2 or not f[0].isdigit():
            continue
        text = f[1].strip()
        if text.upper().startswith("UNLIMITED"):
            minutes = None
        else:
            units = dict((u, int(n)) for n, u in re.findall(
                r"(\d+)\s*(day|hour|minute|second)s?", text))
            if not units:
                continue
            minutes = (units.get("day", 0) * 1440 + units.get("hour", 0) * 60
                       + units.get("minute", 0) + units.get("second", 0) / 60)
        nodes = int(f[0]) // slots_per_node
        if nodes:
            wins.append(Window(nodes, minutes))
    return wins


class LsfBatch(BatchSystem):
    name = "lsf"

    def __init__(self, nnodes: bool = True, slots_per_node: int | None = None) -> None:
        self.nnodes = nnodes
        #: bslots counts slots; a window in nodes needs the slots of one node.
        self.slots_per_node = slots_per_node

    def render(self, spec: PilotSpec) -> str:
        return render("lsf.sh.j2", spec, nnodes=self.nnodes)

    def submit(self, spec: PilotSpec) -> Submitted:
        text = self.render(spec)
        script = write_script(spec, text)
        r = run_command(["bsub"], input=text, cwd=spec.workdir)   # bsub < script
        m = re.search(r"Job <(\d+)>", r.stdout)
        if not m:
            raise BatchError(f"`bsub < {script}`: could not read a job id from "
                             f"{r.stdout.strip()!r}")
        jid = m.group(1)
        record_batch_id(spec, jid)
        return Submitted(jid, script, spec.workdir / f"pilot-{jid}.out",
                         spec.workdir / f"pilot-{jid}.err")

    def status(self, batch_ids: Sequence[str]) -> dict[str, PilotStatus]:
        ids, bad = split_ids(batch_ids, NUMERIC_ID_RE, "LSF")
        got: dict[str, PilotStatus] = {}
        garbage: list[str] = []
        if ids:
            # 255 when an id is unknown ("Job <1> is not found"); the rest are still printed
            r = run_command(["bjobs", "-a", "-noheader", "-o", FORMAT, *ids],
                            ok_codes=range(256))
            if r.returncode and not r.stdout.strip() and "not found" not in r.stderr:
                raise BatchError(f"`bjobs` failed (exit {r.returncode}): "
                                 f"{r.stderr.strip() or 'no output'}")
            got, garbage = parse_bjobs(r.stdout, ids)
        result = {**complete(ids, got, garbage, "bjobs output",
                             "LSF no longer knows this job (older than CLEAN_PERIOD)"), **bad}
        return {jid: result[jid] for jid in dict.fromkeys(batch_ids)}

    def cancel(self, batch_id: str) -> None:
        run_command(["bkill", check_id(batch_id, NUMERIC_ID_RE, "LSF")])

    def windows(self) -> list[Window]:
        if not self.slots_per_node or not shutil.which("bslots"):
            return []
        return parse_bslots(run_command(["bslots"]).stdout, self.slots_per_node)
