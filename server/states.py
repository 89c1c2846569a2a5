"""The job state machine: the one place that says which state changes are legal.

Every transition the server writes goes through :func:`check_path`; a step with nothing to do is
passed straight through and recorded in the same event row (``via``).
"""
from __future__ import annotations

from enum import Enum

from pilotfish.errors import IllegalTransition
from pilotfish.validate import echo


class State(str, Enum):
    CREATED = "CREATED"  #: just inserted; decides at once between waiting and ready
    AWAITING_PARENTS = "AWAITING_PARENTS"  #: some parent has not reached JOB_FINISHED yet
    READY = "READY"  #: in the server's queue, waiting for an agent with room for it
    STAGED_IN = "STAGED_IN"  #: an agent has its inputs in the job's workdir
    PREPROCESSED = "PREPROCESSED"  #: the app's preprocess step succeeded (or there was none)
    RUNNING = "RUNNING"  #: the app's executable is running on an agent
    EXECUTION_FINISHED = "EXECUTION_FINISHED"  #: the executable exited 0
    POSTPROCESSED = "POSTPROCESSED"  #: the app's postprocess step succeeded (or there was none)
    STAGED_OUT = "STAGED_OUT"  #: outputs copied to output_url (or there was none)
    JOB_FINISHED = "JOB_FINISHED"  #: done; final
    STAGE_IN_FAILED = "STAGE_IN_FAILED"  #: copying the input failed
    PREPROCESS_FAILED = "PREPROCESS_FAILED"  #: the preprocess step exited non-zero
    RUN_FAILED = "RUN_FAILED"  #: the executable exited non-zero or could not start
    RUN_TIMEOUT = "RUN_TIMEOUT"  #: the executable outlived wall_time_minutes and was killed
    POSTPROCESS_FAILED = "POSTPROCESS_FAILED"  #: the postprocess step exited non-zero
    STAGE_OUT_FAILED = "STAGE_OUT_FAILED"  #: copying the output failed
    RESTART_READY = "RESTART_READY"  #: back in the queue for another attempt
    FAILED = "FAILED"  #: out of retries, or a parent failed; final until retried by a user
    USER_KILLED = "USER_KILLED"  #: killed by a user; final until retried by a user

    def __str__(self) -> str:
        return self.value


S = State
ALL = frozenset(S)
#: Waiting in the server's queue for an agent.
QUEUED = frozenset({S.READY, S.RESTART_READY})
#: The states a job passes through while an agent holds its lease.
ON_AGENT = frozenset({S.STAGED_IN, S.PREPROCESSED, S.RUNNING, S.EXECUTION_FINISHED,
                      S.POSTPROCESSED, S.STAGED_OUT})
FAILURES = frozenset({S.STAGE_IN_FAILED, S.PREPROCESS_FAILED, S.RUN_FAILED, S.RUN_TIMEOUT,
                      S.POSTPROCESS_FAILED, S.STAGE_OUT_FAILED})
#: Nothing more happens to a job in these states unless a user retries it.
FINAL = frozenset({S.JOB_FINISHED, S.FAILED, S.USER_KILLED})
#: The ``to`` of the event a removed job leaves on the event stream: no state a job can be in.
REMOVED = "REMOVED"

#: The path a successful attempt takes on an agent, in order.
PIPELINE = (S.STAGED_IN, S.PREPROCESSED, S.RUNNING, S.EXECUTION_FINISHED, S.POSTPROCESSED,
            S.STAGED_OUT, S.JOB_FINISHED)
#: Which failure each pipeline step can end in.
FAILURE_OF = {S.STAGED_IN: S.STAGE_IN_FAILED, S.PREPROCESSED: S.PREPROCESS_FAILED,
              S.RUNNING: S.RUN_FAILED, S.POSTPROCESSED: S.POSTPROCESS_FAILED,
              S.STAGED_OUT: S.STAGE_OUT_FAILED}

