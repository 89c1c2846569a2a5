"""Server clients for the web process, one key each, reused across requests.

A :class:`pilotfish.Client` holds one ZeroMQ socket, which only one thread may use at a time;
the ASGI server runs each request in a thread of its pool, so each request borrows a client of
its key from a free list and gives it back. A client that lost the server is dropped (a new
one finds a restarted server's address again in server.json).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pilotfish import keys, settings
from pilotfish.client import Client
from pilotfish.errors import PilotfishError, ServerUnavailable

#: Idle clients kept per key.
KEEP = 8


class ClientPool:
    """``key``: the name of a client pair in the home's keys dir, or None for the client the
    CLI would use (``--client-key``, $PILOTFISH_CLIENT_KEY or the home's own pair)."""

    def __init__(self, home: Path, address: str | None = None, timeout: float = 30.0) -> None:
        self.home = Path(home)
        self.address = address
        self.timeout = timeout
        self._free: dict[str | None, list[Client]] = {}
        self._lock = threading.Lock()

    def key_file(self, key: str | None) -> Path | None:
        return None if key is None else keys.keys_dir(self.home) / f"{key}{keys.SECRET}"

    def new(self, key: str | None, timeout: float | None = None) -> Client:
        return Client(self.address, self.home, timeout=timeout or self.timeout,
                      client_key=None if self.plain() else self.key_file(key))

    def plain(self) -> bool:
        """Does the server serve without CurveZMQ (ipc://, or started --insecure)? Then there
        are no keys to give: the server takes every caller for admin, and only the web's own
        role checks stand (a token's jobs are not told apart from others')."""
        address = settings.server_address(self.home, self.address)
        if not address or not keys.uses_curve(address):
            return True
        info = settings.read_server_info(self.home) or {}
        return info.get("address") == address and info.get("curve") is False

    @contextmanager
    def client(self, key: str | None) -> Iterator[Client]:
        with self._lock:
            free = self._free.setdefault(key, [])
            c = free.pop() if free else None
        if c is None:
            c = self.new(key)
        try:
            yield c
        except (ServerUnavailable, keys.Refused):
            c.close()
            raise
        except PilotfishError:
            self._give_back(key, c)  # the server's answer was an error: the socket is fine
            raise
        except BaseException:
            c.close()  # a reply may still be on its way: never hand this socket out again
            raise
        else:
            self._give_back(key, c)

    def _give_back(self, key: str | None, c: Client) -> None:
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < KEEP:
                free.append(c)
                return
        c.close()

    def forget(self, key: str | None) -> None:
        """Close the idle clients of a key (its token was revoked)."""
        with self._lock:
            gone = self._free.pop(key, [])
        for c in gone:
            c.close()

    def close(self) -> None:
        with self._lock:
            every = [c for cs in self._free.values() for c in cs]
            self._free.clear()
        for c in every:
            c.close()
