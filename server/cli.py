"""``pilotfish server|app|job``: the admin commands, all built on :class:`Client`."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from pilotfish import console, settings
from pilotfish.errors import PilotfishError, ValidationError

from . import daemon, site_agents
from pilotfish.client import Client

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
JOB_COLUMNS = [("id", "ID"), ("name", "NAME"), ("application", "APP"), ("state", "STATE"),
               ("attempts", "TRIES"), ("group", "GROUP"), ("tags", "TAGS"),
               ("priority", "PRIO"), ("state_time", "SINCE"), ("agent", "AGENT"),
               ("message", "MESSAGE")]


def home_of(ctx: click.Context) -> Path:
    return settings.home(ctx.obj.get("home") if ctx.obj else None)


def client_of(ctx: click.Context) -> Client:
    return Client(address=ctx.obj.get("server"), home=home_of(ctx))


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def parse_kv(items: tuple[str, ...], what: str, typed: bool = False) -> dict[str, Any]:
    """``k=v`` pairs; with ``typed``, a value that parses as JSON (5, true, [1]) is taken so."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValidationError(f"{what} {item!r} must look like key=value")
        k, v = item.split("=", 1)
        if typed:
            try:
                v = json.loads(v)
            except ValueError:
                pass
        out[k] = v
    return out


