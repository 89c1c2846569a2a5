"""Plots as bytes: utilization (busy cores against time, the LIGO figures) and usage per
period (the edge service's Figure 7), from what ``Client.utilization``/``Client.usage``
return. Pure: data in, PNG or SVG bytes out; no server, no files. ``pilotfish plot`` and the
web pages both call these.

matplotlib is imported here only (Agg: no display), so nothing else pays for it. In an SVG the
busy line is the group ``id="busy"`` and the allocated line ``id="allocated"``; the bars of
usage series ``i`` are ``id="usage-<i>-<period index>"``; titles and names are text, escaped by
matplotlib's SVG writer.
"""
from __future__ import annotations

import io
from datetime import datetime, timezone

FORMATS = ("png", "svg")
#: Bars drawn at most (periods × series); more groups are summed into "other".
MAX_SERIES = 12
MAX_PERIODS = 400


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, fmt: str) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected png or svg")
    buf = io.BytesIO()
    # no date in the file, a fixed id salt: the same data gives the same bytes
    meta = {"Date": None} if fmt == "svg" else {"Software": None}
    import matplotlib
    with matplotlib.rc_context({"svg.hashsalt": "pilotfish", "svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt, metadata=meta, dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def _dates(ts: list[float]):
    return [datetime.fromtimestamp(t, timezone.utc) for t in ts]


def utilization_image(u: dict, fmt: str = "png", title: str | None = None,
                      size: tuple[float, float] = (10, 4)) -> bytes:
    """Busy cores as steps (and the agents' allocated cores, dashed, when there were any)
    against UTC time."""
    plt = _pyplot()
    import matplotlib.dates as mdates
    fig, ax = plt.subplots(figsize=size)
    busy = u["busy"]
    (line,) = ax.plot(_dates([t for t, _ in busy]), [v for _, v in busy], drawstyle="steps-post",
                      color="tab:blue", linewidth=1.2, label="busy cores")
    line.set_gid("busy")
    if u.get("max_allocated"):
        alloc = u["allocated"]
        (al,) = ax.plot(_dates([t for t, _ in alloc]), [v for _, v in alloc],
                        drawstyle="steps-post", color="tab:gray", linestyle="--", linewidth=1,
                        label="allocated cores (agents)")
        al.set_gid("allocated")
    ax.set_ylim(0, max(1, u.get("max_busy", 0), u.get("max_allocated", 0)) * 1.08)
    ax.set_xlim(*_dates([u["since"], u["until"]]))
    ax.set_ylabel("cores")
    ax.set_xlabel("time (UTC)")
    loc = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(loc)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc, tz=timezone.utc))
    where = ", ".join(f"{k} {u[k]}" for k in ("site", "pilot") if u.get(k))
    ax.set_title(title or f"Busy cores{' — ' + where if where else ''}: "
                 f"{u['core_seconds'] / 3600:.3g} core-hours, {u['attempts']} attempts",
                 fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, fmt)


def usage_series(report: dict, measure: str = "core_hours") -> tuple[list[str], dict[str, list]]:
    """(periods, {series name: values per period}) of a usage report: the period key (day
    or month) on the x axis, one series per combination of the other keys (the largest
    ``MAX_SERIES - 1`` by total, the rest summed as "other"). Without a period key, one bar
    per group."""
    by = report["by"]
    period = next((k for k in by if k in ("day", "month")), None)
    others = [k for k in by if k != period]
    periods = sorted({r[period] for r in report["rows"]}) if period else ["all"]
    periods = periods[-MAX_PERIODS:]
    at = {p: i for i, p in enumerate(periods)}
    series: dict[str, list] = {}
    for r in report["rows"]:
        p = r[period] if period else "all"
        if p not in at:
            continue
        name = " / ".join("-" if r[k] is None else str(r[k]) for k in others) or measure
        series.setdefault(name, [0.0] * len(periods))[at[p]] += r[measure]
    if len(series) > MAX_SERIES:
        ranked = sorted(series, key=lambda s: -sum(series[s]))
        keep = {s: series[s] for s in ranked[:MAX_SERIES - 1]}
        keep["other"] = [sum(series[s][i] for s in ranked[MAX_SERIES - 1:])
                         for i in range(len(periods))]
        series = keep
    return periods, series


def usage_image(report: dict, fmt: str = "png", measure: str = "core_hours",
                title: str | None = None, size: tuple[float, float] = (10, 4)) -> bytes:
    """Stacked bars of ``measure`` (core_hours, jobs, finished or attempts) per period, one
    colour per series (see :func:`usage_series`)."""
    plt = _pyplot()
    periods, series = usage_series(report, measure)
    fig, ax = plt.subplots(figsize=size)
    bottom = [0.0] * len(periods)
    x = list(range(len(periods)))
    for i, (name, vals) in enumerate(series.items()):
        bars = ax.bar(x, vals, bottom=bottom, label=name, width=0.8)
        for j, patch in enumerate(bars):
            patch.set_gid(f"usage-{i}-{j}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(x)
    step = max(1, len(periods) // 20)
    ax.set_xticklabels([p if i % step == 0 else "" for i, p in enumerate(periods)],
                       rotation=45 if len(periods) > 6 else 0, ha="right", fontsize=8)
    ax.set_ylabel(measure.replace("_", "-"))
    ax.set_title(title or f"{measure.replace('_', '-')} by {', '.join(report['by']) or 'all'}",
                 fontsize=10)
    if series and len(series) > 1 or any(k not in ("day", "month") for k in report["by"]):
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, fmt)


def format_of(path: str) -> str:
    """png or svg from a file name's suffix; a ValueError otherwise."""
    import os
    name = os.path.basename(path)
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if suffix not in FORMATS:
        raise ValueError(f"the output file {path!r} must end in .png or .svg")
    return suffix
