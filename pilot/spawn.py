"""Starting task processes off the agent's loop: glibc's ``posix_spawn`` called through ctypes
on a thread pinned to the task's cores.

Why not ``os.posix_spawn`` on the loop (what the agent did before): the child must be born on
its cores (an OpenMP runtime or OpenBLAS reads the mask in its constructors), so the spawning
thread pins itself to them and the child inherits the mask. ``posix_spawn`` is a vfork: the
parent resumes only after the child's exec, on the same core, where the freshly exec'd child is
running -- and Python 3.11's ``os.posix_spawn`` holds the GIL meanwhile. py-spy on W2 put 37 %
of the loop's time in ``sched_setaffinity`` (the migration to the task's core) and 21 % in
``posix_spawn``. Here each core has its own spawner thread, pinned once; ctypes releases the
GIL around the call, so the loop goes on while the thread waits behind its child.

The working directory is a file action (``posix_spawn_file_actions_addfchdir_np`` /
``addchdir_np``, glibc 2.29+), never a process-wide ``chdir``, which another thread would see.
The child gets the default action for SIGPIPE and SIGXFSZ (Python ignores them; a task must not
inherit that, as ``subprocess`` restores them too), an empty signal mask and its own session.

The thread also tells the agent's guard ``+pid`` at once and opens the pidfd; results go back
to the loop through a deque and an eventfd the loop polls (see :class:`Spawner`).
"""
from __future__ import annotations

import ctypes
import os
import queue
import select
import signal
import threading
import time
from collections import deque
from typing import Callable

#: glibc through ctypes. Only ``posix_spawn`` releases the GIL (a CDLL function): every
#: release while the loop waits for the GIL hands it over, and getting it back waits for the
#: loop's next blocking call, so the short calls (file actions, the guard's line, the pidfd,
#: the eventfd) keep it (PyDLL functions).
_spawn_lib = ctypes.CDLL(None)
_spawn_lib.posix_spawn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p]
_spawn_lib.posix_spawn.restype = ctypes.c_int
_libc = ctypes.PyDLL(None, use_errno=True)
_P = ctypes.c_void_p
for _name, _args in (("posix_spawn_file_actions_init", [_P]),
                     ("posix_spawn_file_actions_destroy", [_P]),
                     ("posix_spawn_file_actions_addopen", [_P, ctypes.c_int, ctypes.c_char_p,
                                                           ctypes.c_int, ctypes.c_uint]),
                     ("posix_spawn_file_actions_adddup2", [_P, ctypes.c_int, ctypes.c_int]),
                     ("posix_spawnattr_init", [_P]),
                     ("posix_spawnattr_setflags", [_P, ctypes.c_short]),
                     ("posix_spawnattr_setsigdefault", [_P, _P]),
                     ("posix_spawnattr_setsigmask", [_P, _P]),
                     ("sigemptyset", [_P]),
                     ("sigaddset", [_P, ctypes.c_int]),
                     ("write", [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]),
                     ("eventfd_write", [ctypes.c_int, ctypes.c_uint64])):
    _f = getattr(_libc, _name)
    _f.argtypes, _f.restype = _args, ctypes.c_int
#: glibc 2.29+ (2019) has the working-directory file actions; with an older one the spawning
#: thread takes a working directory of its own (``unshare(CLONE_FS)``: its cwd is no other
#: thread's) and enters the directory itself before the spawn (see :func:`_enter`).
_NP = hasattr(_libc, "posix_spawn_file_actions_addfchdir_np")
if _NP:
    _libc.posix_spawn_file_actions_addfchdir_np.argtypes = [_P, ctypes.c_int]
    _libc.posix_spawn_file_actions_addchdir_np.argtypes = [_P, ctypes.c_char_p]
CLONE_FS = 0x200
_dup = os.dup  # (a name of ours, so that a test can make it fail)
_own_cwd = threading.local()


def _enter(kind: str, where) -> None:
    """Without the _np file actions: enter the child's working directory in this thread,
    whose working directory is its own (unshared once; never the process's)."""
    if not getattr(_own_cwd, "done", False):
        if _libc.unshare(CLONE_FS) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"unshare(CLONE_FS): {os.strerror(e)}")
        _own_cwd.done = True
    if kind == "fchdir":
        os.fchdir(where)
    else:
        os.chdir(where)


