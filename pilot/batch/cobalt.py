"""Cobalt (ALCF Theta and the Blue Genes): ``qsub --mode script``, ``qstat``, ``qdel``.

Options go on the qsub command line, the form ALCF documents first for script jobs
(``qsub -A <project> -t <mins> -n <nodes> --mode script <script>``); ``#COBALT`` lines in the
script are the other documented form and are used only for the site profile's extra directives.
``-O <workdir>/<name>`` names the job and its ``.output``/``.error``/``.cobaltlog`` files.

``qstat --header JobID:State:Location <ids>`` prints a table (header, a line of '=', one row per
job). Cobalt keeps no job history: a job that ended is simply gone from qstat, so its status is
MISSING (its ``.cobaltlog`` says how it ended). Backfill windows: Theta's ``nodelist`` output is
not documented in a form we could check against, so none are reported.
"""
from __future__ import annotations

import re
import shlex
from typing import Sequence

from .base import (BatchError, BatchSystem, PilotSpec, PilotState, PilotStatus, Submitted,
                   run_command)
from .templating import (NUMERIC_ID_RE, check_id, complete, record_batch_id, render,
                         split_ids, unparsable, validate, write_script)

STATES = {"queued": PilotState.QUEUED, "user_hold": PilotState.QUEUED,
          "admin_hold": PilotState.QUEUED, "dep_hold": PilotState.QUEUED,
          "maxrun_hold": PilotState.QUEUED,
          "starting": PilotState.RUNNING, "running": PilotState.RUNNING,
          "exiting": PilotState.RUNNING, "killing": PilotState.RUNNING,
          "dep_fail": PilotState.FAILED}
HEADER = "JobID:State:Location"


def submit_argv(spec: PilotSpec, script: str) -> list[str]:
    """The qsub command for ``spec`` (one argv item each; no shell)."""
    validate(spec)
    argv = ["qsub", "-n", str(spec.nodes), "-t", str(spec.walltime_minutes)]
    if spec.queue:
        argv += ["-q", spec.queue]
    if spec.project:
        argv += ["-A", spec.project]
    argv += ["-O", f"{spec.workdir}/{spec.name}", "--mode", "script", script]
    return argv


def parse_qstat(out: str, ids: Sequence[str]) -> tuple[dict[str, PilotStatus], list[str]]:
    got: dict[str, PilotStatus] = {}
    garbage: list[str] = []
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if lines and lines[0].split()[:1] == ["JobID"]:
        lines = lines[1:]
    if lines and set(lines[0].strip()) == {"="}:
        lines = lines[1:]
    for line in lines:
        f = line.split()
        if len(f) != 3 or f[0] not in ids:
            garbage.append(line)
            continue
        jid, word, location = f
        state = STATES.get(word)
        if state is None:
            got[jid] = unparsable(line, f"Cobalt job state {word!r}")
            continue
        nodes = () if location in ("None", "-", "N/A") else tuple(location.split(","))
        got[jid] = PilotStatus(state, raw=word, nodes=nodes,
                               reason="a job it depends on failed" if word == "dep_fail"
                               else None)
    return got, garbage


class CobaltBatch(BatchSystem):
    name = "cobalt"

    def render(self, spec: PilotSpec) -> str:
        argv = submit_argv(spec, f"{spec.workdir}/pilot.sh")
        return render("cobalt.sh.j2", spec, argv_shown=shlex.join(argv[1:]))

    def submit(self, spec: PilotSpec) -> Submitted:
        script = write_script(spec, self.render(spec))
        r = run_command(submit_argv(spec, str(script)), cwd=spec.workdir)
        m = re.search(r"(\d+)\s*$", r.stdout.strip())
        if not m:
            raise BatchError(f"`qsub ... {script}`: could not read a job id from "
                             f"{r.stdout.strip()!r}")
        jid = m.group(1)
        record_batch_id(spec, jid)
        prefix = f"{spec.workdir}/{spec.name}"
        return Submitted(jid, script, spec.workdir / f"{spec.name}.output",
                         spec.workdir / f"{spec.name}.error",
                         extra={"cobaltlog": f"{prefix}.cobaltlog"})

    def status(self, batch_ids: Sequence[str]) -> dict[str, PilotStatus]:
        ids, bad = split_ids(batch_ids, NUMERIC_ID_RE, "Cobalt")
        got: dict[str, PilotStatus] = {}
        garbage: list[str] = []
        if ids:
            # exit 1 when none of the ids is known
            r = run_command(["qstat", "--header", HEADER, *ids], ok_codes=(0, 1))
            got, garbage = parse_qstat(r.stdout, ids)
        result = {**complete(ids, got, garbage, "Cobalt qstat output",
                             "not in Cobalt's qstat: the job ended (Cobalt keeps no history; "
                             "see its .cobaltlog)"), **bad}
        return {jid: result[jid] for jid in dict.fromkeys(batch_ids)}

    def cancel(self, batch_id: str) -> None:
        run_command(["qdel", check_id(batch_id, NUMERIC_ID_RE, "Cobalt")])
