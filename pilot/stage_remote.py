"""The node agent's stager for remote URLs (scp, sftp, http(s), gsiftp, globus).

Where no site stager has staged a job's input already (a laptop, agents started by hand), the
node agent's stager child (:mod:`pilotfish.pilot.stage`) moves remote inputs and outputs itself
through :mod:`pilotfish.transfer`, under the same limits as local staging: the step's byte cap
(its MAX_BYTES argument) and its timeout (``PILOTFISH_STAGE_TIMEOUT``, which the agent sets for
it; the agent also kills the step at that deadline), plus a stall bound
(``PILOTFISH_TRANSFER_STALL`` seconds without a byte moved, default 60).

* stage-in: the file the URL names lands in the workdir under its last path part, written
  under a temporary name and renamed (a remote directory is refused: remote inputs are files).
* stage-out: the workdir's regular files go to ``URL/<workdir name>/<relative path>`` in one
  session where the protocol batches; symlinks are not followed and not sent, a file with
  more than one link and the home's private files are refused, a device or FIFO fails the
  step. Each file is uploaded under a temporary name and renamed where the protocol can.

Credentials: the site profile's ``transfers.credentials`` when the agent runs for a site
(``PILOTFISH_SITE``, set by ``pilot agent --site``), over the user's transfers file
(``$PILOTFISH_TRANSFERS`` or ~/.config/pilotfish/transfers.yaml); never from the job.
"""
from __future__ import annotations

import os
import stat
from urllib.parse import quote

from pilotfish.dataroots import DataRoots
from pilotfish.transfer import Limits, TransferError, check_url, scheme_for
from pilotfish.transfer.local import _DIR, MARKER, StageError, kind, open_workdir, private_files

STALL_ENV = "PILOTFISH_TRANSFER_STALL"
TIMEOUT_ENV = "PILOTFISH_STAGE_TIMEOUT"
SITE_ENV = "PILOTFISH_SITE"


def _seconds(env, name: str, default: float) -> float:
    try:
        v = float(env.get(name) or default)
    except ValueError:
        raise StageError(f"{name}={env.get(name)!r}: expected seconds") from None
    if not 0 < v < 1e9:
        raise StageError(f"{name}={env.get(name)!r}: expected a positive number of seconds")
    return v


def limits(cap: int, environ=None) -> Limits:
    env = os.environ if environ is None else environ
    timeout = _seconds(env, TIMEOUT_ENV, 3600.0)
    stall = _seconds(env, STALL_ENV, 60.0)
    return Limits(timeout=timeout, max_bytes=cap, stall=min(stall, timeout))


def credentials(home: str):
    from pilotfish.transfer.credentials import Credentials
    site_creds = None
    name = os.environ.get(SITE_ENV)
    if name:
        from pathlib import Path

        from pilotfish.site_configs.loader import load_site
        site = load_site(name, Path(home))
        if site.transfers is not None and site.transfers.credentials:
            site_creds = {k: v.model_dump(exclude_none=True)
                          for k, v in site.transfers.credentials.items()}
    return Credentials.load(site=site_creds)


def stage_in(url: str, workdir: str, roots: DataRoots, cap: int) -> None:
    u = check_url(url, "input_url")
    name = u.name
    if name in ("", ".", "..", "~") or "/" in name:
        raise StageError(f"input_url {u}: names no file")
    scheme = scheme_for(u, credentials=credentials(roots.home[0]), roots=roots)
    wfd = open_workdir(workdir)
    try:
        _remove_file(wfd, name)  # a retry's copy, or whatever a task left there
    finally:
        os.close(wfd)
    scheme.get(u, os.path.join(workdir, name), limits(cap))


def _remove_file(dfd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def files_of(wfd: int, private: set, where: str) -> tuple[list, list]:
    """(relative path, open dir fd, name) of every regular file under the workdir, walked with
    directory fds and O_NOFOLLOW; and the dir fds to close."""
    out, fds = [], []

    def walk(dfd: int, rel: str, depth: int) -> None:
        if depth > 200:
            raise StageError(f"{where}: directories nested more than 200 deep")
        with os.scandir(dfd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            if not rel and name == MARKER:
                continue
            here = f"{rel}{name}"
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                continue  # never followed; a remote side has no safe place for it
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    raise StageError(f"workdir file {here} has {st.st_nlink} hard links; a "
                                     "file linked from elsewhere is not staged out")
                if (st.st_dev, st.st_ino) in private:
                    raise StageError(f"workdir file {here} is a private file of the home")
                out.append((here, dfd, name))
            elif stat.S_ISDIR(st.st_mode):
                sub = os.open(name, _DIR, dir_fd=dfd)
                fds.append(sub)
                walk(sub, here + "/", depth + 1)
            else:
                raise StageError(f"workdir {here} is a {kind(st.st_mode)}; only regular "
                                 "files and directories are staged out")

    walk(wfd, "", 0)
    return out, fds


def stage_out(url: str, workdir: str, job: str, roots: DataRoots, cap: int) -> None:
    u = check_url(url, "output_url")
    if u.query:
        raise StageError(f"output_url {u}: a ?query is not part of an output URL")
    base = u.raw.rstrip("/")
    lim = limits(cap)
    scheme = scheme_for(u, credentials=credentials(roots.home[0]), roots=roots)
    wfd = open_workdir(workdir)
    fds = [wfd]
    try:
        files, more = files_of(wfd, private_files(roots.home[0]), f"output_url {u}")
        fds += more
        total = 0
        pairs = []
        for rel, dfd, name in files:
            total += os.stat(name, dir_fd=dfd, follow_symlinks=False).st_size
            if total > cap:
                raise StageError(f"output_url {u}: the workdir holds more than the staging "
                                 "byte cap (--stage-max-bytes, PILOTFISH_STAGE_MAX_BYTES, or "
                                 "the site profile's staging.max_bytes)")
            target = f"{base}/{quote(os.path.basename(workdir))}/{quote(rel)}"
            # the directory fd is ours and fixed: the file is opened below it, never through
            # a path a task could swap
            pairs.append((f"/proc/self/fd/{dfd}/{name}", check_url(target, "output_url")))
        if not pairs:
            return
        if scheme.batch:
            results = scheme.put_batch(pairs, lim)
        else:
            results = []
            for src, target in pairs:
                try:
                    results.append(scheme.put(src, target, lim))
                except TransferError as exc:
                    results.append(exc)
                    break
        for r in results:
            if isinstance(r, TransferError):
                raise r
    finally:
        for fd in fds:
            os.close(fd)


__all__ = ["credentials", "limits", "stage_in", "stage_out"]
