"""``pilotfish server|app|job``: the admin commands, all built on :class:`Client`."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from pilotfish import console, settings
from pilotfish.clitypes import PLAIN_FLOAT, PLAIN_INT, plain_float  # noqa: F401  (job_cli imports them here)
from pilotfish.errors import PilotfishError, ServerUnavailable, ValidationError

from . import daemon, site_agents
from pilotfish.client import Client
from pilotfish.textfile import read_text

#: Seconds `server status` waits for a live server's answer before it says so.
STATUS_WAIT = 10.0
CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
JOB_COLUMNS = [("id", "ID"), ("name", "NAME"), ("application", "APP"), ("state", "STATE"),
               ("attempts", "TRIES"), ("group", "GROUP"), ("tags", "TAGS"),
               ("priority", "PRIO"), ("state_time", "SINCE"), ("agent", "AGENT"),
               ("node", "NODE"), ("message", "MESSAGE")]


def home_of(ctx: click.Context) -> Path:
    return settings.home(ctx.obj.get("home") if ctx.obj else None)


def client_of(ctx: click.Context) -> Client:
    home = home_of(ctx)
    explicit = ctx.obj.get("server") or os.environ.get("PILOTFISH_SERVER")
    if not explicit:
        dead_server(home)
    return Client(address=explicit, home=home)


def dead_server(home: Path) -> None:
    """Raise at once when server.json names a server that /proc says is gone (kill -9, a
    zombie, a reused pid): a request would otherwise wait the client's whole timeout."""
    info = settings.read_server_info(home)
    if info and daemon.running_pid(home) is None:
        raise ServerUnavailable(f"no server is running for {home} (pid {info.get('pid')} of "
                                "server.json is gone or is not a pilotfish server); start one "
                                "with `pilotfish server start`")




def _json_value(text: str) -> Any:
    """A --set value as JSON when it is JSON (5, true, [1], {"a": 1}), else the text; numbers
    only as plain numerals (json takes NaN and Infinity, which no field accepts)."""
    def refuse(name):
        raise ValueError(name)
    try:
        return json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError):
        return text


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
            v = _json_value(v)
        out[k] = v
    return out


