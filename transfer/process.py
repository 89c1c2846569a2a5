"""Running a transfer client (sftp, globus-url-copy) as a watched child process.

The child runs in its own session with a small environment, no shell, arguments that hold no
secret (credentials live in files the client reads), and is killed with its whole process group
when it passes ``limits.timeout``, moves no byte for ``limits.stall`` seconds (counted from its
``/proc/PID/io`` read and write totals, which pipes to ssh and file copies both move), or when a
file it writes passes ``limits.max_bytes``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable, Sequence

from .base import Limits, TransferError, human

POLL = 0.1


def _io(pid: int) -> int:
    """Bytes the process read and wrote so far (rchar + wchar), or -1 without /proc."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            total = 0
            for line in f:
                if line.startswith((b"rchar:", b"wchar:")):
                    total += int(line.split()[1])
            return total
    except (OSError, ValueError):
        return -1


def small_env(extra: dict | None = None) -> dict:
    """PATH, HOME, USER and the C locale (stable error text): nothing else of ours leaks."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "USER", "LOGNAME", "SSH_AUTH_SOCK")
           if k in os.environ}
    env.setdefault("PATH", "/usr/bin:/bin")
    env["LC_ALL"] = "C"
    env.update(extra or {})
    return env


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def run(argv: Sequence[str], limits: Limits, what: str, *, env: dict | None = None,
        pass_fds: Sequence[int] = (), growing: Callable[[], int] | None = None,
        stdin_data: bytes | None = None, stdout_path: str | None = None) -> tuple[int, str]:
    """Run ``argv`` under ``limits``: (exit status, standard error text). ``growing``: the
    size of the largest file being written (checked against ``limits.max_bytes``);
    ``stdout_path``: a new file for the child's standard output (else it is dropped). Raises
    TransferError naming ``what`` on timeout, stall or cap; the child is dead then."""
    import tempfile
    err = tempfile.TemporaryFile()
    out = subprocess.DEVNULL
    if stdout_path is not None:
        out = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        p = subprocess.Popen(list(argv), stdin=subprocess.PIPE if stdin_data is not None
                             else subprocess.DEVNULL, stdout=out, stderr=err,
                             env=small_env(env), start_new_session=True, close_fds=True,
                             pass_fds=tuple(pass_fds), cwd="/")
    except OSError as exc:
        err.close()
        raise TransferError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    finally:
        if out != subprocess.DEVNULL:
            os.close(out)
    try:
        if stdin_data is not None:
            p.stdin.write(stdin_data)
            p.stdin.close()
        start = last_move = time.monotonic()
        last_io: object = None
        while p.poll() is None:
            time.sleep(POLL)
            now = time.monotonic()
            grown = growing() if growing is not None else 0
            io = _io(p.pid)
            # progress: the client's I/O counters, or (without /proc/PID/io) the file's size;
            # with neither, the stall bound is left to ssh's keepalives and the timeout
            mark = (io, grown) if io >= 0 or growing is not None else now
            if mark != last_io:
                last_io, last_move = mark, now
            if grown > limits.max_bytes:
                kill_group(p)
                raise TransferError(f"{what}: more than {human(limits.max_bytes)}: over the "
                                    "transfer byte cap (staging.max_bytes / "
                                    "transfers.max_bytes)")
            if now - start > limits.timeout:
                kill_group(p)
                raise TransferError(f"{what}: timed out after {limits.timeout:g} s")
            if now - last_move > limits.stall:
                kill_group(p)
                raise TransferError(f"{what}: stalled: no data moved for {limits.stall:g} s")
        err.seek(0)
        return p.returncode, err.read(64 * 1024).decode("utf-8", "replace")
    except BaseException:
        if p.poll() is None:
            kill_group(p)
        raise
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the client's own children (ssh) go with it
        except (ProcessLookupError, PermissionError):
            pass
        err.close()


__all__ = ["kill_group", "run", "small_env"]
