"""The umbrella ``pilotfish`` command: gathers each room's command group (the top floor)."""
from __future__ import annotations

import sys

import click

from pilotfish import __version__, console
from pilotfish.errors import PilotfishError

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CTX)
@click.version_option(__version__, "-V", "--version")
@click.option("--home", envvar="PILOTFISH_HOME", help="pilotfish home (default ~/.pilotfish).")
@click.option("--server", "server", help="Server address, e.g. tcp://host:port (default: "
              "$PILOTFISH_SERVER or the home's server.json).")
@click.pass_context
def cli(ctx, home, server) -> None:
    """pilotfish: many small tasks on machines built for huge jobs.

    A server keeps the jobs; node agents inside batch allocations pull work and run it.
    """
    ctx.ensure_object(dict)
    ctx.obj["home"] = home
    ctx.obj["server"] = server


def _register() -> None:
    from pilotfish.demo import demo_cmd
    from pilotfish.pilot.cli import pilot_group
    from pilotfish.server.cli import app_group, server_group
    from pilotfish.server.job_cli import job_group
    for group in (server_group, app_group, job_group, pilot_group, demo_cmd):
        cli.add_command(group)


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
