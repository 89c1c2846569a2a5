"""The REST API under /api/: JSON in, JSON out, the server's ops over HTTP.

Every call is made with the caller's key (its token's ``web-NAME``, or in open mode the home's
own), so the server checks roles, ownership and every argument as it does for the CLI; the
web checks the role first only to answer early. Changes need a JSON body (``{}`` when there is
nothing to say): a page of another site cannot send one without a CORS preflight, which this
API never grants. Errors: ``{"error": one line, "code": ...}`` with the status of the code.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from pilotfish import keys

from .base import MAX_BODY, WebError, current_user, cursor_arg, need, only, web_of

router = APIRouter(prefix="/api", tags=["api"])
FILTER_PARAMS = {"state", "app", "site", "group", "tag", "name", "owner", "array"}
#: Rows per list call at most: a response stays small whatever the database holds.
MAX_LIMIT = 1000


def job_filter(q: dict[str, Any]) -> dict:
    f: dict[str, Any] = {}
    for k in FILTER_PARAMS:
        v = q.get(k)
        if v is None or v == "":
            continue
        if k == "state":
            v = [s for s in v.split(",") if s] if "," in v else v
        f[k] = v
    return f


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise WebError(400, f"limit must be 1..{MAX_LIMIT}, got {limit}", "invalid")
    return limit


async def json_body(request: Request) -> Any:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise WebError(415, "send a JSON body (Content-Type: application/json; {} when there "
                       "is nothing to say)", "invalid")
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
        raise WebError(413, f"the body is larger than {MAX_BODY // 2**20} MiB", "invalid")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise WebError(413, f"the body is larger than {MAX_BODY // 2**20} MiB", "invalid")
    try:
        return json.loads(body or b"{}")
    except ValueError as exc:
        raise WebError(400, f"the body is not JSON: {exc}", "invalid") from None


def reader(request: Request):
    return need(current_user(request), keys.READER)


async def act(request: Request, role: str, fn, *args):
    user = need(current_user(request), role)
    web = web_of(request)
    return await run_in_threadpool(web.call, user, fn, *args)


# -- read ------------------------------------------------------------------------------------
@router.get("/jobs", summary="List jobs (filters, sort, keyset paging)")
def list_jobs(request: Request, state: str | None = None, app: str | None = None,
              site: str | None = None, group: str | None = None, tag: str | None = None,
              name: str | None = None, owner: str | None = None, array: int | None = None,
              limit: int = 50, after: int | None = None, at: str | None = None,
              offset: int = 0, newest: bool = False, sort: str | None = None) -> list[dict]:
    """``state`` may list several, comma-separated. ``sort``: id, state, app, name, updated
    or ended, ``-`` first for descending (ended: only jobs that have ended). ``after``: the
    last row's id, and with a sort other than id ``at``: that row's value of the sorted
    field (state, application, name, state_time or ended): pages stay as fast at the
    millionth job as at the first."""
    only(request.query_params, FILTER_PARAMS | {"limit", "after", "at", "offset", "newest",
                                                "sort"})
    user = reader(request)
    flt = job_filter(dict(request.query_params))
    if array is not None:
        flt["array"] = array
    if sort is not None:
        cur = cursor_arg(sort, None if after is None else str(after), at)
    elif at is not None:
        raise WebError(400, "at is the cursor's value of a sort: give sort too", "invalid")
    else:
        cur = after
    return web_of(request).call(user, lambda c: c.jobs(flt, limit=_limit(limit), offset=offset,
                                                       newest=newest, after=cur, sort=sort))


@router.get("/jobs/counts", summary="Jobs by state (with the same filters)")
def job_counts(request: Request, state: str | None = None, app: str | None = None,
               site: str | None = None, group: str | None = None, tag: str | None = None,
               name: str | None = None, owner: str | None = None,
               array: int | None = None) -> dict[str, int]:
    only(request.query_params, FILTER_PARAMS)
    flt = job_filter(dict(request.query_params))
    if array is not None:
        flt["array"] = array
    return web_of(request).call(reader(request), lambda c: c.counts(flt))


@router.get("/groups", summary="Group identifiers in order (after: page on from one)")
def list_groups(request: Request, after: str = "", limit: int = 100) -> dict:
    only(request.query_params, {"after", "limit"})
    return web_of(request).call(reader(request), lambda c: c.groups(after=after, limit=limit))


@router.get("/jobs/{job_id}", summary="One job: every field, argv, attempts, events")
def show_job(request: Request, job_id: int) -> dict:
    only(request.query_params, set())
    return web_of(request).call(reader(request), lambda c: c.job(job_id))


@router.get("/jobs/{job_id}/log", summary="A job's stored output (job.out or job.err)")
def job_log(request: Request, job_id: int, stream: str = "out", after: int = 0,
            tail: int | None = None) -> dict:
    only(request.query_params, {"stream", "after", "tail"})
    return web_of(request).call(reader(request),
                                lambda c: c.job_log(job_id, stream, after, tail))


@router.get("/apps", summary="The app whitelist")
def list_apps(request: Request) -> list[dict]:
    only(request.query_params, set())
    return web_of(request).call(reader(request), lambda c: c.apps())


@router.get("/apps/{name}", summary="One app, with its jobs by state")
def show_app(request: Request, name: str) -> dict:
    only(request.query_params, set())
    return web_of(request).call(reader(request), lambda c: c.app(name))


@router.get("/pilots", summary="Pilots with their agents")
def list_pilots(request: Request, all: bool = False, site: str | None = None) -> list[dict]:
    only(request.query_params, {"all", "site"})
    return web_of(request).call(reader(request), lambda c: c.pilots(all=all, site=site))


@router.get("/agents", summary="Node agents (affinity_ok false: pinned to part of the node)")
def list_agents(request: Request, all: bool = False) -> list[dict]:
    only(request.query_params, {"all"})
    return web_of(request).call(reader(request), lambda c: c.agents(all=all))


@router.get("/sites", summary="Sites whose agents report, with their health")
def list_sites(request: Request) -> list[dict]:
    only(request.query_params, set())
    return web_of(request).call(reader(request), lambda c: c.sites())


@router.get("/status", summary="Jobs by state, queue, agents, the event stream's ends")
def status(request: Request) -> dict:
    only(request.query_params, set())
    st = web_of(request).call(reader(request), lambda c: c.status())
    st.pop("db", None)  # where the database is (its user, its host) is not the web's to tell
    return st


@router.get("/events", summary="Events after a cursor (wait: hold until one comes)")
def events(request: Request, since: int = 0, limit: int = 100, wait: float = 0.0,
           job: int | None = None, group: str | None = None, state: str | None = None,
           kind: str | None = None) -> dict:
    """Ask again with ``since`` = the answer's ``cursor``. ``wait`` up to 30 s."""
    only(request.query_params, {"since", "limit", "wait", "job", "group", "state", "kind"})
    if not 0 <= wait <= 30:
        raise WebError(400, "wait must be 0..30 seconds", "invalid")
    args: dict[str, Any] = {"job": job, "group": group,
                            "state": state.split(",") if state and "," in state else state,
                            "kind": kind.split(",") if kind and "," in kind else kind}
    return web_of(request).call(reader(request), lambda c: c.events(
        since=since, limit=_limit(limit), wait=wait, **args))


