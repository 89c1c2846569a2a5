"""The HTML pages: jobs, one job (with its actions), pilots and agents, sites, login.

Pages are rendered by jinja2 with autoescape on, so whatever a job or an agent is called shows
as text. A page asked with the header ``X-Live: 1`` (static/live.js, when the event stream
says something on it changed) answers its main part only, which the script puts in place:
pages update without reloading. Actions go GET confirm page -> POST with the session's CSRF
token -> redirect (303) back, with the server's one-line answer shown.
"""
from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from pilotfish import job_sort, keys
from pilotfish.client import FINAL_STATES
from pilotfish.errors import Forbidden, PilotfishError

from .auth import COOKIE, User
from .base import WebError, current_user, cursor_arg, flip, int_arg, need, sort_of, web_of

router = APIRouter(include_in_schema=False)
PER_PAGE = (20, 50, 100, 200)
FILTERS = ("state", "app", "site", "group", "tag", "name")
#: A filtered job table counts by state at most this many jobs (the newest; see job_counts):
#: each costs a row read (PostgreSQL: a heap page each for a group spread over the table),
#: 10,000 cost 100-170 ms on 1M jobs; "1,000+" is what GitLab's lists say too.
COUNT_LIMIT = 1_000
ACTIONS = {"kill": "Kill", "retry": "Retry", "alter": "Alter", "delete": "Delete"}
MAX_FORM = 64 * 1024


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _sid(request: Request) -> str | None:
    """The session of this request (made by the middleware when it came without one)."""
    return getattr(request.state, "sid", None) or request.cookies.get(COOKIE)


def render(request: Request, template: str, user: User | None = None, **ctx: Any) -> str:
    web = web_of(request)
    sid = _sid(request)
    ctx.setdefault("live", "")
    ctx.setdefault("poll", 0)
    ctx.setdefault("live_jobs", "")
    return web.templates.get_template(template).render(
        request=request, user=user, open_mode=web.open_mode,
        fragment=request.headers.get("x-live") == "1",
        csrf=web.auth.csrf(sid) if sid else "", notice=_notice(request),
        **ctx)


#: What an action's redirect may say (?done=...): a link from elsewhere cannot put its own
#: words on a page of ours.
_NOTICE = re.compile(r"job \d{1,19} (killed|retried|altered|deleted)")


def _notice(request: Request) -> str:
    done = request.query_params.get("done", "")
    return done if _NOTICE.fullmatch(done) else ""


def render_error(request: Request, status: int, message: str) -> str:
    try:
        user = current_user(request)
    except WebError:
        user = None
    return render(request, "error.html", user, status=status, message=message)


def page_user(request: Request, role: str = keys.READER) -> User:
    return need(current_user(request), role)


async def form_of(request: Request) -> dict[str, str]:
    """A urlencoded form (small), its CSRF token checked against the session."""
    if request.headers.get("content-type", "").split(";")[0].strip() != \
            "application/x-www-form-urlencoded":
        raise WebError(415, "expected a form", "invalid")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise WebError(413, "the form is too large", "invalid")
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"),
                                         keep_blank_values=True).items()}
    if not web_of(request).auth.csrf_ok(_sid(request), form.get("csrf")):
        raise WebError(403, "the form's CSRF token does not match this session (reload the "
                       "page and try again)", "forbidden")
    return form


# -- login -----------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request):
    return render(request, "login.html", None, error="")


@router.post("/login")
async def login(request: Request):
    form = await form_of(request)
    web = web_of(request)
    user = web.auth.user_of_token(form.get("token", "").strip())
    if user is None:
        return HTMLResponse(render(request, "login.html", None,
                                   error="unknown or revoked token"), status_code=401)
    web.auth.end_session(_sid(request))
    resp = redirect("/jobs")
    # a new session id at login: one planted before it is worth nothing after
    resp.set_cookie(COOKIE, web.auth.new_session(user.name), httponly=True, samesite="strict",
                    path="/")
    return resp


