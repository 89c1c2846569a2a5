"""Torque (with Moab or Maui): ``qsub`` with ``nodes=N:ppn=P``, ``qstat -f``, ``qdel``, ``showbf``.

Directives follow the Torque Administrator Guide (``-l nodes=N:ppn=P[:gpus=G]``,
``-l walltime=HH:MM:SS``, ``-l mem``, ``-q``, ``-A``, ``-N``, ``-o``/``-e``). ``-o``/``-e`` are also
given on the qsub command line: Slurm's Torque wrappers (Debian ``slurm-wlm-torque``), which
this adapter must work with too, ignore ``#PBS -o`` because the wrapper always passes its own
``-o`` to sbatch, while a command-line ``-o`` reaches sbatch. Under those wrappers the job is a
Slurm job (``SLURM_*`` set, ``PBS_NODEFILE`` never), which the pilot head handles as Slurm.

``qstat -f`` of a completed job (state C) carries ``exit_status`` in real Torque: 0 normal,
-11 walltime exceeded, -10/-12 memory/CPU-time limit, other negative values Torque's own
failures, 271 (256 + SIGTERM) a running job deleted with qdel. Slurm's wrapper prints no
exit_status at all; a C job without one is FINISHED, unless this adapter cancelled it itself.
"""
from __future__ import annotations

import re
import shutil
from typing import Sequence

from .base import (BatchError, BatchSystem, PilotSpec, PilotState, PilotStatus, Submitted,
                   Window, run_command)
from .pbs import exec_hosts
from .templating import (PBS_ID_RE, check_id, complete, parse_clock, record_batch_id, render,
                         split_ids, unparsable, write_script)

STATES = {"Q": PilotState.QUEUED, "H": PilotState.QUEUED, "W": PilotState.QUEUED,
          "T": PilotState.QUEUED, "S": PilotState.QUEUED,
          "R": PilotState.RUNNING, "E": PilotState.RUNNING}
_ATTR = re.compile(r"^\s+([A-Za-z_][\w.]*) = ?(.*)$")
_JOB = re.compile(r"^Job Id:\s*(\S+)\s*$")


