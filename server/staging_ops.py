"""Request ops of site stagers (``stage_poll``, role site or admin) and ``transfer_ls``.

One op does a stager's whole round trip, so a stager costs the server one message per poll:
it says who it is and how it is doing (shown by ``pilotfish transfer ls``), hands back finished
work, names the work it still holds (which renews its leases, and lets a restarted server
adopt them), and asks for up to ``want`` new jobs. See :mod:`.staging` for the rules.
"""
from __future__ import annotations

import json
import math

from pilotfish.errors import ValidationError
from pilotfish.keys import READER, SITE
from pilotfish.validate import check_name

from .core import JobServer
from .ops import MAX_ID, _arg, op
from .staging import MAX_GRANT, file_name

#: Most items a poll may hand back or hold, and the largest report (JSON bytes) kept.
MAX_ITEMS = 2000
MAX_REPORT = 64 * 1024


def _int(v, what: str, hi: int = MAX_ID) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise ValidationError(f"{what} must be an integer 0..{hi}")
    return v


def _done(items) -> list[dict]:
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise ValidationError(f"done must be a list of at most {MAX_ITEMS} results")
    out = []
    for d in items:
        if not isinstance(d, dict) or not isinstance(d.get("ok"), bool):
            raise ValidationError("each done item is a map with job, token and ok")
        item = {"job": _int(d.get("job"), "done.job"), "token": _int(d.get("token"),
                                                                       "done.token"),
                "ok": d["ok"], "msg": None, "name": None, "bytes": None, "seconds": None,
                "sha256": None}
        if d.get("msg") is not None:
            if not isinstance(d["msg"], str):
                raise ValidationError("done.msg must be text")
            item["msg"] = d["msg"][:2000].replace("\x00", "\\0")
        if d.get("bytes") is not None:
            item["bytes"] = _int(d["bytes"], "done.bytes")
        s = d.get("seconds")
        if s is not None:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) \
                    or not 0 <= s < 1e9:
                raise ValidationError("done.seconds must be a number of seconds")
            item["seconds"] = float(s)
        h = d.get("sha256")
        if h is not None:
            if not isinstance(h, str) or len(h) != 64 or h.strip("0123456789abcdef"):
                raise ValidationError("done.sha256 must be 64 lower-case hex digits")
            item["sha256"] = h
        if item["ok"]:
            item["name"] = file_name(d.get("name"))
            if item["name"] is None:
                raise ValidationError("done.name must be a plain file name (no '/', not "
                                      "starting with '.' or '-')")
        out.append(item)
    return out


def _holding(items) -> list[dict]:
    if not isinstance(items, list) or len(items) > MAX_ITEMS:
        raise ValidationError(f"holding must be a list of at most {MAX_ITEMS} items")
    out = []
    for h in items:
        if not isinstance(h, dict):
            raise ValidationError("each holding item is a map with job and token")
        out.append({"job": _int(h.get("job"), "holding.job"),
                    "token": _int(h.get("token"), "holding.token")})
    return out


@op(SITE, args=("stager", "site", "want", "lookahead", "done", "holding", "report"))
def stage_poll(srv: JobServer, args: dict, now: float) -> dict:
    """A site stager's round trip: results in, new stage leases out (see module doc)."""
    sid = check_name(_arg(args, "stager", str, required=True), "stager id")
    site = check_name(_arg(args, "site", str, required=True), "site")
    want = _int(_arg(args, "want", int, 0), "want", MAX_GRANT)
    conc = _int(_arg(args, "lookahead", int, 1), "lookahead", 100_000)
    done = _done(_arg(args, "done", list, []))
    holding = _holding(_arg(args, "holding", list, []))
    report = _arg(args, "report", dict, {})
    if len(json.dumps(report)) > MAX_REPORT:
        raise ValidationError(f"report is over {MAX_REPORT // 1024} KiB")
    book = srv.staging
    rec = book.stager(sid, site, now, max(1, conc))
    rec.report = report
    refused = book.results(rec, done, now)
    book.adopt(rec, holding, now)
    held = {h["job"] for h in holding}
    # what it holds that is no longer its lease (taken back while it was silent): drop it
    for h in holding:
        lease = book.leases.get(h["job"])
        if lease is None or lease.stager != sid or lease.token != h["token"]:
            refused.append(h)
    lost = [j for j in rec.leases if j not in held and book.leases[j].since < now - 5.0]
    for job in lost:  # leased to it but it does not know them (a reply lost): hand them out
        lease = book.leases.pop(job)
        rec.leases.discard(job)
        srv.queue.push(job, lease.priority, lease.shape)
    work = book.grant(rec, want, now) if want else []
    window, ahead = book.window(site, rec.lookahead)
    return {"work": work, "refused": refused, "lease": srv.lease_timeout,
            "window": window, "ahead": ahead}


@op(READER)
def transfer_ls(srv: JobServer, args: dict, now: float) -> dict:
    """Staging as the server sees it (held, leased, staged and waiting for an agent, per site)
    and each stager's last report (in flight, queued, per endpoint: bytes/s, errors)."""
    return srv.staging.view(now)