# <spawn.h>
SETSIGDEF, SETSIGMASK, SETSID = 0x04, 0x08, 0x80
#: Opaque glibc structures, with room to spare (x86_64: 80, 336 and 128 bytes).
_FA_SIZE, _ATTR_SIZE, _SIGSET_SIZE = 256, 1024, 256
_libc.syscall.restype = ctypes.c_long
#: The pidfd_open system call's number (one table for every architecture since Linux 5.3).
SYS_PIDFD_OPEN = 434


def _pidfd_open(pid: int) -> int:
    fd = _libc.syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def _write(fd: int, data: bytes) -> None:
    """One write of a few bytes to a pipe (atomic); OSError when it fails."""
    if _libc.write(fd, data, len(data)) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _sigset(*signals: int):
    s = ctypes.create_string_buffer(_SIGSET_SIZE)
    _libc.sigemptyset(s)
    for sig in signals:
        _libc.sigaddset(s, sig)
    return s


def _attr(flags: int):
    """Spawn attributes, made once: ``posix_spawn`` only reads them (any thread may share
    them). SIGPIPE and SIGXFSZ to their default action, an empty signal mask."""
    a = ctypes.create_string_buffer(_ATTR_SIZE)
    _libc.posix_spawnattr_init(a)
    _libc.posix_spawnattr_setsigdefault(a, _sigset(signal.SIGPIPE, signal.SIGXFSZ))
    _libc.posix_spawnattr_setsigmask(a, _sigset())
    _libc.posix_spawnattr_setflags(a, SETSIGDEF | SETSIGMASK | flags)
    return a


_ATTR = _attr(SETSID)  # every task leads a session of its own


def _cstrings(items: list[bytes], what: str):
    """A NULL-terminated ``char *[]`` pointing into one joined bytes object, and that object
    (keep it alive until the call returns). One join and one array constructor: the per-item
    ctypes assignments cost ~0.5 us each, and a task's environment has dozens."""
    blob = b"\0".join(items) + b"\0"
    if blob.count(b"\0") != len(items) + (not items):
        raise ValueError(f"embedded null byte in {what}")
    base = ctypes.cast(ctypes.c_char_p(blob), ctypes.c_void_p).value
    addrs, at = [], base
    for item in items:
        addrs.append(at)
        at += len(item) + 1
    return (ctypes.c_void_p * (len(items) + 1))(*addrs), blob


def spawn(argv: list, env: dict, actions: list) -> int:
    """``posix_spawn`` ``argv[0]`` with ``argv`` and ``env``, in a session of its own; the
    pid.
    ``actions`` in order:
    ``("open", fd, path, flags, mode)``, ``("dup2", fd, newfd)``, ``("fchdir", fd)``,
    ``("chdir", path)``. Raises OSError when it cannot start (the errno of the exec or of an
    action), TypeError or ValueError for a malformed argv or env (checked before anything
    runs). The caller's thread mask is the child's."""
    if not isinstance(argv, (list, tuple)):
        raise TypeError(f"argv must be a list, not {type(argv).__name__}")
    if not argv:
        raise ValueError("argv must not be empty")
    path = argv[0]  # the program (posix_spawn: no PATH search)
    c_argv, keep_argv = _cstrings([os.fsencode(a) for a in argv], "argv")
    try:
        envs = [(k + "=" + v).encode("utf-8", "surrogateescape") for k, v in env.items()]
    except TypeError:  # not strings: os.fsencode says which type it got
        envs = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    for k in env:
        if not k or "=" in k:
            raise ValueError("illegal environment variable name")
    c_env, keep_env = _cstrings(envs, "env")
    c_path = os.fsencode(path)
    if b"\0" in c_path:
        raise ValueError("embedded null byte in the program")
    fa = ctypes.create_string_buffer(_FA_SIZE)
    _libc.posix_spawn_file_actions_init(fa)
    try:
        for i, a in enumerate(actions):
            kind = a[0]
            if not _NP and kind in ("fchdir", "chdir"):
                if i:
                    raise ValueError("without glibc 2.29 a working directory must be the "
                                     "first spawn action")
                _enter(kind, a[1])
                continue
            if kind == "open":
                rc = _libc.posix_spawn_file_actions_addopen(fa, a[1], os.fsencode(a[2]), a[3],
                                                            a[4])
            elif kind == "dup2":
                rc = _libc.posix_spawn_file_actions_adddup2(fa, a[1], a[2])
            elif kind == "fchdir":
                rc = _libc.posix_spawn_file_actions_addfchdir_np(fa, a[1])
            elif kind == "chdir":
                rc = _libc.posix_spawn_file_actions_addchdir_np(fa, os.fsencode(a[1]))
            else:
                raise ValueError(f"unknown spawn action {kind!r}")
            if rc:
                raise OSError(rc, os.strerror(rc))
        pid = ctypes.c_int()
        # ctypes releases the GIL for the call: other threads run while we wait for the exec
        rc = _spawn_lib.posix_spawn(ctypes.byref(pid), c_path, fa, _ATTR,
                                    c_argv, c_env)
        if rc:
            raise OSError(rc, os.strerror(rc), path)
        return pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(fa)


