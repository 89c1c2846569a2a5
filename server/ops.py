"""What clients may ask the server: one function per ``request`` op, all run in the server loop.

Each op validates everything before it changes anything, so a refused request changes nothing.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple

from sqlalchemy import delete, func, or_, select, text

from pilotfish import __version__, arrays
from pilotfish.errors import (Forbidden, IllegalTransition, NotFound, PilotfishError,
                              ValidationError)
from pilotfish.keys import ADMIN, AGENT, READER, SITE, SUBMITTER
from pilotfish.protocol import MAX_MESSAGE_BYTES
from pilotfish.validate import check_int, check_name, echo, echo_keys, wire_safe

from . import job_sort, job_tags, states, usage_cache
from .apps import App, app_from_spec, check_resources
from .core import JobServer, shape_of
from .db import apps as apps_t
from .db import job_attempts, job_events, job_parents, jobs
from .jobs import (ALTERABLE, INT_RANGES, build_job, check_description, check_tags, check_url,
                   tags_list,
                   workdir_for)
from .states import State
from .store import chunks

S = State
MAX_JOBS_PER_REQUEST = 100_000
#: The states a user may ask for; the rest are reached only by running jobs.
USER_STATES = (S.USER_KILLED, S.RESTART_READY)
OPS: dict[str, Callable[[JobServer, dict, float], Any]] = {}
_FILTER_KEYS = {"ids", "state", "app", "site", "group", "tag", "name", "owner", "array"}
#: The tag prefix that marks a job of an array (``array:<array id>``); never a user tag.
ARRAY_TAG = "array:"


class Caller(NamedTuple):
    """Who sent a message: the name and role of its CurveZMQ key (from the ZAP user id, never
    from the peer-chosen routing id)."""
    name: str | None     # the key's name; None on a connection without CURVE
    role: str | None     # None: no role (its key was revoked, or roles.json is broken)
    key: str | None      # the Z85 public key; None without CURVE
    why: str | None = None  # why there is no role


#: Without CURVE there is no ZAP and no key: the ipc:// socket is owner-only and --insecure
#: serves loopback only, so whoever gets in is the server's own user: admin.
LOCAL_ADMIN = Caller(None, ADMIN, None)
#: The roles each op's declared role admits: reader < submitter < admin; agents only speak
#: the agent messages (hello, update, bye), never a request.
ADMITS = {READER: frozenset({READER, SUBMITTER, SITE, ADMIN}),
          SUBMITTER: frozenset({SUBMITTER, SITE, ADMIN}),
          SITE: frozenset({SITE, ADMIN}), ADMIN: frozenset({ADMIN})}
AGENT_ROLES = frozenset({AGENT, ADMIN})


def op(role: str, args: tuple[str, ...] = (), caller: bool = False):
    """Register a request op: the least role that may call it (``reader``, ``submitter`` or
    ``admin``), every argument it reads (others are refused), and whether it needs the
    caller (ops whose effect depends on who asks get it as a 4th argument)."""
    def register(fn):
        fn.role, fn.admits = role, ADMITS[role]
        fn.args, fn.wants_caller = frozenset(args), caller
        OPS[fn.__name__] = fn
        return fn
    return register


def who(caller: Caller) -> str:
    return f"key {caller.name!r} ({caller.role or 'no role'})"


def check_call(name: str, fn, args: dict, caller: Caller) -> None:
    """Refuse a request its caller's role does not allow, or with arguments the op does not
    take (a typo must not be silently ignored)."""
    if caller.role not in fn.admits:
        if caller.role is None:
            raise Forbidden(f"{f'key {caller.name!r}' if caller.name else 'this key'} may do "
                            f"nothing: {caller.why or 'it has no role'}")
        need = " or ".join(r for r in ((SITE, ADMIN) if fn.role == SITE else
                                      (READER, SUBMITTER, ADMIN)) if r in fn.admits)
        raise Forbidden(f"{who(caller)} may not {name}: it needs the role {need}")
    unknown = args.keys() - fn.args
    if unknown:
        raise ValidationError(f"{name}: unknown argument(s) {echo_keys(unknown)}; it takes "
                              f"{', '.join(sorted(fn.args)) or 'none'}")


MAX_ID = 2**63 - 1


def _arg(args: dict, key: str, types, default=None, required=False):
    """One request argument of the given type; ints must be in 0..MAX_ID."""
    if key not in args or args[key] is None:
        if required:
            raise ValidationError(f"missing argument {echo(key)}")
        return default
    v = args[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in
                                    (types if isinstance(types, tuple) else (types,))):
        raise ValidationError(f"argument {echo(key)} has the wrong type")
    if type(v) is int and not 0 <= v <= MAX_ID:
        raise ValidationError(f"argument {echo(key)} must be an integer 0..{MAX_ID}, "
                              f"got {echo(v)}")
    if type(v) is str and "\x00" in v:  # PostgreSQL refuses NUL in text
        raise ValidationError(f"argument {echo(key)} must not contain a NUL byte")
    return v


def _ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
            type(i) is int and 0 < i <= MAX_ID for i in value):
        raise ValidationError(f"{what} must be a list of job ids (integers 1..{MAX_ID})")
    return value


# -- server ----------------------------------------------------------------------------------
@op(READER)
def ping(srv: JobServer, args: dict, now: float) -> dict:
    return {"version": __version__, "time": now}


@op(READER)
def status(srv: JobServer, args: dict, now: float) -> dict:
    alive = [a for a in srv.agents.values() if a.state == "ALIVE"]
    return {"version": __version__, "pid": os.getpid(), "db": srv.engine.url.render_as_string(
        hide_password=True), "uptime": round(now - srv.started, 1), "counts": srv.counts(),
        "queued": len(srv.queue), "leases": len(srv.leases), "agents_alive": len(alive),
        # still reading the queued jobs at start ("queued" counts those read so far)
        "loading": srv.loading is not None,
        "cores_alive": sum(a.cores for a in alive), "stats": dict(srv.stats),
        "epoch": srv.epoch,
        # the event stream's ends: `events --since newest` follows from now
        "events": {"newest": srv.batch.next_event_id - 1, "oldest": srv.events_pruned + 1}}


@op(READER, args=("all",))
def agent_ls(srv: JobServer, args: dict, now: float) -> list:
    return [a.to_dict(now) for a in srv.agents.values()
            if args.get("all") or a.state == "ALIVE"]


# -- apps ------------------------------------------------------------------------------------
@op(ADMIN, args=("spec",))
def app_add(srv: JobServer, args: dict, now: float) -> dict:
    app = app_from_spec(_arg(args, "spec", dict, required=True))
    if app.name in srv.app_names:
        raise ValidationError(f"an app named {app.name!r} exists; use `app alter` to change it")
    d = app.to_dict()
    d.pop("id")
    srv.sync()
    app.id = srv.conn.execute(apps_t.insert().values(created=now, **d)).inserted_primary_key[0]
    app.__post_init__()
    srv.apps[app.id] = app
    srv.app_names[app.name] = app
    return app.to_dict()


@op(READER)
def app_ls(srv: JobServer, args: dict, now: float) -> list:
    return wire_safe([a.to_dict() for a in sorted(srv.apps.values(), key=lambda a: a.name)])


@op(READER, args=("name",))
def app_show(srv: JobServer, args: dict, now: float) -> dict:
    app = srv.app(_arg(args, "name", str, required=True))
    srv.sync()
    d = app.to_dict()
    d["jobs"] = {r[0]: r[1] for r in srv.conn.execute(
        select(jobs.c.state, func.count()).where(jobs.c.app_id == app.id)
        .group_by(jobs.c.state))}
    return wire_safe(d)


def _unfinished_jobs(srv: JobServer, app: App) -> int:
    srv.sync()
    return srv.conn.execute(select(func.count()).where(
        jobs.c.app_id == app.id, jobs.c.state.not_in([s.value for s in states.FINAL]))
    ).scalar_one()


#: App keys that decide what a job runs; locked while the app has unfinished jobs.
RUN_KEYS = ("executable", "args", "parameters", "preprocess", "postprocess", "environment",
            "container")


@op(ADMIN, args=("name", "changes"))
def app_alter(srv: JobServer, args: dict, now: float) -> dict:
    app = srv.app(_arg(args, "name", str, required=True))
    changes = _arg(args, "changes", dict, required=True)
    spec = app.to_dict()
    spec.pop("id")
    spec.update(changes)
    new = app_from_spec(spec, app.id)
    old_d, new_d = app.to_dict(), new.to_dict()
    # what decides what a queued job runs: its argv, its steps, its environment, its image
    changed = [k for k in RUN_KEYS if new_d[k] != old_d[k]]
    if changed and (n := _unfinished_jobs(srv, app)):
        raise ValidationError(f"app {app.name!r} has {n} unfinished jobs; what decides what "
                              f"they run ({', '.join(RUN_KEYS)}) can change only when none is "
                              f"left; asked to change: {', '.join(changed)} (wait for them, or "
                              "add a new app)")
    if new.name != app.name and new.name in srv.app_names:
        raise ValidationError(f"an app named {new.name!r} exists")
    d = new.to_dict()
    d.pop("id")
    srv.sync()
    srv.conn.execute(apps_t.update().where(apps_t.c.id == app.id).values(**d))
    del srv.app_names[app.name]
    srv.apps[app.id] = new
    srv.app_names[new.name] = new
    return new.to_dict()


@op(ADMIN, args=("name",))
def app_rm(srv: JobServer, args: dict, now: float) -> dict:
    app = srv.app(_arg(args, "name", str, required=True))
    srv.sync()
    n = srv.conn.execute(select(func.count()).where(jobs.c.app_id == app.id)).scalar_one()
    if n:
        raise ValidationError(f"app {app.name!r} still has {n} jobs; remove them first "
                              f"(`pilotfish job rm-all --app {app.name}`)")
    srv.conn.execute(delete(apps_t).where(apps_t.c.id == app.id))
    del srv.apps[app.id]
    del srv.app_names[app.name]
    return {"removed": app.name}


# -- jobs: add -------------------------------------------------------------------------------
@op(SUBMITTER, args=("jobs",), caller=True)
def job_add(srv: JobServer, args: dict, now: float, caller: Caller = LOCAL_ADMIN) -> dict:
    msgs = _arg(args, "jobs", list, required=True)
    if len(msgs) > MAX_JOBS_PER_REQUEST:
        raise ValidationError(f"{len(msgs)} jobs in one request; at most "
                              f"{MAX_JOBS_PER_REQUEST:,} are added at once (all or none): split "
                              "them into several files or calls")
    rows = []
    for i, m in enumerate(msgs):
        try:
            rows.append(build_job(m, srv.app, srv.data_roots))
        except PilotfishError as exc:
            where = f"job #{i + 1}: " if len(msgs) > 1 else ""
            raise type(exc)(f"{where}{exc}") from None
    known = _known_intake_keys(srv, rows, caller)
    if not known:
        return {"ids": insert_jobs(srv, rows, now, caller.name), "known": 0}
    new_ids = iter(insert_jobs(srv, [r for r in rows if r["intake_key"] not in known], now,
                               caller.name))
    return {"ids": [known[r["intake_key"]] if r["intake_key"] in known else next(new_ids)
                    for r in rows], "known": len(known)}


def _known_intake_keys(srv: JobServer, rows: list[dict], caller: Caller) -> dict[str, int]:
    """The jobs already stored under the rows' intake keys (key -> job id): a producer that
    sends the same jobs again (a redelivered AMQP message) gets their ids, and nothing is added
    twice. A key is the producer's own: one held by another key's job is refused, so a key
    cannot be used to learn of other users' jobs."""
    wanted = [r["intake_key"] for r in rows if r["intake_key"] is not None]
    if not wanted:
        return {}
    if len(set(wanted)) != len(wanted):
        seen: set[str] = set()
        twice = next(k for k in wanted if k in seen or seen.add(k))
        raise ValidationError(f"intake_key {echo(twice)} is given to two jobs of one request")
    srv.sync()  # this turn's earlier adds are seen too
    known: dict[str, int] = {}
    for part in chunks(wanted, 900):
        for r in srv.conn.execute(select(jobs.c.id, jobs.c.intake_key, jobs.c.owner)
                                  .where(jobs.c.intake_key.in_(part))):
            if caller.role != ADMIN and r.owner != caller.name:
                raise Forbidden(f"intake_key {echo(r.intake_key)} belongs to a job of another "
                                "key; nothing was added")
            known[r.intake_key] = r.id
    return known