_T: dict[State, set[State]] = {
    S.CREATED: {S.AWAITING_PARENTS, S.READY, S.FAILED},
    S.AWAITING_PARENTS: {S.READY, S.FAILED},
    S.READY: {S.STAGED_IN, S.STAGE_IN_FAILED},
    S.RESTART_READY: {S.STAGED_IN, S.STAGE_IN_FAILED},
    # (STAGE_IN_FAILED: a site stager's file could not be placed in the workdir)
    S.STAGED_IN: {S.PREPROCESSED, S.PREPROCESS_FAILED, S.STAGE_IN_FAILED},
    S.PREPROCESSED: {S.RUNNING, S.RUN_FAILED},
    S.RUNNING: {S.EXECUTION_FINISHED, S.RUN_FAILED, S.RUN_TIMEOUT},
    S.EXECUTION_FINISHED: {S.POSTPROCESSED, S.POSTPROCESS_FAILED},
    S.POSTPROCESSED: {S.STAGED_OUT, S.STAGE_OUT_FAILED},
    S.STAGED_OUT: {S.JOB_FINISHED},
    S.JOB_FINISHED: set(),
    # a retried workflow's subjob whose parents have not finished waits for them again
    S.FAILED: {S.RESTART_READY, S.AWAITING_PARENTS},
    S.USER_KILLED: {S.RESTART_READY, S.AWAITING_PARENTS},
}
for _f in FAILURES:
    _T[_f] = {S.RESTART_READY, S.FAILED}
# a site stager's stage-out failed while its files are still staged: only the stage-out is
# tried again (the job waits in POSTPROCESSED for a stager; the task does not run again)
_T[S.STAGE_OUT_FAILED].add(S.POSTPROCESSED)
# An agent lost or stopped while it held the job: back to the queue, or FAILED when the job
# has used up its retries (a job that keeps killing its agents must not loop forever).
for _s in ON_AGENT:
    _T[_s] |= {S.RESTART_READY, S.FAILED}
# A user may kill any job that is not final.
for _s in ALL - FINAL:
    _T[_s].add(S.USER_KILLED)
TRANSITIONS: dict[State, frozenset[State]] = {s: frozenset(t) for s, t in _T.items()}
del _T, _f, _s


def parse(name: str) -> State:
    """A state from its name in any case, or from a unique prefix of it (``fin`` is no state;
    ``job_f`` is JOB_FINISHED), or from a unique prefix of one of its words (``killed`` is
    USER_KILLED); else a clear error listing the candidates or the names."""
    if not isinstance(name, str):
        raise IllegalTransition(f"unknown state {echo(name)}; states are: "
                                f"{', '.join(s.value for s in State)}")
    key = name.strip().upper().replace("-", "_")
    if key in State.__members__:
        return State[key]
    if key:
        for match in (lambda s: s.value.startswith(key),
                      lambda s: any(w.startswith(key) for w in s.value.split("_"))):
            found = [s for s in State if match(s)]
            if len(found) == 1:
                return found[0]
            if found:
                raise IllegalTransition(f"state {echo(name)} is ambiguous: it could be "
                                        f"{', '.join(s.value for s in found)}")
    raise IllegalTransition(f"unknown state {echo(name)}; states are: "
                            f"{', '.join(s.value for s in State)}")


def is_legal(frm: State, to: State) -> bool:
    return to in TRANSITIONS[frm]


def check_path(frm: State, path: list[State] | tuple[State, ...]) -> None:
    """Raise IllegalTransition unless every hop of ``frm -> path[0] -> path[1] ...`` is legal."""
    cur = frm
    for nxt in path:
        if nxt not in TRANSITIONS[cur]:
            raise IllegalTransition(f"illegal state change {cur.value} -> {nxt.value}")
        cur = nxt


