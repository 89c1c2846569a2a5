"""``pilotfish job ...``: add, list, show, alter, remove, kill, retry and wait for jobs."""
from __future__ import annotations

import time
from typing import Any

import click
import yaml

from pilotfish import console
from pilotfish.errors import ValidationError

from .cli import (CTX, JOB_COLUMNS, PLAIN_FLOAT, PLAIN_INT, client_of, json_option,
                  load_structured, parse_kv)
from pilotfish.client import FINAL_STATES


@click.group("job", context_settings=CTX)
def job_group() -> None:
    """Add and manage jobs."""


def filter_options(f):
    """The job filter flags shared by ls, kill, retry, alter, rm-all and wait."""
    for opt in reversed([
        click.option("--state", "states", multiple=True, help="Job state (repeatable)."),
        click.option("--app", help="App name."),
        click.option("--site", help="Site name."),
        click.option("--group", help="group_identifier."),
        click.option("--tag", help="A tag the job carries."),
        click.option("--name", help="Exact job name."),
        click.option("--owner", help="The key name that added the job (a submitter may "
                     "change only its own jobs)."),
    ]):
        f = opt(f)
    return f


def make_filter(ids=(), states=(), app=None, site=None, group=None, tag=None, name=None,
                owner=None) -> dict:
    f: dict[str, Any] = {}
    if ids:
        f["ids"] = list(ids)
    if states:
        f["state"] = list(states)
    for k, v in (("app", app), ("site", site), ("group", group), ("tag", tag), ("name", name),
                 ("owner", owner)):
        if v:
            f[k] = v
    return f


@job_group.command("add", context_settings=CTX)
@click.option("-f", "--file", "job_file", help="A JSON/YAML job message or a list of them "
              "('-' reads standard input). Added all or none.")
@click.option("--name", help="Job name.")
@click.option("--app", "application", help="App to run.")
@click.option("--param", "params", multiple=True, metavar="K=V", help="App parameter.")
@click.option("--description")
@click.option("--site")
@click.option("--queue")
@click.option("--project")
@click.option("--wall-time", "wall_time_minutes", type=PLAIN_FLOAT,
              help="Minutes; also the timeout.")
@click.option("--nodes", "num_nodes", type=PLAIN_INT)
@click.option("--ppn", "processes_per_node", type=PLAIN_INT, help="Processes per node.")
@click.option("--depth", "cpus_per_process", type=PLAIN_INT, help="Cores per process.")
@click.option("--gpus-per-process", type=PLAIN_INT)
@click.option("--input-url", help="A file or directory to copy into the workdir: an absolute "
              "path or file:// URL under a data root (see `server start -h`).")
@click.option("--output-url", help="A directory under a data root; the workdir is copied to "
              "OUTPUT_URL/NAME.ID/ (never merged into an existing folder).")
@click.option("--group", "group_identifier")
@click.option("--tag", "tags", multiple=True)
@click.option("--priority", type=PLAIN_INT)
@click.option("--max-retries", type=PLAIN_INT)
@click.option("--parent", "parents", multiple=True, type=PLAIN_INT, help="Job id to wait for.")
@json_option
@click.pass_context
def job_add(ctx, job_file, params, as_json, **flags) -> None:
    """Add one job from flags, or many from a file (thousands per second)."""
    if job_file:
        data = load_structured(job_file)
        jobs = data if isinstance(data, list) else [data]
    else:
        if not flags.get("name") or not flags.get("application"):
            raise click.UsageError("give --name and --app, or -f FILE")
        job = {k: v for k, v in flags.items() if v not in (None, ())}
        for k in ("tags", "parents"):
            if k in job:
                job[k] = list(job[k])
        if params:
            job["parameters"] = parse_kv(params, "--param")
        jobs = [job]
    t0 = time.perf_counter()
    ids = client_of(ctx).add_jobs(jobs)
    dt = time.perf_counter() - t0
    if as_json:
        return console.print_json({"ids": ids})
    if len(ids) == 1:
        console.out.print(f"job {ids[0]} added")
    else:
        console.out.print(f"{len(ids)} jobs added (ids {ids[0]}..{ids[-1]}) in {dt:.2f} s "
                          f"({len(ids) / dt:,.0f} jobs/s)")


@job_group.command("ls", context_settings=CTX)
@filter_options
@click.option("--limit", type=PLAIN_INT, default=100, show_default=True, help="0 for all.")
@click.option("--offset", type=PLAIN_INT, default=0)
@click.option("--newest", is_flag=True, help="Newest first.")
@json_option
@click.pass_context
def job_ls(ctx, limit, offset, newest, as_json, **f) -> None:
    """List jobs, oldest first."""
    rows = client_of(ctx).jobs(make_filter(**f), limit=limit, offset=offset, newest=newest)
    if as_json:
        return console.print_json(rows)
    console.table(rows, JOB_COLUMNS)
    if limit and len(rows) == limit:
        console.err.print(f"(first {limit}; use --limit/--offset for more)")


