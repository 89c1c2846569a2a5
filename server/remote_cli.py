"""``pilotfish site ls --remote``: the remote sites (served by other pilotfish servers over
RabbitMQ) with their health as this server sees it. site_configs imports only the core, so
the option is added to its ``site ls`` here, at registration (pilotfish/cli.py)."""
from __future__ import annotations

import click

from pilotfish import console

from .cli import client_of

REMOTE_COLUMNS = [("site", "SITE"), ("health", "HEALTH"), ("heard", "LAST HEARTBEAT"),
                  ("backlog", "BACKLOG"), ("capacity", "CAPACITY"), ("forwarded", "FORWARDED")]


def remote_ls(ctx: click.Context, as_json: bool) -> None:
    with client_of(ctx) as c:
        r = c.call("remote_sites")
    if as_json:
        return console.print_json(r["sites"])
    rows = [dict(s, health="healthy" if s["healthy"] else "SILENT" if s["last_heartbeat"]
                 else "never heard",
                 heard="-" if s["silent_seconds"] is None else f"{s['silent_seconds']:g} s ago")
            for s in r["sites"]]
    console.table(rows, REMOTE_COLUMNS)


def add_remote_option(ls_cmd: click.Command) -> None:
    """Give ``site ls`` a --remote flag that lists the remote sites instead of profiles."""
    ls_cmd.params.insert(0, click.Option(
        ["--remote"], is_flag=True, help="List the remote sites instead: sites served by other "
        "pilotfish servers (federation), with their health as the server sees it (last "
        "heartbeat, backlog, capacity, jobs forwarded there)."))
    inner = ls_cmd.callback

    def callback(remote: bool = False, **kw):
        if remote:
            return remote_ls(click.get_current_context(), kw.get("as_json", False))
        return inner(**kw)
    ls_cmd.callback = callback
