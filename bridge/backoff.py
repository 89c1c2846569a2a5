"""Waits between reconnects: doubling from ``first`` to ``most`` seconds, reset on success."""
from __future__ import annotations


class Backoff:
    def __init__(self, first: float = 0.5, most: float = 30.0) -> None:
        self.first, self.most = first, most
        self.delay = first

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.most, self.delay * 2)
        return d

    def reset(self) -> None:
        self.delay = self.first
