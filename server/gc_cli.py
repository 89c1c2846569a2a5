"""``pilotfish gc``: remove what old final jobs and ended pilots left behind.

The server selects the jobs and pilots and prunes event rows (op ``gc``, in bounded chunks);
this process removes the files, because it sees the agents' work root and the server may not.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from pilotfish import console, settings

from .cli import CTX, client_of, home_of, json_option
from .gc_files import MAX_TAIL_LINES, Tally, clean_pilot, clean_workdir, parse_duration

CHUNK = 500
#: Workdirs removed per re-check that their jobs are still final (the race with `job retry`).
CONFIRM = 50


@click.command("gc", context_settings=CTX)
@click.option("--finished-before", "age", required=True, metavar="DURATION",
              help="Age: jobs final (finished, failed, killed) and pilots ended longer ago than "
              "this, e.g. 7d, 12h, 30m, 2w, 1d12h.")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; change nothing.")
@click.option("--keep-tails", type=click.IntRange(0, MAX_TAIL_LINES), metavar="N",
              help="Keep each workdir with its job.out and job.err cut to their last N lines; "
              "remove everything else in it.")
@click.option("--keep-events", is_flag=True,
              help="Keep the jobs' event rows (default: prune all but each job's last).")
@click.option("--work-root", type=click.Path(file_okay=False), metavar="DIR",
              help="The agents' work root, where the workdirs are (default: $PILOTFISH_HOME/"
              "work, the agents' default).")
@json_option
@click.pass_context
def gc_cmd(ctx, age, dry_run, keep_tails, keep_events, work_root, as_json) -> None:
    """Remove the workdirs of old final jobs, their old event rows, the output the server
    stored for them (`job log`) and the folders of old ended pilots, and say what that freed.

    Never touches a job that is not final, follows no symlink and removes nothing outside the
    work root ($PILOTFISH_HOME/work or --work-root) and $PILOTFISH_HOME/pilots. Pruned jobs
    keep their row and their last event, so `job show` still says how each ended, but no
    longer the states it passed through. Example: pilotfish gc --finished-before 7d --dry-run
    """
    seconds = parse_duration(age)
    home = home_of(ctx)
    root = Path(work_root).expanduser() if work_root else settings.work_root(home)
    root = root.resolve()  # a root that is a symlink (to scratch) is the user's choice
    cutoff = time.time() - seconds
    tally = Tally()
    pilots: list = []
    with client_of(ctx) as client:
        after = 0
        while True:
            # the stored output (job log) of the jobs goes with their workdirs
            r = client.call("gc", before=cutoff, after=after, limit=CHUNK,
                            prune=not (dry_run or keep_events), output=not dry_run)
            if after == 0:
                pilots = r.get("pilots", [])
            for i in range(0, len(r["jobs"]), CONFIRM):
                part = r["jobs"][i:i + CONFIRM]
                still = set(client.call("gc", before=cutoff, ids=[j[0] for j in part])["final"])
                for job, workdir, _state in part:
                    if job in still:  # else retried since: not final any more, left alone
                        clean_workdir(root, workdir, tally, dry_run=dry_run,
                                      keep_tails=keep_tails, job=job)
                    else:
                        tally.skipped += 1
            tally.jobs += len(r["jobs"])
            tally.events += 0 if keep_events else r["events"]
            tally.outputs += r.get("outputs", 0)
            if r["next"] is None:
                break
            after = r["next"]
    for pid, _state in pilots:
        clean_pilot(home / "pilots", pid, tally, dry_run=dry_run)
    report = {"dry_run": dry_run, "before": cutoff, "work_root": str(root),
              **dataclasses.asdict(tally)}
    if as_json:
        console.print_json(report)
        return
    _print(report, age, keep_tails)


def _print(r: dict, age: str, keep_tails: int | None) -> None:
    would = "would be " if r["dry_run"] else ""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r["before"]))
    out = console.out.print
    head = "gc --dry-run (nothing changed): " if r["dry_run"] else "gc: "
    out(f"{head}{r['jobs']} final jobs older than {age} (before {when})", markup=False)
    what = f"trimmed to their last {keep_tails} lines of output" if keep_tails is not None \
        else "removed"
    out(f"  workdirs: {r['workdirs']} {would}{what} under {r['work_root']}"
        + (f"; {r['missing']} not there (another work root, or removed before)"
           if r["missing"] else ""), markup=False)
    out(f"  event rows: {r['events']} {would}pruned (each job keeps its last event)",
        markup=False)
    out(f"  stored output (job log): {r['outputs']} pieces {would}removed", markup=False)
    if r["skipped"]:
        out(f"  left alone: {r['skipped']} jobs retried while gc ran (not final any more)",
            markup=False)
    out(f"  pilot folders: {r['pilots']} {would}removed", markup=False)
    out(f"  {'would free' if r['dry_run'] else 'freed'}: {r['files']} files, "
        f"{_size(r['bytes'])}", markup=False)
    for line in r["refused"]:
        console.err.print(f"  refused: {line}", markup=False)


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"
