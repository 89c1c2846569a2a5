"""Workflows (the seed's Argo jobs) on the dashboard: a list with state, subjob progress and
routing key, a page per workflow with its subjobs (each a link to its job page) and its state
history, and the same as JSON under /api/workflows. Both are the ``workflow_ls`` and
``workflow_show`` ops with the user's key; the pages follow the event stream (live.js:
``workflows`` on any workflow event, ``workflow:ID`` on its own events and its subjobs')."""
from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from pilotfish import keys

from .base import WebError, current_user, int_arg, need, only, web_of
from .pages import page_user, render

pages = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/api", tags=["api"])
PER_PAGE = 100
#: Subjob ids a workflow page names for live.js at most (a bigger workflow refreshes on its
#: own events and on "many").
MAX_LIVE_JOBS = 2000
FILTERS = ("state", "group", "owner")
MAX_LIMIT = 1000


def _filter(q) -> dict:
    f = {k: q[k] for k in FILTERS if q.get(k)}
    if "state" in f and "," in f["state"]:
        f["state"] = [s for s in f["state"].split(",") if s]
    return f


@pages.get("/workflows", response_class=HTMLResponse)
def workflows_page(request: Request):
    user = page_user(request)
    q = request.query_params
    only(q, set(FILTERS) | {"page"})
    flt = _filter(q)
    page = int_arg(q.get("page"), "page", 1)
    if not 1 <= page <= 10**6:
        raise WebError(400, "page must be 1..1000000", "invalid")
    rows = web_of(request).call(user, lambda c: c.workflows(
        flt, limit=PER_PAGE + 1, offset=(page - 1) * PER_PAGE))
    more = len(rows) > PER_PAGE
    link = lambda p: "/workflows?" + urlencode({**flt, "page": p})  # noqa: E731
    return render(request, "workflows.html", user, rows=rows[:PER_PAGE], flt=flt, page=page,
                  prev=link(page - 1) if page > 1 else "", next=link(page + 1) if more else "",
                  live="workflows")


@pages.get("/workflows/{wf_id}", response_class=HTMLResponse)
def workflow_page(request: Request, wf_id: int):
    user = page_user(request)
    only(request.query_params, set())
    wf = web_of(request).call(user, lambda c: c.workflow(wf_id))
    subs = wf["subjob_list"]
    return render(request, "workflow.html", user, wf=wf, subs=subs, live=f"workflow:{wf_id}",
                  live_jobs=",".join(str(s["job"]) for s in subs[:MAX_LIVE_JOBS]))


@api.get("/workflows", summary="Workflows (filters state, group, owner; offset paging)")
def list_workflows(request: Request, state: str | None = None, group: str | None = None,
                   owner: str | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
    """``state`` may list several, comma-separated; ``done`` of ``subjobs`` finished."""
    only(request.query_params, set(FILTERS) | {"limit", "offset"})
    if not 1 <= limit <= MAX_LIMIT:
        raise WebError(400, f"limit must be 1..{MAX_LIMIT}, got {limit}", "invalid")
    user = need(current_user(request), keys.READER)
    flt = _filter(request.query_params)
    return web_of(request).call(user, lambda c: c.workflows(flt, limit=limit, offset=offset))


@api.get("/workflows/{wf_id}", summary="One workflow: fields, subjobs (subjob_list), events")
def show_workflow(request: Request, wf_id: int) -> dict:
    only(request.query_params, set())
    user = need(current_user(request), keys.READER)
    return web_of(request).call(user, lambda c: c.workflow(wf_id))
