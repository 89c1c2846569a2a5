"""``pilotfish.Client``: the Python API to a running server; the CLI is built on it.

Example::

    from pilotfish import Client
    c = Client()                      # finds the server of $PILOTFISH_HOME
    c.add_app({"name": "hello", "executable": "/bin/echo", "args": ["hi", "{who}"],
               "parameters": {"who": {"type": "str"}}})
    ids = c.add_jobs([{"name": "j1", "application": "hello", "parameters": {"who": "you"}}])
    c.wait({"ids": ids})
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import zmq

from pilotfish import arrays, keys
from pilotfish import protocol as P
from pilotfish import settings
from pilotfish.errors import (ERRORS_BY_CODE, PilotfishError, ProtocolError, Pruned,
                              ServerUnavailable, ValidationError)
from pilotfish.validate import INT64, echo

FINAL_STATES = ("JOB_FINISHED", "FAILED", "USER_KILLED")
#: A workflow's failure states, and its final ones (as server/states.py has them; a test keeps
#: them equal): edge processes (pilotfish mail) follow them without importing the server.
WORKFLOW_FAILED_STATES = ("STAGE_IN_FAILED", "SUBJOB_PREPROCESS_FAILED", "SUBJOB_RUN_FAILED",
                          "SUBJOB_POSTPROCESS_FAILED", "SUBJOB_FAILED", "STAGE_OUT_FAILED",
                          "USER_KILLED")
WORKFLOW_FINAL_STATES = ("HISTORY",) + WORKFLOW_FAILED_STATES
#: The ``to`` of a removed job's event (see server/states.py).
REMOVED = "REMOVED"
#: Seconds one ``events`` request of follow() and wait() may be parked at the server.
FOLLOW_WAIT = 30.0
#: wait(): with no job of ours reaching its end, count again after this many seconds (a job
#: altered out of the filter changes no state).
WAIT_RECOUNT = 10.0
#: wait(): with more jobs than this still to end, at most 20 ``events`` requests a second.
WAIT_PACE_ABOVE = 10


def _encode_request(rid: int, op: str, args: dict) -> bytes:
    """The request frame, or a one-line ValidationError naming the value msgpack cannot carry
    (an integer past 64 bits, a set, a datetime...) instead of msgpack's own exception."""
    try:
        return P.encode(P.REQUEST, rid=rid, op=op, args=args)
    except (OverflowError, TypeError, ValueError) as exc:
        where, bad = _unsendable(args, "")
        if isinstance(bad, int) and not isinstance(bad, bool):
            raise ValidationError(f"{where or 'a value'} = {echo(bad)} is past 64 bits: "
                                  f"pilotfish integers are {INT64[0]}..{INT64[1]}") from None
        if where:
            raise ValidationError(f"{where}: a {type(bad).__name__} cannot be sent to the server "
                                  "(use numbers, strings, booleans, None, lists and maps)") \
                from None
        raise ValidationError(f"this request cannot be sent: {exc}") from None


