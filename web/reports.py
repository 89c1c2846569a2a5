"""Utilization and usage on the web: the pages ``/utilization`` and ``/usage``, their REST
``/api/utilization`` and ``/api/usage`` (JSON = what ``Client.utilization``/``Client.usage``
return, as ``pilotfish plot … --json`` / ``report usage --json`` print) and the plots
``/api/plots/utilization.{png,svg}`` and ``/api/plots/usage.{png,svg}`` (``web/plots.py``'s
bytes, the same drawing as ``pilotfish plot``). One path: the user's key asks the server
through the client, times are read by :func:`pilotfish.timespec.parse_range` as the CLI
reads them, and the server checks the rest (ranges, caps, unknown pilots or sites).

A page resolves the range once (the server's answer says which since/until it used) and
puts those epoch seconds in the image and download links, so "2h" means the same interval
in the figures and in the picture beside them. Drawing runs in the threadpool (sync routes;
matplotlib takes tens of milliseconds to a second and must not hold the event loop), one
drawing at a time: pyplot's figure registry is not thread-safe. The answers for a fixed
range (since and until both given, as the page's links give them) are kept a minute
(:class:`Recent`; a page keeps its answer under the range the server fixed, which its links
name), and so are the images drawn from them, so the page, its image and a download ask the
server once and draw once: on a million jobs one answer is seconds of
chunked requests, and a drawing takes matplotlib about half a second.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from pilotfish import keys
from pilotfish.errors import NotFound, ValidationError
from pilotfish.timespec import parse_range
from pilotfish.usage import MEASURES, parse_by, utc

from .base import WebError, current_user, need, one_line, only, web_of
from .pages import page_user, render

pages = APIRouter(include_in_schema=False)
api = APIRouter(prefix="/api", tags=["api"])

UTIL_PARAMS = {"site", "pilot", "since", "until", "step"}
USAGE_PARAMS = {"by", "since", "until"}
MEDIA = {"png": "image/png", "svg": "image/svg+xml"}
#: Rows a usage page shows (the JSON has them all, up to the client's 100,000 groups).
MAX_TABLE_ROWS = 2000
#: What the by= selector offers (any other valid list works when typed in the URL).
BY_CHOICES = ("site,day", "site,month", "app,day", "app,month", "group,day", "group,month",
              "site,app,month", "site", "app", "group", "day", "month")
_DRAW = threading.Lock()


class Recent:
    """The last few answers for fixed ranges, each kept ``ttl`` seconds, per user key.

    Only a range with both ends given, and over, is kept: "the last day" moves with the
    clock, a range reaching into the future still fills. A few
    entries only (a utilization answer is up to ~20,000 points, an image up to a few
    hundred kB)."""

    def __init__(self, size: int = 8, ttl: float = 60.0) -> None:
        self.size, self.ttl = size, ttl
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def _key(user, kind: str, args: dict):
        if args.get("since") is None or args.get("until") is None or \
                args["until"] > time.time():  # (a range not over yet still changes)
            return None
        return (user.key, user.name, kind,
                tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                             for k, v in args.items())))

    def get(self, user, kind: str, args: dict, fn):
        key = self._key(user, kind, args)
        if key is None:
            return fn()
        with self.lock:
            hit = self.items.get(key)
            if hit and time.monotonic() - hit[0] < self.ttl:
                self.items.move_to_end(key)
                return hit[1]
        value = fn()
        self.put(user, kind, args, value)
        return value

    def put(self, user, kind: str, args: dict, value) -> None:
        """Keep ``value`` as the answer for ``args`` (when they are a fixed, past range)."""
        key = self._key(user, kind, args)
        if key is None:
            return
        with self.lock:
            self.items[key] = (time.monotonic(), value)
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


RECENT = Recent()


def ask_utilization(request: Request, user, args: dict) -> dict:
    web = web_of(request)
    return RECENT.get(user, "utilization", args,
                      lambda: web.call(user, lambda c: c.utilization(**args)))


def ask_usage(request: Request, user, args: dict) -> dict:
    web = web_of(request)
    return RECENT.get(user, "usage", args, lambda: web.call(user, lambda c: c.usage(**args)))


def _reader(request: Request):
    return need(current_user(request), keys.READER)


def _text(q, name: str) -> str | None:
    v = q.get(name)
    return v if v not in (None, "") else None


def _step(q) -> float | None:
    v = _text(q, "step")
    if v is None:
        return None
    try:
        step = float(v)
    except ValueError:
        raise WebError(400, "step must be a number of seconds", "invalid") from None
    return step  # its range (and NaN, inf) is the server's to refuse


def util_args(q) -> dict[str, Any]:
    """Client.utilization's arguments from a query: times as the CLI reads them."""
    since, until = parse_range(_text(q, "since"), _text(q, "until"), time.time())
    return {"site": _text(q, "site"), "pilot": _text(q, "pilot"), "since": since,
            "until": until, "step": _step(q)}


