"""CurveZMQ keys: who may talk to the server, and how the wire is encrypted.

Every ``tcp://`` connection to the server is CurveZMQ (RFC 26): encrypted, and the server admits
only clients (node agents, site agents, the CLI, the Python API) whose public key is in its
authorized-keys directory. ``ipc://`` and ``inproc://`` endpoints never leave the machine and are
guarded by file permissions instead (the server makes its ipc socket owner-only).

Layout, all owner-only (files 0600, directories 0700)::

    $PILOTFISH_HOME/keys/
        server.key  server.key_secret      the server's pair (the public half is not secret)
        client.key  client.key_secret      the home's default client pair, authorized
        NAME.key    NAME.key_secret        more client pairs (``keys init --client NAME``)
        authorized/NAME.key                public keys the server admits (re-read on change)
        roles.json                         each key's role: admin, submitter, agent, reader

Files are the ZeroMQ certificate format that ``zmq.auth.create_certificates`` writes, so czmq
and pyzmq tools read them. ``server start`` makes the server pair and the default client pair
when they are missing, so everything that shares the home (the CLI, agents on a shared file
system) finds its keys with nothing to configure.

From elsewhere, a process needs the server's public key and an authorized client pair, looked up
in this order:

* server public key: ``--server-key`` (a key file, or the 40-character key itself),
  ``$PILOTFISH_SERVER_KEY``, the home's ``server.json`` (when it names the same address), the
  home's ``keys/server.key``;
* client pair: ``--client-key`` (a ``.key_secret`` file), ``$PILOTFISH_CLIENT_KEY``, the home's
  ``keys/client.key_secret``.
"""
from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import NamedTuple

import zmq
from zmq.utils import z85

from pilotfish import settings
from pilotfish.errors import PilotfishError, ServerUnavailable

log = logging.getLogger("pilotfish.keys")

SERVER = "server"
#: The default client pair of a home (what the CLI and agents sharing the home use).
DEFAULT_CLIENT = "client"
PUBLIC = ".key"
SECRET = ".key_secret"
SERVER_KEY_ENV = "PILOTFISH_SERVER_KEY"
CLIENT_KEY_ENV = "PILOTFISH_CLIENT_KEY"
#: Transports that never leave the machine: no CURVE there (file permissions guard ipc).
LOCAL_TRANSPORTS = ("ipc://", "inproc://")
#: What a key may do (see ROLE_HELP); the home's default client pair is admin.
ADMIN, SUBMITTER, AGENT, READER = "admin", "submitter", "agent", "reader"
#: A site agent: what a submitter may, and the site stager's ops (stage_poll).
SITE = "site"
ROLES = (ADMIN, SUBMITTER, AGENT, READER, SITE)
#: The role of a key made by `keys init --client` or admitted by `keys authorize` without
#: --role, and of a key with no entry in roles.json: least privilege that still lets a user
#: submit; node agents need `--role agent`.
DEFAULT_ROLE = SUBMITTER
ROLES_FILE = "roles.json"
ROLE_HELP = ("admin: everything (apps, any job, server shutdown); submitter: add jobs and "
             "change its own, list and show all, record pilots and sites (site agents, pilot "
             "submit); agent: node agents only (hello, update, bye); reader: list and show; "
             "site: a site agent (a submitter that may also stage jobs' data)")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_Z85_RE = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
_KEY_LINE = re.compile(rb'^\s*(public-key|secret-key)\s*=\s*["\']?([^"\'\s]+)["\']?\s*$')

_BANNER = """#   ****  Generated on {when} by pilotfish  ****
#   ZeroMQ CURVE {what} Certificate
#   {note}

"""


class KeyProblem(PilotfishError):
    """A key is missing, unreadable, malformed or unsafely stored."""

    code = "keys"


class Refused(ServerUnavailable):
    """The server is there but refused our handshake (a key it does not admit, or a
    CURVE/plain-text mismatch)."""


class Curve(NamedTuple):
    """What a CURVE client socket needs (Z85 bytes)."""
    server_public: bytes
    public: bytes
    secret: bytes


# -- files ------------------------------------------------------------------------------------
def keys_dir(home: Path) -> Path:
    return Path(home) / "keys"


def authorized_dir(home: Path) -> Path:
    return keys_dir(home) / "authorized"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith(".key"):
        raise KeyProblem(f"key name {name!r}: expected letters, digits, '_', '.' and '-' "
                         "(up to 64, not ending in .key)")
    return name


