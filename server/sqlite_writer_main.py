"""The SQLite writer process: runs the server's statements on its own connection (see
server/sqlite_remote.py). Run by path with only the standard library, so it starts in a few
milliseconds: ``python -I sqlite_writer_main.py FD DATABASE``.

Requests come over the socket FD as length-prefixed pickles, in order:
``("x", sql, params)`` run a statement and answer its result; ``("m", sql, rows)`` run it for
every row and answer nothing (an error is kept: every later request but a rollback answers it,
as an aborted transaction would); ``("c",)`` commit (a failed commit is kept the same way: its
transaction may still be open), ``("r",)`` roll back (clears the error),
``("f", name)`` define a function the server's SQL may use (regexp). It exits when the
socket closes, rolling back what was not committed.
"""
from __future__ import annotations

import pickle
import re
import signal
import socket
import sqlite3
import struct
import sys

_LEN = struct.Struct("!I")


def _send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def _error(exc: BaseException) -> BaseException:
    """``exc`` as it can travel (a driver error keeps its class)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return sqlite3.OperationalError(f"{type(exc).__name__}: {exc}")


def _regexp(pattern, value):
    # as SQLAlchemy's pysqlite dialect defines it
    return value is not None and re.search(pattern, value) is not None


def serve(sock: socket.socket, path: str) -> None:
    conn = sqlite3.connect(path, check_same_thread=False)
    cur = conn.cursor()
    kept: BaseException | None = None
    buf = b""
    try:
        while True:
            while len(buf) < 4:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return
                buf += chunk
            (n,) = _LEN.unpack_from(buf)
            while len(buf) < 4 + n:
                chunk = sock.recv(max(1 << 20, 4 + n - len(buf)))
                if not chunk:
                    return
                buf += chunk
            req = pickle.loads(buf[4:4 + n])
            buf = buf[4 + n:]
            kind = req[0]
            if kind == "m":
                if kept is None:
                    try:
                        cur.executemany(req[1], req[2])
                    except Exception as exc:
                        kept = _error(exc)
                continue
            if kind == "r":
                kept = None
                try:
                    conn.rollback()
                    _send(sock, ("ok", None))
                except Exception as exc:
                    _send(sock, ("err", _error(exc)))
                continue
            if kept is not None:  # until the rollback: nothing after it may be committed
                _send(sock, ("err", kept))
                continue
            try:
                if kind == "x":
                    cur.execute(req[1], req[2])
                    desc = cur.description
                    rows = cur.fetchall() if desc is not None else None
                    _send(sock, ("ok", (desc, rows, cur.rowcount, cur.lastrowid)))
                elif kind == "c":
                    try:
                        conn.commit()
                    except Exception as exc:
                        # its transaction may still be open: nothing more may be committed
                        # with it, so every request fails until the rollback
                        kept = _error(exc)
                        raise
                    _send(sock, ("ok", None))
                elif kind == "f":
                    if req[1] == "regexp":
                        conn.create_function("regexp", 2, _regexp, deterministic=True)
                    _send(sock, ("ok", None))
                else:
                    _send(sock, ("err", sqlite3.InterfaceError(f"unknown request {kind!r}")))
            except Exception as exc:
                _send(sock, ("err", _error(exc)))
    except (EOFError, ConnectionError, OSError):
        return
    finally:
        try:
            conn.rollback()
            conn.close()
        except Exception:
            pass


def main() -> None:
    # The server stops us by closing the socket, after its last commit: a Ctrl-C or a TERM
    # sent to its whole process group must not end us first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd, path = int(sys.argv[1]), sys.argv[2]
    sock = socket.socket(fileno=fd)
    serve(sock, path)


if __name__ == "__main__":
    main()
