"""The ASGI application: FastAPI with jinja2 pages under / and the REST API under /api/.

Imported only by the web process (``pilotfish web``): fastapi and uvicorn never load at CLI
start-up.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from pilotfish import __version__
from pilotfish.errors import PilotfishError

from . import api, pages, reports, workflows
from .auth import COOKIE, is_loopback_host, split_hostport
from .base import HERE, Web, WebError, one_line, status_of

log = logging.getLogger("pilotfish.web")

#: No inline script or style anywhere: the CSP forbids them, so an injected <script> in a
#: page could not run even if escaping failed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cross-Origin-Opener-Policy": "same-origin", "Cache-Control": "no-store"}


def create_app(home: Path, open_mode: bool, address: str | None = None,
               web_key: str | None = None, on_stop=None) -> FastAPI:
    web = Web(home, open_mode, address, web_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        web.hub.start(asyncio.get_running_loop())
        yield
        web.hub.stop()
        web.pool.close()
        if on_stop:  # (uvicorn ends a SIGTERM by raising it again: no finally runs after)
            on_stop()

    app = FastAPI(title="pilotfish", version=__version__, openapi_url="/api/openapi.json",
                  docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="The pilotfish job server over HTTP: a client of the server "
                  "like the CLI. Authorization: Bearer <token> (`pilotfish keys token`).")
    app.state.web = web

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if web.open_mode and not is_loopback_host(split_hostport(host)[0]):
            # an open dashboard answers to loopback names only: a page of another site whose
            # name resolves to 127.0.0.1 (DNS rebinding) gets nothing
            response = JSONResponse({"error": "this open dashboard answers loopback names "
                                     "only", "code": "forbidden"}, status_code=403)
        else:
            new_sid = None
            if not request.url.path.startswith(("/api/", "/static/")) and \
                    web.auth.session(request.cookies.get(COOKIE)) is None:
                # every page view has a session: its CSRF token binds the forms to it
                new_sid = request.state.sid = web.auth.new_session()
            response = await call_next(request)
            if new_sid and COOKIE not in response.headers.get("set-cookie", ""):
                response.set_cookie(COOKIE, new_sid, httponly=True, samesite="strict",
                                    path="/")
        for k, v in HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    def error_response(request: Request, status: int, message: str, code: str):
        message = one_line(message)
        if request.url.path.startswith("/api/") or \
                "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"error": message, "code": code}, status_code=status)
        if status == 401:
            return pages.redirect("/login")
        return HTMLResponse(pages.render_error(request, status, message), status_code=status)

    @app.exception_handler(WebError)
    async def web_error(request: Request, exc: WebError):
        return error_response(request, exc.status, str(exc), exc.code)

    @app.exception_handler(PilotfishError)
    async def server_error(request: Request, exc: PilotfishError):
        return error_response(request, status_of(exc), str(exc), exc.code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "path",
                                                                           "body"))
        return error_response(request, 400, f"{where or 'request'}: "
                              f"{first.get('msg', 'invalid')}", "invalid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, str(exc.detail), "error")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("%s %s", request.method, request.url.path)
        return error_response(request, 500, f"internal error ({type(exc).__name__}); see the "
                              "web log", "internal")

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    app.include_router(reports.api)
    app.include_router(workflows.api)
    app.include_router(pages.router)
    app.include_router(reports.pages)
    app.include_router(workflows.pages)
    return app