# -- change ----------------------------------------------------------------------------------
@router.post("/jobs", status_code=201,
             summary="Add jobs (all or none): a job map, a list of them, or {\"jobs\": [...]}")
async def add_jobs(request: Request) -> dict:
    body = await json_body(request)
    jobs = body["jobs"] if isinstance(body, dict) and set(body) == {"jobs"} else \
        body if isinstance(body, list) else [body]
    return {"ids": await act(request, keys.SUBMITTER, lambda c: c.add_jobs(jobs))}


@router.post("/jobs/{job_id}/kill", summary="Kill a job (body {})")
async def kill_job(request: Request, job_id: int) -> dict:
    await _no_args(request)
    return await act(request, keys.SUBMITTER, lambda c: c.kill_jobs({"ids": [job_id]}))


@router.post("/jobs/{job_id}/retry", summary="Retry a failed or killed job (body {})")
async def retry_job(request: Request, job_id: int) -> dict:
    await _no_args(request)
    return await act(request, keys.SUBMITTER, lambda c: c.retry_jobs({"ids": [job_id]}))


@router.post("/jobs/{job_id}/alter", summary="Change a job's fields (body: the changes)")
async def alter_job(request: Request, job_id: int) -> dict:
    changes = await json_body(request)
    return await act(request, keys.SUBMITTER, lambda c: c.call(
        "job_alter", filter={"ids": [job_id]}, changes=changes))


@router.delete("/jobs/{job_id}", summary="Delete a job and its history")
async def delete_job(request: Request, job_id: int) -> dict:
    return await act(request, keys.SUBMITTER, lambda c: c.remove_jobs({"ids": [job_id]}))


OPS = {"kill": "job_kill", "retry": "job_retry", "alter": "job_alter", "delete": "job_rm"}


@router.post("/jobs/{action}", summary="kill, retry, alter or delete the jobs of a filter "
             "(body {\"filter\": {...}} and for alter \"changes\")")
async def change_jobs(request: Request, action: str) -> dict:
    if action not in OPS:
        raise WebError(404, f"no action {action!r}; actions: {', '.join(OPS)}", "not_found")
    body = await json_body(request)
    if not isinstance(body, dict):
        raise WebError(400, "the body must be a JSON object", "invalid")
    # the server checks the arguments (unknown ones refused) and the filter; the body goes as
    # the op's arguments (not as call()'s keywords: a "timeout" key must not set ours)
    return await act(request, keys.SUBMITTER, lambda c: c._call(OPS[action], body, None))


async def _no_args(request: Request) -> None:
    body = await json_body(request)
    if body not in ({}, None):
        raise WebError(400, "this takes no arguments: send {}", "invalid")

