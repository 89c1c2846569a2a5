"""``pilotfish pilot ls``: the pilots and node agents the server knows, from the login node.

A client of the server. Pilots that no site agent polls (submitted by hand) are polled here,
through their scheduler, so their batch state is the scheduler's whenever someone looks.
"""
from __future__ import annotations

import click

from pilotfish import console

from .site_cli import CTX, _client as client_of

#: Seconds after which a site agent that has not reported no longer counts as polling its site.
SITE_AGENT_FRESH = 60.0


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)

AGENT_COLUMNS = [("pilot", "PILOT"), ("node", "NODE"), ("id", "AGENT"), ("state", "STATE"),
                 ("cpus", "CPUS"), ("gpus", "GPUS"), ("launcher", "LAUNCHER"),
                 ("leases", "TASKS"), ("tasks_done", "DONE"), ("silent_seconds", "SILENT"),
                 ("affinity", "AFFINITY")]


def affinity_text(a: dict) -> str:
    if a.get("node_cores") is None:
        return "?"
    if a["affinity_ok"]:
        return "ok"
    return f"PINNED {a['cores']}/{a['node_cores']}"


PILOT_COLUMNS = [("id", "PILOT"), ("site", "SITE"), ("batch_id", "BATCH ID"),
                 ("state", "STATE"), ("nodes", "NODES"), ("agents", "AGENTS"),
                 ("tasks", "TASKS"), ("tasks_done", "DONE"), ("idle", "SILENT"),
                 ("affinity", "AFFINITY"), ("reason", "REASON")]


def poll_unwatched(client) -> None:
    """Ask the scheduler about pilots whose site has no live site agent polling it."""
    from .batch_poll import poll, unsettled
    todo = unsettled(client.pilots(all=True))
    if not todo:
        return
    watched = {s["name"] for s in client.sites()
               if not s["paused"] and s["silent_seconds"] < SITE_AGENT_FRESH}
    poll(client, [p for p in todo if p["site"] not in watched])


@click.command("ls", context_settings=CTX)
@click.option("-a", "--all", "show_all", is_flag=True, help="Also pilots that ended and agents "
              "that left or were lost.")
@click.option("--site", help="Only this site's pilots.")
@click.option("--pilot", help="Only this pilot (with --agents).")
@click.option("--agents", "by_agent", is_flag=True, help="One row per node agent instead of "
              "one per pilot.")
@json_option
@click.pass_context
def pilot_ls(ctx, show_all, site, pilot, by_agent, as_json) -> None:
    """Pilots: state, agents registered, tasks running and done, silence, affinity warnings.

    STATE follows the agents at once (RUNNING when they said hello; FINISHED or FAILED when
    all are gone) and the scheduler's word on how the batch job ended, asked here for pilots
    no site agent polls.

    AFFINITY says PINNED when an agent's affinity mask is smaller than its node (the launcher
    that started it bound it to part of the node, e.g. aprun without -d): its tasks then share
    those CPUs. Start agents with full-node depth and binding off (see `pilot run`).
    """
    import time
    client = client_of(ctx)
    poll_unwatched(client)
    if by_agent:
        return _agents(client, show_all, pilot, as_json)
    pilots = client.pilots(all=show_all, site=site)
    if as_json:
        return console.print_json(pilots)
    if not pilots:
        console.out.print("no pilots" + ("" if show_all else " active (-a shows all)"))
        return
    now = time.time()
    rows = [{**p, "agents": f"{p['agents_alive']}/{p['nodes']}",
             "idle": None if not p["last_seen"] else f"{now - p['last_seen']:.0f}s",
             "affinity": f"PINNED {p['pinned']}" if p["pinned"] else "ok"} for p in pilots]
    console.table(rows, PILOT_COLUMNS)
    pinned = sum(p["pinned"] for p in pilots)
    if pinned:
        console.err.print(f"warning: {pinned} agent(s) pinned to part of their node; see "
                          "`pilot ls --agents`", markup=False)


def _agents(client, show_all: bool, pilot: str | None, as_json: bool) -> None:
    agents = client.agents(all=show_all)
    if pilot:
        agents = [a for a in agents if a["pilot"] == pilot]
    agents.sort(key=lambda a: (a["pilot"] or "", a["node"] or a["host"], a["started"]))
    if as_json:
        return console.print_json(agents)
    rows = [{**a, "id": a["id"][:8], "node": a["node"] or a["host"],
             "cpus": a["cores"] if a.get("node_cores") is None
             else f"{a['cores']}/{a['node_cores']}", "affinity": affinity_text(a)}
            for a in agents]
    if not rows:
        console.out.print("no agents" + ("" if show_all else " alive (-a shows all)"))
        return
    console.table(rows, AGENT_COLUMNS)
    pinned = sum(1 for a in agents if a.get("node_cores") is not None and not a["affinity_ok"])
    if pinned:
        console.err.print(f"warning: {pinned} agent(s) pinned to part of their node; see "
                          "AFFINITY", markup=False)