def load_structured(path: str) -> Any:
    """JSON or YAML from a file, or from standard input for ``-``."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise PilotfishError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValidationError(f"{path}: neither JSON nor YAML: {str(exc).splitlines()[0]}") \
                from None


# -- server ----------------------------------------------------------------------------------
@click.group("server", context_settings=CTX)
def server_group() -> None:
    """Start, stop and inspect the job server."""


@server_group.command("start", context_settings=CTX)
@click.option("-f", "--foreground", is_flag=True, help="Run in this terminal instead of as "
              "a daemon.")
@click.option("--db", "db_url", help="Database URL (default: SQLite file in the home; "
              "e.g. postgresql+psycopg://user@host/db).")
@click.option("--bind", default="tcp://127.0.0.1:*", show_default=True,
              help="ZeroMQ endpoint; '*' as port picks a free one. Use tcp://0.0.0.0:PORT for "
                   "compute nodes on other hosts.")
@click.option("--heartbeat", type=float, default=settings.HEARTBEAT_SECONDS, show_default=True,
              help="Seconds between agent heartbeats; leases expire after "
                   f"{settings.LEASE_HEARTBEATS:g} missed ones.")
@click.option("--insecure", is_flag=True, help="No CurveZMQ: plain text, no authentication. "
              "Only on a loopback bind (tcp://127.0.0.1:PORT) or ipc://; refused otherwise.")
@click.option("--site", "sites", multiple=True, metavar="SITE",
              help="Also run the site agent that keeps pilots queued for this site profile, "
                   "beside the server and stopped with it (repeatable; see `pilotfish site "
                   "agent -h`). Its log: HOME/logs/site-agent-SITE.log.")
@click.option("--site-poll", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds between the site agents' rounds.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.pass_context
def server_start(ctx, foreground, db_url, bind, heartbeat, insecure, sites, site_poll,
                 verbose) -> None:
    """Start the job server (a daemon with a pid file and a log file, or -f).

    tcp:// is CurveZMQ-encrypted and admits only clients whose public key is in
    HOME/keys/authorized/; the first start makes the keys (see `pilotfish keys -h`).
    """
    from pilotfish import keys
    home = home_of(ctx)
    if sites:
        from pilotfish.site_configs.loader import load_site
        for site in sites:
            load_site(site, home)  # a bad name or profile stops here, before anything starts
    db_url = db_url or settings.default_db_url(home)
    if insecure and not keys.is_loopback_bind(bind):
        raise PilotfishError(f"--insecure is refused for {bind}: plain text is only served on "
                             "loopback (tcp://127.0.0.1:PORT) or ipc://")
    if foreground:
        console.setup_logging(verbose)
        if daemon.running_pid(home):
            raise PilotfishError(f"a server is already running for {home} "
                                 f"(pid {daemon.running_pid(home)})")
        daemon.run_foreground(home, db_url, bind, heartbeat, insecure=insecure, sites=sites,
                              site_poll=site_poll)
        return
    info = daemon.start_background(home, db_url, bind, heartbeat, insecure=insecure,
                                   sites=sites, site_poll=site_poll)
    console.out.print(f"server started: pid {info['pid']}, {info['address']}, db {info['db']}\n"
                      f"log: {settings.log_path(home)}")
    for site in sites:
        console.out.print(f"site agent for {site}: log {site_agents.log_path(home, site)}")
    if info.get("curve"):
        console.out.print(f"CurveZMQ: server public key {info['public_key']}; authorized "
                          f"client keys in {keys.authorized_dir(home)}", markup=False)
    elif not info.get("secure"):
        console.err.print(f"warning: INSECURE server (--insecure): plain text, no "
                          f"authentication on {info['address']}", markup=False)


@server_group.command("stop", context_settings=CTX)
@click.pass_context
def server_stop(ctx) -> None:
    """Stop the server of this home."""
    pid = daemon.stop(home_of(ctx))
    console.out.print("no server running" if pid is None else f"server {pid} stopped")


@server_group.command("status", context_settings=CTX)
@json_option
@click.pass_context
def server_status(ctx, as_json) -> None:
    """Is the server up; jobs by state; agents. Exit code 1 when it is not running."""
    home = home_of(ctx)
    try:
        st = client_of(ctx).status()
    except PilotfishError as exc:
        if as_json:
            console.print_json({"running": False, "error": str(exc)})
        else:
            console.out.print(f"not running: {exc}")
        ctx.exit(1)
    st["running"] = True
    st["address"] = settings.server_address(home, ctx.obj.get("server"))
    if as_json:
        console.print_json(st)
        return
    console.out.print(f"running: pid {st['pid']} at {st['address']}, up {st['uptime']:.0f} s, "
                      f"db {st['db']}")
    console.out.print(f"agents alive: {st['agents_alive']} ({st['cores_alive']} cores); "
                      f"queued: {st['queued']}; leased: {st['leases']}")
    console.table([{"state": k, "jobs": v} for k, v in sorted(st["counts"].items())],
                  [("state", "STATE"), ("jobs", "JOBS")])


# -- apps ------------------------------------------------------------------------------------
@click.group("app", context_settings=CTX)
def app_group() -> None:
    """Register and manage apps: the whitelist of what jobs may run."""


def _param_flags(params: tuple[str, ...]) -> dict:
    """``NAME:TYPE[=DEFAULT]`` flags; richer declarations (min, max, pattern, choices) go in -f."""
    out = {}
    for p in params:
        decl, _, default = p.partition("=")
        name, _, ptype = decl.partition(":")
        spec: dict[str, Any] = {"type": ptype or "str"}
        if "=" in p:
            spec["default"] = default
        out[name] = spec
    return out


@app_group.command("add", context_settings=CTX)
@click.argument("name", required=False)
@click.option("-f", "--file", "spec_file", help="App definition (YAML or JSON) to register.")
@click.option("--exec", "executable", help="Absolute path of the executable.")
@click.option("--arg", "args", multiple=True, help="One argv item; may hold {param} "
              "placeholders. Repeat in order.")
@click.option("--param", "params", multiple=True, metavar="NAME:TYPE[=DEFAULT]",
              help="Declare a parameter (int, float, str, choice, path). Repeatable.")
@click.option("--pre", "pre", help="Preprocess executable (absolute path).")
@click.option("--post", "post", help="Postprocess executable (absolute path).")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment for its jobs.")
@click.option("--description", default="")
@json_option
@click.pass_context
def app_add(ctx, name, spec_file, executable, args, params, pre, post, env, description,
            as_json) -> None:
    """Register an app from flags or from a definition file (-f)."""
    if spec_file:
        spec = load_structured(spec_file)
        if name and isinstance(spec, dict):
            spec["name"] = name
    else:
        if not name or not executable:
            raise click.UsageError("give NAME and --exec, or -f FILE")
        spec = {"name": name, "executable": executable, "args": list(args),
                "parameters": _param_flags(params), "environment": parse_kv(env, "--env"),
                "description": description,
                "preprocess": [pre] if pre else None, "postprocess": [post] if post else None}
    app = client_of(ctx).add_app(spec)
    if as_json:
        console.print_json(app)
    else:
        console.out.print(f"app {app['name']} registered (id {app['id']})")


@app_group.command("ls", context_settings=CTX)
@json_option
@click.pass_context
def app_ls(ctx, as_json) -> None:
    """List the registered apps."""
    apps = client_of(ctx).apps()
    if as_json:
        return console.print_json(apps)
    rows = [dict(a, argv=" ".join([a["executable"], *a["args"]]),
                 params=",".join(a["parameters"])) for a in apps]
    console.table(rows, [("name", "NAME"), ("argv", "ARGV TEMPLATE"), ("params", "PARAMETERS"),
                         ("description", "DESCRIPTION")])


@app_group.command("show", context_settings=CTX)
@click.argument("name")
@json_option
@click.pass_context
def app_show(ctx, name, as_json) -> None:
    """Show one app, with its job counts by state."""
    app = client_of(ctx).app(name)
    if as_json:
        return console.print_json(app)
    console.out.print(yaml.safe_dump(app, sort_keys=False).rstrip(), markup=False)  # text


@app_group.command("alter", context_settings=CTX)
@click.argument("name")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Change a key (values parse as JSON when they can, e.g. "
                   "args='[\"-n\",\"{n}\"]').")
@click.option("-f", "--file", "spec_file", help="Keys to change, as YAML or JSON.")
@json_option
@click.pass_context
def app_alter(ctx, name, sets, spec_file, as_json) -> None:
    """Change an app's definition (args and parameters only while it has no unfinished jobs)."""
    changes = load_structured(spec_file) if spec_file else {}
    if not isinstance(changes, dict):
        raise ValidationError(f"{spec_file} must be a map of app keys to change")
    changes.update(parse_kv(sets, "--set", typed=True))
    if not changes:
        raise click.UsageError("nothing to change: give --set KEY=VALUE or -f FILE")
    app = client_of(ctx).alter_app(name, **changes)
    if as_json:
        return console.print_json(app)
    console.out.print(f"app {app['name']} updated")


@app_group.command("rm", context_settings=CTX)
@click.argument("name")
@click.pass_context
def app_rm(ctx, name) -> None:
    """Remove an app that has no jobs."""
    client_of(ctx).remove_app(name)
    console.out.print(f"app {name} removed")
