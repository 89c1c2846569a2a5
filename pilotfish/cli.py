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
    from pilotfish.bridge.cli import bridge_group
    from pilotfish.server.events_cli import events_group
    from pilotfish.web.cli import token_cmd, web_cmd
    for cmd in (pilot_ls, submit_cmd, cancel_cmd):
        pilot_group.add_command(cmd)
    for cmd in (site_agent_cmd, site_status_cmd):
        site_group.add_command(cmd)
    for group in (server_group, app_group, job_group, pilot_group, site_group, keys_group,
                  demo_cmd):
        cli.add_command(group)
    cli.add_command(container_group)
    cli.add_command(gc_cmd)
    cli.add_command(source_group)
    cli.add_command(bridge_group)
    cli.add_command(events_group)
    keys_group.add_command(token_cmd)
    cli.add_command(web_cmd)


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and a non-zero exit code, never a traceback for our errors."""
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


if __name__ == "__main__":
    sys.exit(main())