# -- an event's ``via``, as stored --------------------------------------------------------------
#: One letter per state for the ``via`` column of job_events (schema 16): a successful attempt
#: passes six states on its way to JOB_FINISHED, 75 bytes as comma-joined names, more than half
#: of its event row; six letters keep the row, and each dispatch turn's dirty pages, about half
#: the size. Stored in databases: never renumber; a new state takes a new letter. (Upper case
#: only: SQLite's LIKE, which the event filter uses, ignores case.)
VIA_CODE: dict[State, str] = {
    S.CREATED: "A", S.AWAITING_PARENTS: "B", S.READY: "C", S.STAGED_IN: "D",
    S.PREPROCESSED: "E", S.RUNNING: "F", S.EXECUTION_FINISHED: "G", S.POSTPROCESSED: "H",
    S.STAGED_OUT: "I", S.JOB_FINISHED: "J", S.STAGE_IN_FAILED: "K", S.PREPROCESS_FAILED: "L",
    S.RUN_FAILED: "M", S.RUN_TIMEOUT: "N", S.POSTPROCESS_FAILED: "O", S.STAGE_OUT_FAILED: "P",
    S.RESTART_READY: "Q", S.FAILED: "R", S.USER_KILLED: "S",
}
#: The same by state name, and back
VIA_LETTER: dict[str, str] = {s.value: c for s, c in VIA_CODE.items()}
_VIA_STATE = {c: s.value for s, c in VIA_CODE.items()}
assert len(_VIA_STATE) == len(VIA_CODE) == len(State), "every state has its own letter"


def via_names(stored: str | None) -> list[str]:
    """The states an event passed through, first first, from its stored ``via``."""
    if not stored:
        return []
    try:
        return [_VIA_STATE[c] for c in stored]
    except KeyError:  # a text no state path (schema 16 leaves one as it was): as stored
        return stored.split(",")


def via_text(stored: str | None) -> str | None:
    """The stored ``via`` as the comma-joined names `job show` gives (None for none)."""
    return ",".join(via_names(stored)) or None


def after_failure(retries: int, max_retries: int) -> State:
    """Where a failed attempt goes: another try while retries are left, else FAILED."""
    return S.RESTART_READY if retries < max_retries else S.FAILED


# -- workflows (the seed's Argo jobs) -----------------------------------------------------------
class WorkflowState(str, Enum):
    """A workflow's state, derived from its subjobs' job states (server/workflows.py). The
    SUBJOB_* states form a ladder climbed once per subjob step; a step ends when a subjob
    completes (SUBJOB_INCREMENTED), and the next climbs again from SUBJOB_SUBMITTED."""
    CREATED = "CREATED"  #: stored with its subjobs; the first subjob waits for a pilot
    STAGED_IN = "STAGED_IN"  #: the first subjob has the workflow's input in its workdir
    SUBJOB_SUBMITTED = "SUBJOB_SUBMITTED"  #: the step's subjob is in the server's queue
    SUBJOB_IN_PREPROCESSED = "SUBJOB_IN_PREPROCESSED"  #: its inputs staged, preprocess done
    SUBJOB_QUEUED = "SUBJOB_QUEUED"  #: about to run (pilots have no per-job batch queue)
    SUBJOB_RUNNING = "SUBJOB_RUNNING"  #: the subjob's app runs
    SUBJOB_RUN_FINISHED = "SUBJOB_RUN_FINISHED"  #: the app exited 0
    SUBJOB_IN_POSTPROCESSED = "SUBJOB_IN_POSTPROCESSED"  #: postprocess done, outputs handed on
    SUBJOB_COMPLETED = "SUBJOB_COMPLETED"  #: the subjob reached JOB_FINISHED
    SUBJOB_INCREMENTED = "SUBJOB_INCREMENTED"  #: on to the next subjob (the message says which)
    SUBJOBS_COMPLETED = "SUBJOBS_COMPLETED"  #: every subjob finished
    STAGED_OUT = "STAGED_OUT"  #: the last subjobs' outputs are in the workflow's output_url
    HISTORY = "HISTORY"  #: done; final
    STAGE_IN_FAILED = "STAGE_IN_FAILED"  #: a first subjob could not stage the input in
    SUBJOB_PREPROCESS_FAILED = "SUBJOB_PREPROCESS_FAILED"  #: a subjob's inputs or preprocess
    SUBJOB_RUN_FAILED = "SUBJOB_RUN_FAILED"  #: a subjob's app failed or timed out
    SUBJOB_POSTPROCESS_FAILED = "SUBJOB_POSTPROCESS_FAILED"  #: a subjob's postprocess failed
    SUBJOB_FAILED = "SUBJOB_FAILED"  #: a subjob failed otherwise (lost agents, killed alone)
    STAGE_OUT_FAILED = "STAGE_OUT_FAILED"  #: a subjob's stage-out (hand-on or final) failed
    USER_KILLED = "USER_KILLED"  #: killed by a user (workflow kill), as a job is

    def __str__(self) -> str:
        return self.value


