"""``pilotfish workflow ...``: add, list, show, kill and retry workflows (the seed's Argo jobs)."""
from __future__ import annotations

import click

from pilotfish import console
from pilotfish.errors import ValidationError

from .cli import CTX, client_of, json_option, load_structured

COLUMNS = [("id", "ID"), ("name", "NAME"), ("state", "STATE"), ("done", "DONE"),
           ("subjobs", "SUBJOBS"), ("group_identifier", "GROUP"), ("username", "USER"),
           ("state_time", "SINCE"), ("message", "MESSAGE")]
SUB_COLUMNS = [("index", "#"), ("job", "JOB"), ("name", "NAME"), ("application", "APP"),
               ("state", "STATE"), ("parents", "PARENTS"), ("message", "MESSAGE")]


@click.group("workflow", context_settings=CTX)
def workflow_group() -> None:
    """Workflows: subjobs that run in order (or as a DAG), passing their files on.

    A workflow message has the seed's keys: name, description, user_id, username, email,
    group_identifier, input_url, output_url, job_status_routing_key and subjobs (job messages
    as `job add` takes them; `parents`: indices of other subjobs). Its states follow its
    subjobs: CREATED, STAGED_IN, SUBJOB_SUBMITTED ... SUBJOBS_COMPLETED, STAGED_OUT, HISTORY.
    """


@workflow_group.command("add", context_settings=CTX)
@click.option("-f", "--file", "path", required=True, metavar="FILE",
              help="A JSON or YAML workflow message ('-' reads standard input).")
@json_option
@click.pass_context
def add_cmd(ctx, path, as_json) -> None:
    """Add a workflow; prints its id and its subjobs' job ids. All or nothing: a bad subjob
    refuses the whole workflow, naming its index. Example: pilotfish workflow add -f wf.yaml"""
    msg = load_structured(path)
    if not isinstance(msg, dict):
        raise ValidationError(f"{path}: a workflow file holds one workflow message (a map)")
    with client_of(ctx) as c:
        r = c.add_workflow(msg)
    if as_json:
        return console.print_json(r)
    known = " (added before: this intake_key was known)" if r.get("known") else ""
    console.out.print(f"workflow {r['id']}: jobs {', '.join(map(str, r['jobs']))}{known}",
                      markup=False)


@workflow_group.command("ls", context_settings=CTX)
@click.option("--state", "states", multiple=True, help="Workflow state (repeatable).")
@click.option("--group", help="group_identifier.")
@click.option("--owner", help="The key name that added it.")
@click.option("--limit", type=click.IntRange(0), default=100, show_default=True,
              help="At most this many (0: all).")
@json_option
@click.pass_context
def ls_cmd(ctx, states, group, owner, limit, as_json) -> None:
    """List workflows, oldest first. Example: pilotfish workflow ls --state SUBJOB_RUNNING"""
    f = {k: v for k, v in (("state", list(states)), ("group", group), ("owner", owner)) if v}
    with client_of(ctx) as c:
        rows = c.workflows(f, limit=limit)
    if as_json:
        return console.print_json(console.iso_times(rows))
    console.table(rows, COLUMNS)


@workflow_group.command("show", context_settings=CTX)
@click.argument("wf_id", type=click.IntRange(1), metavar="ID")
@json_option
@click.pass_context
def show_cmd(ctx, wf_id, as_json) -> None:
    """A workflow, its subjobs and its state history. Example: pilotfish workflow show 3"""
    with client_of(ctx) as c:
        d = c.workflow(wf_id)
    if as_json:
        return console.print_json(console.iso_times(d))
    out = console.out
    for k in ("id", "name", "state", "message", "description", "user_id", "username", "email",
              "group_identifier", "input_url", "output_url", "job_status_routing_key", "owner",
              "intake_key"):
        v = d.get(k)
        if v not in (None, "", []):
            out.print(f"{k}: {console.plain(console.fmt(v))}", markup=False)
    out.print(f"subjobs: {d['done']} of {d['subjobs']} completed", markup=False)
    console.table([dict(s, parents=",".join(map(str, s["parents"] or [])) or "-")
                   for s in d["subjob_list"]], SUB_COLUMNS)
    for s in d["subjob_list"]:
        r = s.get("remote")
        if r:  # forwarded to another server's site, not started there yet
            since = console.local_time(r["since"]) if r.get("since") else "?"
            heard = ("never heard from" if r["silent_seconds"] is None
                     else f"last heartbeat {r['silent_seconds']:g} s ago")
            state = ("accepted there" if r["accepted"] else "forwarded, not accepted yet"
                     if r["forwarded"] else "not forwarded: no healthy site")
            out.print(f"subjob {s['index']} (job {s['job']}) waits for remote site {r['site']} "
                      f"since {since} ({state}"
                      f"; {heard}{'' if r['healthy'] else ', not healthy'})", markup=False)
    out.print("events:", markup=False)
    for e in d["events"]:
        msg = f": {console.plain(e['message'])}" if e["message"] else ""
        out.print(f"  #{e['id']} {console.local_time(e['time'])}  {e['from'] or '-'} -> "
                  f"{e['to']}{msg}", markup=False)


def _change(ctx, ids, as_json, what: str) -> None:
    with client_of(ctx) as c:
        r = c.kill_workflows(list(ids)) if what == "kill" else c.retry_workflows(list(ids))
    if as_json:
        return console.print_json(r)
    done = "killed" if what == "kill" else "retried"
    console.out.print(f"{len(r['changed'])} of {len(set(ids))} workflows {done}"
                      + (f": {', '.join(map(str, r['changed']))}" if r["changed"] else ""),
                      markup=False)


@workflow_group.command("kill", context_settings=CTX)
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(1), metavar="ID...")
@json_option
@click.pass_context
def kill_cmd(ctx, ids, as_json) -> None:
    """Kill workflows: their unfinished subjobs are stopped (USER_KILLED), the workflow is
    KILLED. Example: pilotfish workflow kill 3"""
    _change(ctx, ids, as_json, "kill")


@workflow_group.command("retry", context_settings=CTX)
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(1), metavar="ID...")
@json_option
@click.pass_context
def retry_cmd(ctx, ids, as_json) -> None:
    """Resume failed or killed workflows at their failed subjobs (finished subjobs are kept).
    Example: pilotfish workflow retry 3"""
    _change(ctx, ids, as_json, "retry")
