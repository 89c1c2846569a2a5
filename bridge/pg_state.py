"""What a NOTIFY source remembers across restarts, in its own files (never in the user's database
and never in the server): the cursor, the pulse in flight, and the refused pulses.

``<state>.json`` (replaced atomically: write, fsync, rename)::

    {"source": "diiid-efit", "cursor": 190004, "pending": {"id": 190005, "payload": "{...}"},
     "submitted": 12, "refused": 1}

``cursor``: the largest pulse id handled (a job added, or refused and recorded); ``pending``:
the pulse being submitted, written *before* its job is sent. After a crash a pending pulse is
settled first: the server is asked whether a job with its tag exists (then it is done), else it
is submitted again. ``<state>.refused.jsonl``: one JSON line per refused pulse (time, id,
origin, error, payload cut to 4 KiB). ``<state>.lock``: held while a source runs, so two
sources never share one cursor.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.validate import INT64, cap

KEEP_PAYLOAD = 4096


class State:
    def __init__(self, path: Path, source: str) -> None:
        self.path = Path(path)
        self.source = source
        self.refused_path = self.path.with_name(self.path.stem + ".refused.jsonl")
        self.cursor: int | None = None
        self.pending: dict | None = None
        self.submitted = 0
        self.refused = 0
        self._lock_fd: int | None = None
        self.fresh = True

    # -- the lock ---------------------------------------------------------------------------
    def lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path.with_name(self.path.stem + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PilotfishError(f"another source (pid {other}) uses the state file "
                                 f"{self.path}; one cursor, one source") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the cursor -------------------------------------------------------------------------
    def load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError("not a map")
            cursor, pending = d.get("cursor"), d.get("pending")
            if cursor is not None and (type(cursor) is not int
                                       or not INT64[0] <= cursor <= INT64[1]):
                raise ValueError(f"cursor {cursor!r} is not an integer")
            if pending is not None and not (isinstance(pending, dict)
                                            and type(pending.get("id")) is int
                                            and isinstance(pending.get("payload"), str)):
                raise ValueError("pending is not {id, payload}")
        except ValueError as exc:
            raise ValidationError(f"state file {self.path} is damaged ({exc}); move it away "
                                  "and start with --from-id to choose where to resume") from None
        if d.get("source") != self.source:
            raise ValidationError(f"state file {self.path} belongs to source "
                                  f"{d.get('source')!r}, not {self.source!r}: give each "
                                  "source its own --state")
        self.fresh = False
        self.cursor, self.pending = cursor, pending
        self.submitted = int(d.get("submitted") or 0)
        self.refused = int(d.get("refused") or 0)

    def save(self) -> None:
        data = {"source": self.source, "cursor": self.cursor, "pending": self.pending,
                "submitted": self.submitted, "refused": self.refused, "saved": time.time()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(data).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself survives a power cut
        finally:
            os.close(dfd)
        self.fresh = False

    def begin(self, pulse_id: int, payload: str) -> None:
        """Write the pulse in flight before its job is sent."""
        self.pending = {"id": pulse_id, "payload": payload}
        self.save()

    def done(self, pulse_id: int, refused: bool = False) -> None:
        if self.cursor is None or pulse_id > self.cursor:
            self.cursor = pulse_id
        if refused:
            self.refused += 1
        else:
            self.submitted += 1
        self.pending = None
        self.save()

    # -- refusals ---------------------------------------------------------------------------
    def record_refused(self, pulse_id: int | None, origin: str, error: str,
                       payload: str) -> None:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": self.source,
            "id": pulse_id, "origin": origin, "error": cap(error),
            "payload": payload[:KEEP_PAYLOAD]}
        if len(payload) > KEEP_PAYLOAD:
            entry["payload_chars"] = len(payload)
        fd = os.open(self.refused_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode("utf-8", "surrogatepass"))
            os.fsync(fd)
        finally:
            os.close(fd)
