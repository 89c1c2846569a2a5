"""The stager: one stage-in or stage-out of one job, as a child process of the node agent.

``python -m pilotfish.pilot.stage in|out JOB WORKDIR URL MAX_BYTES HOME WORK_ROOT [ROOT ...]``

The agent spawns it like a task's step (its own session, pinned to the task's cores, registered
with the guard, watched by a pidfd, killed at its deadline, by ``stop_all`` and by a cancel), so
a slow, huge or hostile transfer never holds the agent's loop. It prints one line on standard
error when it fails (the job's message) and exits 1.

A remote URL (scp, sftp, http(s), gsiftp, globus) is moved through :mod:`pilotfish.transfer`
by :mod:`pilotfish.pilot.stage_remote`, under the same byte cap and the step's timeout. For a
local one, the rule of :mod:`pilotfish.dataroots` is applied again here, after symlinks: to the
``realpath`` of the URL, then to the path the kernel really opened (``/proc/self/fd``). Every
open uses ``O_NOFOLLOW`` and directory file descriptors (the helpers live in
:mod:`pilotfish.transfer.local`), so a symlink swapped in while we copy is never followed.
What is copied locally:

* stage-in: a regular file (into the workdir under its own name) or a directory (its tree into
  ``WORKDIR/<name>/``); several URLs joined by newlines (a workflow's subjob with several
  parents) are staged in one after the other, each with its own byte cap. Inside a tree:
  regular files, directories and symlinks (copied as symlinks, never followed). A device, FIFO or socket fails the step, named; a top-level input
  that is not a regular file or directory is refused without being opened.
* stage-out: the workdir's tree into ``URL/<workdir name>/``, a folder of the job's own. It is
  built under a temporary name in the same directory (with a marker file naming the job) and
  renamed into place; an existing folder that is not this job's earlier stage-out fails the
  step: never merged, never overwritten. Regular files with more than one link are refused (a
  task could hard-link a secret into its workdir).

At most MAX_BYTES of file data are copied per step (a file that grows while copied is stopped
there). Imports are light on purpose: this starts once per staged job.
"""
from __future__ import annotations

import os
import stat
import sys

from pilotfish.dataroots import DataRoots, shown, url_path
from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.transfer.local import (  # noqa: F401  (StageError, Budget...: the stager's names)
    _DIR, _RD, CHUNK, MARKER, Budget, StageError, check_opened, copy_file, copy_tree, kind,
    open_workdir, private_files, remove, resolved, roots_of)

def stage_in(url: str, workdir: str, roots: DataRoots, cap: int) -> None:
    what = "input_url"
    path = url_path(url, what)  # its last part names the copy, as the user wrote it
    real = resolved(url, what, roots)
    try:
        st = os.lstat(real)
    except OSError as exc:
        raise StageError(f"{what} {shown(url)}: {exc.strerror}") from None
    is_dir = stat.S_ISDIR(st.st_mode)
    if is_dir:  # read whole: it may not contain the home or the work root
        try:
            roots.check_path(real, what, url, tree=True)
        except ValidationError as exc:
            raise StageError(str(exc)) from None
    if not is_dir and not stat.S_ISREG(st.st_mode):
        raise StageError(f"{what} {shown(url)} is a {kind(st.st_mode)}; only a regular file "
                         "or a directory is staged in")
    name = os.path.basename(path) or os.path.basename(real)
    if not name:
        raise StageError(f"{what} {shown(url)} names no file or directory")
    wfd = open_workdir(workdir)
    try:
        parent = os.open(os.path.dirname(real), _DIR)
        try:
            check_opened(parent, roots, what, url)
            remove(wfd, name)  # a retry's copy, or whatever a task left there
            budget = Budget(cap, f"{what} {shown(url)}")
            budget.private = private_files(roots.home[0])
            for path_, name_ in ((roots.home[0], "the pilotfish home"),
                                 *((x, "the agent's work root") for x in roots.exclude)):
                try:
                    fst = os.stat(path_)
                    budget.forbidden[fst.st_dev, fst.st_ino] = name_
                except OSError:
                    pass
            if not is_dir:
                try:
                    copy_file(parent, os.path.basename(real), wfd, budget,
                              f"{what} {shown(url)}", dname=name)
                except BaseException:
                    remove(wfd, name)
                    raise
                return
            sfd = os.open(os.path.basename(real), _DIR, dir_fd=parent)
            try:
                check_opened(sfd, roots, what, url)
                os.mkdir(name, 0o700, dir_fd=wfd)
                dfd = os.open(name, _DIR, dir_fd=wfd)
                try:
                    try:
                        copy_tree(sfd, dfd, budget, f"{what} {shown(url)[1:-1]}")
                    except BaseException:
                        remove(wfd, name)  # no half tree for the task to trip over
                        raise
                    os.fchmod(dfd, stat.S_IMODE(st.st_mode) & 0o777 | 0o700)
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        finally:
            os.close(parent)
    finally:
        os.close(wfd)