def usage_args(q) -> dict[str, Any]:
    since, until = parse_range(_text(q, "since"), _text(q, "until"), time.time())
    return {"by": parse_by(q.get("by", "site,day")), "since": since, "until": until}


def _measure(q) -> str:
    m = q.get("measure") or "core_hours"
    if m not in MEASURES:
        raise WebError(400, f"measure must be one of {', '.join(MEASURES)}", "invalid")
    return m


def _fmt(fmt: str) -> str:
    if fmt not in MEDIA:
        raise WebError(404, "plots are .png or .svg", "not_found")
    return fmt


def _draw(fn, *args, **kw) -> bytes:
    with _DRAW:
        return fn(*args, **kw)


def _image(data: bytes, fmt: str, name: str) -> Response:
    return Response(data, media_type=MEDIA[fmt],
                    headers={"Content-Disposition": f'inline; filename="{name}.{fmt}"'})


def _exact(t: float) -> str:
    """An epoch second for a link: repr keeps every bit, so the image asks the same range
    (before 1973 an epoch is too short for parse_when: an ISO time, to the microsecond)."""
    if t >= 1e8:
        return repr(float(t))
    from datetime import datetime, timezone
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


def util_link(u: dict) -> str:
    """The query of an answer's own range (site, pilot, since, until)."""
    return urlencode({k: v for k, v in (("site", u["site"]), ("pilot", u["pilot"]),
                                        ("since", _exact(u["since"])),
                                        ("until", _exact(u["until"]))) if v is not None})


def usage_link(rep: dict) -> str:
    return urlencode({"by": ",".join(rep["by"]), "since": _exact(rep["since"]),
                      "until": _exact(rep["until"])})


# -- REST --------------------------------------------------------------------------------------
@api.get("/utilization", summary="Busy cores against time (Client.utilization)")
def utilization(request: Request, site: str | None = None, pilot: str | None = None,
                since: str | None = None, until: str | None = None,
                step: str | None = None) -> dict:
    """``since``/``until`` as the CLI takes them (``2h``, ``2026-12-01T10:30``, epoch
    seconds; default the last day); at most 400 days."""
    only(request.query_params, UTIL_PARAMS)
    args = util_args(request.query_params)
    return ask_utilization(request, _reader(request), args)


@api.get("/usage", summary="Jobs and core-hours per site, app, group, day or month "
         "(Client.usage)")
def usage(request: Request, by: str = "site,day", since: str | None = None,
          until: str | None = None) -> dict:
    """``by``: any of site, app, group with day or month, comma-separated (default
    site,day; empty: one row of totals); ``since``/``until`` as the CLI takes them (default
    the last 30 days)."""
    only(request.query_params, USAGE_PARAMS)
    args = usage_args(request.query_params)
    return ask_usage(request, _reader(request), args)


@api.get("/plots/utilization.{fmt}", summary="The utilization plot (png or svg)",
         response_class=Response)
def utilization_plot(request: Request, fmt: str, site: str | None = None,
                     pilot: str | None = None, since: str | None = None,
                     until: str | None = None, step: str | None = None):
    only(request.query_params, UTIL_PARAMS)
    fmt = _fmt(fmt)
    args = util_args(request.query_params)
    user = _reader(request)
    from .plots import utilization_image
    data = RECENT.get(user, f"utilization.{fmt}", args, lambda: _draw(
        utilization_image, ask_utilization(request, user, args), fmt))
    return _image(data, fmt, "utilization")