def private_dir(path: Path) -> Path:
    """Make ``path`` (and its missing parents) a directory only its owner can enter."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.make_private(path)
    return path


def _valid_z85(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def _write(path: Path, public: bytes, secret: bytes | None) -> None:
    """Write a certificate file 0600 from its first byte, atomically (no half-written key)."""
    what, note = (("**Secret**", "DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its "
                   "permissions.") if secret else
                  ("Public", "Exchange securely; give it to the server's keys/authorized/."))
    text = _BANNER.format(when=time.strftime("%Y-%m-%d %H:%M:%S"), what=what, note=note)
    text += "metadata\ncurve\n" + f'    public-key = "{public.decode()}"\n'
    if secret:
        text += f'    secret-key = "{secret.decode()}"\n'
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_key_file(path: str | os.PathLike, secret: bool = False) -> tuple[bytes, bytes | None]:
    """(public, secret) from a certificate file (or a file holding just a public key).

    With ``secret``, the file must hold a secret key that matches its public key, and must not
    be readable by others (like ssh, an exposed secret key is refused, not used).
    """
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise KeyProblem(f"{p}: no such key file") from None
    except OSError as exc:
        raise KeyProblem(f"{p}: cannot read the key file: {exc.strerror or exc}") from None
    if len(data) > 65536:
        raise KeyProblem(f"{p}: not a CurveZMQ key file (too large)")
    found: dict[bytes, bytes] = {}
    for line in data.splitlines():
        m = _KEY_LINE.match(line)
        if m:
            found.setdefault(m.group(1), m.group(2))
    pub, sec = found.get(b"public-key"), found.get(b"secret-key")
    if pub is None and _valid_z85(data.strip()):
        pub = data.strip()  # a bare public key
    if pub is None or not _valid_z85(pub) or (sec is not None and not _valid_z85(sec)):
        raise KeyProblem(f"{p}: not a CurveZMQ key file (expected 'public-key = \"...\"' with "
                         "a 40-character Z85 key, as `pilotfish keys init` writes)")
    if secret:
        if sec is None:
            raise KeyProblem(f"{p}: holds no secret key; give the .key_secret file")
        if mode & 0o077:
            raise KeyProblem(f"{p}: a secret key readable by others (mode "
                             f"{stat.S_IMODE(mode):04o}); chmod 600 {p}")
        if zmq.curve_public(sec) != pub:
            raise KeyProblem(f"{p}: its secret key does not match its public key")
    return pub, sec


def public_key(value: str | os.PathLike) -> bytes:
    """A public key from a key file, or the 40-character Z85 key itself."""
    s = os.fspath(value)
    if isinstance(s, str) and _Z85_RE.fullmatch(s) and not os.path.exists(s) \
            and _valid_z85(s.encode()):
        return s.encode()
    return read_key_file(s)[0]


def make_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A new key pair ``name.key`` / ``name.key_secret`` in ``directory`` (refuses to replace)."""
    check_name(name)
    private_dir(directory)
    pub_path, sec_path = directory / f"{name}{PUBLIC}", directory / f"{name}{SECRET}"
    for p in (pub_path, sec_path):
        if p.exists():
            raise KeyProblem(f"{p} exists: not replacing a key (remove it first)")
    public, secret = zmq.curve_keypair()
    _write(sec_path, public, secret)
    _write(pub_path, public, None)
    return pub_path, sec_path


def _authorize_public(home: Path, name: str, public: bytes) -> Path:
    d = private_dir(authorized_dir(home))
    path = d / f"{check_name(name)}{PUBLIC}"
    if path.exists():
        raise KeyProblem(f"a key named {name!r} is already authorized ({path}); revoke it "
                         "first or give another --name")
    _write(path, public, None)
    return path


# -- roles -------------------------------------------------------------------------------------
def roles_path(home: Path) -> Path:
    return keys_dir(home) / ROLES_FILE


