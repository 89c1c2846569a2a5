"""Workdirs made ahead: a thread creates queued tasks' workdirs and their ``job.out`` and
``job.err`` while the agent's loop starts and reaps other tasks.

Making a directory and two files costs 0.3-0.4 ms on an ext4 disk (inode allocation, the
journal), several milliseconds when the disk is busy -- as much as everything else the agent
does for a short task, and all of it, before, inside the agent's one loop (the spawn waited
for the child to create the files). Here it happens on a thread: the system calls release the
GIL, so the loop goes on meanwhile and a second core does the file system's work. The spawn
then only hands the open files to the child (``POSIX_SPAWN_DUP2``).

Only plain tasks are prepared (no input to stage, no preprocess step): their first process is
the run step, whose files are ``job.out``/``job.err``. At most ``ahead`` tasks are held
prepared (three descriptors each) and they are prepared in queue order, in bursts: once
``ahead`` are held the thread sleeps until the loop has taken half of them. When the loop reaches a
task the thread has not prepared yet, the loop does it itself as before (it never waits for a
task the thread has not begun).

Safety is the loop's: the thread opens the workdir without following a symlink as its last
part and checks, through ``/proc/self/fd``, that the directory it opened is the path built from
the work root (a task may have planted a symlink on the way), then creates the files relative
to that open directory. Anything unexpected and the task is left to the loop's own checks.
"""
from __future__ import annotations

import errno
import os
import threading
from collections import deque

from pilotfish.errors import ValidationError
from pilotfish.validate import check_relpath