W = WorkflowState
#: The ladder a workflow climbs, in order; SUBJOB_INCREMENTED leads back to SUBJOB_SUBMITTED.
WF_LADDER = (W.CREATED, W.STAGED_IN, W.SUBJOB_SUBMITTED, W.SUBJOB_IN_PREPROCESSED,
             W.SUBJOB_QUEUED, W.SUBJOB_RUNNING, W.SUBJOB_RUN_FINISHED,
             W.SUBJOB_IN_POSTPROCESSED, W.SUBJOB_COMPLETED)
WF_FAILURES = frozenset({W.STAGE_IN_FAILED, W.SUBJOB_PREPROCESS_FAILED, W.SUBJOB_RUN_FAILED,
                         W.SUBJOB_POSTPROCESS_FAILED, W.SUBJOB_FAILED, W.STAGE_OUT_FAILED,
                         W.USER_KILLED})
#: Nothing happens to a workflow in these states unless a user retries it (HISTORY: never).
WF_FINAL = WF_FAILURES | {W.HISTORY}
_WT: dict[WorkflowState, set[WorkflowState]] = {
    a: {b} for a, b in zip(WF_LADDER, WF_LADDER[1:])}
_WT[W.SUBJOB_COMPLETED] = {W.SUBJOB_INCREMENTED, W.SUBJOBS_COMPLETED}
_WT[W.SUBJOB_INCREMENTED] = {W.SUBJOB_SUBMITTED}
_WT[W.SUBJOBS_COMPLETED] = {W.STAGED_OUT}
_WT[W.STAGED_OUT] = {W.HISTORY}
_WT[W.HISTORY] = set()
for _w in set(W) - WF_FINAL:
    _WT[_w] |= WF_FAILURES
# retry: from the start (nothing ran yet) or at the failed subjob's step
for _w in WF_FAILURES:
    _WT[_w] = {W.CREATED, W.SUBJOB_SUBMITTED}
WF_TRANSITIONS: dict[WorkflowState, frozenset[WorkflowState]] = {
    s: frozenset(t) for s, t in _WT.items()}
del _WT, _w


def check_wf_path(frm: WorkflowState, path: list[WorkflowState]) -> None:
    """Raise IllegalTransition unless every hop of a workflow's ``frm -> path...`` is legal."""
    cur = frm
    for nxt in path:
        if nxt not in WF_TRANSITIONS[cur]:
            raise IllegalTransition(f"illegal workflow state change {cur.value} -> {nxt.value}")
        cur = nxt


def wf_climb(frm: WorkflowState, to: WorkflowState) -> list[WorkflowState]:
    """The ladder's states from ``frm`` (exclusive) up to ``to`` (inclusive); empty when ``to``
    is not above ``frm`` (a workflow never climbs down within a step)."""
    i = 1 if frm is W.SUBJOB_INCREMENTED else WF_LADDER.index(frm)
    j = WF_LADDER.index(to)
    return list(WF_LADDER[i + 1:j + 1]) if j > i else []
