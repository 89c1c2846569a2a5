"""The transfer interface: a URL, its checks, the limits of one transfer, and the scheme registry.

One small interface, one module per scheme behind it (:data:`REGISTRY`), chosen by the URL's
scheme with :func:`scheme_for`. Every scheme answers::

    stat(url, limits)            -> Stat(size, is_dir)
    get(url, dest_path, limits)  -> bytes moved   (dest_path: the final local path)
    put(src_path, url, limits)   -> bytes moved   (url: the final remote path)
    get_batch([(url, dest)], limits) -> [bytes or TransferError, ...]   (one session where the
    put_batch([(src, url)], limits)  -> [bytes or TransferError, ...]    protocol has it)

and keeps these promises: a file is written under a temporary name in its target directory and
renamed into place (a half-written file is never visible under its final name); at most
``limits.max_bytes`` are moved per file; a transfer with no progress for ``limits.stall``
seconds, or running longer than ``limits.timeout``, is stopped; a failure raises
:class:`TransferError` with one line naming the URL (``scp://host/path: No such file``).

:func:`check_url` is pure and runs at the door (the server's ``job add``) and again in every
scheme: credentials inside a URL, option-like users and hosts (``-oProxyCommand=...``),
percent-encoded ``..`` parts, NUL, control characters and unknown schemes are refused.
Credentials come from the site profile's ``transfers.credentials`` or the user's transfers file
(see :mod:`pilotfish.transfer.credentials`), never from a URL or a job.

Imports only the core and the standard library: the server checks URLs with it.
"""
from __future__ import annotations

import importlib
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence, Union
from urllib.parse import unquote

from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.validate import echo

#: scheme -> "module:Class"; modules are imported when a scheme is first used (paramiko-free,
#: requests-free start-up; the server never imports them).
REGISTRY: dict[str, str] = {
    "file": "pilotfish.transfer.local:LocalScheme",
    "local": "pilotfish.transfer.local:LocalScheme",
    "scp": "pilotfish.transfer.ssh:ScpScheme",
    "sftp": "pilotfish.transfer.ssh:SftpScheme",
    "http": "pilotfish.transfer.http:HttpScheme",
    "https": "pilotfish.transfer.http:HttpScheme",
    "gsiftp": "pilotfish.transfer.gridftp:GridFtpScheme",
    "globus": "pilotfish.transfer.globus:GlobusScheme",
}
#: The schemes a job's input_url/output_url may use (bare absolute paths are ``file``).
SCHEMES: tuple[str, ...] = tuple(REGISTRY)
#: Schemes served on this machine's own file system (the data roots rule applies).
LOCAL_SCHEMES = ("file", "local")
LOCAL_PREFIXES = ("file://", "local://")
#: Schemes whose URL must name a host.
REMOTE_SCHEMES = tuple(s for s in SCHEMES if s not in LOCAL_SCHEMES)

MAX_URL = 4096
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,31}$")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
_IPV6_RE = re.compile(r"^\[[0-9A-Fa-f:.]{2,45}\]$")
_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]")


class TransferError(PilotfishError):
    """A transfer failed or was refused: ``str(err)`` is one line naming the URL."""

    code = "transfer"


class Stat(NamedTuple):
    size: int | None  #: bytes (None: a directory, or the server did not say)
    is_dir: bool