def insert_jobs(srv: JobServer, rows: list[dict], now: float, owner: str | None,
                chained: bool = False) -> list[int]:
    """Add checked rows (from build_job) with new ids: their parents, first states, queue;
    ``owner``: the key name that adds them (None: the home's own, unnamed, admin);
    ``chained``: a row's parents may be rows before it in this call, by the ids they get (a
    workflow's subjobs, in an order that puts parents first)."""
    parent_ids = {p for r in rows for p in r["parents"]}
    if chained:
        parent_ids -= set(range(srv.next_id, srv.next_id + len(rows)))
    parent_state: dict[int, str] = {}
    if parent_ids:
        srv.sync()
        for part in chunks(sorted(parent_ids), 900):
            for r in srv.conn.execute(select(jobs.c.id, jobs.c.state).where(jobs.c.id.in_(part))):
                parent_state[r.id] = r.state
        missing = parent_ids - parent_state.keys()
        if missing:
            raise NotFound(f"parent job(s) {', '.join(map(str, sorted(missing)))} do not exist")
    ids = []
    b = srv.batch
    created, ready, waiting = S.CREATED, S.READY, S.AWAITING_PARENTS
    tag_rows: list[dict] = []
    for row in rows:
        job_id = srv.next_id
        srv.next_id += 1
        ids.append(job_id)
        parents = row.pop("parents")
        path = [created, ready]
        msg = None
        if parents:
            ps = [parent_state[p] for p in parents]
            bad = [p for p, s in zip(parents, ps) if s in (S.FAILED.value, S.USER_KILLED.value)]
            if bad:
                path, msg = [created, S.FAILED], f"parent job {bad[0]} failed"
            elif any(s != S.JOB_FINISHED.value for s in ps):
                path = [created, waiting]
                srv.waited_on.update(parents)
            for p in parents:
                b.parent_inserts.append({"job_id": job_id, "parent_id": p})
        if row.get("fenced"):
            row["fenced"] = now
            srv.fence.held.add(job_id)
        row.update(id=job_id, state_time=now, created=now, retries=0, attempts=0,
                   workdir=workdir_for(job_id, row["name"], row["group_identifier"]),
                   started=None, ended=None, exit_code=None, message=msg, agent=None,
                   owner=owner)
        b.insert_job(row, path, msg)
        tag_rows += job_tags.pairs(job_id, row.get("tags"))
        if chained:
            parent_state[job_id] = path[-1].value
        if row.get("input_url"):
            srv.staging.note_job(job_id, row["input_url"])
        if path[-1] is ready:
            srv.enqueue(job_id, row)
    if tag_rows:  # (the tag filter's index: see job_tags)
        job_tags.add(srv.conn, tag_rows)
    return ids


