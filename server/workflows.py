"""Workflows (the seed's Argo jobs): checking a workflow message, and deriving a workflow's
state from its subjobs' job states.

A workflow message has the seed's keys (``user_id``, ``name``, ``description``,
``group_identifier``, ``username``, ``email``, ``input_url``, ``output_url``,
``job_status_routing_key``, ``subjobs``) and pilotfish's ``intake_key``. Each subjob is a job
message as ``job add`` takes it (checked by :func:`.jobs.build_job`, nothing duplicated), whose
``parents`` are indices of earlier or later subjobs (0-based); when no subjob names parents,
the subjobs form a chain in their order.

Data between subjobs. Every subjob is a job of its own; its input_url and output_url are
set here, never by the message:

* a subjob without parents (the first of a chain) stages in the workflow's ``input_url``;
* a subjob with children stages out into the workflow's hand-on folder ``<first data
  root>/workflow.<id>`` (the stager puts its workdir's tree in ``<that>/<name>.<job id>/``),
  and each child stages in that folder of each of its parents: it finds its parent's workdir
  contents in ``<parent name>.<parent job id>/`` of its own workdir (several parents: one such
  folder each, their URLs joined by a newline, which no checked URL holds);
* a subjob without children (the last of a chain) stages out into the workflow's
  ``output_url``.

States. :class:`Tracker` follows the subjobs of the workflows that are not done: every job
state change passes through ``Batch.transition``, which notes those of subjobs; before the
turn's commit :meth:`Tracker.derive` moves each touched workflow along its own state machine
(``states.WorkflowState``, checked by ``states.check_wf_path``) and writes one event per state
(``server_events`` rows of kind ``workflow``) in the same transaction.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import func, select

from pilotfish.dataroots import DataRoots
from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.validate import INT64, check_int, check_name, echo, echo_keys

from . import states
from .apps import App
from .db import job_parents, jobs, workflows
from .jobs import (_ROUTING_KEY_RE, JOB_KEYS, build_job, check_description, check_token,
                   check_url)
from .states import State, WorkflowState
from .store import Batch, chunks

S, W = State, WorkflowState
WORKFLOW_KEYS = frozenset({"user_id", "name", "description", "group_identifier", "username",
                           "email", "input_url", "output_url", "job_status_routing_key",
                           "subjobs", "intake_key"})
#: Subjobs of one workflow, at most: a workflow is a pipeline of steps, not an array.
MAX_SUBJOBS = 1000
#: Subjobs on one path from a first subjob to a last, at most: each subjob gets its parents'
#: whole workdirs (their own inputs included), one folder deeper each step, and the stager
#: copies trees at most 200 directories deep.
MAX_DEPTH = 100
#: Addresses a workflow's e-mail goes to, at most.
MAX_EMAILS = 10
#: A plain address: no spaces, quotes, angle brackets or line breaks (no header injection).
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+")
#: The folder of a workflow's hand-on data under its server's first data root.
HANDON = "workflow.{id}"


def check_emails(value: Any) -> str | None:
    """Addresses as stored: comma-joined, each a plain ``local@domain``."""
    if value is None or value == "" or value == []:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValidationError("email must be an address or a list of addresses")
    if len(items) > MAX_EMAILS:
        raise ValidationError(f"{len(items):,} e-mail addresses; at most {MAX_EMAILS}")
    for v in items:
        if len(v) > 254 or not _EMAIL_RE.fullmatch(v):
            raise ValidationError(f"email {echo(v)} is not a plain address (local@domain)")
    return ",".join(items)


def _parents(sub: dict, i: int, n: int) -> list[int]:
    ps = sub.get("parents")
    if ps is None:
        return []
    if not isinstance(ps, list) or len(ps) > n:
        raise ValidationError(f"subjobs[{i}]: parents must be a list of subjob indices "
                              f"(0..{n - 1})")
    for p in ps:
        if type(p) is not int or not 0 <= p < n:
            raise ValidationError(f"subjobs[{i}]: parent {echo(p)} is no subjob index "
                                  f"(0..{n - 1})")
        if p == i:
            raise ValidationError(f"subjobs[{i}]: a subjob cannot be its own parent")
    return sorted(set(ps))


def topo_order(parents: list[list[int]]) -> list[int]:
    """The subjobs' indices, each after its parents (ties by index); a cycle is an error
    naming a subjob on it."""
    n = len(parents)
    kids: list[list[int]] = [[] for _ in range(n)]
    need = [len(ps) for ps in parents]
    for i, ps in enumerate(parents):
        for p in ps:
            kids[p].append(i)
    import heapq
    ready = [i for i in range(n) if not need[i]]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for k in kids[i]:
            need[k] -= 1
            if not need[k]:
                heapq.heappush(ready, k)
    if len(order) < n:
        stuck = min(i for i in range(n) if need[i])
        raise ValidationError(f"subjobs[{stuck}]: its parents form a cycle (a workflow is a "
                              "DAG: no subjob may depend on itself through others)")
    return order


@dataclass
class Plan:
    """A checked workflow: its row (without id, state and times) and its subjobs' job rows
    (from build_job, without URLs), their parents by index and the order to insert them."""
    row: dict
    subjobs: list[dict]
    parents: list[list[int]]
    order: list[int]


def build_workflow(msg: Any, app_by_name: Callable[[str], App], roots: DataRoots) -> Plan:
    """Check a workflow message whole; ValidationError (naming the key or the subjob's index)
    on the first thing wrong. Nothing is stored here."""
    if not isinstance(msg, dict):
        raise ValidationError("a workflow must be a map of workflow keys")
    unknown = msg.keys() - WORKFLOW_KEYS
    if unknown:
        raise ValidationError(f"unknown workflow key(s) {echo_keys(unknown)}; expected "
                              f"{', '.join(sorted(WORKFLOW_KEYS))}")
    name = check_name(msg.get("name"), "workflow name")
    row: dict[str, Any] = {"name": name}
    row["description"] = check_description(msg.get("description"), name)
    uid = msg.get("user_id")
    row["user_id"] = None if uid is None else check_int(uid, "user_id", 0, INT64[1])
    un = msg.get("username")
    row["username"] = None if un is None else check_name(un, "username")
    row["email"] = check_emails(msg.get("email"))
    grp = msg.get("group_identifier")
    row["group_identifier"] = None if grp is None else check_name(grp, "group_identifier")
    row["input_url"] = check_url(msg.get("input_url"), "input_url", roots)
    row["output_url"] = check_url(msg.get("output_url"), "output_url", roots)
    row["job_status_routing_key"] = check_token(msg.get("job_status_routing_key"),
                                                "job_status_routing_key", _ROUTING_KEY_RE)
    row["intake_key"] = check_token(msg.get("intake_key"), "intake_key")
    subs = msg.get("subjobs")
    if not isinstance(subs, list) or not subs:
        raise ValidationError(f"workflow {name!r}: subjobs must be a non-empty list of job "
                              "messages")
    n = len(subs)
    if n > MAX_SUBJOBS:
        raise ValidationError(f"workflow {name!r}: {n:,} subjobs; a workflow has at most "
                              f"{MAX_SUBJOBS:,}")
    chain = not any(isinstance(s, dict) and "parents" in s for s in subs)
    rows, parents = [], []
    for i, sub in enumerate(subs):
        try:
            if not isinstance(sub, dict):
                raise ValidationError("a subjob must be a job message (a map)")
            bad = sub.keys() - JOB_KEYS
            if bad:  # (build_job says so too; here before 'parents' is taken out)
                raise ValidationError(f"unknown job key(s) {echo_keys(bad)}")
            for k in ("input_url", "output_url", "intake_key"):
                if sub.get(k):
                    raise ValidationError(f"{k} is the workflow's to set, not a subjob's "
                                          "(inputs come from the parents or the workflow)")
            parents.append(([i - 1] if i else []) if chain else _parents(sub, i, n))
            job = {k: v for k, v in sub.items() if k not in ("parents", "input_url",
                                                             "output_url", "intake_key")}
            if job.get("group_identifier") is None and row["group_identifier"] is not None:
                job["group_identifier"] = row["group_identifier"]
            rows.append(build_job(job, app_by_name, roots))
        except PilotfishError as exc:
            raise type(exc)(f"subjobs[{i}]: {exc}") from None
    row["subjobs"] = n
    order = topo_order(parents)
    depth = [0] * n
    for i in order:
        depth[i] = 1 + max((depth[p] for p in parents[i]), default=0)
        if depth[i] > MAX_DEPTH:
            raise ValidationError(f"subjobs[{i}]: {depth[i]} subjobs deep; a path through a "
                                  f"workflow has at most {MAX_DEPTH} (each subjob receives its "
                                  "parents' whole workdirs, nested one level deeper per step)")
    return Plan(row, rows, parents, order)


def handon_url(roots: DataRoots, wf_id: int) -> str:
    return f"{roots.roots[0].rstrip('/')}/{HANDON.format(id=wf_id)}"


def wire_urls(plan: Plan, ids: list[int], roots: DataRoots, wf_id: int) -> None:
    """Each subjob's input_url and output_url (see the module's doc), given the job ids
    its rows will get (``ids[i]``: subjob i's)."""
    handon = handon_url(roots, wf_id)
    has_kids = {p for ps in plan.parents for p in ps}
    for i, r in enumerate(plan.subjobs):
        ps = plan.parents[i]
        r["input_url"] = "\n".join(f"{handon}/{plan.subjobs[p]['name']}.{ids[p]}"
                                   for p in ps) if ps else plan.row["input_url"]
        r["output_url"] = handon if i in has_kids else plan.row["output_url"]


# -- deriving states ---------------------------------------------------------------------------
#: Where on the ladder a subjob's job state puts its step (``first``: no subjob completed yet).
def rung(s: State, first: bool) -> WorkflowState | None:
    if s in states.QUEUED:
        return W.CREATED if first else W.SUBJOB_SUBMITTED
    return {S.STAGED_IN: W.STAGED_IN if first else W.SUBJOB_SUBMITTED,
            S.PREPROCESSED: W.SUBJOB_IN_PREPROCESSED, S.RUNNING: W.SUBJOB_RUNNING,
            S.EXECUTION_FINISHED: W.SUBJOB_RUN_FINISHED,
            S.POSTPROCESSED: W.SUBJOB_IN_POSTPROCESSED,
            S.STAGED_OUT: W.SUBJOB_IN_POSTPROCESSED}.get(s)


_FAILURE = {S.PREPROCESS_FAILED: W.SUBJOB_PREPROCESS_FAILED, S.RUN_FAILED: W.SUBJOB_RUN_FAILED,
            S.RUN_TIMEOUT: W.SUBJOB_RUN_FAILED,
            S.POSTPROCESS_FAILED: W.SUBJOB_POSTPROCESS_FAILED,
            S.STAGE_OUT_FAILED: W.STAGE_OUT_FAILED}


@dataclass
class Flow:
    """A workflow the server follows: its subjobs' job ids and states, by index."""
    id: int
    name: str
    grp: str | None
    state: WorkflowState
    done: int
    jobs: list[int]
    parents: list[list[int]]
    states: list[State]
    #: index -> (the failure step of its latest failed attempt, or None; the job's message)
    fails: dict[int, tuple[State | None, str | None]] = field(default_factory=dict)
    #: index -> the last step its latest failed attempt passed (the ladder is climbed that
    #: far before the failure, when one update brought both)
    reached: dict[int, State] = field(default_factory=dict)
    index: dict[int, int] = field(default_factory=dict)  # job id -> subjob index

    def __post_init__(self) -> None:
        self.index = {j: i for i, j in enumerate(self.jobs)}

    def failure(self) -> tuple[WorkflowState, str, int] | None:
        """The workflow's failure state and message when a subjob is out of the race (FAILED
        or USER_KILLED): the first with a failure step of its own (its children failed
        only because of it), else the first."""
        out = [i for i, s in enumerate(self.states) if s in (S.FAILED, S.USER_KILLED)]
        if not out:
            return None
        i = next((i for i in out if self.fails.get(i, (None,))[0] is not None), out[0])
        step, msg = self.fails.get(i, (None, None))
        if step is S.STAGE_IN_FAILED:
            wf = W.STAGE_IN_FAILED if not self.parents[i] else W.SUBJOB_PREPROCESS_FAILED
        else:
            wf = _FAILURE.get(step, W.SUBJOB_FAILED)
        what = step.value if step is not None else self.states[i].value
        return wf, f"subjobs[{i}] (job {self.jobs[i]}) {what}: {msg or ''}".rstrip(": "), i


class Tracker:
    """The workflows not yet in HISTORY, with their subjobs' states (rebuilt at load)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.flows: dict[int, Flow] = {}
        self.next_id = 1  # the next workflow's id (set by load)

    def load(self, conn, ids: list[int] | None = None) -> None:
        """Follow the workflows not in HISTORY (or those of ``ids``) from the database."""
        if ids is None:
            self.next_id = conn.execute(select(func.coalesce(func.max(workflows.c.id), 0))
                                        ).scalar_one() + 1
        q = select(workflows.c.id, workflows.c.name, workflows.c.group_identifier,
                   workflows.c.state, workflows.c.done, workflows.c.subjobs)
        q = q.where(workflows.c.id.in_(ids)) if ids is not None else \
            q.where(workflows.c.state != W.HISTORY.value)
        found = {r.id: r for r in conn.execute(q)}
        for part in chunks(sorted(found), 500):
            subs: dict[int, list] = {w: [None] * found[w].subjobs for w in part}
            by_job: dict[int, tuple[int, int]] = {}
            for r in conn.execute(select(jobs.c.id, jobs.c.workflow_id, jobs.c.subjob_index,
                                         jobs.c.state, jobs.c.run_state, jobs.c.message)
                                  .where(jobs.c.workflow_id.in_(part))):
                subs[r.workflow_id][r.subjob_index] = r
                by_job[r.id] = (r.workflow_id, r.subjob_index)
            parents: dict[int, list[list[int]]] = {w: [[] for _ in subs[w]] for w in part}
            for jpart in chunks(sorted(by_job), 900):
                for r in conn.execute(select(job_parents).where(job_parents.c.job_id.in_(jpart))):
                    w, i = by_job[r.job_id]
                    if r.parent_id in by_job:
                        parents[w][i].append(by_job[r.parent_id][1])
            for w in part:
                rows = subs[w]
                if any(r is None for r in rows):  # subjobs removed (job rm): not followed
                    continue
                f = Flow(w, found[w].name, found[w].group_identifier, W(found[w].state),
                         found[w].done, [r.id for r in rows], parents[w],
                         [S(r.state) for r in rows])
                for i, r in enumerate(rows):
                    if r.run_state in S.__members__ and S(r.run_state) in states.FAILURES:
                        f.fails[i] = (S(r.run_state), r.message)
                    elif r.state in (S.FAILED.value, S.USER_KILLED.value):
                        f.fails[i] = (None, r.message)
                self.follow(f)

    def follow(self, f: Flow) -> None:
        self.flows[f.id] = f
        for j in f.jobs:
            self.batch.wf_jobs[j] = f.id

    def forget(self, f: Flow) -> None:
        self.flows.pop(f.id, None)
        for j in f.jobs:
            self.batch.wf_jobs.pop(j, None)

    def move(self, f: Flow, path: list[WorkflowState], now: float, message: str | None,
             **cols: Any) -> None:
        """The one way a workflow changes state: checked, written, one event per state."""
        states.check_wf_path(f.state, path)
        b = self.batch
        frm = f.state
        for i, to in enumerate(path):
            b.server_event("workflow", to.value, now, frm.value,
                           message if i == len(path) - 1 or to is W.SUBJOB_INCREMENTED
                           else None, workflow_id=f.id, name=f.name, grp=f.grp)
            frm = to
        f.state = path[-1]
        b.update_workflow(f.id, state=f.state.value, state_time=now, message=message,
                          done=f.done, **cols)

    def derive(self, now: float) -> None:
        """Move every workflow whose subjobs changed this turn (called before the commit)."""
        moves, self.batch.wf_moves = self.batch.wf_moves, []
        touched: dict[int, Flow] = {}
        for w, job, path, msg in moves:
            f = self.flows.get(w)
            if f is None:
                continue
            i = f.index[job]
            f.states[i] = path[-1]
            step = next((s for s in path if s in states.FAILURES), None)
            if step is not None or path[-1] in (S.FAILED, S.USER_KILLED):
                f.fails[i] = (step, msg)
            if step is not None:
                before = path[:path.index(step)]
                if before:
                    f.reached[i] = before[-1]
            touched[w] = f
        for f in touched.values():
            if f.state in states.WF_FAILURES and f.failure() is None:
                # its failed subjobs were retried one by one (job retry): it resumes
                self.move(f, [W.CREATED if f.done == 0 else W.SUBJOB_SUBMITTED], now,
                          "resumed: its failed subjobs were retried")
            if f.state not in states.WF_FINAL:
                self._derive(f, now)

    def _derive(self, f: Flow, now: float) -> None:
        n = len(f.jobs)
        finished = sum(s is S.JOB_FINISHED for s in f.states)
        path: list[WorkflowState] = []
        cur, msg = f.state, None
        while f.done < finished:  # each subjob completed closes a step of the ladder
            path += states.wf_climb(cur, W.SUBJOB_COMPLETED)
            f.done += 1
            if f.done < n:
                path.append(W.SUBJOB_INCREMENTED)
                msg = f"{f.done} of {n} subjobs completed"
            else:
                path += [W.SUBJOBS_COMPLETED, W.STAGED_OUT, W.HISTORY]
                msg = f"all {n} subjobs completed"
            cur = path[-1]
        if cur is not W.HISTORY:
            failed = f.failure()
            if failed is not None:
                r = f.reached.get(failed[2])
                r = rung(r, f.done == 0) if r is not None else None
                if r is not None:
                    path += states.wf_climb(cur, r)
                path.append(failed[0])
                msg = failed[1]
            else:
                first = f.done == 0
                rungs = [r for s in f.states if (r := rung(s, first)) is not None]
                if rungs:
                    top = max(rungs, key=states.WF_LADDER.index)
                    path += states.wf_climb(cur, top)
        if path:
            self.move(f, path, now, msg)
            if f.state is W.HISTORY:
                self.forget(f)

