"""The embedded default: a pilot as a process group on this machine, no scheduler.

``submit()`` starts a small supervisor through a double fork (so it is nobody's child once the
submitter exits, and the submitter never keeps a zombie): the supervisor runs in a session of its
own, starts the script (a file, executed directly through its ``#!/bin/bash``; no shell string is
ever built) as the leader of a new session and process group, and records:

- ``workdir/local.json``: the script's pid (the batch id is ``local-<pid>``) and start time;
- ``workdir/local.exit``: how it ended (return code, and "cancelled"/"timeout" when it was
  ended by a cancel or its walltime).

Like a batch system, the supervisor enforces the walltime (SIGTERM to the group, SIGKILL after a
grace; the script gets ``PILOTFISH_END_TIME`` so the head ends its agents in time) and ends
what is left of the group when the script exits. ``cancel()`` asks the supervisor (a
``local.cancel`` file), which sends SIGTERM and, after the grace, SIGKILL; with the supervisor
gone it signals the group itself.

Batch ids only name a pid, so a registry directory (one small JSON file per pilot; default
``$TMPDIR/pilotfish-local-<uid>``) maps them to their workdirs. A pid is trusted only while its
process start time matches the recorded one (pids are reused).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import psutil

from .base import BatchError, BatchSystem, PilotSpec, PilotState, PilotStatus, Submitted
from .templating import missing, record_batch_id, render, write_script

#: Seconds between SIGTERM and SIGKILL (the head needs ~15 s to hand its agents' tasks back).
GRACE = 20.0
#: Seconds submit() waits for the supervisor to report the script's pid.
START_TIMEOUT = 15.0

_LAUNCH = ("import sys; from pilotfish.pilot.batch.local import _launch; "
           "_launch(sys.argv[1:])")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int, create_time: float | None) -> bool:
    """The process ``pid`` still runs and is the one we started (not a reused pid)."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(p.create_time() - create_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _end_group(pgid: int, grace: float) -> None:
    """SIGTERM the group, SIGKILL whatever is left after ``grace`` seconds."""
    if not _group_alive(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def _launch(argv: list[str]) -> None:
    """First fork's child: fork the supervisor into its own session and return at once."""
    if os.fork():
        os._exit(0)
    os.setsid()
    try:
        code = supervise(argv)
    except BaseException:   # noqa: BLE001 - a supervisor must leave a trace, not a traceback
        import traceback
        traceback.print_exc()
        code = 1
    os._exit(code)


def supervise(argv: list[str]) -> int:
    """Run the pilot script: ``workdir script walltime_minutes grace``."""
    workdir, script = Path(argv[0]), Path(argv[1])
    walltime, grace = float(argv[2]), float(argv[3])
    env = dict(os.environ)
    started = time.time()
    env.setdefault("PILOTFISH_END_TIME", f"{started + walltime * 60:.0f}")
    with open(workdir / "pilot.out", "ab") as out, open(workdir / "pilot.err", "ab") as err:
        child = subprocess.Popen([str(script)], cwd=workdir, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=err, env=env, start_new_session=True,
                                 close_fds=True)
    _write_json(workdir / "local.json",
                {"pid": child.pid, "supervisor": os.getpid(), "started": started,
                 "create_time": psutil.Process(child.pid).create_time(),
                 "supervisor_create_time": psutil.Process(os.getpid()).create_time()})
    cancel_file = workdir / "local.cancel"
    deadline = started + walltime * 60
    why, term_at = None, 0.0
    while True:
        try:
            rc = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.time()
        if why is None and (cancel_file.exists() or now >= deadline):
            why = "cancelled" if cancel_file.exists() else "timeout"
            _signal_group(child.pid, signal.SIGTERM)
            term_at = now
        elif why is not None and now - term_at >= grace:
            _signal_group(child.pid, signal.SIGKILL)
    # the script ended: end what it left in its group, as a batch system ends the job
    _end_group(child.pid, grace)
    _write_json(workdir / "local.exit", {"returncode": rc, "ended": time.time(), "why": why})
    return 0


class LocalBatch(BatchSystem):
    name = "local"

    def __init__(self, state_dir: Path | str | None = None, grace: float = GRACE) -> None:
        self.state_dir = Path(state_dir) if state_dir else \
            Path(tempfile.gettempdir()) / f"pilotfish-local-{os.getuid()}"
        self.grace = grace

    def render(self, spec: PilotSpec) -> str:
        return render("local.sh.j2", spec)

    def _record(self, batch_id: str) -> dict | None:
        if not batch_id.startswith("local-") or not batch_id[6:].isdigit():
            return None
        return _read_json(self.state_dir / f"{batch_id}.json")

    def submit(self, spec: PilotSpec) -> Submitted:
        script = write_script(spec, self.render(spec))
        for name in ("local.json", "local.exit", "local.cancel"):
            (spec.workdir / name).unlink(missing_ok=True)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = spec.workdir / "local-supervisor.log"
        with open(log, "ab") as logf:
            run = subprocess.run([sys.executable, "-c", _LAUNCH, str(spec.workdir), str(script),
                                  str(spec.walltime_minutes), str(self.grace)],
                                 stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 timeout=START_TIMEOUT, close_fds=True)
        if run.returncode:
            raise BatchError(f"local pilot supervisor did not start (exit {run.returncode}); "
                             f"see {log}")
        deadline = time.monotonic() + START_TIMEOUT
        info = None
        while time.monotonic() < deadline:
            info = _read_json(spec.workdir / "local.json")
            if info:
                break
            time.sleep(0.02)
        if not info:
            raise BatchError(f"local pilot supervisor did not report the script's pid within "
                             f"{START_TIMEOUT:.0f} s; see {log}")
        batch_id = f"local-{info['pid']}"
        _write_json(self.state_dir / f"{batch_id}.json", {**info, "workdir": str(spec.workdir)})
        record_batch_id(spec, batch_id)
        return Submitted(batch_id, script, spec.workdir / "pilot.out",
                         spec.workdir / "pilot.err", extra={"supervisor_log": str(log)})

    def status(self, batch_ids: Sequence[str]) -> dict[str, PilotStatus]:
        return {jid: self._status(jid) for jid in dict.fromkeys(batch_ids)}

    def _status(self, batch_id: str) -> PilotStatus:
        rec = self._record(batch_id)
        if rec is None:
            return missing(f"no local pilot {batch_id!r} is recorded in {self.state_dir}")
        workdir = Path(rec["workdir"])
        ended = _read_json(workdir / "local.exit")
        if ended is not None:
            rc, why = ended.get("returncode"), ended.get("why")
            if why == "cancelled":
                return PilotStatus(PilotState.CANCELLED, raw=f"exit {rc}", reason="cancelled")
            if why == "timeout":
                return PilotStatus(PilotState.TIMEOUT, raw=f"exit {rc}",
                                   reason="walltime reached")
            if rc == 0:
                return PilotStatus(PilotState.FINISHED, raw="exit 0")
            if isinstance(rc, int) and rc < 0:
                return PilotStatus(PilotState.FAILED, raw=f"signal {-rc}",
                                   reason=f"killed by signal {-rc}")
            return PilotStatus(PilotState.FAILED, raw=f"exit {rc}", reason=f"exit {rc}")
        if _alive(rec["pid"], rec.get("create_time")) or \
                _alive(rec["supervisor"], rec.get("supervisor_create_time")):
            reason = "cancel requested" if (workdir / "local.cancel").exists() else None
            return PilotStatus(PilotState.RUNNING, raw="running", reason=reason,
                               nodes=(os.uname().nodename,))
        return missing("the local pilot's processes are gone and no exit was recorded "
                       "(supervisor killed?)")

    def cancel(self, batch_id: str) -> None:
        rec = self._record(batch_id)
        if rec is None:
            raise BatchError(f"no local pilot {batch_id!r} is recorded in {self.state_dir}")
        workdir = Path(rec["workdir"])
        if (workdir / "local.exit").exists():
            return   # already ended
        (workdir / "local.cancel").write_text(f"{time.time():.3f}\n")
        if not _alive(rec["supervisor"], rec.get("supervisor_create_time")) and \
                _alive(rec["pid"], rec.get("create_time")):
            _end_group(rec["pid"], self.grace)   # nobody else will
