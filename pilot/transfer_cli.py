"""``pilotfish transfer ls``: what the site stagers move, as they last told the server.

One row per endpoint of each stager (in flight, queued, limit, done, failed, bytes/s and the
last error), then the server's own books per site (held for a stager, leased, staged and
waiting for an agent). ``--json`` gives the ``transfer_ls`` reply as it is.
"""
from __future__ import annotations

import json

import click

from pilotfish import console
from .site_cli import CTX, _client


@click.group("transfer", context_settings=CTX)
def transfer_group() -> None:
    """Data transfers: the site stagers' work (stage-in of remote inputs)."""


def _rate(n: float) -> str:
    for unit in ("B/s", "KiB/s", "MiB/s", "GiB/s"):
        if n < 1024 or unit == "GiB/s":
            return f"{n:.0f} {unit}" if unit == "B/s" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _tail(text: str, n: int = 100) -> str:
    """An error's end: its one line starts with the (long) URL and ends with what happened."""
    return text if len(text) <= n else "…" + text[-(n - 1):]


@transfer_group.command("ls", context_settings=CTX)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def transfer_ls_cmd(ctx, as_json) -> None:
    """Transfers in flight and queued, per stager and endpoint: limits, bytes/s, errors."""
    view = _client(ctx).call("transfer_ls")
    if as_json:
        return click.echo(json.dumps(view, indent=2))
    rows = []
    for s in view["stagers"]:
        rep = s.get("report") or {}
        eps = rep.get("endpoints") or {}
        state = s["state"] if s["state"] != "ALIVE" else "ok"
        if not eps:
            rows.append({"stager": s["id"], "state": state, "endpoint": "-", "active": 0,
                         "queued": rep.get("queued", 0), "limit": "-", "done": 0,
                         "failed": 0, "rate": "-", "error": rep.get("error") or ""})
        for name, e in eps.items():
            rows.append({"stager": s["id"], "state": state, "endpoint": name,
                         "active": e["active"], "queued": e["queued"], "limit": e["limit"],
                         "done": e["done"], "failed": e["failed"],
                         "rate": _rate(e.get("bytes_per_s") or 0),
                         "error": _tail(e.get("last_error") or "")})
    if rows:
        console.table(rows, [("stager", "STAGER"), ("state", "STATE"),
                             ("endpoint", "ENDPOINT"), ("active", "IN FLIGHT"),
                             ("queued", "QUEUED"), ("limit", "LIMIT"), ("done", "DONE"),
                             ("failed", "FAILED"), ("rate", "RATE"),
                             ("error", "LAST ERROR")])
    else:
        console.out.print("no site stager has reported")
    sites = [{"site": k, **v} for k, v in sorted(view["sites"].items())]
    if sites:
        console.table(sites, [("site", "SITE"), ("held", "WAITING FOR A STAGER"),
                              ("leased", "BEING STAGED"),
                              ("staged_waiting", "STAGED, WAITING FOR AN AGENT")])
