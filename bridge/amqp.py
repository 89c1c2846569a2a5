"""The AMQP bridge process: the job receiver and the status publisher, each in a thread of its
own with its own broker connection and its own server client (neither pika's connections nor
ZeroMQ sockets are shared between threads). SIGTERM or SIGINT stops both; messages not yet
acknowledged go back to the queue (the broker redelivers them), the cursor keeps what the
broker confirmed.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from pilotfish.client import Client
from pilotfish.errors import PilotfishError

from .config import BridgeConfig, parse_url

log = logging.getLogger("pilotfish.bridge")
#: Seconds the parts get to finish once asked to stop (a supervising server waits 10).
STOP_GRACE = 5.0


def lock_state_dir(path: Path, what: str = "AMQP bridge") -> int:
    """Hold the state directory (its cursor is this bridge's alone) for the life of the
    process; a second bridge on it is refused."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise PilotfishError(f"another {what} (pid {other or '?'}) uses {path}; give this "
                             "one its own state directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def run(cfg: BridgeConfig, home: Path, new_client: Callable[[], Client]) -> int:
    """Run until SIGTERM/SIGINT; 1 when a part failed (the log says why), else 0."""
    from .publisher import Publisher
    from .receiver import Receiver
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # we log what matters, plainly
    if cfg.nice:
        # an edge process never takes a core from the server's loop or a task: with every
        # change published, W2 beside the bridge ran at 0.73-0.91x without this
        os.nice(cfg.nice)
    state = cfg.state_path(home)
    fd = lock_state_dir(state)
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parts: list[tuple[str, Callable[[], None]]] = []
    if cfg.jobs_queue:
        parts.append(("receiver", Receiver(cfg, new_client, stop).run))
    if cfg.exchange:
        parts.append(("publisher", Publisher(cfg, new_client, stop, state).run))
    if cfg.site_name:
        from .site_beat import SiteBeat
        parts.append(("site heartbeat", SiteBeat(cfg, new_client, stop).run))
    failed: list[str] = []

    def guarded(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("the %s failed; stopping the bridge", name)
            failed.append(name)
            stop.set()

    threads = [threading.Thread(target=guarded, args=p, name=p[0], daemon=True) for p in parts]
    log.info("AMQP bridge (pid %d) for %s: %s; state in %s", os.getpid(), parse_url(cfg.url),
             " and ".join(p[0] for p in parts), state)
    for t in threads:
        t.start()
    deadline = None
    while any(t.is_alive() for t in threads):
        stop.wait(0.5)
        for t in threads:
            t.join(0.01)
        if stop.is_set() and deadline is None:
            deadline = time.monotonic() + STOP_GRACE
        if deadline is not None and time.monotonic() > deadline:
            # a part waits on a server that does not answer (a server stopping us waits for
            # us before it answers again): leave; what was not acknowledged is redelivered and
            # the cursor holds only what the broker confirmed
            log.warning("AMQP bridge stopped with a request to the server still open")
            logging.shutdown()
            os._exit(1 if failed else 0)
    os.close(fd)
    log.info("AMQP bridge stopped")
    return 1 if failed else 0