@dataclass(frozen=True)
class Limits:
    """The bounds of one transfer (of one batch for ``*_batch``)."""
    timeout: float = 3600.0  #: seconds for the whole transfer
    max_bytes: int = 100 * 2**30  #: bytes per file (a directory: in all)
    stall: float = 60.0  #: seconds without a byte moved before it is stopped
    connect_timeout: float = 15.0  #: seconds to reach the server

    def __post_init__(self) -> None:
        for name in ("timeout", "stall", "connect_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e9:
                raise ValidationError(f"transfer {name} must be a positive number of seconds, "
                                      f"got {echo(v)}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) \
                or self.max_bytes < 1:
            raise ValidationError(f"transfer max_bytes must be a whole number >= 1, got "
                                  f"{echo(self.max_bytes)}")


@dataclass(frozen=True)
class Url:
    """A checked URL. ``path`` is percent-decoded (for ``file``/``local``: the absolute path)."""
    raw: str
    scheme: str  #: lower case; ``file`` for a bare absolute path
    host: str = ""
    port: int | None = None
    user: str | None = None
    path: str = "/"
    query: str = ""  #: http(s) only, as written

    @property
    def endpoint(self) -> str:
        """What per-endpoint limits count: ``scheme://host[:port]`` (``file://`` for local)."""
        if self.scheme in LOCAL_SCHEMES:
            return "file://"
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port else "")

    @property
    def name(self) -> str:
        """The last part of the path (what a staged-in copy is called)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:  # credentials never reach a Url, so its text is safe to show
        return self.raw


def shown(value: Any) -> str:
    return echo(value, 100)


def _refuse(what: str, value: Any, why: str) -> ValidationError:
    return ValidationError(f"{what} {shown(value)}: {why}")


def _check_path(what: str, value: str, raw_path: str, decode: bool) -> str:
    """The decoded path, refused when a part is '..' (also when percent-encoded)."""
    path = unquote(raw_path, errors="strict") if decode else raw_path
    if _CTRL_RE.search(path):
        raise _refuse(what, value, "the path holds NUL or a control character (maybe "
                                   "percent-encoded)")
    if ".." in path.split("/"):
        raise _refuse(what, value, "the path may not contain a '..' part (also not "
                                   "percent-encoded as %2e%2e)")
    return path


def check_url(value: Any, what: str = "url") -> Url:
    """Parse and check one URL (pure: no file system, no network). Raises a one-line
    :class:`ValidationError` naming ``what``.

    ``/abs/path``, ``file:///abs/path`` and ``local:///abs/path`` are local (the data-roots
    rule of :mod:`pilotfish.dataroots` is applied by the caller or the local scheme);
    ``scheme://[user@]host[:port]/path`` is remote (``/~/rel`` is relative to the login's
    home for scp/sftp)."""
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{what} must be a non-empty URL string")
    if len(value) > MAX_URL:
        raise _refuse(what, value, f"longer than {MAX_URL} characters")
    if _CTRL_RE.search(value):
        raise _refuse(what, value, "NUL, line breaks and control characters are refused")
    if value.startswith("/"):
        return Url(value, "file", path=_check_path(what, value, value, decode=False))
    scheme, sep, rest = value.partition("://")
    if not sep or not _SCHEME_RE.match(scheme):
        raise _refuse(what, value, "expected an absolute path or scheme://...; supported "
                                   f"schemes: {', '.join(SCHEMES)}")
    scheme = scheme.lower()
    if scheme not in REGISTRY:
        raise _refuse(what, value, f"unknown scheme {shown(scheme)}; supported schemes: "
                                   f"{', '.join(SCHEMES)}")
    netloc, slash, tail = rest.partition("/")
    path_part = slash + tail
    if "#" in path_part:
        raise _refuse(what, value, "a #fragment is not part of a transfer URL")
    query = ""
    if "?" in path_part:
        if scheme not in ("http", "https"):
            raise _refuse(what, value, f"a ?query is not part of a {scheme}:// URL")
        path_part, _, query = path_part.partition("?")
    user = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        if ":" in userinfo or "@" in userinfo:  # never echoed: the password is in it
            raise _refuse(what, f"{scheme}://***@{netloc}{path_part}",
                          "credentials inside a URL are refused; put them in the "
                                       "site profile's transfers.credentials or your transfers "
                                       "file (~/.config/pilotfish/transfers.yaml)")
        if userinfo.startswith("-"):
            raise _refuse(what, value, f"user {shown(userinfo)} starts with '-': refused (it "
                                       "could be read as an option)")
        if not _USER_RE.match(userinfo):
            raise _refuse(what, value, f"user {shown(userinfo)}: expected letters, digits, "
                                       "'.', '_' or '-' (no percent-encoding)")
        user = userinfo
    host, port = netloc, None
    m = re.match(r"^(.*?)(?::([0-9]{1,5}))?$", netloc) if not netloc.startswith("[") else \
        re.match(r"^(\[[^\]]*\])(?::([0-9]{1,5}))?$", netloc)
    if m:
        host, port_s = m.group(1), m.group(2)
        port = int(port_s) if port_s else None
    if host.startswith("-"):
        raise _refuse(what, value, f"host {shown(host)} starts with '-': refused (it could "
                                   "reach ssh or a client as an option)")
    if port is not None and not 0 < port < 65536:
        raise _refuse(what, value, f"port {port} is not in 1..65535")
    if scheme in LOCAL_SCHEMES:
        if user or port or host not in ("", "localhost"):
            raise _refuse(what, value, f"a {scheme}:// URL names no host (only "
                                       f"{scheme}:///path or {scheme}://localhost/path)")
        if "%" in path_part:
            raise _refuse(what, value, f"percent-encoding is not decoded in {scheme}:// URLs; "
                                       "give the plain path")
        if not path_part.startswith("/"):
            raise _refuse(what, value, "expected an absolute path")
        return Url(value, scheme, path=_check_path(what, value, path_part, decode=False))
    if not host:
        raise _refuse(what, value, f"a {scheme}:// URL must name a host")
    if not (_HOST_RE.match(host) or _IPV6_RE.match(host)):
        raise _refuse(what, value, f"host {shown(host)} is not a host name or address")
    if not path_part or path_part == "/":
        raise _refuse(what, value, "names no file")
    try:
        path = _check_path(what, value, path_part, decode=True)
    except UnicodeDecodeError:
        raise _refuse(what, value, "the path's percent-encoding is not UTF-8") from None
    if "%" in query and _CTRL_RE.search(unquote(query)):
        raise _refuse(what, value, "the query holds a control character")
    return Url(value, scheme, host=host.lower(), port=port, user=user, path=path, query=query)


def check_job_url(value: Any, what: str, roots: Any) -> str | None:
    """The door check of a job's ``input_url``/``output_url`` (the server's job add and
    alter): None for none; a local URL or path under ``roots`` (a
    :class:`pilotfish.dataroots.DataRoots`), returned as its normalized path; a remote URL of
    a known scheme, checked by :func:`check_url` and returned as written."""
    from pilotfish import dataroots
    if isinstance(value, str) and "://" in value and not value.startswith(LOCAL_PREFIXES):
        u = check_url(value, what)
        if u.scheme not in LOCAL_SCHEMES:
            return u.raw
    return dataroots.check_url(value, what, roots)  # local paths: its rule and its words


def as_url(url: Union[Url, str], what: str = "url") -> Url:
    return url if isinstance(url, Url) else check_url(url, what)


class Scheme:
    """One protocol. Subclasses set ``names`` and implement stat/get/put (and the batches
    where the protocol moves many files in one session; ``batch = True`` then).

    ``credentials``: a :class:`pilotfish.transfer.credentials.Credentials` (or None: none);
    ``roots``: the local data roots (:class:`pilotfish.dataroots.DataRoots`) the local
    scheme and local ends of transfers are checked against (None: not checked here)."""

    names: tuple[str, ...] = ()
    batch: bool = False

    def __init__(self, credentials: Any = None, roots: Any = None) -> None:
        self.credentials = credentials
        self.roots = roots

    def stat(self, url: Url | str, limits: Limits) -> Stat:
        raise TransferError(f"{url}: stat is not supported by {type(self).__name__}")

    def get(self, url: Url | str, dest: str, limits: Limits) -> int:
        raise TransferError(f"{url}: get is not supported by {type(self).__name__}")

    def put(self, src: str, url: Url | str, limits: Limits) -> int:
        raise TransferError(f"{url}: put is not supported by {type(self).__name__}")

    def get_batch(self, pairs: Sequence[tuple[Url | str, str]],
                  limits: Limits) -> list[int | TransferError]:
        """Each pair's bytes, or its TransferError (one failure does not stop the others)."""
        return [_one(self.get, u, d, limits) for u, d in pairs]

    def put_batch(self, pairs: Sequence[tuple[str, Url | str]],
                  limits: Limits) -> list[int | TransferError]:
        return [_one(self.put, s, u, limits) for s, u in pairs]