def check_role(role: str) -> str:
    if role not in ROLES:
        raise KeyProblem(f"role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def default_role(name: str) -> str:
    """The role of a key roles.json does not name: admin for the home's default pair (homes
    made before roles existed keep working), else DEFAULT_ROLE."""
    return ADMIN if name == DEFAULT_CLIENT else DEFAULT_ROLE


def parse_roles(data: bytes, where: object = ROLES_FILE) -> dict[str, str]:
    """``{key name: role}`` from roles.json; raises KeyProblem when it is not that."""
    import json
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise KeyProblem(f"{where}: not JSON ({exc})") from None
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise KeyProblem(f"{where}: expected a map of key name to role")
    bad = sorted(f"{k}={v}" for k, v in obj.items() if v not in ROLES)
    if bad:
        raise KeyProblem(f"{where}: unknown role(s) {', '.join(bad)}; roles: {', '.join(ROLES)}")
    return obj


def read_roles(home: Path) -> dict[str, str]:
    p = roles_path(home)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise KeyProblem(f"{p}: cannot read: {exc.strerror or exc}") from None
    return parse_roles(data, p)


def write_private_json(p: Path, obj: dict) -> None:
    """Write ``obj`` (keys sorted) to ``p`` 0600 from its first byte and atomically (a reader
    never sees half a file; the new inode tells a watcher to re-read it)."""
    import json
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dict(sorted(obj.items())), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_roles(home: Path, roles: dict[str, str]) -> None:
    """roles.json, written by :func:`write_private_json` (a server reading it never sees
    half a file)."""
    private_dir(keys_dir(home))
    write_private_json(roles_path(home), roles)


def role_of(home: Path, name: str) -> str:
    return read_roles(home).get(name) or default_role(name)


def set_role(home: Path, name: str, role: str) -> str:
    """Give the authorized key ``name`` the role ``role``; returns its previous role. A running
    server applies it to the key's next message."""
    check_name(name)
    check_role(role)
    if not (authorized_dir(home) / f"{name}{PUBLIC}").exists():
        known = ", ".join(e["name"] for e in authorized(home)) or "none"
        raise KeyProblem(f"no authorized key named {name!r} (authorized: {known})")
    roles = read_roles(home)
    old = roles.get(name) or default_role(name)
    roles[name] = role
    _write_roles(home, roles)
    return old


def _forget_role(home: Path, name: str) -> None:
    try:
        roles = read_roles(home)
    except KeyProblem:
        return  # a broken file is the admin's to fix; `keys role` rewrites it
    if roles.pop(name, None) is not None:
        _write_roles(home, roles)


# -- the home's keys ----------------------------------------------------------------------------
def ensure_home_keys(home: Path) -> list[Path]:
    """Make what is missing of the home's server pair, default client pair and authorized-keys
    directory; return the files made. A default client pair made here is authorized; one that
    exists is left as it is (its authorization may have been revoked on purpose)."""
    home = Path(home)
    settings.make_private(home)
    d = private_dir(keys_dir(home))
    private_dir(authorized_dir(home))
    made: list[Path] = []
    sec = d / f"{SERVER}{SECRET}"
    if not sec.exists():
        made += make_pair(d, SERVER)
    elif not (d / f"{SERVER}{PUBLIC}").exists():  # the public half is derived from the secret
        pub, _ = read_key_file(sec, secret=True)
        _write(d / f"{SERVER}{PUBLIC}", pub, None)
        made.append(d / f"{SERVER}{PUBLIC}")
    if not (d / f"{DEFAULT_CLIENT}{SECRET}").exists():
        pub_path, sec_path = make_pair(d, DEFAULT_CLIENT)
        made += [pub_path, sec_path]
        if not (authorized_dir(home) / f"{DEFAULT_CLIENT}{PUBLIC}").exists():
            made.append(_authorize_public(home, DEFAULT_CLIENT, read_key_file(pub_path)[0]))
            roles = read_roles(home)
            roles[DEFAULT_CLIENT] = ADMIN
            _write_roles(home, roles)
    if made:
        log.info("made CurveZMQ keys in %s: %s", d, ", ".join(str(p.relative_to(d))
                                                             for p in made))
    return made


def server_keys(home: Path) -> tuple[bytes, bytes]:
    """The server's (public, secret) pair from the home."""
    return read_key_file(keys_dir(home) / f"{SERVER}{SECRET}", secret=True)  # type: ignore


def new_client(home: Path, name: str, role: str = DEFAULT_ROLE) -> tuple[Path, Path, Path]:
    """A new client pair in the home's keys, authorized with ``role``: (public, secret,
    authorized) files."""
    check_name(name)
    check_role(role)
    if name == SERVER:
        raise KeyProblem("'server' is the server's own pair; pick another client name")
    ensure_home_keys(home)
    d = keys_dir(home)
    if (authorized_dir(home) / f"{name}{PUBLIC}").exists():
        raise KeyProblem(f"a key named {name!r} is already authorized; revoke it first or pick "
                         "another name")
    roles = read_roles(home)  # a broken roles.json stops us before any file is made
    pub_path, sec_path = make_pair(d, name)
    roles[name] = role  # written before the key is admitted: never a moment with no role
    _write_roles(home, roles)
    return pub_path, sec_path, _authorize_public(home, name, read_key_file(pub_path)[0])


def authorize(home: Path, path: str | os.PathLike, name: str | None = None,
              role: str = DEFAULT_ROLE) -> Path:
    """Admit the public key in ``path`` (a .key or .key_secret file; only the public half is
    kept) under ``name`` (default: the file's name without .key/.key_secret) with ``role``."""
    check_role(role)
    public = read_key_file(path)[0]
    if name is None:
        name = Path(path).name
        for suffix in (SECRET, PUBLIC):
            if name.endswith(suffix):
                name = name[:-len(suffix)]
                break
    for entry in authorized(home):
        if entry["public_key"] == public.decode():
            raise KeyProblem(f"that key is already authorized as {entry['name']!r}")
    check_name(name)
    if (authorized_dir(home) / f"{name}{PUBLIC}").exists():
        raise KeyProblem(f"a key named {name!r} is already authorized; revoke it first or "
                         "give another --name")
    settings.make_private(Path(home))
    private_dir(keys_dir(home))
    roles = read_roles(home)
    roles[name] = role
    _write_roles(home, roles)
    return _authorize_public(home, name, public)


def revoke(home: Path, name: str) -> Path:
    """Stop admitting the key named ``name``: new connections are refused at once, and open
    ones get nothing from their next message on (the server checks the key per message)."""
    path = authorized_dir(home) / f"{check_name(name)}{PUBLIC}"
    try:
        path.unlink()
    except FileNotFoundError:
        known = ", ".join(e["name"] for e in authorized(home)) or "none"
        raise KeyProblem(f"no authorized key named {name!r} (authorized: {known})") from None
    _forget_role(home, name)  # a later key of that name starts from the default again
    return path


def authorized(home: Path) -> list[dict]:
    """The authorized keys: name, role, public key, file; unreadable files are listed with an
    error (and every role as None when roles.json is unreadable: the server then refuses all)."""
    d = authorized_dir(home)
    out = []
    if not d.is_dir():
        return out
    try:
        roles: dict[str, str] | None = read_roles(home)
    except KeyProblem as exc:
        log.error("%s", exc)
        roles = None
    for p in sorted(d.glob(f"*{PUBLIC}")):
        name = p.name[:-len(PUBLIC)]
        role = None if roles is None else roles.get(name) or default_role(name)
        try:
            out.append({"name": name, "role": role,
                        "public_key": read_key_file(p)[0].decode(), "path": str(p),
                        "error": None})
        except KeyProblem as exc:
            out.append({"name": name, "role": role, "public_key": None, "path": str(p),
                        "error": str(exc)})
    return out


class AuthorizedKeys:
    """The server's view of the authorized-keys directory: re-read when the directory changes
    (a key added or revoked takes effect for the next connection) and at least every
    ``max_age`` seconds (a key file edited in place)."""

    def __init__(self, directory: Path, max_age: float = 5.0) -> None:
        self.directory = Path(directory)
        self.max_age = max_age
        self._keys: dict[bytes, str] = {}
        self._sig: tuple | None = None
        self._loaded = 0.0

    def _signature(self) -> tuple | None:
        try:
            st = self.directory.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def reload(self) -> None:
        keys: dict[bytes, str] = {}
        sig = self._signature()
        if sig is not None:
            for p in sorted(self.directory.glob(f"*{PUBLIC}")):
                try:
                    keys[read_key_file(p)[0]] = p.name[:-len(PUBLIC)]
                except KeyProblem as exc:
                    log.warning("authorized keys: skipping %s", exc)
        self._keys, self._sig, self._loaded = keys, sig, time.monotonic()

    def lookup(self, public: bytes) -> str | None:
        """The name a Z85 public key is authorized under, or None."""
        if self._signature() != self._sig or time.monotonic() - self._loaded > self.max_age:
            self.reload()
        return self._keys.get(public)


class KeyRoles:
    """The server's view of who a CURVE caller is: the name its public key is authorized under
    and that name's role. Checked at every lookup (one stat of authorized/ and one of
    roles.json, about 2 us), so `keys revoke` and `keys role` apply to a connection's NEXT
    message, not only to new connections; key files edited in place are re-read at least
    every ``max_age`` seconds. A roles.json that cannot be read or parsed gives no key any
    role (every request refused, with the reason) until it is fixed: failing open could grant
    what an admin just meant to take away."""

    def __init__(self, home: Path, max_age: float = 5.0) -> None:
        self.home = Path(home)
        self.max_age = max_age
        self._dir = os.fspath(authorized_dir(home))
        self._path = os.fspath(roles_path(home))
        self.keys = AuthorizedKeys(authorized_dir(home), max_age)
        self.roles: dict[str, str] | None = {}
        self.error: str | None = None
        self._sig: tuple | None = None
        self._loaded = 0.0

    @staticmethod
    def _stat(path: str) -> tuple | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return ("error", str(exc))
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _reload(self, sig: tuple) -> None:
        self.keys.reload()
        try:
            self.roles = read_roles(self.home)
            self.error = None
        except KeyProblem as exc:
            if self.error != str(exc):
                log.error("roles: %s; every request is refused until it is fixed "
                          "(`pilotfish keys role NAME ROLE` rewrites it)", exc)
            self.roles, self.error = None, str(exc)
        self._sig, self._loaded = sig, time.monotonic()

    def lookup(self, public: bytes) -> tuple[str | None, str | None]:
        """(name, role) of a Z85 public key; (None, None) when it is no longer authorized,
        (name, None) when roles.json is broken."""
        sig = (self._stat(self._dir), self._stat(self._path))
        if sig != self._sig or time.monotonic() - self._loaded > self.max_age:
            self._reload(sig)
        name = self.keys._keys.get(public)
        if name is None:
            return None, None
        if not _NAME_RE.fullmatch(name):  # a file put in authorized/ by hand: the name is
            # stored as job owner and agent key (64 characters at most)
            return name[:64], None
        if self.roles is None:
            return name, None
        return name, self.roles.get(name) or default_role(name)


# -- what a client uses -------------------------------------------------------------------------
def uses_curve(address: str) -> bool:
    """Does a connection to ``address`` go through CURVE? Everything but ipc:// and inproc://."""
    return not address.startswith(LOCAL_TRANSPORTS)


def is_loopback_bind(bind: str) -> bool:
    """ipc://, or tcp:// on a loopback address (127.0.0.0/8, ::1, localhost)."""
    if bind.startswith("ipc://"):
        return True
    if not bind.startswith("tcp://"):
        return False
    host = bind[len("tcp://"):].rsplit(":", 1)[0]
    if ";" in host:  # tcp://source;dest: the bound side is after the ';'
        host = host.split(";", 1)[1]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_public(home: Path, address: str, explicit: str | os.PathLike | None) \
        -> tuple[bytes | None, bool]:
    """(the server's public key or None, whether the server says it serves plain text)."""
    given = explicit or os.environ.get(SERVER_KEY_ENV)
    if given:
        try:
            return public_key(given), False
        except KeyProblem as exc:
            src = "--server-key" if explicit else f"${SERVER_KEY_ENV} (or --server-key)"
            raise KeyProblem(f"{src}: {exc}") from None
    info = settings.read_server_info(home) or {}
    if info.get("address") == address:
        if info.get("public_key"):
            return info["public_key"].encode(), False
        if info.get("curve") is False:
            return None, True
    path = keys_dir(home) / f"{SERVER}{PUBLIC}"
    if path.exists():
        return read_key_file(path)[0], False
    return None, False


def client_pair(home: Path, explicit: str | os.PathLike | None = None) -> tuple[bytes, bytes]:
    given = explicit or os.environ.get(CLIENT_KEY_ENV)
    if given:
        try:
            return read_key_file(given, secret=True)  # type: ignore[return-value]
        except KeyProblem as exc:
            src = "--client-key" if explicit else f"${CLIENT_KEY_ENV} (or --client-key)"
            raise KeyProblem(f"{src}: {exc}") from None
    path = keys_dir(home) / f"{DEFAULT_CLIENT}{SECRET}"
    if not path.exists():
        raise KeyProblem(f"no client key: give --client-key FILE (a .key_secret file made by "
                         f"`pilotfish keys init --client NAME` in the server's home) or set "
                         f"${CLIENT_KEY_ENV} (looked for {path})")
    return read_key_file(path, secret=True)  # type: ignore[return-value]


def client_curve(home: Path | str | None, address: str,
                 server_key: str | os.PathLike | None = None,
                 client_key: str | os.PathLike | None = None) -> Curve | None:
    """The keys to reach the server at ``address``, or None for a plain connection (ipc://, or
    a server whose server.json in this home says it was started --insecure)."""
    if not uses_curve(address):
        return None
    home = settings.home(home)
    spub, plain = _server_public(home, address, server_key)
    if spub is None:
        if plain and not client_key:
            return None
        raise KeyProblem(f"no public key for the server at {address}: give --server-key FILE "
                         f"(its home's keys/server.key) or set ${SERVER_KEY_ENV}")
    public, secret = client_pair(home, client_key)
    return Curve(spub, public, secret)


def apply_client(sock: zmq.Socket, curve: Curve | None) -> zmq.Socket:
    """Make ``sock`` a CURVE client (before it connects); None leaves it plain."""
    if curve is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
    return sock


#: Why a handshake failed, for people (a libzmq protocol error code -> a hint).
HANDSHAKE_HINTS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "security mechanism mismatch: one side uses "
    "CurveZMQ and the other not (a client without keys, or a server started --insecure)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "cryptographic error: wrong server public key?",
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: "key exchange failed: wrong server public key?",
}


