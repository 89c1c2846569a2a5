"""``pilotfish demo``: the whole system on this machine, in a throw-away home, in seconds.

Starts a server on SQLite, registers an app, submits jobs, starts node agents on this machine's
cores, shows progress, prints a summary, and leaves nothing running. Part of the top floor: it
drives the server and the agents only as a user would, through the client and the CLI.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from pilotfish import console
from pilotfish.clitypes import PLAIN_FLOAT, PLAIN_INT

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEMO_APP = {
    "name": "sleep",
    "description": "sleeps for a while (the demo's stand-in for real work)",
    "executable": shutil.which("sleep") or "/bin/sleep",
    "args": ["{seconds}"],
    "parameters": {"seconds": {"type": "float", "min": 0, "max": 3600, "default": 0.01}},
}


def split_cores(cores: list[int], parts: int) -> list[list[int]]:
    parts = max(1, min(parts, len(cores)))
    return [cores[i::parts] for i in range(parts)]


def explain(summary: dict, njobs: int, seconds: float) -> list[str]:
    """The summary's two shares in words: how busy the cores were, and how much of their time
    was the tasks' own work (the two differ by what it costs to start and end a process)."""
    util, eff = summary["core_utilization"], summary["efficiency"]
    if util is None or eff is None:
        return []
    cores, makespan = summary["cores"], summary["makespan_seconds"]
    lines = [f"  cores: a task was running on them {util:.0%} of the time"
             + ("" if util >= 0.995 else f" (idle {1 - util:.0%}: waiting for the next task)")]
    lines.append(f"  work: {eff:.0%} of the cores' time was the tasks' own work "
                 f"({njobs} x {seconds:g} s = {njobs * seconds:.1f} s of sleep on {cores} cores "
                 f"in {makespan:.2f} s); the rest, {summary['overhead_ms_per_task']:.1f} ms "
                 "per task, went to starting and ending each task's process"
                 + ("" if util >= 0.995 else " and to idle cores"))
    return lines


@click.command("demo", context_settings=CTX)
@click.option("--jobs", "njobs", type=PLAIN_INT, default=1000, show_default=True)
@click.option("--seconds", type=PLAIN_FLOAT, default=0.01, show_default=True,
              help="How long each demo task sleeps.")
@click.option("--agents", "nagents", type=PLAIN_INT, default=1, show_default=True,
              help="Node agents to start here; they share this machine's cores.")
@click.option("--keep", is_flag=True, help="Keep the temporary home (database, logs, workdirs).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo_cmd(njobs, seconds, nagents, keep, as_json) -> None:
    """Run NJOBS small jobs through a local server and agents, then clean up."""
    from pilotfish.server import daemon
    from pilotfish.client import FINAL_STATES, Client
    t0 = time.time()
    home = Path(tempfile.mkdtemp(prefix="pilotfish-demo-"))
    procs: list[subprocess.Popen] = []
    say = console.err.print if as_json else console.out.print
    try:
        say(f"[bold]pilotfish demo[/bold]: home {home}")
        info = daemon.start_background(home, f"sqlite:///{home / 'pilotfish.db'}",
                                       "tcp://127.0.0.1:*", 2.0)
        say(f"server up at {info['address']} after {time.time() - t0:.2f} s")
        cores = sorted(os.sched_getaffinity(0))
        for i, part in enumerate(split_cores(cores, nagents)):
            log = open(home / f"agent-{i}.log", "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pilotfish", "--home", str(home), "pilot", "agent",
                 "--server", info["address"], "--cores", ",".join(map(str, part)),
                 "--idle-timeout", "0"], stdout=log, stderr=log, stdin=subprocess.DEVNULL))
            log.close()
        c = Client(info["address"], home)
        c.add_app(DEMO_APP)
        jobs = [{"name": f"demo-{i}", "application": "sleep", "group_identifier": "demo",
                 "parameters": {"seconds": seconds}} for i in range(njobs)]
        c.add_jobs(jobs)
        say(f"{njobs} jobs submitted; {len(procs)} agent(s) on cores {cores}")
        with console.progress_bar(not as_json, FINAL_STATES) as progress:
            counts = c.wait(poll=0.1, progress=progress)
        s = c.summary()
        makespan = (s["last_ended"] or t0) - (s["first_started"] or t0)
        summary = {
            "jobs": njobs, "states": counts,
            "seconds_total": round(time.time() - t0, 3),
            "seconds_to_first_task_done": round((s["first_ended"] or t0) - t0, 3),
            "makespan_seconds": round(makespan, 3),
            "jobs_per_second": round(njobs / makespan, 1) if makespan > 0 else None,
            "cores": len(cores),
            # share of core time inside a task process (spawn to exit, as the agent saw it)
            "core_utilization": round(s["core_seconds"] / (len(cores) * makespan), 3)
            if makespan > 0 else None,
            # share of core time spent in the tasks' own work (their sleep)
            "efficiency": round(njobs * seconds / (len(cores) * makespan), 3)
            if makespan > 0 else None,
            # core time per task that was not the task's work: its process start and exit,
            # and the cores' idle time between tasks
            "overhead_ms_per_task": round(1000 * (len(cores) * makespan - njobs * seconds)
                                          / njobs, 2) if makespan > 0 and njobs else None,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        daemon.stop(home)
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
    if as_json:
        console.print_json(summary)
        return
    say(f"[bold]done[/bold]: {', '.join(f'{k}={v}' for k, v in sorted(counts.items()))}")
    say(f"  {summary['jobs_per_second']} jobs/s over a {summary['makespan_seconds']} s makespan;"
        f" first task done {summary['seconds_to_first_task_done']} s after start")
    for line in explain(summary, njobs, seconds):
        say(line)
    say("  nothing left running" + (f"; home kept at {home}" if keep else ""))