def _one(fn, a, b, limits) -> int | TransferError:
    try:
        return fn(a, b, limits)
    except TransferError as exc:
        return exc
    except ValidationError as exc:
        return TransferError(str(exc))


_CLASSES: dict[str, type] = {}


def scheme_class(name: str) -> type[Scheme]:
    if name not in REGISTRY:
        raise ValidationError(f"unknown scheme {shown(name)}; supported schemes: "
                              f"{', '.join(SCHEMES)}")
    if name not in _CLASSES:
        module, _, cls = REGISTRY[name].partition(":")
        _CLASSES[name] = getattr(importlib.import_module(module), cls)
    return _CLASSES[name]


def scheme_for(url: Url | str, credentials: Any = None, roots: Any = None) -> Scheme:
    """The scheme object that moves ``url`` (an unknown scheme: ValidationError listing
    :data:`SCHEMES`)."""
    u = as_url(url)
    return scheme_class(u.scheme)(credentials=credentials, roots=roots)


def is_remote(url: Url | str) -> bool:
    return as_url(url).scheme not in LOCAL_SCHEMES


# -- atomic placement of a local file -------------------------------------------------------

@dataclass
class Partial:
    """A file being written beside ``dest`` under a temporary name, renamed into place by
    :meth:`commit`, removed by :meth:`discard` (so a half-written file never has the final
    name). ``O_EXCL | O_NOFOLLOW``: never writes through a planted symlink."""
    dest: str
    tmp: str = field(init=False)
    fd: int = field(init=False, default=-1)

    def __post_init__(self) -> None:
        d, name = os.path.split(self.dest)
        if not name:
            raise TransferError(f"{self.dest}: names no file")
        self.tmp = os.path.join(d, f".{name}.partial-{secrets.token_hex(4)}")

    def open(self) -> int:
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def commit(self, mode: int = 0o644) -> None:
        if self.fd >= 0:
            os.fchmod(self.fd, mode & ~_umask())
        self.close()
        os.rename(self.tmp, self.dest)

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)


def over_cap(url: Any, limits: Limits) -> TransferError:
    return TransferError(f"{url}: more than {human(limits.max_bytes)}: over the transfer byte "
                         "cap (staging.max_bytes / transfers.max_bytes)")


__all__ = ["LOCAL_SCHEMES", "Limits", "Partial", "REGISTRY", "REMOTE_SCHEMES", "SCHEMES", "Scheme",
           "Stat", "TransferError", "Url", "as_url", "check_job_url", "check_url", "human",
           "is_remote", "over_cap", "scheme_class", "scheme_for"]