@op(SUBMITTER, args=("job", "array", "sweep", "first", "count", "array_id"), caller=True)
def job_add_array(srv: JobServer, args: dict, now: float, caller: Caller = LOCAL_ADMIN) -> dict:
    """An array (``array``: an index spec) or a sweep (``sweep``: parameter -> values) of one job
    template, expanded here: elements ``first`` .. ``first + count - 1`` in this request. Each
    job is checked and added like any ``job_add`` (all or none) and tagged ``array:<id>``; the
    array id is the first job's id, and later requests of the same array name it (``array_id``).
    """
    template = _arg(args, "job", dict, required=True)
    elems = arrays.Elements(args.get("array"), args.get("sweep"))
    first = _arg(args, "first", int, 0)
    count = _arg(args, "count", int, min(len(elems), MAX_JOBS_PER_REQUEST))
    join = _arg(args, "array_id", int)
    if not 0 < count <= MAX_JOBS_PER_REQUEST or first + count > len(elems):
        raise ValidationError(f"elements {first}..{first + count - 1} of an array of "
                              f"{len(elems):,}: at most {MAX_JOBS_PER_REQUEST:,} per request, "
                              "within the array")
    if "tags" in template and not isinstance(template["tags"], (list, type(None))):
        raise ValidationError("tags must be a list of names")
    if template.get("intake_key") is not None:
        raise ValidationError("an array's jobs cannot share one intake_key; add them with "
                              "job_add, one key per job")
    template = dict(template)
    if "config_file" in template and "parameters" not in template:
        template["parameters"] = template.pop("config_file")
    fixed = template.get("parameters") or {}
    if not isinstance(fixed, dict):
        raise ValidationError("parameters must be a map")
    both = fixed.keys() & {n for n, _ in elems.axes}
    if both:
        raise ValidationError(f"parameter(s) {', '.join(sorted(both))} both fixed and swept")
    filler = arrays.Template(template, elems.names())
    # the stored size of this request: an array multiplies its template, so it gets the budget
    # of one job_add message (which could not carry more)
    try:
        size = len(json.dumps(template)) * count
    except (TypeError, ValueError, RecursionError):
        raise ValidationError("a job template must be plain JSON data") from None
    if size > MAX_MESSAGE_BYTES:
        raise ValidationError(f"{count:,} jobs of this template are about {size >> 20} MB; at "
                              f"most {MAX_MESSAGE_BYTES >> 20} MB per request: send fewer "
                              "elements per request or shorten the template")
    if join is not None:
        srv.sync()
        r = srv.conn.execute(select(jobs.c.tags).where(jobs.c.id == join)).first()
        if r is None or f",{ARRAY_TAG}{join}," not in r.tags:
            raise NotFound(f"no array {join}")
    rows = _array_rows(srv, filler, elems, first, count)
    # a reserved tag: user tags are names, which cannot hold ':'
    tags = (rows[0]["tags"] or ",") + f"{ARRAY_TAG}{join if join is not None else srv.next_id},"
    for r in rows:
        r["tags"] = tags
    ids = insert_jobs(srv, rows, now, caller.name)
    return {"ids": ids, "array": join if join is not None else ids[0], "elements": len(elems)}


