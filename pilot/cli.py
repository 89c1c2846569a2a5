"""``pilotfish pilot ...``: what runs inside an allocation."""
from __future__ import annotations

import os
from pathlib import Path

import click

from pilotfish import console, settings
from pilotfish.errors import PilotfishError

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group("pilot", context_settings=CTX)
def pilot_group() -> None:
    """Run pilots and node agents."""


def _cores(text: str | None) -> list[int] | None:
    if not text:
        return None
    cores: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cores.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise PilotfishError(f"--cores {text!r}: expected a list like 0-3,8") from None
    return sorted(set(cores))


@pilot_group.command("agent", context_settings=CTX)
@click.option("--server", help="Server address (default: $PILOTFISH_SERVER or the home's "
              "server.json).")
@click.option("--cores", help="Cores to use, e.g. 0-3,8 (default: this process's affinity).")
@click.option("--walltime", type=float, help="Minutes this agent may run (default: the batch "
              "job's end, else unlimited). Jobs that would not finish in time are not taken.")
@click.option("--work-root", type=click.Path(file_okay=False), help="Root of job workdirs "
              "(default: HOME/work).")
@click.option("--site", help="Site name: take only jobs for this site or for any site.")
@click.option("--pilot", "pilot_id", help="Pilot (batch job) this agent belongs to.")
@click.option("--prefetch", type=int, help="Cores' worth of tasks to hold beyond the free "
              "cores (default: automatic, from the tasks' run times; 0 for none).")
@click.option("--idle-timeout", type=float, default=300.0, show_default=True,
              help="Leave after this many seconds without work (0: never).")
@click.option("--max-tasks", type=int, help="Leave after running this many tasks.")
@click.option("--fake-exec", is_flag=True, help="BENCHMARKS ONLY: run nothing; report every "
              "task finished at once (measures the server, protocol and database alone).")
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def agent_cmd(ctx, server, cores, walltime, work_root, site, pilot_id, prefetch, idle_timeout,
              max_tasks, fake_exec, verbose, quiet) -> None:
    """Run one node agent: pull tasks that fit this node and run them pinned to cores."""
    from .agent import Agent
    from .resources import detect
    console.setup_logging(verbose, quiet)
    home = settings.home(ctx.obj.get("home") if ctx.obj else None)
    address = settings.server_address(home, server or (ctx.obj or {}).get("server"))
    if not address:
        raise PilotfishError("no server address: give --server or start a server for "
                             f"{home}")
    allowed = set(os.sched_getaffinity(0))
    wanted = _cores(cores)
    if wanted and not set(wanted) <= allowed:
        raise PilotfishError(f"--cores {cores}: cores {sorted(set(wanted) - allowed)} are not in "
                             f"this process's affinity mask {sorted(allowed)}")
    res = detect(walltime, wanted)
    root = Path(work_root) if work_root else settings.work_root(home)
    agent = Agent(address, res, root.resolve(), site=site, pilot=pilot_id, prefetch=prefetch,
                  idle_timeout=idle_timeout, fake_exec=fake_exec, max_tasks=max_tasks)
    ctx.exit(agent.run())
