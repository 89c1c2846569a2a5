"""``pilotfish events``: read and follow the event stream; ``events prune``: drop old events."""
from __future__ import annotations

import json
import sys
import time

import click

from pilotfish import console

from .cli import CTX, client_of, json_option
from .gc_files import parse_duration

KINDS = ("job", "agent", "pilot", "workflow")
PAGE = 1000


@click.group("events", context_settings=CTX, invoke_without_command=True)
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing events as the server commits them (Ctrl-C stops); rides out "
              "a server restart.")
@click.option("--since", type=click.IntRange(0), metavar="ID",
              help="Events after this event id (default: every event kept; with -f: from now).")
@click.option("--job", "jobs", type=click.IntRange(1), multiple=True, metavar="ID",
              help="Events of this job (repeatable).")
@click.option("--group", help="Events of the jobs of this group_identifier.")
@click.option("--workflow", "workflows", type=click.IntRange(1), multiple=True, metavar="ID",
              help="Events of this workflow and of its subjobs (repeatable).")
@click.option("--state", "states", multiple=True,
              help="Events into (or through) this state (repeatable): a job state (any case, "
              "a unique prefix), an agent state (ALIVE, LOST, EXITED), a pilot state, a "
              "workflow state (SUBJOB_RUNNING, HISTORY...), REMOVED.")
@click.option("--kind", "kinds", type=click.Choice(KINDS), multiple=True,
              help="Events of this kind (repeatable).")
@json_option
@click.pass_context
def events_group(ctx, follow, since, jobs, group, workflows, states, kinds, as_json) -> None:
    """The event stream: job, agent, pilot and workflow events by increasing id.

    Every job state change, agents joining, lost or leaving, pilots recorded or changed, jobs
    removed, workflow state changes: oldest first.

    One line per event; --json: one JSON object per line. A script keeps the last id it
    handled and goes on with --since ID: nothing missed, nothing twice. Examples:
    pilotfish events --job 12; pilotfish events -f --state failed --json
    """
    if ctx.invoked_subcommand is not None:
        return
    filters = {k: v for k, v in (("job", list(jobs)), ("group", group), ("state", list(states)),
                                 ("kind", list(kinds)), ("workflow", list(workflows))) if v}
    show = _print_json if as_json else _print_line
    with client_of(ctx) as c:
        ends = c.status()["events"]
        if follow:
            for e in c.follow(ends["newest"] if since is None else since, **filters):
                show(e)
            return
        cursor = ends["oldest"] - 1 if since is None else since
        while True:  # up to the newest event when we started (a busy server never ends)
            r = c.events(since=cursor, limit=PAGE, **filters)
            for e in r["events"]:
                show(e)
            if r["cursor"] == cursor or r["cursor"] >= ends["newest"]:
                break
            cursor = r["cursor"]


def _print_json(e: dict) -> None:
    sys.stdout.write(json.dumps(e) + "\n")
    sys.stdout.flush()


def _print_line(e: dict) -> None:
    t = e["time"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
    if e["kind"] == "job":
        who = f"job {e['job']} {e['name'] or ''}".rstrip()
        if e["group"]:
            who += f" [{e['group']}]"
    elif e["kind"] == "agent":
        who = f"agent {e['agent']} on {e['host']}" + (f" (pilot {e['pilot']})" if e["pilot"]
                                                      else "")
    elif e["kind"] == "workflow":
        who = f"workflow {e.get('workflow')} {e['name'] or ''}".rstrip()
        if e["group"]:
            who += f" [{e['group']}]"
    else:
        who = f"pilot {e['pilot']}" + (f" on site {e['site']}" if e["site"] else "")
    change = f"{e['from'] or '-'} -> {e['to']}"
    if e["via"]:
        change += f" (via {','.join(e['via'])})"
    msg = f": {e['message']}" if e["message"] else ""
    console.out.print(console.plain(f"{when}  #{e['id']}  {who}  {change}{msg}"), markup=False)
    sys.stdout.flush()


@events_group.command("prune", context_settings=CTX)
@click.option("--older-than", "age", required=True, metavar="DURATION",
              help="Drop events older than this: 30d, 12h, 2w, 1d12h.")
@json_option
@click.pass_context
def prune_cmd(ctx, age, as_json) -> None:
    """Drop old events (admin). Each job keeps its last event, so `job show` still says how it
    ended; a follower whose cursor is older than what was dropped gets an error saying so,
    never a silent gap. Example: pilotfish events prune --older-than 30d"""
    cutoff = time.time() - parse_duration(age)
    total = 0
    with client_of(ctx) as c:
        while True:
            r = c.call("events_prune", before=cutoff)
            total += r["pruned"]
            if not r["more"]:
                break
    report = {"pruned": total, "before": cutoff, "oldest": r["oldest"]}
    if as_json:
        console.print_json(report)
    else:
        console.out.print(f"{total} events pruned; the stream starts at id {r['oldest']}")