def _array_rows(srv: JobServer, filler: arrays.Template, elems: arrays.Elements, first: int,
                count: int) -> list[dict]:
    """The rows of elements first .. first + count - 1. The first element is checked whole by
    build_job; the others differ from it only in the fields placeholders and the sweep fill
    (name, description, some parameters), so only those are checked again: the same checks,
    without paying for the rest 100,000 times."""
    it = elems.slice(first, count)
    index, values = next(it)
    try:
        base = build_job(filler.fill(index, values), srv.app, srv.data_roots)
    except PilotfishError as exc:
        raise type(exc)(f"job #{first + 1}: {exc}" if len(elems) > 1 else str(exc)) from None
    app = srv.apps[base["app_id"]]
    name_f, desc_f = filler.text_filler("name"), filler.text_filler("description")
    params_f = filler.param_fill
    swept = [k for k, _ in elems.axes]
    checks = {k: app.params[k].check for k in [k for k, _ in params_f] + swept}
    rows = [base]
    for n, (index, values) in enumerate(it, 2):
        subst = {"index": index, **values}
        row = base.copy()
        try:
            if name_f is not None:
                row["name"] = check_name(arrays.run(name_f, subst), "job name")
            if desc_f is not None:
                row["description"] = check_description(arrays.run(desc_f, subst), row["name"])
            if checks:
                params = base["parameters"].copy()
                for k, f in params_f:
                    params[k] = checks[k](arrays.run(f, subst), app.name)
                for k in swept:
                    params[k] = checks[k](values[k], app.name)
                row["parameters"] = params
        except PilotfishError as exc:
            raise type(exc)(f"job #{first + n}: {exc}") from None  # counted in the array
        rows.append(row)
    return rows


@op(SUBMITTER, args=("jobs",))
def job_check(srv: JobServer, args: dict, now: float) -> dict:
    """Check job messages exactly as ``job_add`` would, and add nothing: edge processes (the
    NOTIFY source) check their job template against the server's rules when they start, not
    at the first pulse."""
    msgs = _arg(args, "jobs", list, required=True)
    if len(msgs) > MAX_JOBS_PER_REQUEST:
        raise ValidationError(f"{len(msgs)} jobs in one request; at most "
                              f"{MAX_JOBS_PER_REQUEST:,} are checked at once")
    for i, m in enumerate(msgs):
        try:
            build_job(m, srv.app, srv.data_roots)
        except PilotfishError as exc:
            where = f"job #{i + 1}: " if len(msgs) > 1 else ""
            raise type(exc)(f"{where}{exc}") from None
    return {"checked": len(msgs)}


# -- jobs: read ------------------------------------------------------------------------------
def where_of(f: dict | None, srv: JobServer, walk_state: bool = False) -> list:
    """SQL conditions for a job filter; unknown keys and bad values are errors."""
    f = f or {}
    if not isinstance(f, dict):
        raise ValidationError("filter must be a map")
    unknown = set(f) - _FILTER_KEYS
    if unknown:
        raise ValidationError(f"unknown filter key(s) {echo_keys(unknown)}; "
                              f"expected {', '.join(sorted(_FILTER_KEYS))}")
    conds = []
    for k in ("app", "site", "group", "tag", "name", "owner"):
        if f.get(k) is not None and not isinstance(f[k], str):
            raise ValidationError(f"filter {k!r} must be a string")
        if f.get(k) is not None and "\x00" in f[k]:  # PostgreSQL refuses NUL in text
            raise ValidationError(f"filter {k!r} must not contain a NUL byte")
    if f.get("ids") is not None:
        conds.append(jobs.c.id.in_(_ids(f["ids"], "ids")))
    if f.get("state"):
        st = f["state"] if isinstance(f["state"], list) else [f["state"]]
        if not all(isinstance(s, str) for s in st):
            raise ValidationError("filter 'state' must be state names")
        # (job_ls may ask for the state unindexed: see _sort_walks)
        col = jobs.c.state + "" if walk_state else jobs.c.state
        conds.append(col.in_([states.parse(s).value for s in st]))
    if f.get("app"):
        conds.append(jobs.c.app_id == srv.app(f["app"]).id)
    if f.get("site"):
        conds.append(jobs.c.site == f["site"])
    if f.get("group"):
        conds.append(jobs.c.group_identifier == f["group"])
    if f.get("tag"):  # (a seek in job_tags when few jobs hold it, else a LIKE)
        conds.append(job_tags.condition(srv.conn, check_tags([f["tag"]]).strip(",")))
    if f.get("name"):
        conds.append(jobs.c.name == f["name"])
    if f.get("owner"):
        conds.append(jobs.c.owner == f["owner"])
    if f.get("array") is not None:
        a = f["array"]
        if type(a) is not int or not 0 < a <= MAX_ID:
            raise ValidationError("filter 'array' must be an array id (its first job's id)")
        # every job of an array has an id >= the array's: the key bounds the tag scan
        conds += [jobs.c.id >= a, jobs.c.tags.contains(f",{ARRAY_TAG}{a},")]
    return conds


