"""``pilotfish pilot submit|cancel`` and ``pilotfish site agent|status``: pilots from the login
node, by hand or elastically. The umbrella CLI adds these to the ``pilot`` and ``site`` groups."""
from __future__ import annotations

import json
import logging

import click

from pilotfish import console, settings
from pilotfish.clitypes import plain_float
from pilotfish.errors import NotFound, PilotfishError, ValidationError

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
log = logging.getLogger("pilotfish.site")


def _home(ctx):
    return settings.home(ctx.obj.get("home") if ctx.obj else None)


def _client(ctx):
    from pilotfish.client import Client
    return Client(address=(ctx.obj or {}).get("server"), home=_home(ctx))


def _walltime(text: str) -> float:
    from pilotfish.site_configs.schema import parse_walltime
    try:
        return float(parse_walltime(text))
    except ValueError as exc:
        raise ValidationError(f"--walltime: {exc}") from None


@click.command("submit", context_settings=CTX)
@click.option("--site", required=True, help="Site profile (see `pilotfish site ls`).")
@click.option("--nodes", type=click.IntRange(1), help="Nodes (default: the profile's "
              "pilot.nodes).")
@click.option("--walltime", help="Minutes, HH:MM[:SS] or D-HH:MM:SS (default: the profile's "
              "pilot.max_walltime).")
@click.option("--queue", help="Queue (default: the first of the profile's queues that fits).")
@click.option("--project", help="Account/project (default: the profile's account).")
@click.option("--image", help="Run the whole pilot inside this image (e.g. "
              "docker:repo/glidein:1.0 with Shifter); the image must provide pilotfish.")
@click.option("--runtime", help="Container runtime for --image (default: the site's).")
@click.option("--leave-when-no-work", type=click.Choice(["never", "after-work", "always"]),
              default="after-work", show_default=True, help="When its agents leave on the "
              "server's word that no queued or pending job fits them (after-work: once they "
              "have run a task, so a pilot submitted before its jobs waits for them).")
@click.option("--dry-run", is_flag=True, help="Print the exact batch script; submit nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def submit_cmd(ctx, site, nodes, walltime, queue, project, image, runtime, leave_when_no_work,
               dry_run, as_json) -> None:
    """Submit one pilot batch job for a site, by hand.

    The script, its stdout/stderr and the batch id are kept in HOME/pilots/<pilot id>/.
    """
    from pilotfish.site_configs.loader import load_site

    from .batch import get as get_batch
    from .site_agent import build_spec, submit
    home = _home(ctx)
    s = load_site(site, home)
    nodes = nodes or s.pilot.nodes
    minutes = _walltime(walltime) if walltime else float(s.pilot.max_walltime)
    if queue is not None and s.queues and queue not in s.queues:
        raise ValidationError(f"site {s.name} has no queue {queue!r}; it has "
                              f"{', '.join(s.queues)}")
    if queue is not None and queue in s.queues:
        why = s.queues[queue].misfit(nodes, minutes)
        if why:
            raise ValidationError(f"site {s.name}, queue {queue}: {why}")
    batch = get_batch(s.scheduler)
    client = None if dry_run else _client(ctx)
    server = settings.server_address(home, (ctx.obj or {}).get("server")) or \
        "tcp://SERVER:PORT"
    if runtime and not image:
        raise ValidationError("--runtime goes with --image")
    if image and (runtime or s.container) == "none":
        raise ValidationError(f"site {s.name} has no container runtime; give --runtime")
    spec = build_spec(s, nodes=nodes, walltime_minutes=minutes, home=home, server=server,
                      queue=queue, project=project, image=image, runtime=runtime,
                      leave_when_no_work=leave_when_no_work)
    if dry_run:
        script = batch.render(spec)
        if as_json:
            return console.print_json({"pilot": spec.name, "scheduler": batch.name,
                                       "queue": spec.queue, "script": script})
        click.echo(script, nl=False)
        return
    sub = submit(s, batch, client, spec)
    if as_json:
        return console.print_json({"pilot": spec.name, "batch_id": sub.batch_id,
                                   "script": str(sub.script), "stdout": str(sub.stdout),
                                   "stderr": str(sub.stderr)})
    console.out.print(f"pilot {spec.name} submitted to {batch.name} as {sub.batch_id} "
                      f"({spec.nodes} nodes, {spec.walltime_minutes} min"
                      f"{', queue ' + spec.queue if spec.queue else ''}); files in "
                      f"{spec.workdir}", markup=False)


