"""What the pages and the REST API share: the web process's state, who is asking, errors.

Errors: the server's own (:mod:`pilotfish.errors`, raised by the client with the server's
one-line message) map to HTTP statuses here, once; the web adds no validation of its own but
the shape of a request (a JSON body, an integer in a path).
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Callable

import jinja2
from fastapi import Request

from pilotfish import errors, job_sort, keys
from pilotfish.validate import echo

from .auth import COOKIE, Auth, User
from .clients import ClientPool
from .live import EventHub

HERE = Path(__file__).resolve().parent
#: HTTP status of each server error code.
STATUS = {errors.ValidationError.code: 400, errors.ProtocolError.code: 400,
          errors.NotFound.code: 404, errors.Forbidden.code: 403,
          errors.IllegalTransition.code: 409, errors.Pruned.code: 410,
          errors.ServerUnavailable.code: 503, keys.KeyProblem.code: 500}
#: The largest form or JSON body the web reads (a job_add of many jobs goes through the CLI
#: or the Python API; 4 MiB is some thousands of jobs).
MAX_BODY = 4 * 2**20


class WebError(Exception):
    """An error of the web layer itself (no login, wrong role, malformed request)."""

    def __init__(self, status: int, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def status_of(exc: errors.PilotfishError) -> int:
    if isinstance(exc, keys.Refused):
        return 503
    return STATUS.get(getattr(exc, "code", "error"), 400)


def one_line(text: str) -> str:
    return " ".join(str(text).split())[:2000]


def _ts(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


def _dur(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    s = int(value)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else \
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{value:.1f}s"


def make_templates() -> jinja2.Environment:
    # autoescape everything: every value a user or a job wrote is shown as text
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["ts"] = _ts
    env.filters["dur"] = _dur
    env.filters["tojson_text"] = lambda v: json.dumps(v, indent=1, sort_keys=True,
                                                      default=str)
    return env


class Web:
    """The web process: its home, the client pool, the auth state, the live event hub."""

    def __init__(self, home: Path, open_mode: bool, address: str | None = None,
                 web_key: str | None = None) -> None:
        self.home = Path(home)
        self.open_mode = open_mode
        self.pool = ClientPool(home, address)
        self.auth = Auth(home, open_mode)
        self.hub = EventHub(self.pool, web_key)
        self.templates = make_templates()

    def call(self, user: User, fn: Callable, *args: Any, **kw: Any) -> Any:
        """Run ``fn(client, ...)`` with a client of the user's key."""
        with self.pool.client(user.key) as c:
            return fn(c, *args, **kw)


def web_of(request: Request) -> Web:
    return request.app.state.web


def bearer(request: Request) -> str | None:
    h = request.headers.get("authorization")
    if not h:
        return None
    scheme, _, value = h.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise WebError(401, "Authorization must be 'Bearer <token>'", "unauthorized")
    return value.strip()


def current_user(request: Request) -> User | None:
    """The user of this request: a Bearer token, else the session (or the owner in open
    mode); None when nobody is logged in."""
    web = web_of(request)
    token = bearer(request)
    if token is not None:
        user = web.auth.user_of_token(token)
        if user is None:
            raise WebError(401, "unknown or revoked token", "unauthorized")
        return user
    return web.auth.user_of_session(request.cookies.get(COOKIE))


def need(user: User | None, role: str) -> User:
    if user is None:
        raise WebError(401, "log in first (a token: `pilotfish keys token NAME --role ROLE`)",
                       "unauthorized")
    if not user.may(role):
        raise WebError(403, f"{user.label} may not do this: it needs the role {role}",
                       "forbidden")
    return user


def int_arg(value: str | None, what: str, default: int | None = None) -> int | None:
    """An integer from a query or form; its range is the server's to check."""
    if value is None or value == "":
        return default
    try:
        return int(value, 10)
    except ValueError:
        raise WebError(400, f"{what} must be an integer, got {echo(value)}", "invalid") \
            from None


def only(params, allowed: set[str]) -> None:
    """Refuse query parameters an endpoint does not take (a typo is not silently ignored)."""
    unknown = set(params.keys()) - allowed
    if unknown:
        raise WebError(400, f"unknown parameter(s) {', '.join(sorted(map(echo, unknown)))}; "
                       f"this takes {', '.join(sorted(allowed)) or 'none'}", "invalid")


def sort_of(sort: str) -> tuple[str, bool]:
    try:
        return job_sort.parse(sort)
    except errors.ValidationError as exc:
        raise WebError(400, str(exc), "invalid") from None


def flip(sort: str) -> str:
    return sort[1:] if sort.startswith("-") else "-" + sort


def cursor_arg(sort: str, job_id: str | None, at: str | None) -> Any:
    """A keyset cursor from a query: the id alone when sorting by id, else [at, id] (at:
    the sort column's value of that row, a number for the times)."""
    i = int_arg(job_id, "after/before")
    name, _ = sort_of(sort)
    if i is None or name == "id":
        return i
    if at is None:
        raise WebError(400, f"sorting by {name}, a page cursor needs at= (its value)",
                       "invalid")
    if name in ("updated", "ended"):
        try:
            value: Any = float(at)
        except ValueError:
            raise WebError(400, "at must be a time (epoch seconds) for this sort",
                           "invalid") from None
    else:
        value = at
    return [value, i]