class Request:
    """One process to start: what to run, on which cores (None: the agent's own mask), and
    until when it may start at all (``time.monotonic()``; None: no bound). The thread fills in
    ``pid``/``pidfd`` or ``error`` (an exception), and ``at`` (``time.time()``). ``task`` and
    ``ctx`` are the caller's."""
    __slots__ = ("task", "ctx", "argv", "env", "actions", "cores", "until", "pid", "pidfd",
                 "error", "at", "pin_error", "token", "ended", "waited")

    def __init__(self, task, ctx, argv: list, env: dict, actions: list,
                 cores: frozenset | None, until: float | None) -> None:
        self.task, self.ctx = task, ctx
        self.argv, self.env, self.actions = argv, env, actions
        self.cores, self.until = cores, until
        self.pid = self.pidfd = self.error = self.pin_error = None
        self.at = 0.0
        #: When its core's thread saw the process end (``time.time()``; see :meth:`Spawner.done`).
        self.ended = 0.0
        #: Set by the thread when it waits for the process and will tell of its end; else
        #: the loop watches the pidfd itself.
        self.waited = False
        #: Taken (popped) by whoever comes first: the thread that starts it, or the loop that
        #: withdraws it (:meth:`Spawner.withdraw`). A list's pop is atomic under the GIL.
        self.token = [True]


#: The error of a request whose start time had passed when its thread came to it.
class TooLate(Exception):
    pass


