"""The workflow ops: add (checked whole, all or nothing), ls, show, kill and retry.

Subjobs are jobs: they are added by ``ops.insert_jobs``, changed by ``ops._set_state`` and
``Batch.transition`` like any job, and the workflow follows (see :mod:`.workflows`).
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select

from pilotfish.errors import Forbidden, IllegalTransition, NotFound, ValidationError
from pilotfish.keys import ADMIN, READER, SUBMITTER
from pilotfish.validate import echo, wire_safe

from . import states, usage_cache
from .core import JobServer
from .db import job_parents, jobs, server_events, workflows
from .ops import LOCAL_ADMIN, MAX_ID, Caller, _arg, _set_state, check_owner, insert_jobs, op
from .states import State, WorkflowState
from .store import chunks
from .workflows import Flow, build_workflow, wire_urls

S, W = State, WorkflowState
MAX_LIST = 10_000


@op(SUBMITTER, args=("workflow",), caller=True)
def workflow_add(srv: JobServer, args: dict, now: float, caller: Caller = LOCAL_ADMIN) -> dict:
    """Add a workflow and its subjobs (all or none). A workflow whose intake_key is stored
    already is not added again: its id comes back with ``known`` true."""
    plan = build_workflow(_arg(args, "workflow", dict, required=True), srv.app,
                          srv.data_roots)
    key = plan.row["intake_key"]
    if key is not None:
        srv.sync()
        r = srv.conn.execute(select(workflows.c.id, workflows.c.owner)
                             .where(workflows.c.intake_key == key)).first()
        if r is not None:
            if caller.role != ADMIN and r.owner != caller.name:
                raise Forbidden(f"intake_key {echo(key)} belongs to a workflow of another key; "
                                "nothing was added")
            return {"id": r.id, "jobs": _job_ids(srv, r.id), "known": True}
    wf_id = srv.workflows.next_id
    base = srv.next_id
    pos = {i: k for k, i in enumerate(plan.order)}
    ids = [base + pos[i] for i in range(len(plan.subjobs))]
    wire_urls(plan, ids, srv.data_roots, wf_id)
    rows = []
    for i in plan.order:  # parents first: insert_jobs knows them when it meets their children
        row = plan.subjobs[i]
        row.update(parents=[ids[p] for p in plan.parents[i]], workflow_id=wf_id,
                   subjob_index=i)
        rows.append(row)
    got = insert_jobs(srv, rows, now, caller.name, chained=True)
    assert got == [ids[i] for i in plan.order], (got, ids)
    first_states = [S(r["state"]) for r in plan.subjobs]
    srv.workflows.next_id += 1
    srv.sync()
    srv.conn.execute(workflows.insert().values(
        id=wf_id, owner=caller.name, done=0, state=W.CREATED.value, state_time=now,
        created=now, message=None, **plan.row))
    f = Flow(wf_id, plan.row["name"], plan.row["group_identifier"], W.CREATED, 0, ids,
             plan.parents, first_states)
    srv.batch.server_event("workflow", W.CREATED.value, now, None,
                           f"{len(ids)} subjobs: jobs {ids[0]}..{ids[-1]}" if len(ids) > 1
                           else f"1 subjob: job {ids[0]}", workflow_id=wf_id, name=f.name,
                           grp=f.grp)
    srv.workflows.follow(f)
    return {"id": wf_id, "jobs": ids, "known": False}


@op(SUBMITTER, args=("workflow",))
def workflow_check(srv: JobServer, args: dict, now: float) -> dict:
    """Check a workflow message as workflow_add would, and add nothing."""
    plan = build_workflow(_arg(args, "workflow", dict, required=True), srv.app,
                          srv.data_roots)
    return {"checked": len(plan.subjobs)}


def _job_ids(srv: JobServer, wf_id: int) -> list[int]:
    return [r.id for r in srv.conn.execute(select(jobs.c.id).where(jobs.c.workflow_id == wf_id)
                                           .order_by(jobs.c.subjob_index))]


def _wf_dict(r) -> dict:
    d = dict(r._mapping)
    d["email"] = d["email"].split(",") if d.get("email") else []
    return d


_WF_FILTER = {"ids", "state", "group", "owner"}


def _where(f: Any) -> list:
    f = f or {}
    if not isinstance(f, dict) or set(f) - _WF_FILTER:
        raise ValidationError(f"a workflow filter is a map of {', '.join(sorted(_WF_FILTER))}")
    conds = []
    if f.get("ids") is not None:
        ids = f["ids"]
        if not isinstance(ids, list) or len(ids) > MAX_LIST or not all(
                type(i) is int and 0 < i <= MAX_ID for i in ids):
            raise ValidationError(f"ids must be a list of at most {MAX_LIST:,} workflow ids")
        conds.append(workflows.c.id.in_(ids))
    if f.get("state") is not None:
        st = f["state"] if isinstance(f["state"], list) else [f["state"]]
        names = []
        for s in st:
            key = s.strip().upper() if isinstance(s, str) else None
            if key not in W.__members__:
                raise ValidationError(f"unknown workflow state {echo(s)}; states are: "
                                      f"{', '.join(w.value for w in W)}")
            names.append(key)
        conds.append(workflows.c.state.in_(names))
    for k, col in (("group", workflows.c.group_identifier), ("owner", workflows.c.owner)):
        if f.get(k) is not None:
            if not isinstance(f[k], str) or "\x00" in f[k] or len(f[k]) > 128:
                raise ValidationError(f"filter {k!r} must be a name")
            conds.append(col == f[k])
    return conds


@op(READER, args=("filter", "limit", "offset"))
def workflow_ls(srv: JobServer, args: dict, now: float) -> list:
    limit = _arg(args, "limit", int, 100)
    offset = _arg(args, "offset", int, 0)
    srv.sync()
    q = select(workflows)
    for c in _where(args.get("filter")):
        q = q.where(c)
    q = q.order_by(workflows.c.id).offset(offset)
    if limit > 0:
        q = q.limit(min(limit, MAX_LIST))
    return wire_safe([_wf_dict(r) for r in srv.conn.execute(q)])


@op(READER, args=("id",))
def workflow_show(srv: JobServer, args: dict, now: float) -> dict:
    wf_id = _arg(args, "id", int, required=True)
    srv.sync()
    r = srv.conn.execute(select(workflows).where(workflows.c.id == wf_id)).first()
    if r is None:
        raise NotFound(f"no workflow {wf_id}")
    d = _wf_dict(r)
    subs = []
    rows = list(srv.conn.execute(select(jobs.c.id, jobs.c.subjob_index, jobs.c.name, jobs.c.app_id,
                                     jobs.c.state, jobs.c.site, jobs.c.input_url,
                                     jobs.c.output_url, jobs.c.message, jobs.c.run_leased,
                                     jobs.c.state_time)
                                 .where(jobs.c.workflow_id == wf_id)
                                 .order_by(jobs.c.subjob_index)))
    index = {j.id: j.subjob_index for j in rows}
    parents: dict[int, list[int]] = {j.id: [] for j in rows}
    for part in chunks(sorted(index), 900):
        for p in srv.conn.execute(select(job_parents).where(job_parents.c.job_id.in_(part))):
            if p.parent_id in index:
                parents[p.job_id].append(index[p.parent_id])
    for j in rows:
        app = srv.apps.get(j.app_id)
        subs.append({"index": j.subjob_index, "job": j.id, "name": j.name,
                     "application": app.name if app else None, "state": j.state,
                     "site": j.site, "parents": sorted(parents[j.id]),
                     "input_url": j.input_url, "output_url": j.output_url,
                     "message": j.message})
        if j.state in ("READY", "RESTART_READY"):  # waiting for another server's site?
            remote = srv.remotes.waiting(j.id, j.site, j.run_leased, j.state_time, now)
            if remote is not None:
                subs[-1]["remote"] = remote
    d["subjob_list"] = subs
    e = server_events
    d["events"] = [{"id": x.id, "time": x.time, "from": x.from_state, "to": x.to_state,
                    "message": x.message}
                   for x in srv.conn.execute(select(e.c.id, e.c.time, e.c.from_state,
                                                    e.c.to_state, e.c.message)
                                             .where(e.c.kind == "workflow",
                                                    e.c.workflow_id == wf_id)
                                             .order_by(e.c.id))]
    return wire_safe(d)


def _flows(srv: JobServer, args: dict, caller: Caller) -> list[Flow]:
    ids = _arg(args, "ids", list, required=True)
    if not ids or len(ids) > MAX_LIST or not all(type(i) is int and 0 < i <= MAX_ID
                                                 for i in ids):
        raise ValidationError(f"ids must be a list of 1..{MAX_LIST:,} workflow ids")
    srv.sync()
    rows = []
    for part in chunks(sorted(set(ids)), 900):
        rows += list(srv.conn.execute(select(workflows.c.id, workflows.c.owner,
                                             workflows.c.state)
                                      .where(workflows.c.id.in_(part))))
    missing = set(ids) - {r.id for r in rows}
    if missing:
        raise NotFound(f"no workflow {min(missing)}")
    check_owner(rows, caller)
    gone = [r.id for r in rows if r.state != W.HISTORY.value and r.id not in
            srv.workflows.flows]
    if gone:
        srv.workflows.load(srv.conn, gone)  # (not followed: a subjob was removed)
    flows = []
    for r in rows:
        f = srv.workflows.flows.get(r.id)
        if f is None and r.state != W.HISTORY.value:
            raise ValidationError(f"workflow {r.id} lost subjobs (removed with job rm): it "
                                  "cannot be changed")
        flows.append(f if f is not None else r)
    return flows


@op(SUBMITTER, args=("ids",), caller=True)
def workflow_kill(srv: JobServer, args: dict, now: float, caller: Caller = LOCAL_ADMIN) -> dict:
    """Kill workflows: their subjobs that are not final become USER_KILLED (stopped on their
    agents), the workflow KILLED. Workflows done or failed already are left as they are."""
    changed = []
    for f in _flows(srv, args, caller):
        if not isinstance(f, Flow) or f.state in states.WF_FINAL:
            continue
        live = [j for j, s in zip(f.jobs, f.states) if s not in states.FINAL]
        for part in chunks(live, 900):
            for r in srv.conn.execute(select(jobs).where(jobs.c.id.in_(part))):
                _set_state(srv, r, S.USER_KILLED, now, f"workflow {f.id} killed by user")
        srv.workflows.move(f, [W.USER_KILLED], now, "killed by user")
        changed.append(f.id)
    return {"changed": changed}


@op(SUBMITTER, args=("ids",), caller=True)
def workflow_retry(srv: JobServer, args: dict, now: float,
                   caller: Caller = LOCAL_ADMIN) -> dict:
    """Resume failed or killed workflows at their failed subjobs: finished subjobs are kept,
    each FAILED or USER_KILLED subjob goes back to the queue (or waits again for its parents
    that have not finished), its retries counted from zero."""
    flows = [f for f in _flows(srv, args, caller)
             if isinstance(f, Flow) and f.state in states.WF_FAILURES]
    for f in flows:
        back = [i for i, s in enumerate(f.states) if s in (S.FAILED, S.USER_KILLED)]
        srv.workflows.move(f, [W.CREATED if f.done == 0 else W.SUBJOB_SUBMITTED], now,
                           f"retried by user: subjobs {', '.join(map(str, back))}")
        rows = {}
        for part in chunks([f.jobs[i] for i in back], 900):
            rows.update({r.id: r for r in srv.conn.execute(select(jobs)
                                                           .where(jobs.c.id.in_(part)))})
        usage_cache.forget_jobs(srv, [f.jobs[i] for i in back])  # (their usage changes)
        for i in back:
            r = rows[f.jobs[i]]
            waits = [f.jobs[p] for p in f.parents[i] if f.states[p] is not S.JOB_FINISHED]
            if not waits:
                _set_state(srv, r, S.RESTART_READY, now, "retried with its workflow")
                continue
            try:
                srv.batch.transition(r.id, S(r.state), [S.AWAITING_PARENTS], now,
                                     "retried with its workflow", retries=0)
            except IllegalTransition as exc:  # (the state machine allows it: a bug)
                raise ValidationError(str(exc)) from None
            srv.waited_on.update(waits)
    return {"changed": [f.id for f in flows]}