def _job_dict(srv: JobServer, r) -> dict:
    d = dict(r._mapping)
    app = srv.apps.get(d.pop("app_id"))
    d["application"] = app.name if app else None
    d["tags"] = tags_list(d["tags"])
    d["group"] = d.pop("group_identifier")
    d["array"] = next((int(t[len(ARRAY_TAG):]) for t in d["tags"] if t.startswith(ARRAY_TAG)),
                      None)
    if d.get("staged"):  # a staged input waiting for an agent (see .staging)
        try:
            d["staged"] = json.loads(d["staged"])
        except ValueError:
            pass
    if d.get("remote_cancel"):  # cancels its remote sites have not confirmed yet
        try:
            d["remote_cancel"] = json.loads(d["remote_cancel"])
        except ValueError:
            pass
    # where the latest attempt ran (or runs); its full record is job show's "runs"
    if "run_agent" in d:
        d["last_agent"] = d["run_agent"]
        d["last_node"] = srv.agent_node(d["run_agent"])
        for k in [k for k in d if k.startswith("run_")]:
            del d[k]
    return d


@op(READER, args=("filter", "limit", "offset", "newest", "after", "sort"))
def job_ls(srv: JobServer, args: dict, now: float) -> list:
    """``after``: only ids past this one (below it with ``newest``): keyset paging, which
    costs the same on the last page of a million jobs as on the first (an OFFSET walks every
    row it skips). ``sort``: one of :data:`pilotfish.job_sort.SORTS` (``-`` first:
    descending), ``after`` then the last row's [value, id] (see :mod:`.job_sort`)."""
    limit = _arg(args, "limit", int, 100)
    offset = _arg(args, "offset", int, 0)
    newest = _arg(args, "newest", bool, False)
    sort = _arg(args, "sort", str, "-id" if newest else "id")
    if args.get("sort") is not None and newest:
        raise ValidationError("give sort or newest, not both (newest is sort -id)")
    after = args.get("after")
    srv.sync()
    q = select(jobs.c.id, jobs.c.name, jobs.c.app_id, jobs.c.state, jobs.c.attempts,
               jobs.c.site, jobs.c.group_identifier, jobs.c.tags, jobs.c.priority,
               jobs.c.state_time, jobs.c.created, jobs.c.started, jobs.c.ended,
               jobs.c.exit_code, jobs.c.agent, jobs.c.message, jobs.c.owner, jobs.c.run_agent,
               jobs.c.argo_job_id, jobs.c.job_status_routing_key)
    flt = args.get("filter")
    for c in where_of(flt, srv, _sort_walks(srv, flt, sort)):
        q = q.where(c)
    run = lambda qq: list(srv.conn.execute(qq))  # noqa: E731
    if job_sort.parse(sort)[0] == "app":
        if offset:
            raise ValidationError("offset cannot be used with sort app: page with after")
        rows = job_sort.by_app(run, q, srv.apps, sort, after, limit)
    else:
        rows = job_sort.by_column(run, q, sort, after, limit, offset)
    # (no wire_safe: these columns are SQL integers, which hold 64 bits at most)
    return [_job_dict(srv, r) for r in rows]


#: Past this many jobs in the filter's states, a list sorted by another column walks that
#: column's index and skips the other states' rows, instead of sorting every matching row.
SORT_WALK = 100_000


def _sort_walks(srv: JobServer, flt: Any, sort: str) -> bool:
    """Whether to make the filter's state condition unindexable (``state || ''``), so the
    database walks the sort's index and skips other states' rows instead of reading every
    row of the state and sorting them: a state of most of a million jobs sorted by time
    costs 0.6 s that way for 50 rows. The counts are in memory; SQLite's planner has no
    statistics to tell (no ANALYZE). A state of few jobs keeps its index (a small sort)."""
    if not isinstance(flt, dict) or not flt.get("state") or \
            job_sort.parse(sort)[0] in ("id", "state", "app"):
        return False
    st = flt["state"] if isinstance(flt["state"], list) else [flt["state"]]
    try:
        names = {states.parse(s).value for s in st}
    except (PilotfishError, AttributeError, TypeError):
        return False  # where_of says what is wrong
    counts = srv.counts()
    return sum(counts.get(n, 0) for n in names) > SORT_WALK


#: Groups per job_groups answer at most.
MAX_GROUPS = 1000
#: The next group name after one, by the index: a loose index scan (one index probe per group,
#: whatever the groups hold), the same SQL on SQLite and PostgreSQL.
_GROUPS_SQL = text("""
WITH RECURSIVE g(x, n) AS (
  SELECT (SELECT MIN(group_identifier) FROM jobs WHERE group_identifier > :after), 1
  UNION ALL
  SELECT (SELECT MIN(group_identifier) FROM jobs WHERE group_identifier > g.x), g.n + 1
  FROM g WHERE g.x IS NOT NULL AND g.n < :limit
) SELECT x FROM g WHERE x IS NOT NULL""")


@op(READER, args=("after", "limit"))
def job_groups(srv: JobServer, args: dict, now: float) -> dict:
    """The group_identifiers jobs carry, in order, from the one after ``after`` on (at most
    ``limit``): browsing groups costs a probe of the group index per group shown, however many
    jobs they hold. ``next``: ask again from it, or None at the end."""
    after = _arg(args, "after", str, "")
    limit = _arg(args, "limit", int, 100)
    if not 1 <= limit <= MAX_GROUPS:
        raise ValidationError(f"limit must be 1..{MAX_GROUPS}")
    srv.sync()
    groups = [r[0] for r in srv.conn.execute(_GROUPS_SQL, {"after": after, "limit": limit})]
    return {"groups": groups, "next": groups[-1] if len(groups) == limit else None}


#: The most jobs a bounded count reads (job_counts with ``limit``).
MAX_COUNT_LIMIT = 100_000
#: A bounded count of a tag (no index) looks at the newest this many jobs only.
COUNT_SCAN = 100_000


