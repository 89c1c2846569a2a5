"""``pilotfish web`` (the dashboard and REST API) and ``pilotfish keys token`` (its tokens).

Imported at CLI start-up: fastapi and uvicorn are imported inside the command only.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import click

from pilotfish import console, keys, settings
from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.validate import echo

from . import tokens
from .auth import is_loopback_host, split_hostport

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEFAULT_BIND = "127.0.0.1:8080"
#: The web process's own client key: it follows the event stream with it (role reader).
WEB_KEY = "web"
log = logging.getLogger("pilotfish.web")


def _home(ctx: click.Context) -> Path:
    return settings.home((ctx.obj or {}).get("home"))


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0: any free one)."""
    host, port = split_hostport(bind)
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535 or len(bind) > 300:
        raise ValidationError(f"--bind {echo(bind)}: expected HOST:PORT, e.g. 127.0.0.1:8080 "
                              "or 0.0.0.0:8443")
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        raise ValidationError(f"--bind {echo(bind)}: no such address {echo(host)}") from None
    return host, int(port)


def web_info_path(home: Path) -> Path:
    return settings.home(home) / "web.json"


def ensure_web_key(home: Path) -> str | None:
    """The web's own reader key (made at its first start in a home with CurveZMQ keys), or
    None when the home has none (an --insecure or ipc:// server: no keys at all)."""
    d = keys.keys_dir(home)
    if not (d / f"{keys.SERVER}{keys.PUBLIC}").exists() and \
            not (d / f"{keys.SERVER}{keys.SECRET}").exists():
        return None
    if not (d / f"{WEB_KEY}{keys.SECRET}").exists():
        if (keys.authorized_dir(home) / f"{WEB_KEY}{keys.PUBLIC}").exists():
            raise PilotfishError(f"a key named {WEB_KEY!r} is authorized but its pair is not in "
                                 f"{d}; `pilotfish keys revoke {WEB_KEY}` and start again")
        keys.new_client(home, WEB_KEY, keys.READER)
    return WEB_KEY


@click.command("web", context_settings=CTX)
@click.option("--bind", default=DEFAULT_BIND, show_default=True, metavar="HOST:PORT",
              help="Where to serve HTTP. On a loopback address it runs open for one user (you: "
                   "admin, with the home's client key) unless --token-required; anywhere else "
                   "every request needs a token (`pilotfish keys token -h`).")
@click.option("--token-required", is_flag=True, help="Ask for a token on loopback too.")
@click.option("--check", is_flag=True, help="Check the options and that the web libraries are "
              "installed, then exit (what `server start --web` runs first).")
@click.option("-v", "--verbose", count=True, help="More log output (-v: every request).")
@click.pass_context
def web_cmd(ctx, bind, token_required, check, verbose) -> None:
    """The web dashboard and REST API (/api/, schema at /api/openapi.json).

    A client of the job server like the CLI: pages for jobs (filters, group browse, paging),
    one job (fields, attempts, history, output; kill, retry, alter, delete), pilots and agents,
    sites; they update live from the server's event stream. Put TLS in front of it (a reverse
    proxy) when it serves beyond this machine: tokens and cookies travel in its requests.
    """
    home = _home(ctx)
    host, port = parse_bind(bind)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise PilotfishError(f"the web dashboard needs fastapi and uvicorn: pip install "
                             f"'pilotfish[web]' ({exc})") from None
    if check:
        return
    open_mode = is_loopback_host(host) and not token_required
    console.setup_logging(verbose)
    web_key = ensure_web_key(home)
    address = (ctx.obj or {}).get("server") or None
    serve(home, host, port, open_mode, address, web_key, verbose)


def serve(home: Path, host: str, port: int, open_mode: bool, address: str | None,
          web_key: str | None, verbose: int = 0) -> None:
    import uvicorn

    from .app import create_app
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise PilotfishError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    port = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{port}/"
    if open_mode:
        log.warning("OPEN web dashboard at %s: NO LOGIN. Anyone who can connect to this "
                    "machine's loopback acts as you (admin, with the home's client key). Use "
                    "--token-required to ask for tokens here too.", url)
    else:
        log.warning("web dashboard at %s: every request needs a token (pilotfish keys token)",
                    url)
    info = web_info_path(home)
    fd = os.open(info, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "pid": os.getpid(), "open": open_mode,
                   "started": time.time()}, f)
    console.out.print(f"web: serving {url}" + (" (open: no login)" if open_mode else
                                               " (tokens required)"), markup=False)
    app = create_app(home, open_mode, address, web_key,
                     on_stop=lambda: info.unlink(missing_ok=True))
    config = uvicorn.Config(app, log_level="info" if verbose else "warning",
                            access_log=verbose > 0, timeout_graceful_shutdown=3,
                            server_header=False, proxy_headers=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        info.unlink(missing_ok=True)


@click.command("token", context_settings=CTX)
@click.argument("name", required=False)
@click.option("--role", type=click.Choice(tokens.TOKEN_ROLES), default=keys.READER,
              show_default=True, help="reader: view; submitter: add jobs and act on the "
              "jobs added with this token; admin: everything.")
@click.option("--revoke", "revoke", is_flag=True, help="Remove the token NAME and its key.")
@click.option("--ls", "listing", is_flag=True, help="List the tokens (names and roles only).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def token_cmd(ctx, name, role, revoke, listing, as_json) -> None:
    """Tokens for the web dashboard and REST API (`pilotfish web`).

    `keys token NAME --role ROLE` prints a new token once; only its hash is kept
    (HOME/keys/web_tokens.json, owner-only). The web acts for it with a client key of its own,
    web-NAME, whose role is the token's (`keys role web-NAME ROLE` changes it); jobs added with
    the token are owned by that key. Use it as `Authorization: Bearer TOKEN` or on the login
    page.
    """
    home = _home(ctx)
    if listing:
        rows = tokens.listing(home)
        if as_json:
            return console.print_json(rows)
        if not rows:
            console.out.print("no tokens")
            return
        console.table([{**r, "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(
            r["created"])) if r["created"] else ""} for r in rows],
            [("name", "NAME"), ("role", "ROLE"), ("key", "KEY"), ("created", "CREATED (UTC)")])
        return
    if not name:
        raise click.UsageError("name a token (or --ls)")
    if revoke:
        tokens.revoke(home, name)
        if as_json:
            return console.print_json({"revoked": name})
        console.out.print(f"token {name} revoked (and its key {tokens.key_name(name)})")
        return
    token = tokens.create(home, name, role)
    if as_json:
        return console.print_json({"name": name, "role": role, "token": token,
                                   "key": tokens.key_name(name)})
    console.out.print(f"token {name} ({role}); it is shown only now:\n{token}", markup=False)