@router.post("/logout")
async def logout(request: Request):
    await form_of(request)
    web_of(request).auth.end_session(_sid(request))
    resp = redirect("/login")
    resp.delete_cookie(COOKIE, path="/")
    return resp


# -- jobs ------------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request):
    user = page_user(request)
    q = request.query_params
    flt = {k: q[k] for k in FILTERS if q.get(k)}
    scope = {k: v for k, v in flt.items() if k != "state"}
    per = int_arg(q.get("per"), "per", 50)
    if per not in PER_PAGE:
        raise WebError(400, f"per must be one of {', '.join(map(str, PER_PAGE))}", "invalid")
    # sort: a whitelisted column (pilotfish.job_sort), newest first by default; the older
    # order=oldest|newest still works
    sort = q.get("sort") or ("id" if q.get("order") == "oldest" else "-id")
    name, desc = sort_of(sort)
    after = cursor_arg(sort, q.get("after"), q.get("at"))
    before = cursor_arg(sort, q.get("before"), q.get("at"))

    def read(c):
        # bounded: a filter matching more than COUNT_LIMIT jobs is counted on its newest
        # COUNT_LIMIT, and the page says so (an exact count reads every matching row)
        counts = c.counts_bounded(scope, COUNT_LIMIT)
        if before is not None:  # the page before: ask the other way from its first row
            rows = c.jobs(flt, limit=per, sort=flip(sort), after=before)[::-1]
        else:
            rows = c.jobs(flt, limit=per, sort=sort, after=after)
        return counts, rows

    got, rows = web_of(request).call(user, read)
    counts, more, scanned = got["counts"], got["more"], got.get("scanned")
    keep = {k: v for k, v in q.items() if k in FILTERS + ("per",)}
    keep["sort"] = sort
    link = lambda **extra: "/jobs?" + urlencode({**keep, **extra})  # noqa: E731

    def at(row: dict, key: str) -> dict:
        cur = job_sort.cursor_of(row, sort)
        return {key: cur} if name == "id" else {key: cur[1], "at": cur[0]}
    pages = {"first": link() if (after is not None or before is not None) else "",
             "prev": link(**at(rows[0], "before")) if rows and (after is not None or
                                                                before is not None) else "",
             "next": link(**at(rows[-1], "after")) if rows and (len(rows) == per or
                                                                 before is not None) else ""}
    states = sorted(counts, key=lambda s: (s in FINAL_STATES, s))
    heads = {k: "/jobs?" + urlencode({**keep, "sort": f"-{k}" if k == name and not desc
                                      else k}) for k in job_sort.SORTS}
    return render(request, "jobs.html", user, rows=rows, counts=counts, states=states,
                  total=sum(counts.values()), flt=flt, more=more, count_limit=COUNT_LIMIT,
                  scanned=scanned,
                  matching=counts.get(flt["state"], 0) if "state" in flt else
                  sum(counts.values()), per=per, sort=sort, sort_name=name, desc=desc,
                  heads=heads, pages=pages,
                  state_link=lambda s: "/jobs?" + urlencode({**scope, "state": s,
                                                             "sort": sort}),
                  live="jobs")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: int):
    user = page_user(request)

    def read(c):
        job = c.job(job_id)
        logs = {s: c.job_log(job_id, s, tail=40) for s in ("out", "err")}
        return job, logs

    job, logs = web_of(request).call(user, read)
    text = {s: b"".join(p[1] for p in r["pieces"]).decode("utf-8", "replace")
            for s, r in logs.items()}
    final = job["state"] in FINAL_STATES
    return render(request, "job.html", user, job=job, logs=logs, text=text, final=final,
                  can_act=user.may(keys.SUBMITTER), live=f"job:{job_id}",
                  poll=0 if final else 3,
                  fields={k: v for k, v in job.items() if k not in (
                      "events", "runs", "argv", "parameters", "tags")})


