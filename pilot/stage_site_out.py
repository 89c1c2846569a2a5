"""Stage-out through the site stager: the node agent hands outputs over, the stager puts them.

Both halves of one layout live here: a job's handed outputs are
``<staging_dir>/out/<job>/<workdir name>/<relative path>``, and they go to
``<output_url>/<workdir name>/<relative path>`` (the same place the node agent's own remote
stage-out puts them, :func:`pilotfish.pilot.stage_remote.stage_out`).

* :func:`hand_off` runs in the node agent's stage child (``stage.py handoff``), off the agent's
  loop. It **copies** the workdir's regular files (the same walk and refusals as a remote
  stage-out: symlinks skipped and never followed, hard-linked files, the home's private files
  and devices refused, the staging byte cap) into ``out/.<job>.partial-XXXX/`` and renames
  that to ``out/<job>`` when whole: a stager never sees half a hand-off. A copy, not a rename
  or hard link: the workdir (often node-local, another file system) keeps the job's files as
  after any stage-out, a whole re-run of the task never writes into staged inodes, and a
  later stage-out of the same workdir never meets a file with two links. The copy costs the
  outputs' size once in the staging directory until the stager has put them.
* :func:`put_out` runs in a site stager's worker thread: every regular file under
  ``out/<job>`` (walked with directory fds, symlinks skipped) in one batch where the scheme
  batches; each put is atomic where the scheme can (sftp: a temporary name, then a rename) and
  its size is checked; the directory is removed when all went. Missing: ``gone`` (the task
  must run again to make them).
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from urllib.parse import quote

from pilotfish.transfer.local import StageError, open_workdir, private_files

OUT = "out"


class Gone(StageError):
    """The handed outputs are not in the staging directory any more."""


def out_dir(staging_dir: str, job: int | str) -> str:
    return os.path.join(staging_dir, OUT, str(int(job)))


def hand_off(workdir: str, job: str, staging_dir: str, home: str, cap: int) -> int:
    """Copy the workdir's files to ``<staging_dir>/out/<job>/<workdir name>/``; the bytes."""
    from .stage_remote import files_of
    outroot = os.path.join(staging_dir, OUT)
    if not os.path.isdir(staging_dir):
        raise StageError(f"staging directory {staging_dir} does not exist here (is it shared "
                         "with the login node?)")
    os.makedirs(outroot, mode=0o700, exist_ok=True)
    wfd = open_workdir(workdir)
    fds = [wfd]
    tmp = tempfile.mkdtemp(prefix=f".{int(job)}.partial-", dir=outroot)
    total = 0
    try:
        files, more = files_of(wfd, private_files(home), f"stage-out of {workdir}")
        fds += more
        base = os.path.join(tmp, os.path.basename(workdir.rstrip("/")))
        os.mkdir(base, 0o700)
        for rel, dfd, name in files:
            dst = os.path.join(base, rel)
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            total += _copy(dfd, name, dst, cap - total, rel)
        final = out_dir(staging_dir, job)
        if os.path.lexists(final):  # an earlier attempt's, never put: this one replaces it
            _remove(final)
        os.rename(tmp, final)
        tmp = None
    finally:
        for fd in fds:
            os.close(fd)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return total


def _copy(dfd: int, name: str, dst: str, room: int, rel: str) -> int:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise StageError(f"workdir {rel} is not a regular file any more")
        if st.st_size > room:
            raise StageError("the workdir holds more than the staging byte cap "
                             "(--stage-max-bytes or the site profile's staging.max_bytes)")
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
        n = 0
        try:
            while True:  # in the kernel where it can (copy_file_range), else read/write
                try:
                    k = os.copy_file_range(src, out, 1 << 24)
                except OSError:
                    k = os.write(out, os.read(src, 1 << 20))
                if not k:
                    break
                n += k
                if n > room:
                    raise StageError("the workdir holds more than the staging byte cap")
        finally:
            os.close(out)
        return n
    finally:
        os.close(src)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def put_out(staging_dir: str, job: int, url: str, scheme, limits) -> tuple[int, int]:
    """Put ``out/<job>``'s files to ``url``; (files, bytes). Raises Gone, or the first
    TransferError (its one line) -- the staged files stay for a retry of the stage-out."""
    from pilotfish.transfer import TransferError, check_url

    from .stage_remote import files_of
    where = out_dir(staging_dir, job)
    try:
        wfd = open_workdir(where)
    except StageError:
        raise Gone(f"{url}: the handed outputs of job {job} are not in the staging directory "
                   "any more") from None
    fds = [wfd]
    try:
        files, more = files_of(wfd, set(), f"staged outputs of job {job}")
        fds += more
        base = url.rstrip("/")
        pairs, sizes = [], []
        for rel, dfd, name in files:
            sizes.append(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_size)
            pairs.append((f"/proc/self/fd/{dfd}/{name}",
                          check_url(f"{base}/{quote(rel)}", "output_url")))
        if not pairs:
            results = []
        elif scheme.batch:
            results = scheme.put_batch(pairs, limits)
        else:
            results = []
            for src, target in pairs:
                try:
                    results.append(scheme.put(src, target, limits))
                except TransferError as exc:
                    results.append(exc)
                    break
        for r, size, (_src, target) in zip(results, sizes, pairs):
            if isinstance(r, BaseException):
                raise r
            if isinstance(r, int) and r != size:
                raise TransferError(f"{target}: size check failed: moved {r} bytes of {size}")
    finally:
        for fd in fds:
            os.close(fd)
    shutil.rmtree(where, ignore_errors=True)
    return len(pairs), sum(sizes)


__all__ = ["Gone", "OUT", "hand_off", "out_dir", "put_out"]
