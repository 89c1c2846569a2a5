"""Local copies: ``file://``, ``local://`` and bare absolute paths, within the data roots.

The rule of :mod:`pilotfish.dataroots` is applied again here, after symlinks: to the
``realpath`` of the URL, then to the path the kernel really opened (``/proc/self/fd``). Every
open below uses ``O_NOFOLLOW`` and directory file descriptors, so a symlink swapped in while we
copy is never followed. The node agent's stager (:mod:`pilotfish.pilot.stage`) builds its
stage-in and stage-out of local URLs on these helpers; :class:`LocalScheme` offers them behind
the transfer interface (:mod:`pilotfish.transfer.base`): one file or tree, placed atomically.

Imports are light on purpose: this starts once per staged job.
"""
from __future__ import annotations

import errno
import os
import stat

from pilotfish.dataroots import DataRoots, make, shown, url_path
from pilotfish.errors import ValidationError

from .base import Limits, Scheme, Stat, TransferError, Url, as_url, human

CHUNK = 1 << 20
#: Written first into a stage-out folder: the job id, so a retry may replace its own folder.
MARKER = ".pilotfish-job"
_RD = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StageError(TransferError):
    """A refusal or failure of a local copy with its one-line message."""


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISREG, "regular file")):
        if test(mode):
            return name
    return "special file"


class Budget:
    """The byte cap of one step."""

    def __init__(self, cap: int, what: str) -> None:
        self.cap, self.left, self.what = cap, cap, what
        #: (st_dev, st_ino) of directories a tree may not contain (the home, the work root):
        #: found by identity, so a bind mount or a second name does not hide them.
        self.forbidden: dict[tuple[int, int], str] = {}
        #: (st_dev, st_ino) of the home's private files: a hard link to one (same file, other
        #: name) is refused wherever it is found.
        self.private: set[tuple[int, int]] = set()

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise StageError(f"{self.what}: more than {human(self.cap)} to copy: over the "
                             "staging byte cap (--stage-max-bytes, PILOTFISH_STAGE_MAX_BYTES, "
                             "or the site profile's staging.max_bytes)")


def opened_path(fd: int) -> str | None:
    """The path the kernel opened behind ``fd`` (None without /proc)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def check_opened(fd: int, roots: DataRoots, what: str, value: str) -> None:
    real = opened_path(fd)
    if real is not None:
        try:
            roots.check_path(real, what, value)
        except ValidationError as exc:  # the caller closes fd (this process ends soon anyway)
            raise StageError(str(exc)) from None


def open_workdir(workdir: str) -> int:
    """The job's workdir as a directory fd, refused unless it is a real directory at exactly
    that path (the agent's work root is a realpath: any symlink on the way changes the path)."""
    try:
        fd = os.open(workdir, _DIR)
    except (NotADirectoryError, OSError) as exc:
        if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:
            raise StageError(f"workdir {workdir} is not a real directory under the work root "
                             "(a symlink?): refused") from None
        raise StageError(f"workdir {workdir}: {exc.strerror}") from None
    real = opened_path(fd)
    if real is not None and real != workdir:
        os.close(fd)
        raise StageError(f"workdir {workdir} is not a real directory under the work root "
                         f"(it leads to {real[:100]}): refused")
    return fd


def copy_file(sfd: int, name: str, dfd: int, budget: Budget, where: str,
              single_link: bool = False, dname: str | None = None) -> None:
    """Copy regular file ``name`` of directory ``sfd`` into directory ``dfd`` (as ``dname``)."""
    src = os.open(name, _RD, dir_fd=sfd)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):  # swapped since we looked: never read it
            raise StageError(f"{where} is a {kind(st.st_mode)}; only regular files, "
                             "directories and symlinks are staged")
        if st.st_nlink > 1 and (st.st_dev, st.st_ino) in budget.private:
            raise StageError(f"{where} is a hard link to a private file of the pilotfish home: "
                             "not staged")
        if single_link and st.st_nlink > 1:
            raise StageError(f"{where} has {st.st_nlink} hard links; a file linked from "
                             "elsewhere is not staged out")
        out = os.open(dname or name,
                      os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dfd)
        try:
            while True:
                # read one byte past the cap at most: enough to know the cap is passed
                data = os.read(src, min(CHUNK, budget.left + 1))
                if not data:
                    break
                budget.take(len(data))
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
            os.fchmod(out, stat.S_IMODE(st.st_mode) & 0o777)
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(out)
    finally:
        os.close(src)