@click.command("cancel", context_settings=CTX)
@click.argument("pilot_ids", nargs=-1, required=True)
@click.pass_context
def cancel_cmd(ctx, pilot_ids) -> None:
    """Cancel pilots (queued or running) through their scheduler; their agents hand tasks back.

    A pilot that has already ended is left as it is (its state and counts stay what they
    were), and nothing is cancelled when any named pilot cannot be.
    """
    from pilotfish.pilotstate import PilotState

    from .batch import get as get_batch
    from .batch_poll import poll
    client = _client(ctx)
    known = {p["id"]: p for p in client.pilots(all=True)}
    named = [known[pid] for pid in pilot_ids if pid in known]
    if poll(client, named):  # the scheduler's word first: it may have ended meanwhile
        known = {p["id"]: p for p in client.pilots(all=True)}
    todo = []
    for pid in pilot_ids:  # check all first: a refused request cancels nothing
        p = known.get(pid)
        if p is None:
            raise NotFound(f"no pilot {pid!r} (see `pilotfish pilot ls -a`)")
        if not p["batch_id"] or not p["scheduler"]:
            raise ValidationError(f"pilot {pid} was not submitted by pilotfish (no batch id); "
                                  "cancel its batch job with the scheduler")
        if PilotState(p["state"]).final:
            raise ValidationError(f"pilot {pid} has ended already ({p['state']}: "
                                  f"{p['reason'] or PilotState(p['state']).meaning}); "
                                  "nothing was cancelled")
        todo.append(p)
    for p in todo:
        get_batch(p["scheduler"]).cancel(p["batch_id"])
        client.update_pilot(p["id"], state="CANCELLED", reason="cancelled by user")
        console.out.print(f"pilot {p['id']} (batch id {p['batch_id']}) cancelled", markup=False)


@click.command("agent", context_settings=CTX)
@click.option("--site", required=True, help="Site profile to provision for.")
@click.option("--poll", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds between rounds (scheduler poll, backlog, decisions).")
@click.option("--quick", type=plain_float(0), default=1.0, show_default=True,
              help="Seconds between quick rounds (the server's backlog only, no scheduler "
              "query), so new work gets pilots at once; 0: none.")
@click.option("--resume-after", type=plain_float(0), default=1800.0, show_default=True,
              help="Seconds a paused site waits before trying to submit again.")
@click.option("--once", is_flag=True, help="One round, then exit.")
@click.option("--rounds", type=click.IntRange(1), help="Stop after this many rounds.")
@click.option("--stage/--no-stage", default=None, help="Run the site stager (fetch jobs' remote "
              "inputs before they queue). Default: when the profile has a transfers section.")
@click.option("--stage-only", is_flag=True, help="Only stage; submit no pilots (a data-transfer "
              "node beside the login node's site agent).")
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def site_agent_cmd(ctx, site, poll, quick, resume_after, once, rounds, stage, stage_only, verbose,
                   quiet) -> None:
    """Keep the right pilots queued for a site: submit for the backlog, within the profile's
    pilot policy (size, walltime, max queued/nodes, staggered submissions, backfill), and cancel
    queued pilots nobody needs; with the profile's ``transfers:`` section, also fetch jobs'
    remote inputs before they queue (the site stager, limits from that section; see
    ``pilotfish transfer ls``). Runs on the site's login node; a client of the server."""
    from pilotfish.site_configs.loader import load_site

    from .site_agent import SiteAgent
    console.setup_logging(verbose, quiet)
    home = _home(ctx)
    s = load_site(site, home)
    client = _client(ctx)
    client.ping()
    stager = None
    if stage or (stage is None and s.transfers is not None) or stage_only:
        from .site_stager import SiteStager
        stager = SiteStager(s, lambda: _client(ctx), home)
    agent = SiteAgent(s, client, home, client.address, poll=poll, resume_after=resume_after,
                      stager=stager, provision=not stage_only, quick=quick)
    ctx.exit(agent.run(once=once, max_rounds=rounds))


@click.command("status", context_settings=CTX)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def site_status_cmd(ctx, as_json) -> None:
    """Site agents the server has heard from: alive, paused, and the last error.

    Exit code 1 when provisioning is paused for a site.
    """
    sites = _client(ctx).sites()
    if as_json:
        return click.echo(json.dumps(sites, indent=2))
    if not sites:
        console.out.print("no site agent has reported")
        return
    rows = [{**s, "state": "PAUSED" if s["paused"] else "ok"} for s in sites]
    console.table(rows, [("name", "SITE"), ("state", "STATE"), ("host", "HOST"), ("pid", "PID"),
                         ("silent_seconds", "SILENT"), ("error", "LAST ERROR")])
    if any(s["paused"] for s in sites):
        raise PilotfishError("provisioning is paused for: " + ", ".join(
            s["name"] for s in sites if s["paused"]))