@router.get("/jobs/{job_id}/confirm", response_class=HTMLResponse)
def confirm_page(request: Request, job_id: int):
    user = page_user(request, keys.SUBMITTER)
    q = request.query_params
    action = q.get("action", "")
    if action not in ACTIONS:
        raise WebError(400, f"no action {action!r}; actions: {', '.join(ACTIONS)}", "invalid")
    job = web_of(request).call(user, lambda c: c.job(job_id))
    field, value = q.get("field", ""), q.get("value", "")
    return render(request, "confirm.html", user, job=job, action=action,
                  label=ACTIONS[action], field=field, value=value)


def _value(text: str) -> Any:
    """An alter value: JSON when it parses (numbers, lists, null), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


@router.post("/jobs/{job_id}/action")
async def job_action(request: Request, job_id: int):
    form = await form_of(request)
    user = page_user(request, keys.SUBMITTER)
    action = form.get("action", "")
    ids = {"ids": [job_id]}
    if action == "kill":
        fn = lambda c: c.kill_jobs(ids)  # noqa: E731
    elif action == "retry":
        fn = lambda c: c.retry_jobs(ids)  # noqa: E731
    elif action == "delete":
        fn = lambda c: c.remove_jobs(ids)  # noqa: E731
    elif action == "alter":
        changes = {form.get("field", ""): _value(form.get("value", ""))}
        fn = lambda c: c.call("job_alter", filter=ids, changes=changes)  # noqa: E731
    else:
        raise WebError(400, f"no action {action!r}; actions: {', '.join(ACTIONS)}", "invalid")
    await run_in_threadpool(web_of(request).call, user, fn)
    if action == "delete":
        return redirect("/jobs?" + urlencode({"done": f"job {job_id} deleted"}))
    done = {"kill": "killed", "retry": "retried", "alter": "altered"}[action]
    return redirect(f"/jobs/{job_id}?" + urlencode({"done": f"job {job_id} {done}"}))


@router.get("/groups", response_class=HTMLResponse)
def groups_page(request: Request):
    """Browse by group_identifier (the edge service's Figure 5): the groups in order, a page
    at a time; each opens the job table filtered to it, with its counts by state."""
    user = page_user(request)
    after = request.query_params.get("after", "")
    r = web_of(request).call(user, lambda c: c.groups(after=after, limit=100))
    return render(request, "groups.html", user, groups=r["groups"],
                  next=("/groups?" + urlencode({"after": r["next"]})) if r["next"] else "",
                  first=bool(after), group_link=lambda g: "/jobs?" + urlencode({"group": g}))


# -- pilots and sites ------------------------------------------------------------------------
@router.get("/pilots", response_class=HTMLResponse)
def pilots_page(request: Request):
    user = page_user(request)
    show_all = request.query_params.get("all") == "1"
    pilots, agents = web_of(request).call(
        user, lambda c: (c.pilots(all=show_all), c.agents(all=show_all)))
    agents.sort(key=lambda a: (a.get("pilot") or "", a.get("node") or a.get("host") or "",
                               a.get("started") or 0))
    pinned = [a for a in agents if a.get("node_cores") is not None and not a["affinity_ok"]]
    return render(request, "pilots.html", user, pilots=pilots, agents=agents, pinned=pinned,
                  show_all=show_all, live="pilots", poll=10)  # (silent: as sites)


@router.get("/sites", response_class=HTMLResponse)
def sites_page(request: Request):
    user = page_user(request)

    def read(c):
        sites = c.sites()
        for s in sites:
            try:
                s["backlog"] = c.site_backlog(s["name"])
            except Forbidden:
                s["backlog"] = None  # a site's backlog is for submitters and admins
            except PilotfishError as exc:
                s["backlog"] = {"error": str(exc)}
        return sites, c.status()

    sites, status = web_of(request).call(user, read)
    # live: backlogs change with job events; a site agent's silence grows with no event at
    # all, so the page also asks again every 10 s (its main part, not a reload)
    return render(request, "sites.html", user, sites=sites, status=status, live="sites",
                  poll=10)


@router.get("/events/stream")
async def event_stream(request: Request):
    from fastapi.responses import StreamingResponse
    page_user(request)
    hub = web_of(request).hub
    return StreamingResponse(hub.stream(request.is_disconnected),
                             media_type="text/event-stream",
                             headers={"X-Accel-Buffering": "no"})