def copy_tree(sfd: int, dfd: int, budget: Budget, where: str, single_link: bool = False,
              skip: str | None = None, depth: int = 0) -> None:
    """Copy the entries of directory ``sfd`` into the (empty) directory ``dfd``."""
    if depth > 200:
        raise StageError(f"{where}: directories nested more than 200 deep")
    with os.scandir(sfd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        if name == skip:
            continue
        here = f"{where}/{name}"
        st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
        elif stat.S_ISREG(st.st_mode):
            copy_file(sfd, name, dfd, budget, here, single_link)
        elif stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in budget.forbidden:
                raise StageError(f"{here} is {budget.forbidden[st.st_dev, st.st_ino]}: "
                                 "not staged")
            os.mkdir(name, 0o700, dir_fd=dfd)
            s2 = os.open(name, _DIR, dir_fd=sfd)
            try:
                d2 = os.open(name, _DIR, dir_fd=dfd)
                try:
                    copy_tree(s2, d2, budget, here, single_link, None, depth + 1)
                    os.fchmod(d2, stat.S_IMODE(st.st_mode) & 0o777 | 0o700)
                finally:
                    os.close(d2)
            finally:
                os.close(s2)
        else:
            raise StageError(f"{here} is a {kind(st.st_mode)}; only regular files, "
                             "directories and symlinks are staged")


def remove(dfd: int, name: str) -> None:
    """Remove entry ``name`` of directory ``dfd`` (a tree without following symlinks)."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def private_files(home: str) -> set[tuple[int, int]]:
    """Identities of the home's files that must never leave it: keys, database, server.json."""
    out = set()
    for d in (home, os.path.join(home, "keys"), os.path.join(home, "keys", "authorized")):
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        out.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    return out


def roots_of(home: str, work_root: str, roots: list[str]) -> DataRoots:
    return make(home, roots, resolve=True, exclude=[work_root])


def resolved(url: str, what: str, roots: DataRoots) -> str:
    """The URL's path after symlinks, checked against the data roots (the node's last word)."""
    real = os.path.realpath(url_path(url, what))
    try:
        roots.check_path(real, what, url)
    except ValidationError as exc:
        raise StageError(str(exc)) from None
    return real


class LocalScheme(Scheme):
    """``file://``, ``local://`` and bare paths: copies on this machine's file system, checked
    against ``roots`` (a resolved :class:`DataRoots`, required) after symlinks."""

    names = ("file", "local")

    def _real(self, url: Url, what: str) -> str:
        if self.roots is None:
            raise TransferError(f"{url}: local transfers need the data roots")
        return resolved(url.raw, what, self.roots)

    def stat(self, url: Url | str, limits: Limits) -> Stat:
        u = as_url(url)
        real = self._real(u, "url")
        try:
            st = os.lstat(real)
        except OSError as exc:
            raise StageError(f"{u}: {exc.strerror}") from None
        is_dir = stat.S_ISDIR(st.st_mode)
        return Stat(None if is_dir else st.st_size, is_dir)

    def get(self, url: Url | str, dest: str, limits: Limits) -> int:
        """Copy the file or tree at ``url`` to ``dest`` (which must not exist yet): built
        under a temporary name beside it, renamed into place."""
        u = as_url(url)
        real = self._real(u, "input_url")
        return _copy_into(real, dest, str(u), self.roots, limits.max_bytes, tree_check=True)

    def put(self, src: str, url: Url | str, limits: Limits) -> int:
        """Copy the local file or tree ``src`` to the path ``url`` names (refused if it
        exists)."""
        u = as_url(url)
        real = self._real(u, "output_url")
        try:
            os.lstat(real)
            raise StageError(f"{u}: exists already; never overwritten")
        except FileNotFoundError:
            pass
        try:
            pfd = os.open(os.path.dirname(real), _DIR)
        except OSError as exc:
            raise StageError(f"{u}: {exc.strerror}") from None
        try:
            check_opened(pfd, self.roots, "output_url", u.raw)
        finally:
            os.close(pfd)
        return _copy_into(os.path.realpath(src), real, str(u), None, limits.max_bytes)


def _copy_into(real: str, dest: str, what: str, roots: DataRoots | None, cap: int,
               tree_check: bool = False) -> int:
    """Copy file or tree ``real`` to ``dest`` via a temporary name in dest's directory."""
    try:
        st = os.lstat(real)
    except OSError as exc:
        raise StageError(f"{what}: {exc.strerror}") from None
    is_dir = stat.S_ISDIR(st.st_mode)
    if not is_dir and not stat.S_ISREG(st.st_mode):
        raise StageError(f"{what} is a {kind(st.st_mode)}; only a regular file or a "
                         "directory is copied")
    if is_dir and roots is not None and tree_check:
        try:
            roots.check_path(real, "input_url", what, tree=True)
        except ValidationError as exc:
            raise StageError(str(exc)) from None
    ddir, dname = os.path.split(dest)
    tmp = f".{dname}.partial-{os.getpid()}"
    budget = Budget(cap, what)
    dfd = os.open(ddir or ".", _DIR)
    try:
        if os.path.lexists(dest):
            raise StageError(f"{dest}: exists already; never overwritten")
        remove(dfd, tmp)
        parent = os.open(os.path.dirname(real), _DIR)
        try:
            if roots is not None:
                check_opened(parent, roots, "url", what)
            try:
                if is_dir:
                    os.mkdir(tmp, 0o700, dir_fd=dfd)
                    sfd = os.open(os.path.basename(real), _DIR, dir_fd=parent)
                    try:
                        if roots is not None:
                            check_opened(sfd, roots, "url", what)
                        t = os.open(tmp, _DIR, dir_fd=dfd)
                        try:
                            copy_tree(sfd, t, budget, what)
                            os.fchmod(t, stat.S_IMODE(st.st_mode) & 0o777 | 0o700)
                        finally:
                            os.close(t)
                    finally:
                        os.close(sfd)
                else:
                    copy_file(parent, os.path.basename(real), dfd, budget, what, dname=tmp)
                os.rename(tmp, dname, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                remove(dfd, tmp)
                raise
        finally:
            os.close(parent)
    finally:
        os.close(dfd)
    return cap - budget.left