@op(READER, args=("filter", "limit"))
def job_counts(srv: JobServer, args: dict, now: float) -> dict:
    """Jobs by state matching ``filter``. With ``limit`` (the web's job table): the counts of
    the newest ``limit`` matching jobs only, as {"counts": {...}, "more": whether more match}:
    an exact count of a group of 20,000 jobs reads 20,000 rows for their states (~0.3 s on
    1M jobs), one of an app or a tag every matching row; a bounded one at most ``limit``."""
    f = args.get("filter")
    limit = _arg(args, "limit", int, 0)
    if limit:
        if not 1 <= limit <= MAX_COUNT_LIMIT:
            raise ValidationError(f"limit must be 1..{MAX_COUNT_LIMIT}")
        return _bounded_counts(srv, f, limit)
    if not f:
        return srv.counts()  # kept in memory: no scan of a million rows per `job wait` poll
    conds = where_of(f, srv)  # checks the filter
    if set(f) == {"state"}:  # from memory too: `job ls --state X` asks for its footer
        wanted = {states.parse(s).value for s in (f["state"] if isinstance(f["state"], list)
                                                  else [f["state"]])}
        return {k: v for k, v in srv.counts().items() if k in wanted}
    srv.sync()
    q = select(jobs.c.state, func.count())
    for c in conds:
        q = q.where(c)
    return {r[0]: r[1] for r in srv.conn.execute(q.group_by(jobs.c.state))}


def _bounded_counts(srv: JobServer, f: dict | None, limit: int) -> dict:
    if not f:  # (from memory: exact whatever the number)
        return {"counts": srv.counts(), "more": False, "scanned": None}
    conds = where_of(f, srv)
    srv.sync()
    scanned = None
    if f.get("tag") and not f.get("array") and job_tags.held(
            srv.conn, check_tags([f["tag"]]).strip(",")) > job_tags.SEEK_MAX:
        # a tag of many jobs is a LIKE on the tags text (see job_tags): when few of the
        # newest match, it reads far; count among the newest COUNT_SCAN jobs only, say so
        top = srv.conn.execute(select(func.max(jobs.c.id))).scalar() or 0
        if top > COUNT_SCAN:
            conds.append(jobs.c.id > top - COUNT_SCAN)
            scanned = COUNT_SCAN
    # the newest first, on the filter's index (group, app, name, site) or the primary key
    found = [r[0] for r in srv.conn.execute(select(jobs.c.state).where(*conds)
                                            .order_by(jobs.c.id.desc()).limit(limit + 1))]
    counts: dict[str, int] = {}
    for st in found[:limit]:
        counts[st] = counts.get(st, 0) + 1
    return {"counts": counts, "more": len(found) > limit or scanned is not None,
            "scanned": scanned}


@op(READER, args=("filter",))
def job_summary(srv: JobServer, args: dict, now: float) -> dict:
    """Counts and times of matching jobs: for throughput and utilization figures."""
    srv.sync()
    cores = jobs.c.processes_per_node * jobs.c.cpus_per_process * jobs.c.num_nodes
    q = select(func.count(), func.min(jobs.c.created), func.min(jobs.c.started),
               func.min(jobs.c.ended), func.max(jobs.c.ended),
               func.sum((jobs.c.ended - jobs.c.started) * cores))
    for c in where_of(args.get("filter"), srv):
        q = q.where(c)
    n, created, started, first_end, last_end, busy = srv.conn.execute(q).one()
    return {"jobs": n, "first_created": created, "first_started": started,
            "first_ended": first_end, "last_ended": last_end, "core_seconds": busy or 0.0}


@op(READER, args=("id",))
def job_show(srv: JobServer, args: dict, now: float) -> dict:
    job_id = _arg(args, "id", int, required=True)
    srv.sync()
    r = srv.conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
    if r is None:
        raise NotFound(f"no job {job_id}")
    d = _job_dict(srv, r)
    d["waiting"] = srv.gangs.waiting_reason(job_id, now)
    app = srv.apps.get(r.app_id)
    try:
        d["argv"] = app.argv(r.parameters) if app else None
    except Exception as exc:  # a row an older version stored: show it, with what is wrong
        d["argv"] = None
        d["argv_error"] = f"{type(exc).__name__}: {echo(str(exc))}"
    d["parents"] = [x[0] for x in srv.conn.execute(
        select(job_parents.c.parent_id).where(job_parents.c.job_id == job_id))]
    d["children"] = [x[0] for x in srv.conn.execute(
        select(job_parents.c.job_id).where(job_parents.c.parent_id == job_id))]
    d["events"] = [{**e._mapping, "via": states.via_text(e.via)} for e in srv.conn.execute(
        select(job_events.c.from_state, job_events.c.to_state, job_events.c.via,
               job_events.c.time, job_events.c.message)
        .where(job_events.c.job_id == job_id).order_by(job_events.c.id))]
    d["runs"] = attempts_of(srv, job_id, r)  # ("attempts" is their count)
    # its transfers: each staging step's event (how it went, or the scheme's error), and the
    # stage lease of a site stager working on it now
    d["transfers"] = transfers_of(d["events"], r.input_url, r.output_url)
    d["staging"] = srv.staging.lease_of(job_id) or srv.staging.out_of(job_id)
    return wire_safe(d)


def transfers_of(events: list[dict], input_url: str | None,
                 output_url: str | None) -> list[dict]:
    """A job's staging steps from its events, each with ``step`` (the staging state it
    reached, also when passed through on the way): stage-in steps when it has an input_url,
    stage-out steps when it has an output_url, failures always."""
    wanted = {S.STAGE_IN_FAILED.value, S.STAGE_OUT_FAILED.value}
    if input_url:
        wanted.add(S.STAGED_IN.value)
    if output_url:
        wanted.add(S.STAGED_OUT.value)
    out = []
    for e in events:
        for step in [e["to_state"]] + (e["via"] or "").split(",")[::-1]:
            if step in wanted:
                out.append({**e, "step": step})
                break
    return out