class Spawner:
    """Spawner threads, one per first core of the tasks it starts, created when first needed.
    The loop calls :meth:`submit` and, when :attr:`fd` (an eventfd) is readable,
    :meth:`done`. ``guard``: the write end of the guard's pipe (see pilot/executor.py) or None;
    the caller keeps it open while this spawner lives (a line of a few bytes is one atomic
    write, so the loop may write its own lines meanwhile). ``deadline``: the start deadline
    now (``time.monotonic()``, None: none), asked just before each start; without it, each
    request's own ``until``.

    A core's thread waits for the process it started to end before it takes its next
    request: the processes of one core's tasks never overlap, so the loop may queue the next
    task of a core while the current one still runs (the executor's chained starts), and the
    thread starts it the moment the core is free -- without a round through the loop. It then
    tells the loop of the end (:meth:`done`; the loop does not watch those pidfds itself):
    the loop, woken by the same end, would otherwise take the GIL just as the thread needs it
    for the next start, and on a VM each such hand-over leaves a core idle for ~60 us. (The
    thread only watches its own copy of the pidfd: reaping stays the loop's.)"""

    def __init__(self, own_mask: set[int], guard: int | None,
                 deadline: Callable[[], float | None] | None = None) -> None:
        self.own_mask = frozenset(own_mask)
        self.guard = guard
        self.deadline = deadline
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: deque[Request] = deque()
        self._exits: deque[Request] = deque()
        self._queues: dict[object, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self.pending = 0   # submitted and not yet returned by done() (the loop's count)

    def submit(self, req: Request) -> None:
        key = min(req.cores) if req.cores else None
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = queue.SimpleQueue()
            th = threading.Thread(target=self._run, args=(q,), daemon=True,
                                  name=f"pilotfish-spawn-{'any' if key is None else key}")
            th.start()
            self._threads.append(th)
        self.pending += 1
        q.put(req)

    def withdraw(self, req: Request) -> bool:
        """Take back a submitted request its thread has not come to: True if it will never
        start (nor come back from :meth:`done`); False if its thread has it already."""
        try:
            req.token.pop()
        except IndexError:
            return False
        self.pending -= 1
        return True

    def done(self) -> tuple[list[Request], list[Request]]:
        """The requests the threads finished since the last call, and the requests whose
        process a core's thread then saw end (the eventfd is reset). Every end comes after
        its start: in the same call or a later one."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        out, ended = [], []
        while self._done:
            out.append(self._done.popleft())
        while self._exits:
            ended.append(self._exits.popleft())
        self.pending -= len(out)
        return out, ended

    @property
    def in_flight(self) -> int:
        """Requests the threads have not returned yet."""
        return self.pending - len(self._done)

    def wait(self, timeout: float) -> bool:
        """Block until every submitted request is back (to be taken with :meth:`done`) or
        ``timeout`` seconds passed; True if all are back."""
        deadline = time.monotonic() + timeout
        while self.in_flight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self.fd], [], [], min(left, 0.05))
        return True

    def stop(self) -> None:
        for q in self._queues.values():
            q.put(None)
        for th in self._threads:
            th.join(1.0)
        alive = any(th.is_alive() for th in self._threads)
        self._queues.clear()
        self._threads.clear()
        if not alive:  # (a thread still waiting for a process would write to the number)
            os.close(self.fd)

    def _run(self, q: queue.SimpleQueue) -> None:
        mask = self.own_mask
        deadline = self.deadline
        ended = None   # the request whose process just ended, told after the next start
        while True:
            if ended is None:
                req = q.get()
            else:
                try:
                    req = q.get_nowait()
                except queue.Empty:
                    req = False
                if not req:  # no next start waiting (or stopping): tell the end now
                    self._exits.append(ended)
                    ended = None
                    _libc.eventfd_write(self.fd, 1)
                    if req is False:
                        req = q.get()
            if req is None:
                return
            try:
                req.token.pop()
            except IndexError:
                continue  # withdrawn by the loop: it starts elsewhere or not at all
            want = req.cores or self.own_mask
            if want != mask:
                try:
                    os.sched_setaffinity(0, want)  # this thread only: the child inherits it
                    mask = want
                except OSError as exc:
                    req.pin_error = exc  # it runs on the agent's own cores, not a last task's
                    try:
                        os.sched_setaffinity(0, self.own_mask)
                        mask = self.own_mask
                    except OSError:
                        pass
            own = None
            try:
                until = deadline() if deadline is not None else req.until
                if until is not None and time.monotonic() >= until:
                    raise TooLate()
                # (argv[0] is the program, checked here: a malformed task fails, not the loop)
                req.pid = spawn(req.argv, req.env, req.actions)
                if self.guard is not None:
                    try:
                        _write(self.guard, b"+%d\n" % req.pid)
                    except OSError:
                        pass  # the loop's next guard line says the guard is gone
                try:
                    req.pidfd = _pidfd_open(req.pid)
                except OSError:
                    # cannot watch it (out of descriptors): stop it, it fails as not started
                    try:
                        os.killpg(req.pid, signal.SIGKILL)
                    except OSError:
                        pass
                    os.waitpid(req.pid, 0)
                    if self.guard is not None:
                        try:
                            os.write(self.guard, b"-%d\n" % req.pid)
                        except OSError:
                            pass
                    req.pid = None
                    raise
                if req.cores is not None:
                    try:
                        own = _dup(req.pidfd)  # ours: the loop closes its own when it reaps
                        req.waited = True
                    except OSError:
                        pass  # (out of descriptors) the loop watches its pidfd instead
            except Exception as exc:  # noqa: BLE001 -- handed to the loop, which fails the task
                req.error = exc
            req.at = time.time()
            self._done.append(req)
            if ended is not None:  # the next one started: now the end before it
                self._exits.append(ended)
                ended = None
            _libc.eventfd_write(self.fd, 1)
            if own is not None:
                # the core is the process's until it ends (GIL released while we wait; poll,
                # not select: a node with a raised descriptor limit may hand out fds > 1023)
                try:
                    waiter = select.poll()
                    waiter.register(own, select.POLLIN)
                    while not waiter.poll(1000):
                        pass
                finally:
                    os.close(own)
                req.ended = time.time()
                ended = req
