"""Data roots: the directories a job's ``input_url`` and ``output_url`` may name, and the checks.

One rule, in one place, applied twice:

* at the door (the server, ``job add`` and ``job alter``), lexically: an absolute path or a
  ``file://`` URL (``file://localhost/`` too, no other host; ``local://`` alike), no NUL or line break, no ``..``
  part, under one of the server's data roots, and not into the pilotfish home;
* on the node (the stager, :mod:`pilotfish.pilot.stage`), on the path after symlinks
  (``realpath``, then the path the kernel really opened): under one of the agent's roots, not
  into the home, not into the agent's work root (other jobs' workdirs). The node's file system
  has the last word, so the rule runs again there.

A data root is an absolute directory declared by ``PILOTFISH_DATA_ROOTS`` (``os.pathsep``
separated), ``--data-root`` or a site profile's ``data_roots``. Without any, the one root is
``$PILOTFISH_HOME/data/``: the only part of the home a job may ever name. The rest of the home
(keys, database, server.json, logs, pilots, sites, workdirs) is never allowed, even when a
declared root contains the home, and a root inside those private parts is refused.

Pure (only the standard library and the core's errors): the server, the agent and the stager
all use it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import ValidationError

ENV = "PILOTFISH_DATA_ROOTS"
#: The home's own data directory: the default root, and the only part of the home jobs may name.
DATA_DIR = "data"
#: Echoed values are cut to this many characters in error messages.
SHOW = 100


def shown(value: Any) -> str:
    """A user's value for an error message, shortened as every echo is (validate.echo)."""
    from .validate import echo
    return echo(value, SHOW)


def within(path: str, root: str) -> bool:
    """Is ``path`` ``root`` or below it? Both absolute and normalized."""
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def _norm(path: str) -> str:
    """Lexically normalized absolute path (``//a/./b/`` -> ``/a/b``); '..' is refused before."""
    out = os.path.normpath(path)
    return "/" + out.lstrip("/") if out.startswith("//") else out


def from_env(environ: dict | None = None) -> list[str]:
    """The roots ``PILOTFISH_DATA_ROOTS`` declares (empty items skipped)."""
    value = (environ if environ is not None else os.environ).get(ENV) or ""
    return [p for p in value.split(os.pathsep) if p]


@dataclass(frozen=True)
class DataRoots:
    """The roots one process allows, with the home they must keep out of.

    ``roots``, ``home`` and ``data`` hold each path in every form it is known by (as given and,
    where it differs, after symlinks), so a lexical check accepts either spelling.
    ``exclude``: more directories never allowed (an agent's work root)."""
    roots: tuple[str, ...]
    home: tuple[str, ...]
    data: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    declared: bool = True

    def allowed(self) -> str:
        """The roots for an error message."""
        return ", ".join(dict.fromkeys(self.roots))

    def refusal(self, path: str, tree: bool = False) -> str | None:
        """Why ``path`` (absolute, normalized) may not be named, or None when it may.
        ``tree``: a directory whose whole tree is read (an input), so it may not contain the
        home or the work root either."""
        if any(within(path, h) for h in self.home) and not any(within(path, d)
                                                                for d in self.data):
            return (f"is inside the pilotfish home ({self.home[0]}); of the home only "
                    f"{self.data[0]} may be named")
        if any(within(path, x) for x in self.exclude):
            return "is inside the agent's work root (job workdirs)"
        if tree and any(within(h, path) for h in self.home):
            return f"contains the pilotfish home ({self.home[0]}), whose keys stay private"
        if tree and any(within(x, path) for x in self.exclude):
            return "contains the agent's work root (job workdirs)"
        if not any(within(path, r) for r in self.roots):
            return "is not under a data root"
        return None

    def check_path(self, path: str, what: str, value: Any = None, tree: bool = False) -> str:
        """Raise a one-line ValidationError when ``path`` may not be named; return it."""
        why = self.refusal(path, tree)
        if why is not None:
            raise ValidationError(f"{what} {shown(value if value is not None else path)} {why}; "
                                  f"allowed data roots: {self.allowed()} (declare more with "
                                  f"--data-root or {ENV})")
        return path