def attempts_of(srv: JobServer, job_id: int, r) -> list[dict]:
    """Each attempt of a job, first first: where it ran, when, how it ended (state null while
    it runs). Earlier ones from job_attempts; the latest from the job's row (its start, while
    it runs, from its lease)."""
    out = []
    for a in srv.conn.execute(select(job_attempts).where(job_attempts.c.job_id == job_id)
                              .order_by(job_attempts.c.attempt)):
        d = dict(a._mapping)
        del d["job_id"]
        d["hosts"] = json.loads(d["hosts"]) if d["hosts"] else None
        out.append(d)
    if r.attempts and r.run_agent is not None:
        lease = srv.leases.get(job_id)
        where = srv.agent_where(r.run_agent)
        out.append({"attempt": r.attempts, "agent": r.run_agent, "host": where["host"],
                    "node": where["node"], "pilot": where["pilot"],
                    "hosts": json.loads(r.run_hosts) if r.run_hosts else None,
                    "leased": r.run_leased,
                    "started": lease.started if lease is not None else r.started,
                    "ended": None if lease is not None else r.ended,
                    "state": None if lease is not None else r.run_state,
                    "exit_code": None if lease is not None else r.exit_code,
                    "message": None if lease is not None else r.run_message})
    return out


def _select_jobs(srv: JobServer, args: dict, caller: Caller, *cols):
    """The jobs a change request's filter matches; all of them the caller's to change, or a
    Forbidden error (the whole request is refused: nothing changes)."""
    f = args.get("filter")
    if not f:
        raise ValidationError("select jobs with ids or a filter (an empty filter would "
                              "match every job)")
    srv.sync()
    q = select(*(cols + (jobs.c.owner,) if cols else (jobs,)))
    for c in where_of(f, srv):
        q = q.where(c)
    rows = list(srv.conn.execute(q.order_by(jobs.c.id)))
    check_owner(rows, caller)
    return rows


def check_owner(rows: list, caller: Caller) -> None:
    """A submitter changes only the jobs its key added; jobs of other keys, and those from
    before jobs had owners (owner NULL), only an admin may change."""
    if caller.role == ADMIN:
        return
    foreign = [r.id for r in rows if r.owner is None or r.owner != caller.name]
    if foreign:
        shown = ", ".join(map(str, foreign[:10])) + (", ..." if len(foreign) > 10 else "")
        raise Forbidden(f"{who(caller)} may change only the jobs it added: {len(foreign)} of "
                        f"the {len(rows)} matching jobs are not its own ({shown}); nothing "
                        "changed")


# -- jobs: change ----------------------------------------------------------------------------
def _set_state(srv: JobServer, r, to: State, now: float, why: str) -> None:
    """A user-asked state change on one job, with the queue and leases kept in step."""
    frm = State(r.state)
    lease = srv.leases.get(r.id)
    if lease is not None:
        frm = lease.state
        if to is not S.USER_KILLED:
            raise IllegalTransition(f"job {r.id} is held by agent {lease.agent}; only a kill "
                                    "can change its state now")
    states.check_path(frm, [to])
    if frm in states.FINAL:  # (a final job's day counted it as a job: the count changes)
        usage_cache.forget_jobs(srv, [r.id])
    cols: dict[str, Any] = {}
    if to is S.RESTART_READY and frm in states.FINAL:
        cols["retries"] = 0
    if lease is not None:
        srv.cancel_on_agent(lease)
        srv._end_lease(lease, now, to.value, message=why)
        cols["agent"] = None
    srv.batch.transition(r.id, frm, [to], now, why, **cols)
    srv.queue.remove(r.id)  # (a job staged by a site stager is queued in STAGED_IN)
    srv.staging.forget(r.id)
    srv.fence.forget(r.id)
    if to in states.QUEUED:
        srv.enqueue(r.id, r)
    if to in (S.FAILED, S.USER_KILLED):
        srv.failed.append(r.id)


def _change_states(srv: JobServer, args: dict, now: float, to: State, why: str,
                   skip: frozenset, caller: Caller) -> dict:
    rows = _select_jobs(srv, args, caller)
    todo = [r for r in rows if r.state not in skip]
    for r in todo:  # check all before changing any
        lease = srv.leases.get(r.id)
        frm = lease.state if lease is not None else State(r.state)
        if to not in USER_STATES:
            raise IllegalTransition(f"illegal state change {frm.value} -> {to.value}: a user "
                                    "may only kill (USER_KILLED) or retry (RESTART_READY) a job")
        if lease is not None and to is not S.USER_KILLED:
            # (_set_state refuses it too, but only after the jobs before it were changed)
            raise IllegalTransition(f"job {r.id} is held by agent {lease.agent}; only a kill "
                                    "can change its state now")
        if to is not S.USER_KILLED or lease is None:
            states.check_path(frm, [to])
    usage_cache.forget_jobs(srv, [r.id for r in todo])  # (a kill or retry changes usage)
    for r in todo:
        _set_state(srv, r, to, now, why)
    return {"changed": [r.id for r in todo], "matched": len(rows)}


@op(SUBMITTER, args=("filter",), caller=True)
def job_kill(srv: JobServer, args: dict, now: float, caller: Caller = LOCAL_ADMIN) -> dict:
    return _change_states(srv, args, now, S.USER_KILLED, "killed by user",
                          frozenset(s.value for s in states.FINAL), caller)


@op(SUBMITTER, args=("filter",), caller=True)
def job_retry(srv: JobServer, args: dict, now: float, caller: Caller = LOCAL_ADMIN) -> dict:
    return _change_states(srv, args, now, S.RESTART_READY, "retried by user",
                          frozenset(s.value for s in states.ALL - {S.FAILED, S.USER_KILLED}),
                          caller)