def load_structured(path: str) -> Any:
    """JSON or YAML from a file, or from standard input for ``-``."""
    try:
        text = sys.stdin.read() if path == "-" else read_text(path)
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
@click.option("--heartbeat", type=PLAIN_FLOAT, default=settings.HEARTBEAT_SECONDS,
              show_default=True,
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
@click.option("--data-root", "data_roots", multiple=True, metavar="DIR",
              help="A directory jobs' input_url/output_url may name (repeatable; also "
                   "$PILOTFISH_DATA_ROOTS and the --site profiles' data_roots; default: "
                   "HOME/data). Nothing else of the home is ever allowed.")
@click.option("--events-keep", metavar="DURATION",
              help="Prune events older than this (30d, 12h, 2w) as the server runs, a bounded "
                   "chunk at a time (default: keep them; `pilotfish events prune` by hand).")
@click.option("--amqp", "amqp", metavar="CONFIG.yaml",
              help="Also run the AMQP bridge with these settings (see `pilotfish bridge amqp "
                   "-h`; the password in a password_file, never in the YAML's url), beside the "
                   "server and stopped with it, with a submitter key of its own. Its log: "
                   "HOME/logs/amqp-bridge.log.")
@click.option("--mail", "mail", metavar="CONFIG.yaml",
              help="Also run `pilotfish mail` with these settings (e-mail to workflows' "
                   "addresses when they end; the SMTP password in a password_file or "
                   "$PILOTFISH_SMTP_PASSWORD, never in the YAML), beside the server and "
                   "stopped with it, with a reader key of its own. Its log: HOME/logs/mail.log.")
@click.option("--federate", "federate", metavar="CONFIG.yaml",
              help="Also run `pilotfish federate` with these settings: jobs of remote sites "
                   "(other pilotfish servers, over RabbitMQ) are forwarded there and their "
                   "status mirrored here. Restarted when it exits, stopped with the server, "
                   "with an admin key of its own. Its log: HOME/logs/federate.log.")
@click.option("--web", "web", metavar="HOST:PORT",
              help="Also run the web dashboard and REST API there (see `pilotfish web -h`: open "
                   "on loopback, tokens elsewhere), beside the server and stopped with it. Its "
                   "log: HOME/logs/web.log.")
@click.option("--output-cap", metavar="SIZE", help="Task output kept for `job log`: at most "
              f"this much of each task's job.out and of its job.err (default "
              f"{settings.OUTPUT_CAP // 2**20}M, at most {settings.OUTPUT_MAX // 2**20}M; 0: "
              f"ship none); the rest stays in the workdir. Also ${settings.OUTPUT_CAP_ENV}.")
@click.option("--output-rate", metavar="SIZE", help="Bytes of task output each agent ships a "
              f"second, at most (default {settings.OUTPUT_RATE // 2**10}K). Also "
              f"${settings.OUTPUT_RATE_ENV}.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.pass_context
def server_start(ctx, foreground, db_url, bind, heartbeat, insecure, sites, site_poll,
                 data_roots, events_keep, amqp, mail, web, federate, output_cap,
                 output_rate, verbose) -> None:
    """Start the job server (a daemon with a pid file and a log file, or -f).

    tcp:// is CurveZMQ-encrypted and admits only clients whose public key is in
    HOME/keys/authorized/; the first start makes the keys (see `pilotfish keys -h`).
    """
    from pilotfish import keys
    home = home_of(ctx)
    # the output limits reach the server (a daemon too) through its environment
    for name, value in ((settings.OUTPUT_CAP_ENV, output_cap),
                        (settings.OUTPUT_RATE_ENV, output_rate)):
        if value is not None:
            os.environ[name] = value
    try:
        settings.output_limits()
    except ValueError as exc:
        raise PilotfishError(str(exc)) from None
    roots = list(data_roots)
    if sites:
        from pilotfish.site_configs.loader import load_site
        for site in sites:
            # a bad name or profile stops here, before anything starts
            roots += load_site(site, home).expanded_data_roots()
    from pilotfish import dataroots
    dataroots.make(home, roots + dataroots.from_env())  # a bad root stops here too
    roots = list(dict.fromkeys(roots))
    if events_keep is not None:
        from .gc_files import parse_duration
        parse_duration(events_keep)  # a bad duration stops here, before anything starts
    if amqp:
        amqp = os.path.abspath(amqp)
        check_bridge_config(home, amqp)  # a bad config stops here, before anything starts
    if mail:
        mail = os.path.abspath(mail)
        check_bridge_config(home, mail, "mail")
    if federate:
        federate = os.path.abspath(federate)
        check_bridge_config(home, federate, "federate")
    if web:
        check_web_bind(home, web)  # a bad address or missing fastapi stops here too
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
                              site_poll=site_poll, data_roots=roots, events_keep=events_keep,
                              amqp=amqp, mail=mail, web=web, federate=federate)
        return
    info = daemon.start_background(home, db_url, bind, heartbeat, insecure=insecure,
                                   sites=sites, site_poll=site_poll, data_roots=roots,
                                   events_keep=events_keep, amqp=amqp, mail=mail, web=web,
                                   federate=federate)
    console.out.print(f"server started: pid {info['pid']}, {info['address']}, db {info['db']}\n"
                      f"log: {settings.log_path(home)}")
    for site in sites:
        console.out.print(f"site agent for {site}: log {site_agents.log_path(home, site)}")
    if amqp:
        console.out.print(f"AMQP bridge: log {site_agents.bridge_log_path(home)}")
    if mail:
        console.out.print(f"mail: log {site_agents.mail_log_path(home)}")
    if federate:
        console.out.print(f"federate: log {site_agents.federate_log_path(home)}")
    if web:
        console.out.print(f"web dashboard: http://{web}/ (log {site_agents.web_log_path(home)})",
                          markup=False)
    if info.get("curve"):
        console.out.print(f"CurveZMQ: server public key {info['public_key']}; authorized "
                          f"client keys in {keys.authorized_dir(home)}", markup=False)
    elif not info.get("secure"):
        console.err.print(f"warning: INSECURE server (--insecure): plain text, no "
                          f"authentication on {info['address']}", markup=False)


def check_bridge_config(home: Path, config: str, what: str = "amqp") -> None:
    """Ask the bridge (or mail) command itself to check its config (the server room does not
    import the bridge): a one-line error now instead of a process that fails in its log."""
    import subprocess
    cmd = {"amqp": ["bridge", "amqp"], "mail": ["mail"], "federate": ["federate"]}[what]
    r = subprocess.run([sys.executable, "-m", "pilotfish", "--home", str(home), *cmd,
                        "--config", config, "--check"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        why = lines[-1].removeprefix("pilotfish: error: ") if lines else "invalid"
        raise PilotfishError(f"--{what} {config}: {why}")


def check_web_bind(home: Path, bind: str) -> None:
    """Ask the web command to check its options (the server room does not import the web)."""
    import subprocess
    r = subprocess.run([sys.executable, "-m", "pilotfish", "--home", str(home), "web", "--bind",
                        bind, "--check"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        why = lines[-1].removeprefix("pilotfish: error: ") if lines else "invalid"
        raise PilotfishError(f"--web {bind}: {why}")


@server_group.command("stop", context_settings=CTX)
@click.pass_context
def server_stop(ctx) -> None:
    """Stop the server of this home."""
    pid = daemon.stop(home_of(ctx))
    console.out.print("no server running" if pid is None else f"server {pid} stopped")


#: after "queued: N" while a server that just started still reads its queued jobs
LOADING = " so far (reading the queue; dispatch starts when it is read)"


@server_group.command("status", context_settings=CTX)
@click.option("--wait", "wait", type=plain_float(0.1, 3600), default=STATUS_WAIT,
              show_default=True, metavar="SECONDS", help="How long to wait for an answer "
              "before calling a live server stuck.")
@json_option
@click.pass_context
def server_status(ctx, wait, as_json) -> None:
    """Is the server up; jobs by state; agents. Exit code 1 when it is not running."""
    home = home_of(ctx)
    # a server named by --server or $PILOTFISH_SERVER may be elsewhere: only asking tells
    explicit = (ctx.obj.get("server") if ctx.obj else None) or os.environ.get("PILOTFISH_SERVER")
    pid = None if explicit else daemon.running_pid(home)
    try:
        # this home's server on this machine: /proc says at once whether its process lives
        # (a kill -9 leaves server.json behind; waiting for an answer took the whole timeout)
        if not explicit and pid is None:
            dead_server(home)
            raise PilotfishError(f"no server is running for {home}")
        with Client(address=explicit, home=home, timeout=wait) as c:
            st = c.status()
    except PilotfishError as exc:
        if isinstance(exc, ServerUnavailable) and pid is not None:
            msg = (f"not answering: server pid {pid} is alive but did not answer within "
                   f"{wait:g} s (busy or stuck? see {settings.log_path(home)})")
        else:
            msg = f"not running: {exc}"
        if as_json:
            console.print_json({"running": False, "pid": pid, "error": msg})
        else:
            console.out.print(msg)
        ctx.exit(1)
    st["running"] = True
    st["address"] = settings.server_address(home, ctx.obj.get("server"))
    if as_json:
        console.print_json(st)
        return
    console.out.print(f"running: pid {st['pid']} at {st['address']}, up {st['uptime']:.0f} s, "
                      f"db {st['db']}")
    console.out.print(f"agents alive: {st['agents_alive']} ({st['cores_alive']} cores); "
                      f"queued: {st['queued']}{LOADING if st.get('loading') else ''}; "
                      f"leased: {st['leases']}")
    console.table([{"state": k, "jobs": v} for k, v in sorted(st["counts"].items())],
                  [("state", "STATE"), ("jobs", "JOBS")])


def _status_db(home: Path) -> tuple[str, str | None]:
    """The database ``db-status`` reads without --db, and where that choice came from:
    $PILOTFISH_DB; else the running server's (it may have been started with --db); else the
    home's SQLite file. A running server's URL with a hidden password cannot be used."""
    if os.environ.get("PILOTFISH_DB"):
        return os.environ["PILOTFISH_DB"], "$PILOTFISH_DB"
    info = settings.read_server_info(home) or {}
    db, pid = info.get("db"), info.get("pid")
    if isinstance(db, str) and "***" not in db and isinstance(pid, int) and daemon.alive(pid):
        return db, f"the running server's, pid {pid}"
    return settings.default_db_url(home), None


@server_group.command("db-status", context_settings=CTX)
@click.option("--db", "db_url", help="Database URL (default: $PILOTFISH_DB, else the running "
              "server's database, else the SQLite file in the home).")
@json_option
@click.pass_context
def server_db_status(ctx, db_url, as_json) -> None:
    """The database's schema version and the migrations the next server start applies.

    Reads only (a missing SQLite file is not created). Exit code 1 when the database is newer
    than this pilotfish or not one it can use.
    """
    from .db_status import db_status
    source = None
    if not db_url:
        db_url, source = _status_db(home_of(ctx))
    st = db_status(db_url)
    if source:
        st["source"] = source
    usable = st["up_to_date"] or st["pending"] or st["version"] is None
    if as_json:
        console.print_json(st)
    else:
        version = "none" if st["version"] is None else st["version"]
        console.out.print(f"db {st['db']}" + (f" ({source})" if source else "")
                          + f"\nschema version: {version} (this pilotfish: "
                          f"{st['head']})", markup=False)
        if st["pending"]:
            console.out.print(f"pending migrations: {len(st['pending'])}", markup=False)
            console.table(st["pending"], [("version", "VERSION"), ("summary", "SUMMARY")])
        elif st["up_to_date"]:
            console.out.print("up to date", markup=False)
        if st["note"]:
            console.out.print(st["note"], markup=False)
    if not usable:
        ctx.exit(1)


# -- apps ------------------------------------------------------------------------------------
@click.group("app", context_settings=CTX)
def app_group() -> None:
    """Register and manage apps: the whitelist of what jobs may run."""


def _param_flags(params: tuple[str, ...]) -> dict:
    """``NAME:TYPE[=DEFAULT]`` flags, and ``NAME:choice:a,b,c[=DEFAULT]``; richer declarations
    (min, max, pattern) go in -f."""
    out = {}
    for p in params:
        decl, _, default = p.partition("=")
        name, _, ptype = decl.partition(":")
        ptype, _, choices = ptype.partition(":")
        spec: dict[str, Any] = {"type": ptype or "str"}
        if choices:
            if ptype != "choice":
                raise click.BadParameter(f"{p!r}: only a choice parameter lists values after "
                                         "its type (NAME:choice:a,b,c)", param_hint="--param")
            spec["choices"] = [c for c in choices.split(",") if c]
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
              help="Declare a parameter (int, float, str, path; choice as "
              "NAME:choice:a,b,c[=DEFAULT]). Repeatable.")
@click.option("--pre", "pre", help="Preprocess executable (absolute path).")
@click.option("--post", "post", help="Postprocess executable (absolute path).")
@click.option("--env", "env", multiple=True, metavar="K=V",
              help="Environment for its jobs. Names that make the loader, a shell or a "
                   "language runtime run other code are refused: LD_* but LD_LIBRARY_PATH, "
                   "GCONV_PATH, GLIBC_TUNABLES, LOCPATH, BASH_ENV, ENV, BASH_FUNC_*, SHELLOPTS, "
                   "BASHOPTS, PS4, PROMPT_COMMAND, IFS, PYTHONSTARTUP, PYTHONINSPECT, PERL5OPT, "
                   "PERL5DB, RUBYOPT, NODE_OPTIONS, JAVA_TOOL_OPTIONS, _JAVA_OPTIONS, "
                   "JDK_JAVA_OPTIONS, ... and the PILOTFISH_* names tasks get.")
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
    warn_missing_programs(app)


def warn_missing_programs(app: dict) -> None:
    """Say so when an app's programs are not on this machine: they may exist only on the
    compute nodes (or in the app's image), so this warns and never refuses."""
    import os
    if app.get("container"):
        return  # the executable is a path inside the image
    programs = [app["executable"], *(app.get("preprocess") or [])[:1],
                *(app.get("postprocess") or [])[:1]]
    for prog in programs:
        if not (os.path.isfile(prog) and os.access(prog, os.X_OK)):
            why = "does not exist" if not os.path.exists(prog) else "is not an executable file"
            console.err.print(f"warning: {prog} {why} on this machine; jobs of app "
                              f"{app['name']} will fail where it is missing (fine if it exists "
                              "only on the compute nodes)", markup=False)


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
    """Change an app's definition. What decides what its jobs run (executable, args,
    parameters, preprocess, postprocess, environment, container) changes only while it has no
    unfinished jobs."""
    changes = load_structured(spec_file) if spec_file else {}
    if not isinstance(changes, dict):
        raise ValidationError(f"{spec_file} must be a map of app keys to change")
    changes.update(parse_kv(sets, "--set", typed=True))
    if not changes:
        raise click.UsageError("nothing to change: give --set KEY=VALUE or -f FILE")
    app = client_of(ctx).alter_app(name, **changes)
    if {"executable", "preprocess", "postprocess", "container"} & set(changes):
        warn_missing_programs(app)
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
