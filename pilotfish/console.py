"""Output for people and for scripts: rich tables, JSON, one-line errors, logging setup."""
from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

# soft_wrap: never break a line ourselves (an error stays one line in a log or a pipe)
# A pipe or file gets whole table rows (grep-able), not rows folded at rich's 80-column default.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 4096)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(rows: Iterable[dict], columns: Sequence[tuple[str, str]],
          title: str | None = None) -> None:
    """A table of ``rows`` showing ``columns`` as (key, header) pairs."""
    t = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for _, header in columns:
        t.add_column(header, overflow="fold")
    for r in rows:  # cells are Text: a "[/x]" in a message is text, not rich markup
        t.add_row(*(Text(fmt(r.get(k))) for k, _ in columns))
    out.print(t)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v > 1e9:  # an epoch time
            return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "-"
    return str(v)


#: Fields holding epoch seconds in job listings, job details, their events and attempts.
TIME_KEYS = frozenset({"created", "started", "ended", "state_time", "time", "leased"})


def local_time(t: float | None) -> str:
    """For people: this machine's local time to the second, ``2026-12-06 01:02:03``."""
    return "null" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def plain(text: str | None) -> str | None:
    """Text an agent or a task sent, safe to print: control characters (a terminal escape
    sequence in a node name or a task's stderr) shown as ``\\x1b``, never acted on; lines
    and tabs kept."""
    if text is None or text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in text)


def duration(seconds: float | None) -> str:
    """For people: ``6ms``, ``2.4s``, ``12s``, ``3m05s``, ``2h03m``, ``1d04h``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{max(seconds, 0) * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def iso_time(t: float | None) -> str | None:
    """For scripts: ISO 8601 in UTC with its offset and milliseconds,
    ``2026-12-06T01:02:03.123+00:00`` (the same on every machine; sorts as text)."""
    from datetime import datetime, timezone
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(
        timespec="milliseconds")


def iso_times(data: Any) -> Any:
    """``data`` (dicts and lists) with every epoch field of :data:`TIME_KEYS` in ISO 8601."""
    if isinstance(data, list):
        return [iso_times(x) for x in data]
    if isinstance(data, dict):
        return {k: (iso_time(v) if k in TIME_KEYS and isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    else v if k in _USER_DATA else iso_times(v)) for k, v in data.items()}
    return data


#: A job's own data: an app parameter may well be called "time".
_USER_DATA = frozenset({"parameters", "argv", "environment"})


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@contextmanager
def progress_bar(enabled: bool = True, final: Collection[str] = ()) -> Iterator[Callable]:
    """A progress bar over job counts by state; yields ``update(counts)``."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    with Progress(TextColumn("[bold]jobs"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                  console=err, disable=not enabled) as bar:
        task = bar.add_task("jobs", total=None, detail="")

        def update(counts: dict[str, int]) -> None:
            total = sum(counts.values())
            done = sum(v for k, v in counts.items() if k in final)
            detail = " ".join(f"{k.lower()}={v}" for k, v in sorted(counts.items()))
            bar.update(task, total=total, completed=done, detail=detail)

        yield update
