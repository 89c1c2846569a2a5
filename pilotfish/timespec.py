"""Times people type: durations (``7d``, ``12h``, ``1d12h``) and points in time (``2h`` ago,
``now``, ``2026-12-01``, ``2026-12-01T10:30``, ``2026-12-01T10:30:00+02:00``, epoch seconds).

Pure; shared by every CLI that takes ``--since``/``--until`` or an age (gc, events prune, plot,
report). A date or time without a zone is UTC, as the server's days are.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

from pilotfish.errors import ValidationError
from pilotfish.validate import echo

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d{1,9})([smhdw])")
MAX_DURATION = 100 * 365 * 86400
#: Points in time are between 1970 and 9999 (what datetime and the plots can show).
MAX_EPOCH = 253402300799.0
_EPOCH_RE = re.compile(r"\d{1,12}(\.\d{1,9})?")


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w' (or several: '1d12h') -> seconds."""
    s = text.strip() if isinstance(text, str) else ""
    parts = _DURATION_RE.findall(s)
    if not s or "".join(n + u for n, u in parts) != s:
        raise ValidationError(f"duration {text!r} must look like 7d, 12h, 30m, 45s, 2w or 1d12h")
    total = sum(int(n) * UNITS[u] for n, u in parts)
    if total > MAX_DURATION:
        raise ValidationError(f"duration {text!r} is longer than 100 years")
    return float(total)


def parse_when(text: str, now: float, what: str = "time") -> float:
    """A point in time as epoch seconds: ``now``; a duration before ``now`` (``2h``,
    ``1d12h``); an ISO date or date-time (UTC unless it names a zone); epoch seconds."""
    s = text.strip() if isinstance(text, str) else ""
    if s == "now":
        return now
    if s and s[-1] in UNITS and s[0].isdigit():
        try:
            return max(0.0, now - parse_duration(s))
        except ValidationError:
            pass
    elif _EPOCH_RE.fullmatch(s) and len(s.split(".")[0]) > 8:  # 20261201 is not an epoch
        t = float(s)
        if t <= MAX_EPOCH:
            return t
    else:
        try:
            d = datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
        except ValueError:
            pass
        else:
            if d.tzinfo is None:
                d = d.replace(tzinfo=timezone.utc)
            try:
                t = d.timestamp()
            except (OverflowError, ValueError, OSError):
                t = -1.0
            if 0 <= t <= MAX_EPOCH:
                return t
    raise ValidationError(f"{what} {echo(text)} must be 'now', a time ago (2h, 30m, 7d, 1d12h), "
                          "an ISO date or date-time (2026-12-01, 2026-12-01T10:30, UTC unless "
                          "it names a zone) or epoch seconds, after 1970")


def parse_range(since: str | None, until: str | None, now: float,
                names: tuple[str, str] = ("since", "until")) -> tuple[float | None, float | None]:
    """``since``/``until`` as epoch seconds (None or "": the server's default), since before
    until and, without an until, in the past. ``names``: what the errors call them (the CLI's
    ``--since``, the web's ``since``). Shared by ``pilotfish plot``/``report`` and the web."""
    from pilotfish.usage import utc
    s = parse_when(since, now, names[0]) if since not in (None, "") else None
    u = parse_when(until, now, names[1]) if until not in (None, "") else None
    if s is not None and u is not None and s >= u:
        raise ValidationError(f"{names[0]} ({utc(s)}) must be before {names[1]} ({utc(u)})")
    if s is not None and u is None and s >= now:
        raise ValidationError(f"{names[0]} ({utc(s)}) is not in the past")
    return s, u
