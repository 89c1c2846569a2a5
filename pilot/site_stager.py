"""The site stager: remote inputs fetched on the login (data-transfer) node before jobs queue.

It runs in the site agent (a thread with its own server connection) when the site profile has
a ``transfers:`` section. Each poll (``stage_poll``, one request) hands back finished work, says
what it still holds (renewing its stage leases) and how it is doing (``pilotfish transfer
ls``), and takes new work within the site's look-ahead window (see
:mod:`pilotfish.server.staging`). Transfers run in worker threads through the transfer room
(:func:`pilotfish.transfer.scheme_for`): at most ``max_concurrent`` at once and at most
``per_endpoint[host]`` per endpoint, a batch of up to ``batch_size`` files in one session where
the scheme has batches; each bounded by ``timeout``, ``stall`` and ``max_bytes``. A file is
written under a temporary name and renamed into ``<staging_dir>/<job>/<name>`` (the scheme's
atomic placement); its size is checked against the bytes moved, its SHA-256 computed when
``checksum`` is on. A failure goes back as the scheme's one-line error: the job lands in
STAGE_IN_FAILED and is retried like any failure, after a backoff the server keeps.

The node agent that takes a staged job moves ``<staging_dir>/<job>/<name>`` into its workdir
(``mv``, a child process: :meth:`pilotfish.pilot.executor.Executor._place`), so the staging
directory must be one the compute nodes see at the same path (a shared scratch file system:
``<scratch>/pilotfish-staging`` by default). The stager removes the job directories the agents
emptied (every ``SWEEP`` seconds).
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.site_configs.schema import Site, Transfers

log = logging.getLogger("pilotfish.site")
#: Seconds between polls while nothing finishes (a finished transfer polls at once).
POLL = 0.5
#: Seconds of finished transfers the bytes/s figures are taken over.
RATE_WINDOW = 30.0
#: Most jobs a stager holds (leased, queued or in flight): a poll names them all.
MAX_HELD = 1000
#: Seconds between sweeps of the staging directory for emptied job directories.
SWEEP = 30.0


def staging_dir(site: Site, home: Path) -> Path:
    """Where this site's staged inputs go: ``transfers.staging_dir``, else
    ``<scratch>/pilotfish-staging``, else ``HOME/staging`` ($VARS expanded here)."""
    t = site.transfers
    raw = (t.staging_dir if t is not None else None) or \
        (f"{site.scratch}/pilotfish-staging" if site.scratch else None)
    if raw is None:
        return Path(home) / "staging"
    value = os.path.expandvars(raw)
    if "$" in value:
        raise PilotfishError(f"site {site.name}: transfers.staging_dir {raw!r}: a variable in "
                             "it is not set here")
    return Path(value)


@dataclass
class Work:
    job: int
    token: int
    url: str
    endpoint: str = "?"
    scheme: str = ""
    host: str = ""
    started: float | None = None


@dataclass
class Endpoint:
    limit: int
    active: int = 0
    queued: int = 0
    done: int = 0
    failed: int = 0
    bytes: int = 0
    last_error: str | None = None
    recent: deque = field(default_factory=deque)  # (time finished, bytes, seconds)

    def rate(self, now: float) -> float:
        while self.recent and self.recent[0][0] < now - RATE_WINDOW:
            self.recent.popleft()
        if not self.recent:
            return 0.0
        span = max(now - min(t - s for t, _b, s in self.recent), 1e-3)
        return sum(b for _t, b, _s in self.recent) / span


class SiteStager:
    """Fetches held jobs' inputs for one site; :meth:`run` until :meth:`stop`."""

    def __init__(self, site: Site, client_factory: Callable[[], Any], home: Path,
                 stager_id: str | None = None, poll: float = POLL) -> None:
        self.site = site
        self.t: Transfers = site.transfers or Transfers()
        st = site.staging
        self.max_concurrent = self.t.max_concurrent or 8
        self.batch_size = self.t.batch_size or 16
        self.timeout = float(self.t.timeout or (st.timeout if st and st.timeout else 3600.0))
        self.max_bytes = self.t.max_bytes or (st.max_bytes if st and st.max_bytes
                                              else 100 * 2**30)
        self.stall = float(self.t.stall or 120.0)
        self.lookahead = self.t.lookahead or self.max_concurrent
        self.dir = staging_dir(site, home)
        self.client_factory = client_factory
        self.poll = poll
        host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
        self.id = (stager_id or f"{site.name}.{host[:40]}.{os.getpid()}")[:64]
        self.pending: deque[Work] = deque()     # leased, waiting for a slot
        self.active: dict[int, Work] = {}       # being transferred
        self.done: list[dict] = []              # results not yet told to the server
        self.endpoints: dict[str, Endpoint] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(self.max_concurrent, thread_name_prefix="stager")
        self.window = self.ahead = 0
        self.next_sweep = time.monotonic() + SWEEP
        self.error: str | None = None
        self.totals = {"done": 0, "failed": 0, "bytes": 0}
        self.credentials = self._credentials()

    def _credentials(self) -> Any:
        """The site profile's ``transfers.credentials`` over the user's transfers file."""
        from pilotfish.transfer.credentials import Credentials
        creds = {k: v.model_dump(exclude_none=True) for k, v in self.t.credentials.items()}
        try:
            return Credentials.load(creds or None)
        except PilotfishError:
            raise
        except Exception as exc:  # a surprise of the transfers file: say it, do not stage
            raise PilotfishError(f"transfer credentials: {exc}") from None

    # -- the loop ---------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        client = self.client_factory()
        log.info("stager %s for site %s: staging into %s, %d at once (%s per endpoint)",
                 self.id, self.site.name, self.dir, self.max_concurrent,
                 self.t.per_endpoint or "no limit")
        try:
            while not self.stopping.is_set():
                try:
                    self.round(client)
                    self.error = None
                except PilotfishError as exc:
                    self.error = str(exc)
                    log.warning("stager %s: poll failed: %s", self.id, exc)
                    time.sleep(min(2.0, self.poll * 4))
                if time.monotonic() >= self.next_sweep:
                    self.sweep()
                self.wake.wait(self.poll)
                self.wake.clear()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            try:
                client.close()
            except Exception:
                pass

    def round(self, client: Any) -> None:
        with self.lock:
            done, self.done = self.done, []
            holding = [{"job": w.job, "token": w.token}
                       for w in list(self.pending) + list(self.active.values())]
            # a little queued beyond the slots, so they never idle (at most MAX_HELD held:
            # a poll names everything it holds)
            room = min(self.max_concurrent * 2, MAX_HELD) - len(holding)
        try:
            reply = client.call("stage_poll", stager=self.id, site=self.site.name,
                                want=max(0, room), lookahead=self.lookahead,
                                done=done, holding=holding, report=self.report())
        except ValidationError as exc:  # refused whole: sending it again would not help;
            # its leases run out and the jobs are staged again
            log.error("stager %s: the server refused a poll (%d results dropped): %s",
                      self.id, len(done), exc)
            raise
        except BaseException:
            with self.lock:  # told nothing: tell it next time
                self.done = done + self.done
            raise
        self.window, self.ahead = reply.get("window", 0), reply.get("ahead", 0)
        dropped = {(r["job"], r["token"]) for r in reply.get("refused", [])}
        with self.lock:
            if dropped:  # taken back while we were silent: not ours to finish
                self.pending = deque(w for w in self.pending if (w.job, w.token) not in dropped)
            for item in reply.get("work", []):
                self.pending.append(self._work(item))
            self._start()

    def sweep(self) -> None:
        """Remove job directories the agents emptied (a job's staged file was moved out)."""
        self.next_sweep = time.monotonic() + SWEEP
        with self.lock:
            busy = {str(w.job) for w in list(self.pending) + list(self.active.values())}
        try:
            with os.scandir(self.dir) as it:
                names = [e.name for e in it if e.name.isdigit() and e.name not in busy
                         and e.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for name in names[:10_000]:
            try:
                os.rmdir(self.dir / name)  # only when empty
            except OSError:
                pass

    def _work(self, item: dict) -> Work:
        w = Work(item["job"], item["token"], item["url"])
        try:
            from pilotfish.transfer import check_url
            u = check_url(w.url, "input_url")
            w.endpoint, w.scheme, w.host = u.endpoint, u.scheme, u.host
        except Exception:  # reported when its transfer starts
            pass
        return w

    def _endpoint(self, w: Work) -> Endpoint:
        ep = self.endpoints.get(w.endpoint)
        if ep is None:
            ep = self.endpoints[w.endpoint] = Endpoint(self.t.limit_for(w.scheme, w.host))
        return ep

    def _start(self) -> None:
        """Start what the limits allow, oldest first (under the lock)."""
        for ep in self.endpoints.values():
            ep.queued = 0
        running = len(self.active)
        waiting: deque[Work] = deque()
        while self.pending:
            w = self.pending.popleft()
            ep = self._endpoint(w)
            if running >= self.max_concurrent or ep.active >= ep.limit:
                ep.queued += 1
                waiting.append(w)
                continue
            batch = [w]
            if self._batches(w):  # more of this endpoint's files in the same session
                # spread them over the sessions free now (4 files, 4 free sessions: 4 of one
                # file each, which land 4 times sooner), batch_size files a session at most
                free = min(ep.limit - ep.active, self.max_concurrent - running)
                same = 1 + sum(1 for x in self.pending if x.endpoint == w.endpoint)
                size = min(self.batch_size, -(-same // max(1, free)))
                rest: deque[Work] = deque()
                while self.pending and len(batch) < size:
                    x = self.pending.popleft()
                    (batch if x.endpoint == w.endpoint else rest).append(x)
                self.pending.extendleft(reversed(rest))
            ep.active += 1
            running += 1
            now = time.time()
            for x in batch:
                x.started = now
                self.active[x.job] = x
            self.pool.submit(self._transfer, batch)
        self.pending = waiting

    def _batches(self, w: Work) -> bool:
        if self.batch_size <= 1:
            return False
        try:
            from pilotfish.transfer import scheme_for
            return bool(scheme_for(w.url).batch)
        except Exception:
            return False

    # -- one transfer (a worker thread) -----------------------------------------------------
    def _transfer(self, batch: list[Work]) -> None:
        t0 = time.time()
        results: list[tuple[Work, dict]] = []
        try:
            results = self._fetch(batch)
        except BaseException as exc:  # a bug or a scheme's surprise: one line, never silence
            why = _one_line(exc)
            results = [(w, {"ok": False, "msg": why}) for w in batch]
        took = time.time() - t0
        with self.lock:
            ep = self._endpoint(batch[0])
            ep.active -= 1
            now = time.time()
            for w, r in results:
                self.active.pop(w.job, None)
                r.update(job=w.job, token=w.token, seconds=round(took, 3))
                self.done.append(r)
                if r["ok"]:
                    ep.done += 1
                    ep.bytes += r.get("bytes") or 0
                    ep.recent.append((now, r.get("bytes") or 0, took))
                    self.totals["done"] += 1
                    self.totals["bytes"] += r.get("bytes") or 0
                else:
                    ep.failed += 1
                    ep.last_error = r["msg"]
                    self.totals["failed"] += 1
                    log.warning("stager %s: job %d: %s", self.id, w.job, r["msg"])
            self._start()
        self.wake.set()

    def _fetch(self, batch: list[Work]) -> list[tuple[Work, dict]]:
        from pilotfish.errors import ValidationError
        from pilotfish.transfer import Limits, TransferError, check_url, scheme_for
        limits = Limits(timeout=self.timeout, max_bytes=self.max_bytes, stall=self.stall)
        out: list[tuple[Work, dict]] = []
        pairs = []
        for w in batch:
            try:
                u = check_url(w.url, "input_url")
                name = u.name
                if not name or name.startswith((".", "-")):
                    raise TransferError(f"{w.url}: names no file to stage (or a hidden one)")
                jobdir = self.dir / str(w.job)
                if jobdir.is_symlink():
                    jobdir.unlink()
                jobdir.mkdir(mode=0o700, exist_ok=True)
                dest = jobdir / name
                if dest.is_symlink() or dest.exists():  # an earlier try's: fetched again
                    dest.unlink()
                pairs.append((w, u, name, str(dest)))
            except (TransferError, ValidationError, OSError) as exc:
                out.append((w, {"ok": False, "msg": _one_line(exc)}))
        if not pairs:
            return out
        scheme = scheme_for(pairs[0][1], credentials=self.credentials)
        if len(pairs) > 1:
            got = scheme.get_batch([(u, d) for _w, u, _n, d in pairs], limits)
        else:
            try:
                got = [scheme.get(pairs[0][1], pairs[0][3], limits)]
            except (TransferError, ValidationError) as exc:
                got = [exc]
        for (w, _u, name, dest), r in zip(pairs, got):
            if isinstance(r, BaseException):
                out.append((w, {"ok": False, "msg": _one_line(r)}))
                continue
            try:
                size = os.stat(dest, follow_symlinks=False).st_size
            except OSError as exc:
                out.append((w, {"ok": False, "msg": f"{w.url}: placed file missing: "
                                                    f"{exc.strerror}"}))
                continue
            if isinstance(r, int) and r != size:
                _unlink(dest)
                out.append((w, {"ok": False, "msg": f"{w.url}: size check failed: moved {r} "
                                                    f"bytes, {size} on disk"}))
                continue
            res = {"ok": True, "name": name, "bytes": size}
            if self.t.checksum:
                res["sha256"] = _sha256(dest)
            out.append((w, res))
        return out

    # -- what transfer ls shows -------------------------------------------------------------
    def report(self) -> dict:
        now = time.time()
        with self.lock:
            eps = {name: {"limit": ep.limit, "active": ep.active, "queued": ep.queued,
                          "done": ep.done, "failed": ep.failed, "bytes": ep.bytes,
                          "bytes_per_s": round(ep.rate(now)), "last_error": ep.last_error}
                   for name, ep in list(self.endpoints.items())[:200]}
            inflight = [{"job": w.job, "endpoint": w.endpoint, "url": w.url[:300],
                         "seconds": round(now - w.started, 1) if w.started else None}
                        for w in list(self.active.values())[:100]]
            return {"host": socket.gethostname(), "pid": os.getpid(), "dir": str(self.dir),
                    "max_concurrent": self.max_concurrent, "active": len(self.active),
                    "queued": len(self.pending), "window": self.window, "ahead": self.ahead,
                    "endpoints": eps, "inflight": inflight, "error": self.error,
                    **self.totals}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    from pilotfish.errors import PilotfishError as PE
    if not isinstance(exc, PE):
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line[:1500]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def start_thread(stager: SiteStager) -> threading.Thread:
    th = threading.Thread(target=stager.run, name="pilotfish-stager", daemon=True)
    th.start()
    return th


__all__ = ["SiteStager", "staging_dir", "start_thread"]