def parse_qstat_full(out: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``qstat -f`` blocks -> ({job id: {attribute: value}}, lines outside any block).
    Continuation lines (long values wrap onto lines starting with a tab) are joined."""
    jobs: dict[str, dict[str, str]] = {}
    garbage: list[str] = []
    cur: dict[str, str] | None = None
    last = None
    for line in out.splitlines():
        if not line.strip():
            continue
        m = _JOB.match(line)
        if m:
            cur = jobs.setdefault(m.group(1), {})
            last = None
            continue
        a = _ATTR.match(line)
        if cur is not None and a:
            last = a.group(1)
            cur[last] = a.group(2).strip()
        elif cur is not None and last is not None and line[:1] in ("\t", " "):
            cur[last] += line.strip()
        else:
            garbage.append(line)
    return jobs, garbage


def torque_finished(attrs: dict[str, str], cancelled: bool, raw: str) -> PilotStatus:
    code = attrs.get("exit_status")
    if code is None:
        if cancelled:
            return PilotStatus(PilotState.CANCELLED, raw=raw, reason="deleted by pilotfish")
        return PilotStatus(PilotState.FINISHED, raw=raw, reason="no exit_status reported")
    try:
        n = int(code)
    except ValueError:
        return unparsable(raw + f" exit_status={code}", f"Torque exit_status {code!r}")
    if n == 0:
        return PilotStatus(PilotState.FINISHED, raw=raw)
    if n == -11:
        return PilotStatus(PilotState.TIMEOUT, raw=raw, reason="walltime exceeded (-11)")
    if n == 271 or (cancelled and n > 256):
        return PilotStatus(PilotState.CANCELLED, raw=raw, reason=f"deleted (exit_status {n})")
    if n in (-10, -12):
        return PilotStatus(PilotState.FAILED, raw=raw,
                           reason="memory limit exceeded (-10)" if n == -10
                           else "CPU time limit exceeded (-12)")
    if n < 0:
        return PilotStatus(PilotState.FAILED, raw=raw,
                           reason=f"Torque could not run the job (exit_status {n})")
    if n > 256:
        return PilotStatus(PilotState.FAILED, raw=raw, reason=f"killed by signal {n - 256}")
    return PilotStatus(PilotState.FAILED, raw=raw, reason=f"exit {n}")


def parse_showbf(out: str) -> list[Window]:
    """Moab ``showbf`` table rows (Partition Tasks Nodes Duration StartOffset StartDate)
    starting now, or Maui's "N procs available [with M nodes] for DURATION" lines."""
    wins: list[Window] = []
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 5 and f[1].isdigit() and f[2].isdigit():
            try:
                minutes = parse_clock(f[3])
                offset = parse_clock(f[4])
            except ValueError:
                continue
            if offset == 0 and int(f[2]) > 0:
                wins.append(Window(int(f[2]), minutes))
            continue
        m = re.search(r"(\d+) nodes? available (?:for (\S+)|with no timelimit)", line)
        if m:
            try:
                minutes = parse_clock(m.group(2)) if m.group(2) else None
            except ValueError:
                continue
            wins.append(Window(int(m.group(1)), minutes))
    return wins


class TorqueBatch(BatchSystem):
    name = "torque"

    def __init__(self) -> None:
        #: Ids this adapter deleted: Slurm's wrapper reports them as plain C (no exit status).
        self._cancelled: set[str] = set()

    def render(self, spec: PilotSpec) -> str:
        return render("torque.sh.j2", spec)

    def submit(self, spec: PilotSpec) -> Submitted:
        script = write_script(spec, self.render(spec))
        out, err = spec.workdir / "pilot.out", spec.workdir / "pilot.err"
        r = run_command(["qsub", "-o", str(out), "-e", str(err), str(script)], cwd=spec.workdir)
        lines = r.stdout.strip().splitlines()
        jid = lines[-1].strip() if lines else ""
        if not PBS_ID_RE.fullmatch(jid):
            raise BatchError(f"`qsub {script}`: could not read a job id from "
                             f"{(r.stdout + r.stderr).strip()!r}")
        record_batch_id(spec, jid)
        return Submitted(jid, script, out, err)

    def status(self, batch_ids: Sequence[str]) -> dict[str, PilotStatus]:
        ids, bad = split_ids(batch_ids, PBS_ID_RE, "Torque")
        got: dict[str, PilotStatus] = {}
        garbage: list[str] = []
        if ids:
            # 153 (unknown job id) when any id is unknown; the known ones are still printed
            r = run_command(["qstat", "-f", *ids], ok_codes=range(256))
            if r.returncode not in (0, 153) and not r.stdout.strip():
                raise BatchError(f"`qstat -f` failed (exit {r.returncode}): "
                                 f"{r.stderr.strip() or 'no output'}")
            jobs, garbage = parse_qstat_full(r.stdout)
            for wanted in ids:
                key = wanted if wanted in jobs else next(
                    (k for k in jobs if k.split(".")[0] == wanted.split(".")[0]), None)
                if key is None:
                    continue
                attrs = jobs[key]
                letter = attrs.get("job_state", "")
                nodes = exec_hosts(attrs.get("exec_host", ""))
                if letter == "C":
                    st = torque_finished(attrs, wanted in self._cancelled, letter)
                    got[wanted] = PilotStatus(st.state, st.raw, st.reason, nodes)
                elif letter in STATES:
                    got[wanted] = PilotStatus(STATES[letter], raw=letter,
                                              reason=attrs.get("comment"), nodes=nodes)
                else:
                    got[wanted] = unparsable(f"Job Id: {key} job_state = {letter}",
                                             f"Torque job_state {letter!r}")
        result = {**complete(ids, got, garbage, "qstat -f output",
                             "Torque no longer knows this job (completed jobs are kept only "
                             "for keep_completed seconds)"), **bad}
        return {jid: result[jid] for jid in dict.fromkeys(batch_ids)}

    def cancel(self, batch_id: str) -> None:
        run_command(["qdel", check_id(batch_id, PBS_ID_RE, "Torque")])
        self._cancelled.add(batch_id)

    def windows(self) -> list[Window]:
        if not shutil.which("showbf"):
            return []
        return parse_showbf(run_command(["showbf"]).stdout)