def owned(dfd: int, name: str, job: str) -> bool | None:
    """None: no entry ``name``; True: a directory of this job's (its marker names ``job``)."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return False
    try:
        fd = os.open(name, _DIR, dir_fd=dfd)
        try:
            m = os.open(MARKER, _RD, dir_fd=fd)
            try:
                return os.read(m, 64) == f"{job}\n".encode()
            finally:
                os.close(m)
        finally:
            os.close(fd)
    except OSError:
        return False


def stage_out(url: str, workdir: str, job: str, roots: DataRoots, cap: int) -> None:
    what = "output_url"
    real = resolved(url, what, roots)
    wfd = open_workdir(workdir)
    try:
        try:
            ofd = os.open(real, _DIR)
        except FileNotFoundError:
            # output_url itself may be made; its parent must already resolve under a root
            pfd = os.open(os.path.dirname(real), _DIR)
            try:
                check_opened(pfd, roots, what, url)
                try:
                    os.mkdir(os.path.basename(real), 0o777, dir_fd=pfd)
                except FileExistsError:
                    pass
                ofd = os.open(os.path.basename(real), _DIR, dir_fd=pfd)
            finally:
                os.close(pfd)
        except NotADirectoryError:
            raise StageError(f"{what} {shown(url)} is not a directory") from None
        except OSError as exc:
            raise StageError(f"{what} {shown(url)}: {exc.strerror}") from None
        check_opened(ofd, roots, what, url)
        try:
            _stage_out_into(ofd, wfd, os.path.basename(workdir), job, url, cap,
                            private_files(roots.home[0]))
        finally:
            os.close(ofd)
    finally:
        os.close(wfd)


def _stage_out_into(ofd: int, wfd: int, name: str, job: str, url: str, cap: int,
                    private: set[tuple[int, int]]) -> None:
    what = f"output_url {shown(url)}"
    if owned(ofd, name, job) is False:
        raise StageError(f"{what}: {name} already exists there and is not this job's output; "
                         "stage-out never merges into or overwrites it")
    partial, old = f".{name}.partial", f".{name}.old"
    for n in (partial, old):  # left by a killed earlier try of this job: ours to remove
        if owned(ofd, n, job) is False:
            raise StageError(f"{what}: {n} exists there and is not this job's; remove it")
        remove(ofd, n)
    os.mkdir(partial, 0o700, dir_fd=ofd)
    try:
        pfd = os.open(partial, _DIR, dir_fd=ofd)
        try:
            m = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                        dir_fd=pfd)
            os.write(m, f"{job}\n".encode())
            os.close(m)
            budget = Budget(cap, what)
            budget.private = private
            copy_tree(wfd, pfd, budget, f"workdir {name}", single_link=True, skip=MARKER)
            mask = os.umask(0)
            os.umask(mask)
            os.fchmod(pfd, 0o777 & ~mask)
        finally:
            os.close(pfd)
        mine = owned(ofd, name, job)
        if mine is False:  # appeared while we copied
            raise StageError(f"{what}: {name} appeared there meanwhile and is not this job's "
                             "output; stage-out never merges into or overwrites it")
        if mine:
            os.rename(name, old, src_dir_fd=ofd, dst_dir_fd=ofd)
        os.rename(partial, name, src_dir_fd=ofd, dst_dir_fd=ofd)
        if mine:
            remove(ofd, old)
    except BaseException:
        remove(ofd, partial)
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        mode, job, workdir, url, max_bytes, home, work_root, *roots = argv
        cap = int(max_bytes)
    except ValueError:
        print("usage: python -m pilotfish.pilot.stage in|out|handoff JOB WORKDIR URL MAX_BYTES HOME "
              "WORK_ROOT [ROOT ...]", file=sys.stderr)
        return 2
    what = "stage-in" if mode == "in" else "stage-out"
    try:
        if mode == "handoff":  # URL: the site stager's staging directory (see stage_site_out)
            from .stage_site_out import hand_off
            hand_off(workdir, job, url, home, cap)
            return 0
        data_roots = roots_of(home, work_root, roots)
        # a workflow's subjob with several parents stages in one folder of each: their URLs
        # joined by newlines (no checked URL holds one; see server/workflows.py)
        for one in url.split("\n") if mode == "in" else [url]:
            if "://" in one and not one.startswith(("file://", "local://")):
                from . import stage_remote  # remote schemes: pilotfish.transfer, same limits
                if mode == "in":
                    stage_remote.stage_in(one, workdir, data_roots, cap)
                elif mode == "out":
                    stage_remote.stage_out(one, workdir, job, data_roots, cap)
                else:
                    raise StageError(f"unknown mode {mode!r}")
            elif mode == "in":
                stage_in(one, workdir, data_roots, cap)
            elif mode == "out":
                stage_out(one, workdir, job, data_roots, cap)
            else:
                raise StageError(f"unknown mode {mode!r}")
    except (StageError, ValidationError, PilotfishError) as exc:
        print(f"{what} failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{what} failed: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except RecursionError:
        print(f"{what} failed: directories nested too deep", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