#: A task's preparation: not asked (the loop does everything), waiting for the thread, being
#: made, made (descriptors held), taken by the loop (or dropped).
TODO, BUSY, DONE, TAKEN = "todo", "busy", "done", "taken"
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Prepared:
    """What the thread made for one task: its workdir, whether it created it (not a retry's),
    the open output files and the open workdir (checked to be the real directory at that path:
    the spawn enters it with ``fchdir``, no path walk and no ``getcwd`` check again) -- or the
    error that fails the task."""
    __slots__ = ("workdir", "created", "out_fd", "err_fd", "dir_fd", "error")

    def __init__(self, workdir: str, created: bool = False, out_fd: int | None = None,
                 err_fd: int | None = None, error: str | None = None,
                 dir_fd: int | None = None) -> None:
        self.workdir, self.created = workdir, created
        self.out_fd, self.err_fd, self.error = out_fd, err_fd, error
        self.dir_fd = dir_fd

    def close(self) -> None:
        for fd in (self.out_fd, self.err_fd, self.dir_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.out_fd = self.err_fd = self.dir_fd = None


def plain(spec: dict) -> bool:
    """A task whose first process is its run step, in a workdir made from nothing."""
    return not (spec.get("input_url") or spec.get("staged") or spec.get("pre"))


def open_real_dir(path: str) -> int | None:
    """``path`` opened (close-on-exec) when it is the real directory at that path: no symlink
    as its last part, and ``/proc/self/fd`` names the path (no symlink on the way). None when a
    symlink is on the way or is the path itself; OSError for anything else (missing, not a
    directory)."""
    try:
        fd = os.open(path, OPEN_DIR)
    except OSError as exc:
        # (the path itself a symlink: ELOOP, or ENOTDIR with O_DIRECTORY)
        if exc.errno == errno.ELOOP or os.path.islink(path):
            return None
        raise
    try:
        if os.readlink(f"/proc/self/fd/{fd}") == path:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def make_workdir(root_prefix: str, rel: str, made_dirs: set[str]) -> Prepared | None:
    """Create ``root_prefix/rel`` (a retry's may exist) and open ``job.out`` and ``job.err``
    in it. None: the directory is not what the path says (leave it to the loop's checks).
    Raises ValidationError for a bad relative path and OSError when the file system refuses."""
    check_relpath(rel, "workdir")
    workdir = f"{root_prefix}/{rel}"
    parent = workdir.rpartition("/")[0]
    if parent not in made_dirs:
        os.makedirs(parent, exist_ok=True)
        made_dirs.add(parent)
    created = False
    try:
        os.mkdir(workdir)
        created = True
    except FileExistsError:
        pass
    try:
        dfd = open_real_dir(workdir)
    except OSError:
        return None  # a file planted as the workdir: the loop refuses it with its own words
    if dfd is None:
        if created:  # made through a symlink on the way: take the empty directory back
            try:
                os.rmdir(workdir)
            except OSError:
                pass
        return None  # the loop refuses it with its own words
    try:
        out = os.open("job.out", _WRITE, 0o644, dir_fd=dfd)
        try:
            err = os.open("job.err", _WRITE, 0o644, dir_fd=dfd)
        except OSError:
            os.close(out)
            raise
    except BaseException:
        os.close(dfd)
        raise
    return Prepared(workdir, created, out, err, dir_fd=dfd)


class Preparer:
    """The thread and its queue (see the module doc). Tasks carry their state in ``t.prep``
    and the result in ``t.prepared``."""

    def __init__(self, root_prefix: str, made_dirs: set[str], ahead: int) -> None:
        self.root_prefix, self.made_dirs, self.ahead = root_prefix, made_dirs, max(1, ahead)
        #: Once ``ahead`` are held, the thread sleeps until the loop has taken them down to
        #: ``low``, then makes the difference in one go: a wake-up per task (each take) cost
        #: a thread switch, on a VM ~60 us of an idle core each (perf sched, W2).
        self.low = self.ahead // 2
        self._full = False
        self._cv = threading.Condition()
        self._todo: deque = deque()
        self._held = 0      # prepared (or being prepared) and not taken yet
        self._stopped = False
        #: Prepared whose descriptors the loop is done with (the child has its copies): the
        #: thread closes them (three closes a task, ~10 us, off the loop). A list append and
        #: pop are atomic: no lock.
        self._to_close: list = []
        self._thread = threading.Thread(target=self._run, name="pilotfish-prepare",
                                        daemon=True)
        self._thread.start()

    def submit(self, t) -> None:
        with self._cv:
            t.prep = TODO
            self._todo.append(t)
            self._cv.notify()

    def take(self, t):
        """The loop is about to start ``t``: its Prepared, or None (do it yourself)."""
        if t.prep is None:
            return None
        with self._cv:
            while t.prep == BUSY:
                self._cv.wait()
            done = t.prep == DONE
            t.prep = TAKEN
            if done:
                self._held -= 1
                if self._full and self._held <= self.low:
                    self._full = False
                    self._cv.notify()
        return t.prepared if done else None

    def drop(self, t) -> None:
        """``t`` leaves the queue without starting (cancelled, stopped): close what was made."""
        p = self.take(t)
        if p is not None:
            p.close()

    def close_later(self, p: Prepared) -> None:
        """The loop is done with ``p``'s descriptors: the thread closes them (at its next
        wake-up, at the latest when it stops)."""
        self._to_close.append(p)

    def _close_done(self) -> None:
        while self._to_close:
            try:
                self._to_close.pop().close()
            except IndexError:
                return

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._close_done()

    def _run(self) -> None:
        while True:
            self._close_done()
            with self._cv:
                while not self._stopped and (not self._todo or self._full):
                    self._cv.wait()
                if self._stopped:
                    return
                t = self._todo.popleft()
                if t.prep != TODO:
                    continue  # the loop got there first
                t.prep = BUSY
                self._held += 1
                self._full = self._held >= self.ahead
            try:
                p = make_workdir(self.root_prefix, t.spec["workdir"], self.made_dirs)
            except (OSError, ValidationError) as exc:
                p = Prepared("", error=f"stage-in failed: {exc}")
            except Exception:  # never kill the thread: the loop does the task instead
                p = None
            with self._cv:
                t.prepared = p
                if p is None:  # the loop makes it itself (its checks say why it cannot)
                    self._held -= 1
                    self._full = self._held >= self.ahead
                    t.prep = None
                else:
                    t.prep = DONE
                self._cv.notify_all()