def _unsendable(value: Any, path: str) -> tuple[str, Any]:
    """(where, value) of the first value in ``value`` that msgpack cannot encode."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes, float)):
        return "", None
    if isinstance(value, int):
        return (path, value) if not INT64[0] <= value <= 2**64 - 1 else ("", None)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{path}[{echo(k)}]" if path else f"key {echo(k)}", k
            found = _unsendable(v, f"{path}.{k}" if path else k)
            if found[0]:
                return found
        return "", None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _unsendable(v, f"{path}[{i}]")
            if found[0]:
                return found
        return "", None
    return path or "a value", value


class Client:
    """``server_key``: the server's public key (a key file or the key itself) and
    ``client_key``: an authorized client pair (a .key_secret file), for a tcp:// server; by
    default from $PILOTFISH_SERVER_KEY / $PILOTFISH_CLIENT_KEY or the home (see
    :mod:`pilotfish.keys`)."""

    def __init__(self, address: str | None = None, home: str | Path | None = None,
                 timeout: float = 60.0, server_key: str | Path | None = None,
                 client_key: str | Path | None = None) -> None:
        self.home = settings.home(home)
        self.address = settings.server_address(self.home, address)
        if not self.address:
            raise ServerUnavailable(f"no server is running for {self.home} "
                                    "(start one with `pilotfish server start`)")
        self._given = (address, server_key, client_key)  # to find a restarted server again
        self.curve = keys.client_curve(self.home, self.address, server_key, client_key)
        self.timeout = timeout
        self._rids = itertools.count(1)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self._poller: zmq.Poller | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            keys.apply_client(s, self.curve)
            self._poller = zmq.Poller()
            self._poller.register(s, zmq.POLLIN)
            # a refused key fails the call at once, not at timeout; a lost connection fails an
            # idempotent call at once (its reply cannot come; see _call)
            self._mon = keys.monitor_socket(s, zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                            | zmq.EVENT_DISCONNECTED)
            self._poller.register(self._mon, zmq.POLLIN)
            s.connect(self.address)
            self._sock = s
        return self._sock

    def _wait(self, sock: zmq.Socket, seconds: float, lost_fails: bool = False) -> bool:
        """Wait for a reply; raise at once when the server refuses our handshake, and with
        ``lost_fails`` when the connection drops (the server died with our request)."""
        deadline = time.monotonic() + seconds
        while True:
            ready = dict(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if sock in ready:
                return True
            if self._mon is not None and self._mon in ready:
                self._monitor_event(lost_fails)
                continue
            if time.monotonic() >= deadline:
                return False

    def _monitor_event(self, lost_fails: bool) -> None:
        from zmq.utils.monitor import recv_monitor_message
        ev = recv_monitor_message(self._mon)
        if ev["event"] == zmq.EVENT_DISCONNECTED:
            if lost_fails:
                self.close()
                raise ServerUnavailable(f"lost the connection to the server at {self.address}")
            return
        if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH or \
                ev["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            self.close()
            raise keys.Refused(
                f"the server at {self.address} refused this client: "
                f"{keys.handshake_hint(ev['event'], ev['value'])}")

    def close(self) -> None:
        if self._sock is not None:
            if self._mon is not None:
                self._sock.disable_monitor()
                self._mon.close(linger=0)
                self._mon = None
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send one request and wait for its reply; server errors are raised as ours."""
        return self._call(op, args, timeout)

    def _call(self, op: str, args: dict, timeout: float | None, lost_fails: bool = False) -> Any:
        """``lost_fails``: the request only reads (asking again is harmless), so a connection
        lost while waiting fails it at once instead of at its timeout."""
        rid = next(self._rids)
        frame = _encode_request(rid, op, args)
        sock = self._socket()
        if lost_fails:  # a drop seen before this request is no news about it
            while self._mon.poll(0):
                self._monitor_event(False)
        sock.send(frame)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._wait(sock, left, lost_fails):
                self.close()  # a late reply must not be taken for the next request's
                raise ServerUnavailable(f"no answer from the server at {self.address} within "
                                        f"{timeout or self.timeout:.0f} s (is it running? "
                                        "`pilotfish server status`)")
            kind, m = P.decode(sock.recv(), (P.REPLY, P.ERROR))
            if m.get("rid") not in (rid, None):
                continue  # a stale reply to an earlier, timed-out request
            if kind == P.ERROR:
                raise ProtocolError(f"server refused the request: {m['error']}")
            if m["ok"]:
                return m["result"]
            raise ERRORS_BY_CODE.get(m["code"] or "error", PilotfishError)(m["error"])

    # -- server -----------------------------------------------------------------------------
    def ping(self, timeout: float | None = None) -> dict:
        return self.call("ping", timeout=timeout)

    def status(self) -> dict:
        return self.call("status")

    def agents(self, all: bool = False) -> list[dict]:
        return self.call("agent_ls", all=all)

    # -- pilots and sites --------------------------------------------------------------------
    def pilots(self, all: bool = False, site: str | None = None) -> list[dict]:
        """Pilots with their agents (recorded ones, and heads started by hand)."""
        return self.call("pilot_ls", all=all, site=site)

    def add_pilot(self, **pilot: Any) -> dict:
        return self.call("pilot_add", **pilot)

    def update_pilot(self, pilot_id: str, /, **changes: Any) -> dict:
        return self.call("pilot_update", id=pilot_id, **changes)

    def site_backlog(self, site: str) -> dict:
        return self.call("site_backlog", site=site)

    def site_report(self, site: str, **report: Any) -> dict:
        return self.call("site_report", site=site, **report)

    def sites(self) -> list[dict]:
        return self.call("site_status")

    def shutdown(self) -> dict:
        return self.call("shutdown")

    # -- apps -------------------------------------------------------------------------------
    def add_app(self, spec: dict) -> dict:
        return self.call("app_add", spec=spec)

    def apps(self) -> list[dict]:
        return self.call("app_ls")

    def app(self, name: str) -> dict:
        return self.call("app_show", name=name)

    def alter_app(self, name: str, /, **changes: Any) -> dict:
        return self.call("app_alter", name=name, changes=changes)

    def remove_app(self, name: str) -> dict:
        return self.call("app_rm", name=name)

    # -- jobs -------------------------------------------------------------------------------
    def add_jobs(self, jobs: list[dict]) -> list[int]:
        """Add jobs atomically (all or none); returns their ids in order."""
        return self.call("job_add", jobs=jobs, timeout=max(self.timeout, len(jobs) / 1000))["ids"]

    def add_job(self, **job: Any) -> int:
        return self.add_jobs([job])[0]

    def add_array(self, job: dict, array: Any,
                  on_chunk: Callable[[int, int], None] | None = None) -> dict:
        """Add one job per index of ``array`` (``"1-100:5,7"``, a ``range`` or a list of ints),
        filling ``{index}`` in the job's name, description and parameter values. Returns
        ``{"array": id, "ids": [...], "elements": n}``; the array id selects the jobs with
        ``filter={"array": id}``. More than :data:`arrays.CHUNK` elements go in several
        requests, each added all or none (``on_chunk(done, total)`` after each)."""
        return self._add_elements(job, {"array": arrays.spec_of(array)}, on_chunk)

    def add_sweep(self, job: dict, sweep: dict,
                  on_chunk: Callable[[int, int], None] | None = None) -> dict:
        """Add one job per combination of ``sweep`` (parameter -> list of values, or
        ``{"range": "1-10"}``): the cartesian product, the first parameter varying slowest;
        ``{index}`` is the combination's number from 0, and ``{param}`` its value."""
        return self._add_elements(job, {"sweep": sweep}, on_chunk)

    def _add_elements(self, job: dict, what: dict, on_chunk) -> dict:
        total = len(arrays.Elements(what.get("array"), what.get("sweep")))  # refuse early
        ids: list[int] = []
        array_id = None
        for first in range(0, total, arrays.CHUNK):
            count = min(arrays.CHUNK, total - first)
            r = self.call("job_add_array", job=job, first=first, count=count,
                          array_id=array_id, timeout=max(self.timeout, count / 1000), **what)
            array_id = r["array"]
            ids += r["ids"]
            if on_chunk:
                on_chunk(len(ids), total)
        return {"array": array_id, "ids": ids, "elements": total}

    # -- workflows (the seed's Argo jobs) ----------------------------------------------------
    def add_workflow(self, workflow: dict) -> dict:
        """Add a workflow message (the seed's Argo job: name, subjobs, ...); returns
        {"id": workflow id, "jobs": subjob job ids by index, "known": already added}."""
        return self.call("workflow_add", workflow=workflow)

    def workflows(self, filter: dict | None = None, limit: int = 100,
                  offset: int = 0) -> list[dict]:
        return self.call("workflow_ls", filter=filter or {}, limit=limit, offset=offset)

    def workflow(self, workflow_id: int) -> dict:
        return self.call("workflow_show", id=workflow_id)

    def kill_workflows(self, ids: list[int]) -> dict:
        return self.call("workflow_kill", ids=ids)

    def retry_workflows(self, ids: list[int]) -> dict:
        return self.call("workflow_retry", ids=ids)

    def jobs(self, filter: dict | None = None, limit: int = 100, offset: int = 0,
             newest: bool = False, after: Any = None, sort: str | None = None) -> list[dict]:
        """``after``: only jobs with ids past it (below it with ``newest``): keyset paging.
        ``sort``: see :mod:`pilotfish.job_sort` (``after`` then ``job_sort.cursor_of`` the
        last row)."""
        args: dict[str, Any] = {"filter": filter or {}, "limit": limit, "offset": offset,
                                "newest": newest}
        if after is not None:
            args["after"] = after
        if sort is not None:
            args["sort"] = sort
        return self.call("job_ls", **args)

    def groups(self, after: str = "", limit: int = 100) -> dict:
        """Group identifiers in order after ``after``: {"groups": [...], "next": the one to
        ask after next, or None at the end}."""
        return self.call("job_groups", after=after, limit=limit)

    def job(self, job_id: int) -> dict:
        return self.call("job_show", id=job_id)

    def job_log(self, job_id: int, stream: str = "out", after: int = 0,
                tail: int | None = None) -> dict:
        """A job's stored output (``stream`` "out": job.out, "err": job.err) from byte
        ``after`` on, or its last ``tail`` lines: ``pieces`` ([offset, bytes] each), ``next``
        (the offset to ask from next), ``final``, ``complete``, ``capped``, ``path``, ``node``
        (see ``pilotfish job log``)."""
        args: dict[str, Any] = {"id": job_id, "stream": stream, "after": after}
        if tail is not None:
            args["tail"] = tail
        return self.call("job_log", **args)

    def summary(self, filter: dict | None = None) -> dict:
        """Job count, first creation/start/end, last end and busy core-seconds."""
        return self.call("job_summary", filter=filter or {})

    def utilization(self, site: str | None = None, pilot: str | None = None,
                    since: float | None = None, until: float | None = None,
                    step: float | None = None, chunk: int | None = None,
                    scan_all: bool = False) -> dict:
        """Busy cores against time (the attempts that ran; a job's cores are num_nodes ×
        processes_per_node × cpus_per_process), of one site and/or pilot, in [since, until]
        (epoch seconds; default: the last day up to now). Asks the server one chunk of jobs
        at a time and adds them up. Returns ``since``, ``until``, ``step`` (the time grain:
        (until - since) / 20,000 unless given), ``busy`` and ``allocated`` (the cores of the
        agents alive), each a step function [[time, cores], ...] from since to until (a value
        holds until the next point's time), ``core_seconds`` (exact), ``attempts``,
        ``max_busy``, ``max_allocated``, ``agents``, ``agents_cut`` and ``requests``.
        ``chunk``: jobs per request, fewer than the server's 5,000 (tests); ``scan_all``: read
        every job from the first, not from the first that can have run in the range (the
        path before schema 13, for benchmarks and tests)."""
        from pilotfish import usage as U
        args: dict[str, Any] = {k: v for k, v in (("site", site), ("pilot", pilot),
                                                  ("since", since), ("until", until),
                                                  ("step", step), ("chunk", chunk))
                if v is not None}
        if scan_all:
            args["scan_all"] = True
        busy: dict[int, int] = {}
        after, n, secs, attempts, first = 0, 0, 0.0, 0, None
        while after is not None:
            r = self.call("utilization", after=after, **args)
            if first is None:  # the range the server fixed: the same for every chunk
                first = r
                args.update(since=r["since"], until=r["until"], step=r["step"])
            U.add_deltas(busy, r["deltas"])
            secs += r["core_seconds"]
            attempts += r["attempts"]
            n += 1
            after = r["after"]
        since_, until_, step_ = first["since"], first["until"], first["step"]
        alloc: dict[int, int] = {}
        U.add_deltas(alloc, first["allocated"])
        busy_pts = U.steps(busy, since_, until_, step_)
        alloc_pts = U.steps(alloc, since_, until_, step_)
        return {"since": since_, "until": until_, "step": step_, "site": site, "pilot": pilot,
                "busy": busy_pts, "allocated": alloc_pts, "core_seconds": secs,
                "attempts": attempts, "max_busy": max(v for _, v in busy_pts),
                "max_allocated": max(v for _, v in alloc_pts), "agents": first["agents"],
                "agents_cut": first["agents_cut"], "requests": n}

    def usage(self, by: str | list[str] = ("site", "day"), since: float | None = None,
              until: float | None = None, chunk: int | None = None,
              scan_all: bool = False, cache: bool = True) -> dict:
        """Jobs and core-hours grouped by any of site, app, group (group_identifier) and day
        or month (UTC), in [since, until) (epoch seconds; default: the 30 days up to now).
        An attempt counts at the site where it ran and the day it ended. Returns ``by``,
        ``since``, ``until``, ``rows`` (dicts: the keys in ``by`` — a name or None; day
        ``YYYY-MM-DD``, month ``YYYY-MM`` — and jobs (ended there in a final state),
        finished (JOB_FINISHED), attempts, core_hours), ``totals`` and ``requests``.
        The closed whole days come from the server's cache of them (``cache=False``: every
        day from the jobs, the way before schema 15)."""
        from pilotfish import usage as U
        keys = U.parse_by(by)
        args: dict[str, Any] = {k: v for k, v in (("since", since), ("until", until),
                                                  ("chunk", chunk)) if v is not None}
        if scan_all:  # (see utilization)
            args["scan_all"] = True
        sums = U.UsageSums(keys)
        n = 0
        windows: list[dict] = [{}]  # the ranges read from the jobs: all of it by default
        if cache and not scan_all and _may_hold_a_day(since, until):
            # the closed whole days from the server's cache (summed there first if need be:
            # "more"), the rest of the range (its edges, today) from the jobs
            more = True
            while more:
                r = self.call("usage_days", by=keys, **{k: v for k, v in args.items()
                                                        if k in ("since", "until")})
                args.update(since=r["since"], until=r["until"])
                n += 1
                more = r["more"]
            if r["span"] is not None:
                sums.add(r["rows"])
                lo, hi = r["span"][0] * 86400.0, r["span"][1] * 86400.0
                windows = [{"since": a, "until": b} for a, b in
                           ((args["since"], lo), (hi, args["until"])) if a < b]
        for window in windows:
            wargs = {**args, **window}
            after = 0
            while after is not None:
                r = self.call("usage", by=keys, after=after, **wargs)
                wargs.update(since=r["since"], until=r["until"])
                if not window:
                    args.update(since=r["since"], until=r["until"])
                sums.add(r["rows"])
                n += 1
                after = r["after"]
        rows = sums.rows()
        return {"by": keys, "since": args["since"], "until": args["until"], "rows": rows,
                "totals": U.totals(rows), "requests": n}

    def counts(self, filter: dict | None = None) -> dict[str, int]:
        return self.call("job_counts", filter=filter or {})

    def counts_bounded(self, filter: dict | None = None, limit: int = 1_000) -> dict:
        """Jobs by state among the newest ``limit`` that match: {"counts": {state: n},
        "more": whether more jobs match, "scanned": None, or N when only the newest N jobs
        were looked at (a tag: no index)} (the web's job table: bounded work per page)."""
        return self.call("job_counts", filter=filter or {}, limit=limit)

    def alter_jobs(self, filter: dict, /, **changes: Any) -> dict:
        return self.call("job_alter", filter=filter, changes=changes)

    def kill_jobs(self, filter: dict) -> dict:
        return self.call("job_kill", filter=filter)

    def retry_jobs(self, filter: dict) -> dict:
        return self.call("job_retry", filter=filter)

    def remove_jobs(self, filter: dict) -> dict:
        return self.call("job_rm", filter=filter)

    # -- the event stream ---------------------------------------------------------------------
    def events(self, since: int = 0, wait: float = 0.0, limit: int = 1000,
               job: int | list[int] | None = None, group: str | None = None,
               state: str | list[str] | None = None,
               kind: str | list[str] | None = None,
               workflow: int | list[int] | None = None) -> dict:
        """Events with id > ``since``, oldest first: {"events": [...], "cursor": the id to ask
        from next, "oldest": the first id the stream holds in full}. ``wait`` (up to 60 s):
        when nothing matches yet, the server answers as soon as something does (or empty at
        the end). Each event has id, time, kind (job, agent, pilot, workflow), job, name,
        group, from, to, via, message, agent, host, pilot, site, workflow (a workflow's event,
        or a subjob's). A cursor older than what was pruned raises
        :class:`pilotfish.errors.Pruned`."""
        args: dict[str, Any] = {"since": since, "limit": limit, "wait": wait}
        for key, value in (("job", job), ("group", group), ("state", state), ("kind", kind),
                           ("workflow", workflow)):
            if value is not None:
                args[key] = value
        # the server refuses a wait that is not 0..60 seconds: give such a request the plain
        # timeout, so that refusal (one line) comes back, not an error of our own poll
        valid = type(wait) in (int, float) and 0 <= wait <= 60
        return self._call("events", args, self.timeout + (wait if valid else 0), lost_fails=True)

    def follow(self, since: int = 0, **filters: Any) -> Iterator[dict]:
        """Every event after ``since`` matching ``filters`` (as :meth:`events` takes them), in
        order, forever, as the server commits them. A dropped connection or a server restart
        is ridden out: it asks again from its cursor, so nothing is missed or seen twice."""
        cursor = since
        pause = 0.05
        while True:
            try:
                r = self.events(since=cursor, wait=FOLLOW_WAIT, **filters)
            except ServerUnavailable:
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
                self._find_server()
                continue
            pause = 0.05
            for e in r["events"]:
                yield e
            cursor = r["cursor"]

    def _find_server(self) -> None:
        """After a lost connection: the home's server may have restarted at a new address."""
        address, server_key, client_key = self._given
        found = settings.server_address(self.home, address)
        if found and found != self.address:
            self.close()
            self.address = found
            self.curve = keys.client_curve(self.home, found, server_key, client_key)

    def wait(self, filter: dict | None = None, timeout: float | None = None,
             poll: float = 0.2,
             progress: Callable[[dict[str, int]], None] | None = None) -> dict[str, int]:
        """Block until every matching job is final; returns the final counts by state.

        Driven by the event stream, nothing polled: the jobs are counted, then counted again
        only once as many jobs reached a final state (or were removed) as were not final --
        before that they cannot all be -- or every 0.25 s of such events when ``progress``
        shows counts, or after a quiet spell. ``poll`` is no longer used (kept so callers
        that pass it still work)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        flt = filter or {}
        ends: dict[str, Any] = {"kind": "job", "state": [*FINAL_STATES, REMOVED]}
        if set(flt) == {"ids"} and isinstance(flt["ids"], list) and 0 < len(flt["ids"]) <= 1000:
            ends["job"] = flt["ids"]
        elif set(flt) == {"group"}:
            ends["group"] = flt["group"]
        cursor = self.status()["events"]["newest"]  # before counting: no end falls between
        while True:
            counts = self.counts(filter)
            if progress:
                progress(counts)
            if all(s in FINAL_STATES for s in counts):
                return counts
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"jobs not final after {timeout} s: {counts}")
            open_jobs = sum(n for s, n in counts.items() if s not in FINAL_STATES)
            counted = time.monotonic()
            seen = 0
            while seen < open_jobs:
                step = WAIT_RECOUNT if deadline is None else min(WAIT_RECOUNT,
                                                                 deadline - time.monotonic())
                if step <= 0:
                    break
                try:
                    r = self.events(since=cursor, wait=step, limit=10_000, **ends)
                except ServerUnavailable:  # a server restart: wait for it, then count again
                    time.sleep(0.2)
                    self._find_server()
                    break
                except Pruned:  # pruned under us (a very old cursor): count again from now
                    cursor = self.status()["events"]["newest"]
                    break
                cursor = r["cursor"]
                seen += len(r["events"])
                if not r["events"] and time.monotonic() - counted >= WAIT_RECOUNT:
                    break  # a quiet spell: count again
                if progress and r["events"] and time.monotonic() - counted >= 0.25:
                    break
                if r["events"] and open_jobs - seen > WAIT_PACE_ABOVE:
                    # many still to end: take their events in bigger helpings (none is lost,
                    # the cursor keeps them) instead of one request per server turn
                    time.sleep(0.05)


def _may_hold_a_day(since: float | None, until: float | None) -> bool:
    """Whether [since, until) may hold a whole UTC day (the server's cache is of whole
    closed days: a shorter range is not worth asking it about)."""
    import math
    if since is None:
        return True
    hi = until if until is not None else time.time() + 3600  # (a server clock ahead)
    return math.floor(hi / 86400) > math.ceil(since / 86400)
