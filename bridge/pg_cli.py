"""``pilotfish source pg``: the command line of the PostgreSQL NOTIFY source (:mod:`.pg_source`).
The umbrella CLI adds the ``source`` group."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import click

from pilotfish import console, settings
from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.textfile import read_text

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
CHANNEL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
log = logging.getLogger("pilotfish.source")
#: Seconds the source waits for one answer of the server.
CLIENT_TIMEOUT = 15.0

EXAMPLE = """\b
  Example (a job for every plasma pulse, as at DIII-D):
    # in the experiment database
    CREATE TABLE pulses (shot bigint PRIMARY KEY, tmax double precision);
    CREATE FUNCTION pulse_notify() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN PERFORM pg_notify('pulse_end', row_to_json(NEW)::text); RETURN NEW; END $$;
    CREATE TRIGGER pulse_end AFTER INSERT ON pulses
      FOR EACH ROW EXECUTE FUNCTION pulse_notify();
\b
    # efit.yaml
    source: diiid-efit          # names the state file and tags jobs pg.diiid-efit.<shot>
    id: shot                    # the growing integer that identifies a pulse
    fields: {shot: shot, tmax: tmax}   # payload field -> app parameter (nothing else)
    example: {shot: 190001, tmax: 5.0} # checked against the server at start
    catch_up_table: pulses      # rows above the cursor are caught up
    job: {application: efit, name: "efit-{shot}", group_identifier: diiid}
\b
    pilotfish --client-key keys/pulses.key_secret source pg \\
        --dsn postgresql://efit@db.example.org/d3d --channel pulse_end --template efit.yaml
"""


@click.group("source", context_settings=CTX)
def source_group() -> None:
    """Job sources: outside systems whose events become jobs (clients of the server)."""


@source_group.command("pg", context_settings=CTX, epilog=EXAMPLE)
@click.option("--dsn", envvar="PILOTFISH_PG_DSN", metavar="DSN",
              help="The database (URL or key=value), without a password: libpq takes it from "
              "PGPASSWORD, PGPASSFILE or ~/.pgpass (default: $PILOTFISH_PG_DSN).")
@click.option("--dsn-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Read the DSN from FILE (it may hold a password; keep it mode 600).")
@click.option("--channel", required=True, help="The NOTIFY channel to LISTEN on.")
@click.option("--template", "template_path", required=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="The job template (YAML): fields, what they fill, the job.")
@click.option("--catch-up-table", "table", metavar="[SCHEMA.]TABLE",
              help="Rows of this table with an id above the cursor are made into jobs on "
              "start, after a reconnect and on every NOTIFY (default: the template's "
              "catch_up_table; without one, only live NOTIFYs count).")
@click.option("--from-id", type=int, metavar="ID", help="A new source (no state yet) resumes "
              "after this id; default: after the table's newest row.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE", help="The cursor file (default: HOME/sources/pg-SOURCE.json); "
              "refused pulses go to FILE's name with .refused.jsonl.")
@click.option("--sweep", type=click.FloatRange(0), default=60.0, show_default=True,
              metavar="SECONDS", help="Also read the table this often (0: only on NOTIFY).")
@click.option("--check", is_flag=True, help="Check the template, the server and the database, "
              "then exit.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per pulse on stdout.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def pg_cmd(ctx, dsn, dsn_file, channel, template_path, table, from_id, state_path, sweep, check,
           as_json, verbose, quiet) -> None:
    """LISTEN on a PostgreSQL channel and add a job for every pulse (NOTIFY payload or new row).

    Payload fields fill only what the template's `fields` names (app parameters, or a job key
    the template allows); every job is checked by the server like any other and tagged
    pg.SOURCE.ID, so a pulse never makes two jobs. Runs until SIGTERM or Ctrl-C; waits out a
    server or database that is away. Refused pulses are logged and kept in the .refused.jsonl
    file beside the state file. Needs psycopg 3 (pip install 'pilotfish[postgres]').
    """
    try:
        import psycopg
    except ImportError:
        raise PilotfishError("pilotfish source pg needs psycopg 3, which is not installed: "
                             "pip install 'pilotfish[postgres]'") from None
    if tuple(int(x) for x in re.findall(r"\d+", psycopg.__version__)[:2]) < (3, 2):
        raise PilotfishError(f"pilotfish source pg needs psycopg 3.2 or newer, found "
                             f"{psycopg.__version__}: pip install -U 'psycopg[binary]'")
    from . import pg_source, pg_template
    from .pg_state import State

    console.setup_logging(verbose, quiet)
    dsn = _dsn(ctx, dsn, dsn_file)
    if not CHANNEL_RE.fullmatch(channel):
        raise ValidationError(f"--channel {channel[:80]!r} is not a channel name (letters, "
                              "digits and '_', at most 63)")
    tmpl = pg_template.load(template_path)
    table = pg_template.check_table(table, "--catch-up-table") if table else \
        tmpl.catch_up_table
    home = settings.home((ctx.obj or {}).get("home"))
    state = State(state_path or home / "sources" / f"pg-{tmpl.source}.json", tmpl.source)
    state.lock()
    try:
        state.load()
        if table is None:
            log.warning("no catch-up table: pulses notified while this source is down are "
                        "lost (give --catch-up-table)")

        def client():
            from pilotfish.client import Client
            # a short wait: a server that does not answer is retried (and the pulse settled
            # by its tag first), so waiting longer only delays the pulses behind it
            return Client(address=(ctx.obj or {}).get("server"), home=home,
                          timeout=CLIENT_TIMEOUT)

        def emit(d: dict) -> None:
            if as_json:
                sys.stdout.write(json.dumps(d) + "\n")
                sys.stdout.flush()

        src = pg_source.Source(
            tmpl, dsn, channel, state, client, table=table, sweep=sweep, from_id=from_id,
            emit=emit, address=lambda: settings.server_address(home, (ctx.obj or {}).get(
                "server")))
        src.install_signals()
        log.info("source %r: %s, channel %s, state %s", tmpl.source,
                 pg_source.describe_dsn(dsn), channel, state.path)
        src.run(check_only=check)
        if check:
            console.out.print(f"source {tmpl.source!r}: template, server and database "
                              "are fine")
    finally:
        state.unlock()


def _dsn(ctx, dsn: str | None, dsn_file: Path | None) -> str:
    """The DSN, never with a password from the command line (any user can read a running
    process's arguments): a password comes from --dsn-file, the environment or PGPASSFILE."""
    from .pg_source import dsn_has_password
    if dsn_file is not None:
        if dsn:
            raise ValidationError("give --dsn or --dsn-file, not both")
        try:
            text = read_text(dsn_file, 1 << 16).strip()
        except OSError as exc:
            raise ValidationError(f"--dsn-file {dsn_file}: {exc.strerror or exc}") from None
        if dsn_has_password(text) and os.stat(dsn_file).st_mode & 0o077:
            log.warning("--dsn-file %s holds a password and others may read it: chmod 600",
                        dsn_file)
        return text
    if not dsn:
        raise ValidationError("give the database with --dsn, --dsn-file or $PILOTFISH_PG_DSN")
    from_cli = ctx.get_parameter_source("dsn") == click.core.ParameterSource.COMMANDLINE
    if from_cli and dsn_has_password(dsn):
        raise ValidationError("--dsn carries a password, which every user of this machine can "
                              "read in the process list: put it in PGPASSFILE (~/.pgpass), "
                              "PGPASSWORD, or a file given with --dsn-file")
    return dsn