def handshake_hint(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the server refused this key (ZAP status {value}: not an authorized key)"
    return HANDSHAKE_HINTS.get(value, f"handshake failed (protocol error {value:#x})")


_MONITORS = itertools.count(1)


def monitor_socket(sock: zmq.Socket, events: int) -> zmq.Socket:
    """``sock.get_monitor_socket(events)`` at an inproc address no other socket of this process
    had. pyzmq's default names it after the socket's file descriptor, and a closed socket's
    monitor endpoint can outlive that number: a new socket given the same number failed with
    'Address already in use' (seen in the test suite, where Clients come one after another)."""
    return sock.get_monitor_socket(
        events, f"inproc://pilotfish-monitor-{os.getpid()}-{next(_MONITORS)}")


def watch_handshakes(sock: zmq.Socket, logger: logging.Logger, what: str,
                     every: float = 60.0) -> threading.Thread:
    """Log (at most once per ``every`` seconds) when ``sock``'s CURVE handshakes fail, from a
    daemon thread, so an agent with a wrong or revoked key says why it gets no work. The
    thread ends when the socket is closed or its context terminated."""
    events = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    mon = monitor_socket(sock, events)

    def run() -> None:
        from zmq.utils.monitor import parse_monitor_message
        last, quiet = 0.0, 0
        try:
            while True:
                frames = mon.recv_multipart()
                ev = parse_monitor_message(frames)
                if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                    break
                now = time.monotonic()
                if now - last >= every:
                    logger.error("%s: cannot connect to %s: %s%s", what,
                                 ev["endpoint"].decode(errors="replace"),
                                 handshake_hint(ev["event"], ev["value"]),
                                 f" ({quiet} more failures since)" if quiet else "")
                    last, quiet = now, 0
                else:
                    quiet += 1
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError:
            pass
        finally:
            mon.close(linger=0)

    t = threading.Thread(target=run, name="pilotfish-handshakes", daemon=True)
    t.start()
    return t


# -- ``pilotfish keys`` -------------------------------------------------------------------------
import click  # noqa: E402  (the command group below; the functions above need no click)

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _home(ctx: click.Context) -> Path:
    return settings.home((ctx.obj or {}).get("home"))


@click.group("keys", context_settings=CTX)
def keys_group() -> None:
    """CurveZMQ keys: the server's pair, client pairs and the keys the server admits.

    Keys live in HOME/keys/ (owner-only). `server start` makes the server pair and an
    authorized default client pair when they are missing, so processes sharing the home need
    nothing else; give other machines the server's public key (keys/server.key) and a client
    pair (keys init --client NAME) through a shared file system, and point them at the files
    with --server-key/--client-key, $PILOTFISH_SERVER_KEY/$PILOTFISH_CLIENT_KEY or a site
    profile's keys: {server_public, client}.

    Every key has a role (HOME/keys/roles.json): admin, submitter (the default for new keys),
    agent (node agents only) or reader; the home's default pair is admin. Without CurveZMQ
    (ipc://, or --insecure on loopback) there are no keys: every caller is admin.
    """


@keys_group.command("init", context_settings=CTX)
@click.option("--client", "name", help="Also make a client pair NAME.key/NAME.key_secret and "
              "authorize it (one per user, site or machine, so each can be revoked alone).")
@click.option("--role", default=None, metavar="ROLE",
              help=f"The new client's role (default: {DEFAULT_ROLE}). {ROLE_HELP}.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def init_cmd(ctx, name, role, as_json) -> None:
    """Make the home's missing keys (server pair, default client pair, which is admin); with
    --client, a new authorized client pair with --role (node agents: --role agent)."""
    from pilotfish import console
    if role and not name:
        raise KeyProblem("--role needs --client NAME (`keys role NAME ROLE` changes a key's)")
    role = check_role(role or DEFAULT_ROLE)
    home = _home(ctx)
    made = [str(p) for p in ensure_home_keys(home)]
    new = None
    if name:
        pub, sec, auth = new_client(home, name, role)
        made += [str(pub), str(sec), str(auth)]
        new = {"name": name, "role": role, "public": str(pub), "secret": str(sec)}
    server_pub = read_key_file(keys_dir(home) / f"{SERVER}{PUBLIC}")[0].decode()
    if as_json:
        return console.print_json({"keys": str(keys_dir(home)), "made": made,
                                   "server_public_key": server_pub, "client": new})
    console.out.print(f"keys in {keys_dir(home)}: " + (f"made {len(made)} files"
                      if made else "all present"), markup=False)
    console.out.print(f"server public key: {server_pub} ({keys_dir(home) / 'server.key'})",
                      markup=False)
    if new:
        console.out.print(f"client {name!r}: authorized as {role}; give its machine {new['secret']} "
                          f"(--client-key) and {keys_dir(home) / 'server.key'} (--server-key)",
                          markup=False)


@keys_group.command("ls", context_settings=CTX)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def ls_cmd(ctx, as_json) -> None:
    """The authorized client keys (HOME/keys/authorized/) and their roles."""
    from pilotfish import console
    home = _home(ctx)
    rows = authorized(home)
    if as_json:
        return console.print_json(rows)
    console.table([{**r, "public_key": r["public_key"] or f"! {r['error']}",
                    "role": r["role"] or "! roles.json unreadable"} for r in rows],
                  [("name", "NAME"), ("role", "ROLE"), ("public_key", "PUBLIC KEY"),
                   ("path", "FILE")])


@keys_group.command("authorize", context_settings=CTX)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", help="Name to authorize it under (default: the file's name without "
              ".key/.key_secret).")
@click.option("--role", default=DEFAULT_ROLE, show_default=True, metavar="ROLE",
              help=f"What the key may do. {ROLE_HELP}.")
@click.pass_context
def authorize_cmd(ctx, file, name, role) -> None:
    """Admit the public key in FILE (a .key file; of a .key_secret only the public half is
    kept) with --role. A running server admits it from the next connection on."""
    from pilotfish import console
    path = authorize(_home(ctx), file, name, role)
    console.out.print(f"authorized {path.name[:-len(PUBLIC)]!r} as {role}: {path}",
                      markup=False)


@keys_group.command("role", context_settings=CTX)
@click.argument("name")
@click.argument("role")
@click.pass_context
def role_cmd(ctx, name, role) -> None:
    """Give the authorized key NAME the role ROLE (admin, submitter, agent or reader). A
    running server applies it from that key's next message on, no restart needed."""
    from pilotfish import console
    old = set_role(_home(ctx), name, role)
    console.out.print(f"{name!r}: {old} -> {role}", markup=False)


@keys_group.command("revoke", context_settings=CTX)
@click.argument("name")
@click.pass_context
def revoke_cmd(ctx, name) -> None:
    """Stop admitting the key NAME. A running server refuses its new connections at once,
    and what its open connections send from their next message on."""
    from pilotfish import console
    path = revoke(_home(ctx), name)
    console.out.print(f"revoked {name!r} (removed {path})", markup=False)