def _variants(path: str, resolve: bool) -> tuple[str, ...]:
    real = os.path.realpath(path)
    return (real,) if resolve else tuple(dict.fromkeys((path, real)))


def make(home: str | os.PathLike, declared: Iterable[str] = (), *, resolve: bool = False,
         exclude: Iterable[str] = ()) -> DataRoots:
    """The data roots of a server (``resolve=False``: lexical, each root also as its realpath)
    or of an agent (``resolve=True``: realpaths only, for checks after symlinks).

    Raises ValidationError for a relative root, one with '..' or a control character, and one
    inside the home other than the home's data directory."""
    home = _norm(os.fspath(home))
    data = f"{home}/{DATA_DIR}"
    homes = _variants(home, resolve)
    datas = _variants(data, resolve)
    roots: list[str] = []
    for root in declared:
        if not isinstance(root, str) or not root or "\x00" in root or "\n" in root \
                or "\r" in root:
            raise ValidationError(f"data root {shown(root)} must be an absolute directory path")
        if not root.startswith("/"):
            raise ValidationError(f"data root {shown(root)} must be absolute")
        if ".." in root.split("/"):
            raise ValidationError(f"data root {shown(root)} may not contain '..'")
        for r in _variants(_norm(root), resolve):
            if any(within(r, h) for h in homes) and not any(within(r, d) for d in datas):
                raise ValidationError(f"data root {shown(root)} is inside the pilotfish home "
                                      f"({home}): of the home only {data} may be a data root")
            roots.append(r)
    is_declared = bool(roots)
    if not roots:
        roots = list(datas)
    excl = [x for e in exclude for x in _variants(_norm(os.fspath(e)), resolve)]
    return DataRoots(tuple(dict.fromkeys(roots)), homes, datas, tuple(excl), is_declared)


def ensure_data_dir(roots: DataRoots) -> None:
    """Create the home's data directory owner-only when it is the default root."""
    if roots.declared:
        return
    try:
        os.mkdir(roots.data[0], 0o700)
    except FileExistsError:
        pass
    except OSError:
        pass  # a read-only home: the stager reports the missing root when a job names it


def url_path(value: Any, what: str) -> str | None:
    """The absolute, normalized path a URL names (lexical checks only, no roots); None for no
    URL. ``file:///p``, ``file://localhost/p`` and ``/p`` are accepted."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\x00" in value or "\n" in value or "\r" in value:
        raise ValidationError(f"{what} must be a URL string without NUL or line breaks "
                              "(a file:// URL or an absolute path)")
    path = value
    if value.startswith("local://"):  # the seeds' name for a local copy: file:// by another name
        value = "file://" + value[len("local://"):]
    if "://" in value:
        if not value.startswith("file://"):
            scheme = value.split("://", 1)[0]
            raise ValidationError(f"{what} {shown(value)}: unsupported scheme {shown(scheme)}; "
                                  "supported: file:// and absolute paths")
        rest = value[len("file://"):]
        host, slash, tail = rest.partition("/")
        if host not in ("", "localhost"):
            raise ValidationError(f"{what} {shown(value)}: file:// URL names host "
                                  f"{shown(host)}; only local paths (file:///path or "
                                  "file://localhost/path)")
        if "%" in rest:
            raise ValidationError(f"{what} {shown(value)}: percent-encoding is not decoded "
                                  "in file:// URLs; give the plain path")
        path = slash + tail
    if not path.startswith("/"):
        raise ValidationError(f"{what} {shown(value)} must be an absolute path or a file:// URL")
    if ".." in path.split("/"):
        raise ValidationError(f"{what} {shown(value)} may not contain a '..' part")
    return _norm(path)


def check_url(value: Any, what: str, roots: DataRoots) -> str | None:
    """The door check: the path a job's URL names, refused with a one-line error naming the
    field and the allowed roots unless it is under a data root and out of the home (an
    ``input_url``, which may be a directory read whole, may not contain the home either)."""
    path = url_path(value, what)
    if path is None:
        return None
    return roots.check_path(path, what, value, tree=what == "input_url")


__all__ = ["DATA_DIR", "ENV", "DataRoots", "check_url", "ensure_data_dir", "from_env", "make",
           "shown", "url_path", "within"]
