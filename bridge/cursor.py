"""The status publisher's saved place in the server's event stream: one file in the bridge's
own state directory, replaced atomically (write, fsync, rename), so a bridge killed at any
moment restarts from a cursor the broker has confirmed everything before."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pilotfish.errors import PilotfishError


class CursorFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int | None:
        """The saved cursor, or None when the bridge never published (start from the oldest
        event the server keeps)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise PilotfishError(f"cannot read the bridge's cursor {self.path}: {exc}; remove "
                                 "it to start from the oldest event the server keeps") from None
        c = data.get("cursor") if isinstance(data, dict) else None
        if type(c) is not int or c < 0:
            raise PilotfishError(f"{self.path} holds no cursor; remove it to start from the "
                                 "oldest event the server keeps")
        return c

    def save(self, cursor: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"cursor": cursor}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
