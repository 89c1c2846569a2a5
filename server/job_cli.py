"""``pilotfish job ...``: add, list, show, alter, remove, kill, retry and wait for jobs."""
from __future__ import annotations

import time
from typing import Any

import click
import yaml

from pilotfish import arrays, console, settings
from pilotfish.job_sort import SORTS
from pilotfish.errors import PilotfishError, ValidationError

from .cli import (CTX, JOB_COLUMNS, PLAIN_FLOAT, PLAIN_INT, client_of, home_of, json_option,
                  load_structured, parse_kv)
from pilotfish.client import FINAL_STATES


@click.group("job", context_settings=CTX)
def job_group() -> None:
    """Add and manage jobs."""


def filter_options(f):
    """The job filter flags shared by ls, kill, retry, alter, rm-all and wait."""
    for opt in reversed([
        click.option("--state", "states", multiple=True, help="Job state (repeatable): any case, "
                     "or a unique prefix of a state or of its words (job_fin, killed)."),
        click.option("--app", help="App name."),
        click.option("--site", help="Site name."),
        click.option("--group", help="group_identifier."),
        click.option("--tag", help="A tag the job carries."),
        click.option("--name", help="Exact job name."),
        click.option("--owner", help="The key name that added the job (a submitter may "
                     "change only its own jobs)."),
        click.option("--array", "array", type=click.IntRange(1), metavar="ID",
                     help="Jobs of this array (the id `job add --array` printed)."),
    ]):
        f = opt(f)
    return f


def make_filter(ids=(), states=(), app=None, site=None, group=None, tag=None, name=None,
                owner=None, array=None) -> dict:
    f: dict[str, Any] = {}
    if ids:
        f["ids"] = list(ids)
    if states:
        f["state"] = list(states)
    for k, v in (("app", app), ("site", site), ("group", group), ("tag", tag), ("name", name),
                 ("owner", owner)):
        if v:
            f[k] = v
    if array is not None:
        f["array"] = array
    return f


@job_group.command("add", context_settings=CTX)
@click.option("-f", "--file", "job_file", help="A JSON/YAML job message or a list of them, or a "
              "sweep file (a job template with `sweep:` or `array:`) ('-' reads standard "
              "input). Added all or none.")
@click.option("--name", help="Job name (with --array: a template, default APP-{index}).")
@click.option("--app", "application", help="App to run.")
@click.option("--param", "params", multiple=True, metavar="K=V",
              help="App parameter (with --array, {index} in V is the index).")
@click.option("--array", "array_spec", metavar="SPEC", help="One job per index: 1-10000, "
              "1-100:5 (step), 1,5,9, 1-3,10; {index} in --name/--param/--description is "
              f"filled in (at most {arrays.MAX_ELEMENTS:,} per array).")
@click.option("--description")
@click.option("--site", help="Site name, or alternatives separated by commas (B,A: the "
              "healthy remote site with the shortest expected wait).")
@click.option("--queue")
@click.option("--project")
@click.option("--wall-time", "wall_time_minutes", type=PLAIN_FLOAT,
              help="Minutes; also the timeout.")
@click.option("--nodes", "num_nodes", type=PLAIN_INT)
@click.option("--ppn", "processes_per_node", type=PLAIN_INT, help="Processes per node.")
@click.option("--depth", "cpus_per_process", type=PLAIN_INT, help="Cores per process.")
@click.option("--gpus-per-process", type=PLAIN_INT)
@click.option("--input-url", help="A file or directory to copy into the workdir: an absolute "
              "path or file:// URL under a data root (see `server start -h`), or a remote "
              "file: scp://, sftp://, http(s)://, gsiftp://, globus://.")
@click.option("--output-url", help="A directory under a data root (or a remote one, as for "
              "--input-url); the workdir is copied to OUTPUT_URL/NAME.ID/ (locally never "
              "merged into an existing folder).")