@op(SUBMITTER, args=("filter", "changes"), caller=True)
def job_alter(srv: JobServer, args: dict, now: float, caller: Caller = LOCAL_ADMIN) -> dict:
    changes = dict(_arg(args, "changes", dict, required=True))
    new_state = changes.pop("state", None)
    if new_state is not None and not isinstance(new_state, str):
        raise ValidationError("state must be a state name")
    unknown = set(changes) - ALTERABLE
    if unknown:
        raise ValidationError(f"cannot alter {echo_keys(unknown)}; "
                              "alterable: state, "
                              f"{', '.join(sorted(ALTERABLE))}")
    rows = _select_jobs(srv, args, caller)
    if not rows:
        return {"changed": [], "matched": 0}
    if new_state is not None:
        to = states.parse(new_state)
        if changes:
            raise ValidationError("change the state alone, not with other fields")
        return _change_states(srv, args, now, to, "state set by user", frozenset(), caller)
    updates = []
    for r in rows:  # validate every job first: a refused alter changes nothing
        if r.id in srv.leases:
            raise ValidationError(f"job {r.id} is held by agent {srv.leases[r.id].agent}; "
                                  "kill it or wait before altering it")
        if r.id in srv.staging.leases or r.id in srv.staging.staged:
            raise ValidationError(f"job {r.id}: a site stager is staging (or has staged) its "
                                  "input; kill it or wait before altering it")
        if r.id in srv.staging.out_held:
            raise ValidationError(f"job {r.id}: its outputs wait for a site stager's "
                                  "stage-out; kill it or wait before altering it")
        d = dict(r._mapping)
        new = dict(changes)
        if "parameters" in new:
            new["parameters"] = srv.apps[r.app_id].check_params(new["parameters"])
        if "tags" in new:  # an array's tag stays: it is the job's membership, not a label
            kept = "".join(f"{t}," for t in tags_list(r.tags) if t.startswith(ARRAY_TAG))
            new["tags"] = ((check_tags(new["tags"]) or ",") + kept) if kept \
                else check_tags(new["tags"])
        for k in ("input_url", "output_url"):
            if k in new:
                new[k] = check_url(new[k], k, srv.data_roots)
        for k, (lo, hi) in INT_RANGES.items():  # as job_add checks them
            if k in new:
                check_int(new[k], k, lo, hi)
        for k in ("site", "queue", "project", "group_identifier"):
            if new.get(k) is not None:
                check_name(new[k], k)
        if "description" in new:  # as job_add checks it: else the write failed at commit
            desc = new["description"] or ""
            if not isinstance(desc, str) or len(desc) > 10_000 or "\x00" in desc:
                raise ValidationError(f"job {r.id}: description must be a string without NUL, "
                                      "at most 10,000 characters")
            new["description"] = desc
        d.update(new)
        check_resources(d, f"job {r.id}")
        updates.append((r, new, d))
    usage_cache.forget_jobs(srv, [r.id for r, new, _ in updates if new])  # (cores, site...)
    for r, new, d in updates:
        if "tags" in new:
            job_tags.remove(srv.conn, job_tags.pairs(r.id, r.tags))
            job_tags.add(srv.conn, job_tags.pairs(r.id, new["tags"]))
        if new:
            srv.batch.update_job(r.id, **new)
        if "input_url" in new:
            srv.staging.note_job(r.id, d["input_url"])
        if r.id in srv.queue or r.id in srv.staging.held:
            srv.queue.remove(r.id)
            srv.staging.forget(r.id)
            srv.queue.push(r.id, d["priority"], shape_of(d))
    return {"changed": [r.id for r, _, _ in updates], "matched": len(rows)}


def _delete_jobs(srv: JobServer, ids: list[int]) -> None:
    srv.output.remove(srv.conn, ids)  # their stored output (job log) goes with them
    for part in chunks(ids, 900):
        srv.conn.execute(delete(job_events).where(job_events.c.job_id.in_(part)))
        srv.conn.execute(delete(job_attempts).where(job_attempts.c.job_id.in_(part)))
        srv.conn.execute(delete(job_parents).where(or_(job_parents.c.job_id.in_(part),
                                                       job_parents.c.parent_id.in_(part))))
        srv.conn.execute(delete(jobs).where(jobs.c.id.in_(part)))


@op(SUBMITTER, args=("filter",), caller=True)
def job_rm(srv: JobServer, args: dict, now: float, caller: Caller = LOCAL_ADMIN) -> dict:
    rows = _select_jobs(srv, args, caller, jobs.c.id, jobs.c.state, jobs.c.name,
                        jobs.c.group_identifier, jobs.c.tags)
    ids = [r.id for r in rows]
    for job in ids:
        lease = srv.leases.get(job)
        if lease is not None:
            srv.cancel_on_agent(lease)
            srv._end_lease(lease, now, None)
        srv.queue.remove(job)
        srv.staging.forget(job, removed=True)
    srv.sync()
    # children left waiting on a removed parent could never run: fail them, visibly
    gone = set(ids)
    for part in chunks(ids, 900):
        for r in srv.conn.execute(
                select(jobs.c.id, job_parents.c.parent_id)
                .join(job_parents, job_parents.c.job_id == jobs.c.id)
                .where(job_parents.c.parent_id.in_(part),
                       jobs.c.state == S.AWAITING_PARENTS.value)):
            if r.id not in gone:
                gone.add(r.id)
                srv.batch.transition(r.id, S.AWAITING_PARENTS, [S.FAILED], now,
                                     f"parent job {r.parent_id} was removed")
                srv.failed.append(r.id)
    usage_cache.forget_jobs(srv, ids)  # (their usage goes with them)
    job_tags.remove(srv.conn, [p for r in rows for p in job_tags.pairs(r.id, r.tags)])
    _delete_jobs(srv, ids)
    # its history goes with the job; the stream tells its followers that it went
    by = f"removed by key {caller.name!r}" if caller.name else "removed"
    for r in rows:
        srv.batch.counts[r.state] -= 1
        srv.batch.server_event("job", states.REMOVED, now, r.state, by, job_id=r.id,
                               name=r.name, grp=r.group_identifier)
    return {"removed": len(ids)}


@op(ADMIN)
def shutdown(srv: JobServer, args: dict, now: float) -> dict:
    srv.stopping = True
    return {"stopping": True, "time": time.time()}