@api.get("/plots/usage.{fmt}", summary="The usage plot: stacked bars per period (png or svg)",
         response_class=Response)
def usage_plot(request: Request, fmt: str, by: str = "site,day", since: str | None = None,
               until: str | None = None, measure: str = "core_hours"):
    only(request.query_params, USAGE_PARAMS | {"measure"})
    fmt = _fmt(fmt)
    m = _measure(request.query_params)
    args = usage_args(request.query_params)
    user = _reader(request)
    from .plots import usage_image
    data = RECENT.get(user, f"usage.{fmt}.{m}", args, lambda: _draw(
        usage_image, ask_usage(request, user, args), fmt, measure=m))
    return _image(data, fmt, "usage")


# -- pages -------------------------------------------------------------------------------------
def _page(request: Request, template: str, user, status: int = 200, **ctx) -> HTMLResponse:
    return HTMLResponse(render(request, template, user, **ctx), status_code=status)


@pages.get("/utilization", response_class=HTMLResponse)
def utilization_page(request: Request):
    """The LIGO plot: busy cores against time for a site, a pilot or a range; the figures
    beside it; PNG and SVG downloads. A bad form shows its one-line error on the page."""
    user = page_user(request)
    q = request.query_params
    only(q, UTIL_PARAMS - {"step"})
    form = {k: q.get(k, "") for k in ("site", "pilot", "since", "until")}
    try:
        args = util_args(q)
        u = ask_utilization(request, user, args)
        # what the image and downloads will ask (the range the server fixed): asked once
        RECENT.put(user, "utilization", {**args, "since": u["since"], "until": u["until"]}, u)
    except (ValidationError, NotFound) as exc:
        return _page(request, "utilization.html", user, 404 if isinstance(exc, NotFound)
                     else 400, form=form, error=one_line(str(exc)), u=None, links={})
    qs = util_link(u)
    links = {"png": f"/api/plots/utilization.png?{qs}", "svg": f"/api/plots/utilization.svg?{qs}",
             "json": f"/api/utilization?{qs}"}
    return _page(request, "utilization.html", user, form=form, error="", u=u, links=links,
                 span=(utc(u["since"]), utc(u["until"])), core_hours=u["core_seconds"] / 3600)


@pages.get("/usage", response_class=HTMLResponse)
def usage_page(request: Request):
    """The edge service's Figure 7: jobs and core-hours per site, app or group per day or
    month, as a table and stacked bars."""
    user = page_user(request)
    q = request.query_params
    only(q, USAGE_PARAMS | {"measure"})
    form = {"by": q.get("by", "site,day"), "since": q.get("since", ""),
            "until": q.get("until", ""), "measure": q.get("measure") or "core_hours"}
    choices = BY_CHOICES if form["by"] in BY_CHOICES else (form["by"],) + BY_CHOICES
    ctx = dict(form=form, choices=choices, measures=MEASURES)
    try:
        m = _measure(q)
        args = usage_args(q)
        rep = ask_usage(request, user, args)
        RECENT.put(user, "usage", {**args, "since": rep["since"], "until": rep["until"]}, rep)
    except (ValidationError, NotFound, WebError) as exc:
        return _page(request, "usage.html", user, getattr(exc, "status", 400), **ctx,
                     error=one_line(str(exc)), rep=None, links={})
    qs = usage_link(rep)
    links = {fmt: f"/api/plots/usage.{fmt}?{qs}&{urlencode({'measure': m})}" for fmt in MEDIA}
    links["json"] = f"/api/usage?{qs}"
    return _page(request, "usage.html", user, **ctx, error="", rep=rep, links=links,
                 rows=rep["rows"][:MAX_TABLE_ROWS], cut=len(rep["rows"]) > MAX_TABLE_ROWS,
                 span=(utc(rep["since"]), utc(rep["until"])))