@click.option("--group", "group_identifier")
@click.option("--tag", "tags", multiple=True)
@click.option("--priority", type=PLAIN_INT)
@click.option("--max-retries", type=PLAIN_INT)
@click.option("--parent", "parents", multiple=True, type=PLAIN_INT, help="Job id to wait for.")
@json_option
@click.pass_context
def job_add(ctx, job_file, params, array_spec, as_json, **flags) -> None:
    """Add one job from flags, many from a file (thousands per second), or an array or a
    sweep of one job (--array, or -f with `sweep:`)."""
    template, what = None, None
    if job_file:
        if array_spec:
            raise click.UsageError("give --array with flags, or `array:` in the file")
        data = load_structured(job_file)
        if isinstance(data, dict) and ("sweep" in data or "array" in data):
            template = dict(data)
            what = {k: template.pop(k) for k in ("sweep", "array") if k in template}
            if len(what) > 1:
                raise ValidationError(f"{job_file}: give `sweep:` or `array:`, not both (a "
                                      "range can be swept: `seed: {range: 1-10}`)")
        else:
            jobs = data if isinstance(data, list) else [data]
    else:
        if array_spec and flags.get("application") and not flags.get("name"):
            flags["name"] = f"{flags['application']}-{{index}}"
        if not flags.get("name") or not flags.get("application"):
            raise click.UsageError("give --name and --app, or -f FILE")
        job = {k: v for k, v in flags.items() if v not in (None, ())}
        for k in ("tags", "parents"):
            if k in job:
                job[k] = list(job[k])
        if "," in job.get("site", ""):  # alternatives (health-aware routing)
            job["site"] = job["site"].split(",")
        if params:
            job["parameters"] = parse_kv(params, "--param")
        jobs = [job]
        if array_spec:
            template, what = job, {"array": array_spec}
    c = client_of(ctx)
    t0 = time.perf_counter()
    if template is not None:
        return _add_array(c, template, what, t0, as_json)
    # (the reply, not Client.add_jobs: it also says how many were there already by intake_key)
    r = c.call("job_add", jobs=jobs, timeout=max(c.timeout, len(jobs) / 1000))
    ids, known = r["ids"], r.get("known", 0)
    dt = time.perf_counter() - t0
    if as_json:
        return console.print_json({"ids": ids, "known": known})
    there = (f"; {known:,} of them were there already (same intake_key): not added again"
             if known else "")
    if len(ids) == 1:
        console.out.print(f"job {ids[0]} was there already (same intake_key): not added again"
                          if known else f"job {ids[0]} added")
    else:
        console.out.print(f"{len(ids)} jobs added (ids {ids[0]}..{ids[-1]}) in {dt:.2f} s "
                          f"({len(ids) / dt:,.0f} jobs/s){there}")