@job_group.command("show", context_settings=CTX)
@click.argument("job_id", type=PLAIN_INT)
@json_option
@click.pass_context
def job_show(ctx, job_id, as_json) -> None:
    """Everything about one job, with its state history."""
    d = client_of(ctx).job(job_id)
    if as_json:
        return console.print_json(d)
    events = d.pop("events")
    if d.get("waiting") is None:
        d.pop("waiting", None)
    console.out.print(yaml.safe_dump(d, sort_keys=False).rstrip())
    console.out.print("history:")
    for e in events:
        path = [e["from_state"] or "·"] + (e["via"].split(",") if e["via"] else []) \
            + [e["to_state"]]
        console.out.print(f"  {console.fmt(e['time'])}  {' -> '.join(path)}"
                          + (f"  ({e['message']})" if e["message"] else ""))


def _select(ids, f) -> dict:
    flt = make_filter(ids, **f)
    if not flt:
        raise click.UsageError("give job ids or filter options")
    return flt


def _report(result: dict, verb: str) -> None:
    console.out.print(f"{len(result['changed'])} of {result['matched']} matching jobs {verb}")


@job_group.command("alter", context_settings=CTX)
@click.argument("ids", nargs=-1, type=PLAIN_INT)
@filter_options
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", required=True,
              help="Field to change (priority=5, tags='[\"a\"]', state=RESTART_READY, ...).")
@json_option
@click.pass_context
def job_alter(ctx, ids, sets, as_json, **f) -> None:
    """Change fields of jobs no agent holds, or their state (checked by the state machine)."""
    r = client_of(ctx).alter_jobs(_select(ids, f), **parse_kv(sets, "--set", typed=True))
    console.print_json(r) if as_json else _report(r, "altered")


@job_group.command("kill", context_settings=CTX)
@click.argument("ids", nargs=-1, type=PLAIN_INT)
@filter_options
@json_option
@click.pass_context
def job_kill(ctx, ids, as_json, **f) -> None:
    """Kill jobs (USER_KILLED); running tasks are stopped on their agents."""
    r = client_of(ctx).kill_jobs(_select(ids, f))
    console.print_json(r) if as_json else _report(r, "killed")


@job_group.command("retry", context_settings=CTX)
@click.argument("ids", nargs=-1, type=PLAIN_INT)
@filter_options
@json_option
@click.pass_context
def job_retry(ctx, ids, as_json, **f) -> None:
    """Put FAILED or USER_KILLED jobs back in the queue with fresh retries."""
    r = client_of(ctx).retry_jobs(_select(ids, f))
    console.print_json(r) if as_json else _report(r, "queued again")


@job_group.command("rm", context_settings=CTX)
@click.argument("ids", nargs=-1, type=PLAIN_INT, required=True)
@json_option
@click.pass_context
def job_rm(ctx, ids, as_json) -> None:
    """Remove jobs by id (running ones are stopped first)."""
    r = client_of(ctx).remove_jobs({"ids": list(ids)})
    console.print_json(r) if as_json else console.out.print(f"{r['removed']} jobs removed")


@job_group.command("rm-all", context_settings=CTX)
@filter_options
@click.option("--yes", is_flag=True, help="Do it without asking.")
@json_option
@click.pass_context
def job_rm_all(ctx, yes, as_json, **f) -> None:
    """Remove every job matching the filters (asks first unless --yes)."""
    flt = make_filter(**f)
    c = client_of(ctx)
    n = sum(c.counts(flt).values())
    if not flt and not yes:
        click.confirm(f"remove ALL {n} jobs?", abort=True)
    elif not yes:
        click.confirm(f"remove {n} jobs?", abort=True)
    # an empty filter is refused by the server; select everything explicitly
    r = c.remove_jobs(flt or {"state": [s for s in _all_states()]})
    console.print_json(r) if as_json else console.out.print(f"{r['removed']} jobs removed")


def _all_states() -> list[str]:
    from .states import State
    return [s.value for s in State]


@job_group.command("wait", context_settings=CTX)
@click.argument("ids", nargs=-1, type=PLAIN_INT)
@filter_options
@click.option("--timeout", type=PLAIN_FLOAT, help="Give up after this many seconds (exit code 2).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@json_option
@click.pass_context
def job_wait(ctx, ids, timeout, quiet, as_json, **f) -> None:
    """Wait until the jobs are final, with a progress bar. Exit 1 if any did not finish."""
    flt = make_filter(ids, **f)
    c = client_of(ctx)
    with console.progress_bar(not quiet and not as_json, FINAL_STATES) as progress:
        try:
            counts = c.wait(flt, timeout=timeout, progress=progress)
        except TimeoutError as exc:
            console.err.print(str(exc))
            ctx.exit(2)
    if as_json:
        console.print_json(counts)
    elif not counts:
        raise ValidationError("no job matches")
    ok = set(counts) <= {"JOB_FINISHED"}
    if not ok:
        ctx.exit(1)
