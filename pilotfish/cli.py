"""The umbrella ``pilotfish`` command: gathers each room's command group (the top floor)."""
from __future__ import annotations

import sys

import click

from pilotfish import __version__, console
from pilotfish.errors import PilotfishError

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _pilot():
    from pilotfish.pilot.cli import pilot_group
    from pilotfish.pilot.ls_cli import pilot_ls
    from pilotfish.pilot.site_cli import cancel_cmd, submit_cmd
    for cmd in (pilot_ls, submit_cmd, cancel_cmd):
        pilot_group.add_command(cmd)
    return pilot_group


def _site():
    from pilotfish.pilot.site_cli import site_agent_cmd, site_status_cmd
    from pilotfish.server.remote_cli import add_remote_option
    from pilotfish.site_configs.cli import site_group
    for cmd in (site_agent_cmd, site_status_cmd):
        site_group.add_command(cmd)
    add_remote_option(site_group.commands["ls"])
    return site_group


def _keys():
    from pilotfish.keys import keys_group
    from pilotfish.web.cli import token_cmd
    keys_group.add_command(token_cmd)
    return keys_group


#: Each top-level command: where it lives ("module:name"), or a function that gathers a group
#: from several rooms. Imported when used, so `pilotfish pilot agent` loads the agent's modules
#: and not the server's, the web's or the bridges' (every command starts faster).
_COMMANDS = {
    "app": "pilotfish.server.cli:app_group",
    "bridge": "pilotfish.bridge.cli:bridge_group",
    "container": "pilotfish.container.cli:container_group",
    "demo": "pilotfish.demo:demo_cmd",
    "events": "pilotfish.server.events_cli:events_group",
    "federate": "pilotfish.bridge.cli:federate_cmd",
    "gc": "pilotfish.server.gc_cli:gc_cmd",
    "job": "pilotfish.server.job_cli:job_group",
    "keys": _keys,
    "mail": "pilotfish.bridge.cli:mail_cmd",
    "pilot": _pilot,
    "plot": "pilotfish.web.usage_cli:plot_group",
    "report": "pilotfish.web.usage_cli:report_group",
    "server": "pilotfish.server.cli:server_group",
    "site": _site,
    "source": "pilotfish.bridge.pg_cli:source_group",
    "transfer": "pilotfish.pilot.transfer_cli:transfer_group",
    "web": "pilotfish.web.cli:web_cmd",
    "workflow": "pilotfish.server.workflow_cli:workflow_group",
}


class _LazyGroup(click.Group):
    """The umbrella group: a command's module is imported the first time it is asked for."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(set(self.commands) | set(_COMMANDS))

    def get_command(self, ctx, name):
        if name not in self.commands and name in _COMMANDS:
            where = _COMMANDS[name]
            if callable(where):
                cmd = where()
            else:
                import importlib
                module, attr = where.split(":")
                cmd = getattr(importlib.import_module(module), attr)
            self.add_command(cmd, name)
        return self.commands.get(name)


@click.group(cls=_LazyGroup, context_settings=CTX)
@click.version_option(__version__, "-V", "--version")
@click.option("--home", envvar="PILOTFISH_HOME", metavar="DIR",
              help="The pilotfish home (default: $PILOTFISH_HOME, else ~/.pilotfish).")
@click.option("--server", "server", help="Server address, e.g. tcp://host:port (default: "
              "$PILOTFISH_SERVER or the home's server.json).")
@click.option("--server-key", metavar="FILE", help="The server's public key file (its "
              "keys/server.key) for a server of another home (default: $PILOTFISH_SERVER_KEY, "
              "the home's server.json or keys/server.key).")
@click.option("--client-key", metavar="FILE", help="An authorized client key pair "
              "(NAME.key_secret) (default: $PILOTFISH_CLIENT_KEY or the home's "
              "keys/client.key_secret).")
@click.pass_context
def cli(ctx, home, server, server_key, client_key) -> None:
    """pilotfish: many small tasks on machines built for huge jobs.

    A server keeps the jobs; node agents inside batch allocations pull work and run it.

    Everything lives in the home: $PILOTFISH_HOME, default ~/.pilotfish (or --home DIR): the
    SQLite database, server.json (the running server's address), server.log, keys/, sites/,
    pilots/ and, by default, the job workdirs (work/).
    """
    import os
    ctx.ensure_object(dict)
    ctx.obj["home"] = home
    ctx.obj["server"] = server
    # every client this command makes (and every process it starts) reads the keys from there
    for value, var in ((server_key, "PILOTFISH_SERVER_KEY"), (client_key, "PILOTFISH_CLIENT_KEY")):
        if value:
            os.environ[var] = value if not os.path.exists(value) else os.path.abspath(value)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and a non-zero exit code, never a traceback for our errors."""
    try:
        return _main(argv)
    finally:
        _close_zmq()


def _close_zmq() -> None:
    """Close our ZeroMQ sockets now, with no linger: left to the interpreter's teardown, the
    context's termination waited on sockets the garbage collector had not closed yet, and
    `job wait` returned 130-250 ms after the last job ended instead of ~30 ms."""
    zmq = sys.modules.get("zmq")
    if zmq is not None and getattr(zmq.Context, "_instance", None) is not None:
        zmq.Context.instance().destroy(linger=0)


def _main(argv: list[str] | None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="pilotfish", standalone_mode=False)
    except click.exceptions.Abort:
        console.err.print("aborted")
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except PilotfishError as exc:
        console.err.print(f"pilotfish: error: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:
        return 130
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """The ``pilotfish`` command (console script and ``python -m pilotfish``): :func:`main`,
    then exit without the interpreter's teardown. Every command has closed what it wrote by
    then; tearing down the modules (rich, click, zmq, ...) only cost each command ~30 ms after
    its work was done (`job wait` returned that much later). Exit handlers still run."""
    import atexit
    import os
    rc = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(rc)


if __name__ == "__main__":
    run()
