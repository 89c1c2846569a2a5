"""The server's SQLite connection, held by a writer process of its own.

On SQLite the server's loop spent half its time inside the driver writing the turn's rows
(executemany of task updates, events, leases, new jobs) while the machine's other core sat
idle; a thread cannot take that work (sqlite3 lets go of the GIL around every row, and the two
threads handed it back and forth thousands of times a turn: docs/DESIGN.md). So the server's
one read-write connection lives in a process of its own (server/sqlite_writer_main.py) and
this module is the DB-API driver SQLAlchemy sees for it: every statement goes to that process,
in order, on one connection and so in one transaction, as before. ``executemany`` -- the
batched writes, nearly all of a busy turn's -- is sent without waiting (the process writes
while the loop handles the next message); anything that returns a result, the commit and the
rollback wait for everything sent before them, and an error among the unanswered writes is
raised by the next of those, failing the turn there (recovered as any failed turn is).

Reads of committed rows that need nothing of the open turn (the dispatch read of untouched
jobs, the queue read at start) use an ordinary connection in the server's process.
"""
from __future__ import annotations

import copyreg
import io
import os
import pickle
import socket
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

_LEN = struct.Struct("!I")
_SCRIPT = str(Path(__file__).with_name("sqlite_writer_main.py"))
#: socket buffer each way: a turn's batched rows go out without blocking on the writer
_BUF = 4 << 20


class RemoteConnection:
    """A DB-API connection whose statements run in a writer process (see the module doc)."""

    def __init__(self, path: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, _BUF)
                except OSError:
                    pass
        self._proc = subprocess.Popen(
            [sys.executable, "-I", _SCRIPT, str(theirs.fileno()), path],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        theirs.close()
        self._sock = ours
        self._buf = b""
        self.closed = False

    # -- the wire ----------------------------------------------------------------------------
    def _post(self, req: tuple) -> None:
        if self.closed:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        try:
            data = pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
        except TypeError:  # a memoryview parameter (a BLOB, as SQLAlchemy binds it)
            data = _dumps_views(req)
        try:
            self._sock.sendall(_LEN.pack(len(data)) + data)
        except OSError as exc:
            raise self._gone(exc) from None

    def _call(self, req: tuple) -> Any:
        self._post(req)
        try:
            while len(self._buf) < 4:
                self._fill()
            (n,) = _LEN.unpack_from(self._buf)
            while len(self._buf) < 4 + n:
                self._fill()
        except OSError as exc:
            raise self._gone(exc) from None
        status, value = pickle.loads(self._buf[4:4 + n])
        self._buf = self._buf[4 + n:]
        if status == "err":
            raise value
        return value

    def _fill(self) -> None:
        chunk = self._sock.recv(1 << 20)
        if not chunk:
            raise ConnectionResetError("closed")
        self._buf += chunk

    def _gone(self, exc: BaseException) -> sqlite3.OperationalError:
        code = self._proc.poll()
        why = f"exit code {code}" if code is not None else str(exc)
        return sqlite3.OperationalError(f"the SQLite writer process is gone ({why})")

    # -- DB-API ------------------------------------------------------------------------------
    def cursor(self) -> "RemoteCursor":
        return RemoteCursor(self)

    def commit(self) -> None:
        self._call(("c",))

    def rollback(self) -> None:
        if not self.closed:
            self._call(("r",))

    def create_function(self, name: str, *args, **kwargs) -> None:
        self._call(("f", name))  # (the process defines its own: only regexp is known)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._sock.close()
        finally:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _dumps_views(obj) -> bytes:
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    p.dispatch_table = {**copyreg.dispatch_table, memoryview: lambda m: (bytes, (m.tobytes(),))}
    p.dump(obj)
    return buf.getvalue()


class RemoteCursor:
    arraysize = 1

    def __init__(self, conn: RemoteConnection) -> None:
        self.connection = conn
        self.description = None
        self.rowcount = -1
        self.lastrowid = None
        self._rows: list = []
        self._at = 0

    def execute(self, sql: str, params: Any = ()) -> "RemoteCursor":
        desc, rows, self.rowcount, self.lastrowid = self.connection._call(
            ("x", sql, tuple(params) if isinstance(params, list) else params))
        self.description = desc
        self._rows, self._at = rows or [], 0
        return self

    def executemany(self, sql: str, seq: Any) -> "RemoteCursor":
        """Sent without waiting (see the module doc)."""
        rows = seq if isinstance(seq, list) else list(seq)
        self.connection._post(("m", sql, rows))
        self.description, self.rowcount, self._rows, self._at = None, -1, [], 0
        return self

    def fetchone(self):
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchmany(self, size: int | None = None) -> list:
        size = size or self.arraysize
        out = self._rows[self._at:self._at + size]
        self._at += len(out)
        return out

    def fetchall(self) -> list:
        out = self._rows[self._at:]
        self._at = len(self._rows)
        return out

    def __iter__(self):
        while (r := self.fetchone()) is not None:
            yield r

    def close(self) -> None:
        self._rows = []

    def setinputsizes(self, *a) -> None:
        pass

    def setoutputsize(self, *a) -> None:
        pass


def engine(url: str):
    """An engine like ``make_engine``'s for ``url`` (a SQLite file) whose connections are
    :class:`RemoteConnection`s (the database exists and is at the current schema: the
    caller made it with ``make_engine`` first)."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.pool import NullPool

    from .db import _sqlite_pragmas
    path = url.split("///", 1)[1].split("?", 1)[0]
    eng = create_engine(url, creator=lambda: RemoteConnection(os.path.abspath(path)),
                        poolclass=NullPool)
    event.listen(eng, "connect", _sqlite_pragmas)
    return eng
