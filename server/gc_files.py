"""The file-system half of ``pilotfish gc``: measure and remove old job workdirs and pilot
folders, never leaving the root they belong to.

A workdir comes from the database as a path relative to the agents' work root. It is refused
when it is absolute, names ``..``/``.``/an empty component, or when any component under the
root is a symlink (a job may have planted one to point the removal elsewhere); the removal
itself (``shutil.rmtree``, fd-based on Linux) never follows symlinks inside the tree.
Pure but for the file system; no database, no server.
"""
from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pilotfish.errors import ValidationError
# (durations people type are parsed in the core, for every CLI; kept importable from here)
from pilotfish.timespec import parse_duration  # noqa: F401

#: The files --keep-tails trims instead of removing.
TAIL_FILES = ("job.out", "job.err")
#: At most this much of a file is read to find its last lines.
TAIL_READ = 1 << 20
MAX_TAIL_LINES = 100_000


class Refused(Exception):
    """A path that is not removed: the message says why."""


def check_relative(rel: object) -> tuple[str, ...]:
    """The components of a workdir relative to the work root, or Refused."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise Refused("not a relative path")
    if rel.startswith("/"):
        raise Refused("an absolute path (workdirs are relative to the work root)")
    parts = tuple(rel.split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise Refused("leaves the work root or is not a plain path ('..', '.', '//')")
    return parts


def locate(root: Path, parts: tuple[str, ...]) -> Path | None:
    """``root/parts`` when it is a real directory reached through real directories only;
    None when it does not exist; Refused for a symlink or a non-directory on the way."""
    path = root
    for i, name in enumerate(parts):
        path = path / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise Refused(f"{'/'.join(parts[:i + 1])} is a symlink (not followed)")
        if not stat.S_ISDIR(st.st_mode):
            raise Refused(f"{'/'.join(parts[:i + 1])} is not a directory")
    return path


def measure(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``: every non-directory entry, symlinks not followed."""
    files = size = 0
    for top, dirs, names in os.walk(path, followlinks=False):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            files += 1
            size += st.st_size
    return files, size


def remove(path: Path) -> None:
    """Remove the tree at ``path`` (a real directory) without following symlinks in it."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise Refused(f"{path} is no longer a plain directory")
    shutil.rmtree(path)


def tail_of(path: Path, lines: int) -> bytes | None:
    """The last ``lines`` lines of a regular file (never through a symlink), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        f.seek(max(0, st.st_size - TAIL_READ))
        data = f.read(TAIL_READ)
    if lines == 0:
        return b""
    kept = data.splitlines(keepends=True)[-lines:]
    return b"".join(kept)


def trim_to_tails(path: Path, lines: int) -> None:
    """Keep only job.out and job.err, each cut to its last ``lines`` lines, in ``path``."""
    tails = {name: tail_of(path / name, lines) for name in TAIL_FILES}
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    for name, data in tails.items():
        if data is None:
            continue
        fd = os.open(path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


@dataclass
class Tally:
    """What a gc pass found and freed (or, in a dry run, would free)."""
    jobs: int = 0            # final jobs older than the cutoff
    workdirs: int = 0        # workdirs removed (or trimmed to their tails)
    missing: int = 0         # workdirs not under this work root (other root, or gone already)
    files: int = 0
    bytes: int = 0
    events: int = 0          # event rows pruned
    outputs: int = 0         # rows of stored task output (job log) removed
    pilots: int = 0          # pilot folders removed
    skipped: int = 0         # jobs retried (not final any more) between selection and removal
    refused: list[str] = field(default_factory=list)

    def add(self, files: int, size: int) -> None:
        self.files += files
        self.bytes += size


def clean_workdir(root: Path, rel: object, tally: Tally, *, dry_run: bool,
                  keep_tails: int | None, job: int) -> None:
    """Measure and remove (or trim) one job's workdir under ``root``; refusals are tallied."""
    try:
        path = locate(root, check_relative(rel))
        if path is None:
            tally.missing += 1
            return
        files, size = measure(path)
        if not dry_run:
            if keep_tails is None:
                remove(path)
            else:
                trim_to_tails(path, keep_tails)
                left = measure(path)
                files, size = files - left[0], size - left[1]
        elif keep_tails is not None:
            kept = [tail_of(path / n, keep_tails) for n in TAIL_FILES]
            files -= sum(k is not None for k in kept)
            size -= sum(len(k) for k in kept if k is not None)
        tally.workdirs += 1
        tally.add(files, size)
    except Refused as exc:
        tally.refused.append(f"job {job}: workdir {rel!r}: {exc}")
    except OSError as exc:
        tally.refused.append(f"job {job}: workdir {rel!r}: {exc.strerror or exc}")


def clean_pilot(pilots_dir: Path, pid: object, tally: Tally, *, dry_run: bool) -> None:
    """Remove ``pilots_dir/<pid>`` (the folder `pilot submit` made) when it is a real one."""
    from pilotfish.validate import check_name
    try:
        try:
            check_name(pid, "pilot id")
        except ValidationError:
            raise Refused("not a pilot id") from None
        path = locate(pilots_dir, (pid,))
        if path is None:
            return
        files, size = measure(path)
        if not dry_run:
            remove(path)
        tally.pilots += 1
        tally.add(files, size)
    except Refused as exc:
        tally.refused.append(f"pilot {pid!r}: {exc}")
    except OSError as exc:
        tally.refused.append(f"pilot {pid!r}: {exc.strerror or exc}")
