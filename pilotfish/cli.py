"""The umbrella ``pilotfish`` command: gathers each room's command group (the top floor)."""
from __future__ import annotations

import sys

import click

from pilotfish import __version__, console
from pilotfish.errors import PilotfishError

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CTX)
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


def _register() -> None:
    from pilotfish.demo import demo_cmd
    from pilotfish.keys import keys_group
    from pilotfish.pilot.cli import pilot_group
    from pilotfish.server.cli import app_group, server_group
    from pilotfish.server.job_cli import job_group
    from pilotfish.pilot.ls_cli import pilot_ls
    from pilotfish.pilot.site_cli import cancel_cmd, site_agent_cmd, site_status_cmd, submit_cmd
    from pilotfish.site_configs.cli import site_group
    from pilotfish.container.cli import container_group
    from pilotfish.server.gc_cli import gc_cmd
    from pilotfish.bridge.pg_cli import source_group
    from pilotfish.bridge.cli import bridge_group, federate_cmd, mail_cmd
    from pilotfish.server.events_cli import events_group
    from pilotfish.server.workflow_cli import workflow_group
    from pilotfish.server.remote_cli import add_remote_option
    from pilotfish.pilot.transfer_cli import transfer_group
    from pilotfish.web.usage_cli import plot_group, report_group
    from pilotfish.web.cli import token_cmd, web_cmd
    for cmd in (pilot_ls, submit_cmd, cancel_cmd):
        pilot_group.add_command(cmd)
    for cmd in (site_agent_cmd, site_status_cmd):
        site_group.add_command(cmd)
    add_remote_option(site_group.commands["ls"])
    for group in (server_group, app_group, job_group, pilot_group, site_group, keys_group,
                  demo_cmd):
        cli.add_command(group)
    cli.add_command(container_group)
    cli.add_command(gc_cmd)
    cli.add_command(source_group)
    cli.add_command(bridge_group)
    cli.add_command(events_group)
    cli.add_command(workflow_group)
    cli.add_command(mail_cmd)
    cli.add_command(federate_cmd)
    cli.add_command(transfer_group)
    cli.add_command(plot_group)
    cli.add_command(report_group)
    keys_group.add_command(token_cmd)
    cli.add_command(web_cmd)


_register()


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
