"""Places an input the site stager staged into a job's workdir: a child process of the agent.

``python -m pilotfish.pilot.place STAGING_DIR JOB NAME WORKDIR``

The site stager (:mod:`.site_stager`, on the login node) fetched the job's remote input into
``STAGING_DIR/JOB/NAME`` on a file system the nodes share. Here it is moved into the workdir:
a rename when both are on one file system (no copy, nothing left behind), else a copy then
the staged file's removal. NAME comes from the task message, so it is checked (one plain path
part); every open uses ``O_NOFOLLOW`` and directory file descriptors, and the workdir must be a
real directory at exactly that path. It prints one line on standard error when it fails (the
job's message) and exits 1; the agent runs it like a stage step (deadline, guard, pidfd).
"""
from __future__ import annotations

import errno
import os
import stat
import sys

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20


class PlaceError(Exception):
    pass


def plain(name: str) -> str:
    if not name or len(name) > 255 or name in (".", "..") or "/" in name or "\x00" in name \
            or name.startswith("."):
        raise PlaceError(f"staged file name {name[:80]!r} is not one plain path part: refused")
    return name


def open_workdir(workdir: str) -> int:
    try:
        fd = os.open(workdir, _DIR)
    except OSError as exc:
        raise PlaceError(f"workdir {workdir}: {exc.strerror} (a symlink?)") from None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = workdir
    if real != workdir:
        os.close(fd)
        raise PlaceError(f"workdir {workdir} is not a real directory (it leads to "
                         f"{real[:100]}): refused")
    return fd


def _remove(dfd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _copy(sfd: int, name: str, wfd: int) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
    try:
        tmp = f".{name}.placing"
        _remove(wfd, tmp)
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=wfd)
        try:
            while True:
                data = os.read(src, CHUNK)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
            os.fchmod(out, stat.S_IMODE(os.fstat(src).st_mode) & 0o777)
        finally:
            os.close(out)
        os.rename(tmp, name, src_dir_fd=wfd, dst_dir_fd=wfd)
    finally:
        os.close(src)


def place(staging_dir: str, job: str, name: str, workdir: str) -> None:
    if not job.isdigit():
        raise PlaceError(f"job {job[:30]!r} is not a job id")
    plain(name)
    try:
        root = os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PlaceError(f"staging directory {staging_dir}: {exc.strerror}") from None
    try:
        try:
            jfd = os.open(job, _DIR, dir_fd=root)
        except OSError as exc:
            raise PlaceError(f"staged input {staging_dir}/{job}/{name}: {exc.strerror} (is "
                             "the staging directory shared with this node?)") from None
        try:
            try:
                st = os.stat(name, dir_fd=jfd, follow_symlinks=False)
            except OSError as exc:
                raise PlaceError(f"staged input {staging_dir}/{job}/{name}: "
                                 f"{exc.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise PlaceError(f"staged input {staging_dir}/{job}/{name} is not a regular "
                                 "file: refused")
            wfd = open_workdir(workdir)
            try:
                _remove(wfd, name)  # a retry's copy, or whatever a task left there
                try:
                    os.rename(name, name, src_dir_fd=jfd, dst_dir_fd=wfd)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    _copy(jfd, name, wfd)
                    os.unlink(name, dir_fd=jfd)
            finally:
                os.close(wfd)
        finally:
            os.close(jfd)
        try:
            os.rmdir(job, dir_fd=root)
        except OSError:
            pass  # not empty: another file of the job's (left for the stager's cleanup)
    finally:
        os.close(root)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4:
        print("usage: python -m pilotfish.pilot.place STAGING_DIR JOB NAME WORKDIR",
              file=sys.stderr)
        return 2
    try:
        place(*argv)
    except PlaceError as exc:
        print(f"stage-in failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"stage-in failed: placing the staged input: {exc.strerror or exc}{where}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
