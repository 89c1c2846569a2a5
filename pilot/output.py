"""Ships pieces of tasks' job.out and job.err to the server, for ``pilotfish job log``.

The files in the workdir are the buffer: the agent keeps only offsets. At each output tick
(``TICK`` seconds, only while tasks run) it looks at the running tasks' two files -- one
``lstat`` each; a file is opened only when it grew -- and reads what is new, at most ``PIECE``
bytes per file and, in all, what its byte budget allows (the server's ``output_rate`` a second,
so a task printing gigabytes costs the agent a small read a tick and nothing more). When a task
ends, its last pieces go in the same update as its end, so a follower that sees the job final
has its output too: always its first ``END_ALLOWANCE`` bytes (budget or not: short outputs never
wait behind another task's flood), the rest as the budget allows, in the next updates, the last
one marked ``eof``.

Past the server's cap (``output_cap`` bytes of each file per attempt) nothing more is read: the
rest stays in the workdir, and the pieces say the file's size and path, so ``job log`` can say
where it is. Pieces ride on updates and are acknowledged with them; after a reconnect (a new
welcome) every stream goes back to its acknowledged offset and reads again from the file, so a
lost message leaves no hole. Files are opened with ``O_NOFOLLOW | O_NONBLOCK`` and read only
when they are regular files: a task that swaps job.out for a FIFO or a symlink gets nothing
shipped, and never blocks the agent.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field

#: Seconds between two looks at running tasks' files.
TICK = 0.5
#: Most bytes read from one file at one look.
PIECE = 64 * 2**10
#: Most bytes of output in one update message.
MAX_PER_MESSAGE = 1 * 2**20
#: Bytes of each file of an ended task sent with its end even when the budget is spent (the
#: budget goes into debt): a task's short output is never held back behind another task's
#: flood, and a follower that sees the job final has it.
END_ALLOWANCE = 4 * 2**10
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: (stream name on the wire, file name in the workdir)
FILES = (("out", "job.out"), ("err", "job.err"))


@dataclass(eq=False)
class _File:
    path: str
    sent: int = 0         # bytes sent (read up to here)
    acked: int = 0        # bytes the server acknowledged
    eof_sent: bool = False
    done: bool = False    # its last piece is acknowledged (or there is nothing to send)
    pending: list = field(default_factory=list)   # (useq, end, eof) sent, not acknowledged


@dataclass(eq=False)
class _Stream:
    job: int
    attempt: int
    files: dict            # stream name -> _File
    ended: bool = False    # the task ended: send the rest (up to the cap), then eof


class OutputShipper:
    def __init__(self) -> None:
        self.cap = 0          # 0: ship nothing (not told yet, or the server wants none)
        self.rate = 0
        self.tokens = 0.0
        self.filled = time.monotonic()
        self.next_tick = 0.0
        self.streams: dict[int, _Stream] = {}   # job -> its current attempt's stream

    def configure(self, cap: int | None, rate: int | None) -> None:
        """From a welcome: the server's cap and rate (None: an older server, ship nothing)."""
        first = not self.rate
        self.cap = max(0, int(cap or 0)) if rate else 0
        self.rate = max(0, int(rate or 0))
        # a full budget to start with: a short task's output goes with its end
        self.tokens = float(self.rate) if first else min(self.tokens, self.rate)
        self.filled = time.monotonic()

    def due(self, mono: float, running: bool) -> bool:
        """Time for a look at running tasks' files, or for more of ended tasks' output (at the
        tick too: the budget refills meanwhile)."""
        return bool(self.cap and mono >= self.next_tick and (running or self.streams))

    def wake(self) -> float | None:
        """time.monotonic() of the next look, when there is something to look at."""
        return self.next_tick if self.cap else None

    def _budget(self, mono: float) -> int:
        self.tokens = min(float(self.rate), self.tokens + (mono - self.filled) * self.rate)
        self.filled = mono
        return int(min(self.tokens, MAX_PER_MESSAGE))

    def collect(self, active: dict, ended: list, mono: float,
                ended_only: bool = False) -> list[dict]:
        """Pieces to send now: of ``ended`` tasks (executor Tasks whose end goes in this
        update) first, then, at a tick, of ``active`` tasks (job -> Task) in their run step.
        ``ended_only``: the rest of every ended task's output, now (the resend after a welcome,
        which carries their ends again), and nothing of running tasks."""
        if ended_only:
            if not self.cap:
                return []
            ended = []
            tick = False
        else:
            tick = mono >= self.next_tick
        if not self.cap or not (ended or tick or self.streams):
            return []
        for t in ended:
            if t.start is None or t.workdir is None:
                continue  # never ran: no job.out
            s = self.streams.get(t.job)
            fresh = s is None or s.attempt != t.attempt
            if fresh or not any(f.sent or f.pending for f in s.files.values()):
                wd = t.workdir
                if not (_size(wd + "/job.out") or _size(wd + "/job.err")):
                    # nothing printed (most tasks): nothing to send, nothing kept (also when a
                    # look while it ran made it a stream: two empty pieces cost the server two
                    # queries and two rows per task)
                    if not fresh:
                        del self.streams[t.job]
                    continue
                if fresh:
                    s = self.streams[t.job] = self._stream(t)
            s.ended = True
        if tick:
            self.next_tick = mono + TICK
            for job, s in list(self.streams.items()):  # cancelled, fenced: forget
                if not s.ended and active.get(job) is None:
                    del self.streams[job]
            for t in active.values():
                if t.step == "run" and t.workdir is not None and t.start is not None:
                    s = self.streams.get(t.job)
                    if s is None or s.attempt != t.attempt:
                        self.streams[t.job] = self._stream(t)
        budget = self._budget(mono)
        out: list[dict] = []
        fresh = {t.job for t in ended}
        for s in sorted(self.streams.values(), key=lambda s: not s.ended):
            if not tick and s.job not in fresh and not (ended_only and s.ended):
                continue  # the rest of earlier ends, and running tasks: at the tick
            for name, f in s.files.items():
                if f.done or (f.eof_sent and s.ended):
                    continue
                chunk, used = self._read(s, name, f, budget)
                budget -= used
                if chunk is not None:
                    out.append(chunk)
        self.tokens -= sum(len(c["data"]) for c in out)
        return out

    def _stream(self, t) -> _Stream:
        return _Stream(t.job, t.attempt, {name: _File(f"{t.workdir}/{fname}")
                                          for name, fname in FILES})

    def _read(self, s: _Stream, name: str, f: _File, budget: int) -> tuple[dict | None, int]:
        size = _size(f.path)
        want = max(0, min(size, self.cap) - f.sent)
        data = b""
        if s.ended:
            budget = max(budget, END_ALLOWANCE)
        if want and budget > 0:
            data = _pread(f.path, f.sent, min(want, PIECE, budget))
        end = f.sent + len(data)
        eof = s.ended and end >= min(size, self.cap)
        if not data and not eof:
            return None, 0
        chunk = {"job": s.job, "attempt": s.attempt, "stream": name, "offset": f.sent,
                 "data": data, "size": size, "eof": eof, "path": f.path}
        f.sent = end
        f.eof_sent = eof
        return chunk, len(data)

    def sent(self, useq: int, chunks: list[dict]) -> None:
        """``chunks`` went out in the update ``useq``."""
        for c in chunks:
            s = self.streams.get(c["job"])
            if s is not None and s.attempt == c["attempt"]:
                s.files[c["stream"]].pending.append((useq, c["offset"] + len(c["data"]),
                                                     c["eof"]))

    def acked(self, uack: int) -> None:
        """The server has stored every update up to ``uack``."""
        for job, s in list(self.streams.items()):
            for f in s.files.values():
                while f.pending and f.pending[0][0] <= uack:
                    _, f.acked, eof = f.pending.pop(0)
                    f.done = f.done or eof
            if s.ended and all(f.done for f in s.files.values()):
                del self.streams[job]

    def rewind(self) -> None:
        """A new welcome: what was sent and not acknowledged may be lost; read it again."""
        for s in self.streams.values():
            for f in s.files.values():
                f.sent, f.pending = f.acked, []
                if not f.done:
                    f.eof_sent = False


def _size(path: str) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _pread(path: str, offset: int, n: int) -> bytes:
    """At most ``n`` bytes of a regular file at ``offset``, never through a symlink, never
    blocking on a FIFO; b"" when it cannot be read."""
    try:
        fd = os.open(path, _OPEN)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.pread(fd, n, offset)
    except OSError:
        return b""
    finally:
        os.close(fd)
