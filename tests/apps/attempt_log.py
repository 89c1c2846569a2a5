"""A short task for the chaos tests: it logs its own attempt so that overlaps can be found.

Usage (run with ``python -S -I``, a ~7 ms start): ``attempt_log.py SECONDS``. In its workdir it
appends to ``attempts.log``, one ``os.write`` per line on an ``O_APPEND`` descriptor (atomic on a
local file system, so lines of attempts running at once never interleave)::

    start JOB ATTEMPT T_START PID PPID
    end   JOB ATTEMPT T_START T_END PID PPID      # it ran its SECONDS to the end
    term  JOB ATTEMPT T_START T_SIGNAL PID PPID   # SIGTERM/SIGHUP/SIGINT: it stops at once

PPID is the agent that started it (the executor spawns tasks as its own children). A task killed
with SIGKILL leaves only its ``start`` line. Times are ``time.time()`` (one machine, one clock).
"""
import os
import signal
import sys
import time

JOB = os.environ.get("PILOTFISH_JOB_ID", "?")
ATTEMPT = os.environ.get("PILOTFISH_ATTEMPT", "?")
FD = os.open("attempts.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
T0 = time.time()
PID, PPID = os.getpid(), os.getppid()


def line(kind: str, *times: float) -> None:
    ts = " ".join(f"{t:.6f}" for t in times)
    os.write(FD, f"{kind} {JOB} {ATTEMPT} {ts} {PID} {PPID}\n".encode())


def _stop(signum, _frame):
    line("term", T0, time.time())
    os._exit(128 + signum)


# a signal between the handlers and the start line would log an end without a start: hold
# them until the start line is written (one that came even earlier killed us without a line)
_SIGS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, _SIGS)
for _sig in _SIGS:
    signal.signal(_sig, _stop)
line("start", T0)
signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGS)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
# block the handlers while writing the end line, so a late signal cannot add a second end
signal.pthread_sigmask(signal.SIG_BLOCK, _SIGS)
line("end", T0, time.time())