def _add_array(c, template: dict, what: dict, t0: float, as_json: bool) -> None:
    n = len(arrays.Elements(what.get("array"), what.get("sweep")))  # a bad spec stops here
    if n > arrays.CHUNK:
        parts = -(-n // arrays.CHUNK)
        console.err.print(f"{n:,} jobs: sending them in {parts} requests of at most "
                          f"{arrays.CHUNK:,}; each request is added all or none")
    done = {"n": 0}

    def chunk(k: int, total: int) -> None:
        done["n"] = k
        if total > arrays.CHUNK and not as_json:
            console.err.print(f"  {k:,} of {total:,} added")

    try:
        if "sweep" in what:
            r = c.add_sweep(template, what["sweep"], on_chunk=chunk)
        else:
            r = c.add_array(template, what["array"], on_chunk=chunk)
    except PilotfishError as exc:
        if done["n"]:  # say what stays: earlier requests were committed
            exc.args = (f"{exc} ({done['n']:,} of {n:,} jobs were added before this request; "
                        "they stay)",)
        raise
    dt = time.perf_counter() - t0
    ids = r["ids"]
    if as_json:
        return console.print_json(r)
    console.out.print(f"array {r['array']}: {len(ids):,} jobs added (ids {ids[0]}..{ids[-1]}) "
                      f"in {dt:.2f} s ({len(ids) / dt:,.0f} jobs/s)")


@job_group.command("ls", context_settings=CTX)
@filter_options
@click.option("--limit", type=click.IntRange(0), default=100, show_default=True,
              help="Jobs per page; 0 for all.")
@click.option("--page", type=click.IntRange(1), help="Page N of --limit jobs.")
@click.option("--offset", type=click.IntRange(0), default=0, help="Skip this many jobs.")
@click.option("--all", "all_", is_flag=True, help="Every matching job (same as --limit 0).")
@click.option("--oldest", is_flag=True, help="Oldest first.")
@click.option("--newest", is_flag=True, help="Newest first (the default).")
@click.option("--sort", type=click.Choice([p + s for s in SORTS for p in ("", "-")]),
              metavar="[-]" + "|".join(SORTS),
              help="Sort by this (a leading - for descending; ties by id). --sort ended lists "
              "only jobs that have ended.")
@json_option
@click.pass_context
def job_ls(ctx, limit, page, offset, all_, oldest, newest, sort, as_json, **f) -> None:
    """List jobs, newest first (--oldest to turn it round), a page of --limit at a time.

    AGENT is the agent holding the job now, else the one its last attempt ran on; NODE is
    that attempt's node. --json gives every listed field (agent: the holder now; last_agent,
    last_node: the last attempt's), with created, started, ended and state_time in ISO 8601.
    """
    if all_:
        limit = 0
    if page is not None:
        if offset:
            raise click.UsageError("give --page or --offset, not both")
        if not limit:
            raise click.UsageError("--page needs a --limit (not 0 or --all)")
        offset = (page - 1) * limit
    flt = make_filter(**f)
    c = client_of(ctx)
    if sort and (oldest or newest):
        raise click.UsageError("give --sort or --oldest/--newest, not both")
    rows = c.jobs(flt, limit=limit, offset=offset, newest=not oldest and not sort, sort=sort)
    if as_json:
        return console.print_json(console.iso_times(rows))
    # AGENT: the holder now, else where the last attempt ran; NODE: that attempt's node
    # (agents' ids shortened as in `job show`: 8 of 32 hex digits tell them apart)
    console.table([dict(r, agent=(r["agent"] or r.get("last_agent") or "")[:8] or None,
                        node=console.plain(r.get("last_node")),
                        message=console.plain(r["message"])) for r in rows], JOB_COLUMNS)
    if limit and (len(rows) == limit or offset):
        total = sum(c.counts(flt).values())
        if not rows:
            console.err.print(f"no jobs past the first {min(offset, total):,}: {total:,} match")
        elif total > len(rows):
            first = offset + 1
            order = f"by {sort}" if sort else "oldest first" if oldest else "newest first"
            more = ""
            if offset + len(rows) < total:
                more = (f"; --page {offset // limit + 2} for the next {limit:,}, --all for all"
                        if offset % limit == 0 else "; --all for all")
            console.err.print(f"showing {first:,}-{offset + len(rows):,} of {total:,} "
                              f"({order}){more}")


@job_group.command("show", context_settings=CTX)
@click.argument("job_id", type=PLAIN_INT)
@json_option
@click.pass_context
def job_show(ctx, job_id, as_json) -> None:
    """Everything about one job: its attempts (where and when each ran, how it ended) and its
    state history (times are local; --json gives ISO 8601, the attempts under "runs")."""
    d = client_of(ctx).job(job_id)
    if as_json:
        return console.print_json(console.iso_times(d))
    events = d.pop("events")
    runs = d.pop("runs", None)
    transfers, staging = d.pop("transfers", None), d.pop("staging", None)
    if d.get("waiting") is None:
        d.pop("waiting", None)
    for k, v in d.items():
        if k == "attempts" and runs is not None:
            continue  # the attempts section lists them

        if k in console.TIME_KEYS:
            console.out.print(f"{k}: {console.local_time(v)}", markup=False)
        elif k == "workdir":
            console.out.print(_workdir_line(v, home_of(ctx)), markup=False)
        else:
            # job data is text, never rich markup ("[/x]" in a description would crash rich)
            console.out.print(yaml.safe_dump({k: v}, sort_keys=False, width=10**6).rstrip(),
                              markup=False)
    if runs is not None:
        for line in attempt_lines(runs):
            console.out.print(line, markup=False)
    for line in transfer_lines(transfers, staging):
        console.out.print(line, markup=False)
    console.out.print("history:")
    for e in events:
        path = [e["from_state"] or "·"] + (e["via"].split(",") if e["via"] else []) \
            + [e["to_state"]]
        console.out.print(f"  {console.local_time(e['time'])}  {' -> '.join(path)}"
                          + (f"  ({console.plain(e['message'])})" if e["message"] else ""),
                          markup=False)


def transfer_lines(transfers: list[dict] | None, staging: dict | None) -> list[str]:
    """The "transfers:" section of `job show`: each staging step that ended (staged, or the
    scheme's one-line error) and a site stager's transfer in flight."""
    if not transfers and not staging:
        return []
    lines = ["transfers:"]
    for e in transfers or []:
        msg = console.plain((e.get("message") or "").strip().splitlines()[0][:300]) \
            if e.get("message") else ""
        lines.append(f"  {console.local_time(e['time'])}  {e.get('step') or e['to_state']}"
                     f"  {msg}")
    if staging and staging.get("waiting"):  # handed outputs, no stager has them yet
        lines.append(f"  outputs WAITING in site {console.plain(staging['site'])}'s staging "
                     "directory for a stager's stage-out")
    elif staging:
        now = "STAGING OUT now" if staging.get("kind") == "out" else "STAGING now"
        lines.append(f"  {console.local_time(staging['since'])}  {now}  by stager "
                     f"{console.plain(staging['stager'])}: {console.plain(staging['url'][:300])}")
    return lines


def attempt_lines(runs: list[dict]) -> list[str]:
    """The "attempts:" section of `job show`: one line per attempt (the agent's first 8
    characters; a multi-node job's nodes), then the first line of how it ended."""
    if not runs:
        return ["attempts: none"]
    lines = ["attempts:"]
    for a in runs:
        a = {k: console.plain(v) if isinstance(v, str) else v for k, v in a.items()}
        if a.get("hosts"):
            a["hosts"] = [console.plain(h) for h in a["hosts"]]
        start, end = a["started"], a["ended"]
        state = a["state"] or ("RUNNING" if start is not None else "LEASED")
        where = ",".join(a["hosts"]) if a.get("hosts") else a["node"] or a["host"] or "-"
        if not a.get("hosts") and a["node"] and a["host"] and a["node"] != a["host"]:
            where += f" ({a['host']})"
        took = (console.duration(end - start) if end is not None else "running") \
            if start is not None else "-"
        t0, t1 = (console.local_time(t) if t is not None else "-" for t in (start, end))
        if t0[:11] == t1[:11]:
            t1 = t1[11:]  # the same day: its time alone
        lines.append(f"  #{a['attempt']}  {state}  agent {a['agent'][:8]}  node {where}"
                     f"  pilot {a['pilot'] or '-'}  started {t0}  ended {t1}  took {took}")
        msg = (a.get("message") or "").strip()
        if msg:
            lines.append(f"      {msg.splitlines()[0][:200]}")
    return lines


def _workdir_line(rel: str, home) -> str:
    """The whole path when this machine's default work root holds the job's workdir (an agent
    of this home ran it here); else the relative one and what it is relative to."""
    root = settings.work_root(home)
    if rel and (root / rel).is_dir():
        return f"workdir: {root / rel}"
    return f"workdir: {rel}  # {WORKDIR_NOTE}"


#: The server does not know where an agent keeps its workdirs (each agent has its own root).
WORKDIR_NOTE = ("relative to the work root of the agent that ran it (by default "
                "$PILOTFISH_HOME/work, or its --work-root)")


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


from . import log_cli  # noqa: E402,F401  (registers `job log`, which lives in its own module)
