"""``pilotfish plot utilization|usage`` and ``pilotfish report usage``: clients of the server
(Client.utilization/usage), drawing with web/plots.py, which the web pages use too."""
from __future__ import annotations

import os
import time

import click

from pilotfish import console
from pilotfish.errors import ValidationError

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
MEASURES = ("core_hours", "jobs", "finished", "attempts")
_WHEN = ("'now', a time ago (2h, 30m, 7d, 1d12h), an ISO date or date-time "
         "(2026-12-01, 2026-12-01T10:30; UTC unless it names a zone) or epoch seconds")


def _client(ctx):
    from pilotfish.client import Client
    obj = ctx.find_root().obj or {}
    return Client(address=obj.get("server"), home=obj.get("home"))


def _range(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    """--since/--until as epoch seconds (None: the server's default), since before until."""
    from pilotfish.timespec import parse_range
    return parse_range(since, until, time.time(), ("--since", "--until"))


def _write(path: str, data: bytes) -> None:
    """The image to ``path`` (a new file, or one replaced), or a one-line error."""
    try:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ValidationError(f"cannot write {path!r}: {exc.strerror or exc}") from None


def _check_output(output: str) -> str:
    from .plots import format_of  # (matplotlib is imported only when drawing)
    try:
        return format_of(output)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None


since_opt = click.option("--since", metavar="T", help=f"From this time: {_WHEN}.")
until_opt = click.option("--until", metavar="T", help="Up to this time (default: now).")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
by_opt = click.option("--by", default="site,day", show_default=True, metavar="KEYS",
                      help="Group by any of site, app, group (group_identifier), with day or "
                      "month (UTC), comma-separated.")


@click.group("plot", context_settings=CTX)
def plot_group() -> None:
    """Plots of what ran: busy cores against time, usage per period (PNG or SVG)."""


@plot_group.command("utilization", context_settings=CTX)
@click.option("--site", help="Jobs that ran at this site (their agent's site).")
@click.option("--pilot", help="Jobs that ran in this pilot.")
@since_opt
@until_opt
@click.option("--step", type=click.FloatRange(min=0.001), metavar="SECONDS",
              help="Time grain (default: the range / 20,000).")
@click.option("-o", "--output", metavar="FILE", help="The image: FILE.png or FILE.svg.")
@click.option("--title", help="A title instead of the summary line.")
@json_opt
@click.pass_context
def plot_utilization(ctx, site, pilot, since, until, step, output, title, as_json) -> None:
    """Busy cores against time for a site, a pilot or a time range (default: the last day).

    A job's cores are num_nodes × processes per node × cpus per process, busy from its
    attempt's start to its end (each attempt, retries too); the dashed line is the cores of
    the agents alive then. --json prints the step functions ([time, cores] change points).
    Example: pilotfish plot utilization --pilot p12 --since 6h -o util.png
    """
    if not output and not as_json:
        raise click.UsageError("give -o FILE.png|FILE.svg (or --json)")
    fmt = _check_output(output) if output else None
    s, u = _range(since, until)
    with _client(ctx) as c:
        data = c.utilization(site=site, pilot=pilot, since=s, until=u, step=step)
    if output:
        from .plots import utilization_image
        _write(output, utilization_image(data, fmt, title=title))
    if as_json:
        console.print_json(data)
    else:
        console.out.print(f"{output}: busy cores {_span(data)}: at most {data['max_busy']} "
                          f"busy, {data['core_seconds'] / 3600:.4g} core-hours in "
                          f"{data['attempts']} attempts", markup=False)


def _hours(h: float) -> str:
    return f"{h:.0f}" if h >= 100 else f"{h:.2f}" if h >= 1 else f"{h:.4f}"


def _span(d: dict) -> str:
    from pilotfish.usage import utc
    return f"{utc(d['since'])} to {utc(d['until'])}"


@plot_group.command("usage", context_settings=CTX)
@by_opt
@since_opt
@until_opt
@click.option("--measure", type=click.Choice(MEASURES), default="core_hours", show_default=True,
              help="What the bars show.")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="The image: FILE.png or FILE.svg.")
@click.option("--title", help="A title of your own.")
@click.pass_context
def plot_usage(ctx, by, since, until, measure, output, title) -> None:
    """Usage per period as stacked bars: one bar per day or month, a colour per site, app or
    group (default: the last 30 days).

    Example: pilotfish plot usage --by site,month --since 2026-01-01 -o usage.svg
    """
    from pilotfish.usage import parse_by
    keys = parse_by(by)
    fmt = _check_output(output)
    s, u = _range(since, until)
    with _client(ctx) as c:
        rep = c.usage(by=keys, since=s, until=u)
    from .plots import usage_image
    _write(output, usage_image(rep, fmt, measure=measure, title=title))
    console.out.print(f"{output}: {measure} by {','.join(keys) or 'all'} {_span(rep)}: "
                      f"{len(rep['rows'])} groups", markup=False)


@click.group("report", context_settings=CTX)
def report_group() -> None:
    """Reports of what ran, as tables (or --json)."""


@report_group.command("usage", context_settings=CTX)
@by_opt
@since_opt
@until_opt
@json_opt
@click.pass_context
def report_usage(ctx, by, since, until, as_json) -> None:
    """Jobs and core-hours per site, app or group, per day or month (default: the last 30
    days).

    An attempt counts at the site where it ran (its agent's site, else the job's) and on
    the day it ended; jobs: jobs whose last attempt ended then in a final state (finished:
    JOB_FINISHED); core-hours: of every attempt, retries too.
    Example: pilotfish report usage --by site,month --since 2026-01-01 --json
    """
    from pilotfish.usage import parse_by
    keys = parse_by(by)
    s, u = _range(since, until)
    with _client(ctx) as c:
        rep = c.usage(by=keys, since=s, until=u)
    if as_json:
        console.print_json(rep)
        return
    cols = [(k, k) for k in keys] + [("jobs", "jobs"), ("finished", "finished"),
                                     ("attempts", "attempts"), ("core_hours", "core-hours")]
    rows = [dict({k: console.plain(r[k]) if isinstance(r[k], str) else r[k] for k in keys},
                 jobs=r["jobs"], finished=r["finished"], attempts=r["attempts"],
                 core_hours=_hours(r["core_hours"])) for r in rep["rows"]]
    tot = rep["totals"]
    rows.append(dict({k: "" for k in keys}, **dict(tot, core_hours=_hours(tot["core_hours"]))))
    if keys:
        rows[-1][keys[0]] = "total"
    console.table(rows, cols, title=f"usage {_span(rep)}")
