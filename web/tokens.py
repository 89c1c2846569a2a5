"""Web tokens: what a person or a script shows the web dashboard and REST API instead of a key.

``pilotfish keys token NAME --role R`` makes a random token, shown once, and keeps only its
SHA-256 in ``HOME/keys/web_tokens.json`` (0600, in the owner-only keys directory). Each token
stands for a CurveZMQ client key of its own, ``web-NAME``, made with it and authorized with
the role: the web process acts for the token with that key, so the server checks the role and
who owns a job exactly as for any client (``jobs.owner`` is ``web-NAME`` for jobs added through
the web with that token; a submitter token acts on those only). The role lives where every
key's does, in roles.json (``keys role web-NAME admin`` changes it). ``--revoke NAME`` removes
the token and revokes its key: its sessions end at their next request.

No fastapi here: the ``keys`` command group imports this module at CLI start-up.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from pathlib import Path

from pilotfish import keys
from pilotfish.errors import ValidationError

TOKENS_FILE = "web_tokens.json"
KEY_PREFIX = "web-"
TOKEN_PREFIX = "pft_"
#: The roles a token may have (agents never use the web).
TOKEN_ROLES = (keys.READER, keys.SUBMITTER, keys.ADMIN)
_lock = threading.Lock()


def path(home: Path) -> Path:
    return keys.keys_dir(home) / TOKENS_FILE


def key_name(name: str) -> str:
    """The client key a token acts with."""
    return KEY_PREFIX + name


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _check_name(name: str) -> str:
    try:
        keys.check_name(key_name(name))
    except keys.KeyProblem:
        raise ValidationError(f"token name {name!r}: letters, digits and '_.-', at most 60 "
                              "characters, starting with a letter or digit") from None
    return name


def read(home: Path) -> dict[str, dict]:
    """``{name: {"sha256": ..., "created": ...}}``; {} when there is no file."""
    try:
        data = path(home).read_bytes()
    except FileNotFoundError:
        return {}
    try:
        obj = json.loads(data)
    except ValueError:
        raise ValidationError(f"{path(home)}: not JSON; fix or remove it") from None
    if not isinstance(obj, dict):
        raise ValidationError(f"{path(home)}: expected a map of token name to its hash")
    return obj


def _write(home: Path, tokens: dict[str, dict]) -> None:
    """0600 from the first byte, replaced atomically (a web process never reads half)."""
    keys.private_dir(keys.keys_dir(home))
    keys.write_private_json(path(home), tokens)


def create(home: Path, name: str, role: str) -> str:
    """Make the token ``name`` with ``role`` and its key; return the token (shown once)."""
    _check_name(name)
    if role not in TOKEN_ROLES:
        raise ValidationError(f"role {role!r}: expected one of {', '.join(TOKEN_ROLES)}")
    with _lock:
        tokens = read(home)
        if name in tokens:
            raise ValidationError(f"a token named {name!r} exists; revoke it first "
                                  f"(`pilotfish keys token --revoke {name}`)")
        kname = key_name(name)
        if (keys.authorized_dir(home) / f"{kname}{keys.PUBLIC}").exists():
            raise ValidationError(f"a key named {kname!r} is authorized already; revoke it "
                                  f"first (`pilotfish keys revoke {kname}`)")
        for suffix in (keys.PUBLIC, keys.SECRET):  # a revoked key's leftovers
            (keys.keys_dir(home) / f"{kname}{suffix}").unlink(missing_ok=True)
        keys.new_client(home, kname, role)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        tokens[name] = {"sha256": digest(token), "created": round(time.time(), 3)}
        _write(home, tokens)
    return token


def revoke(home: Path, name: str) -> None:
    """Remove the token and revoke its key (its pair's files go too)."""
    with _lock:
        tokens = read(home)
        if name not in tokens:
            raise ValidationError(f"no token named {name!r} (tokens: "
                                  f"{', '.join(sorted(tokens)) or 'none'})")
        del tokens[name]
        _write(home, tokens)
        kname = key_name(name)
        try:
            keys.revoke(home, kname)
        except keys.KeyProblem:
            pass  # revoked by hand already
        for suffix in (keys.PUBLIC, keys.SECRET):
            (keys.keys_dir(home) / f"{kname}{suffix}").unlink(missing_ok=True)


def listing(home: Path) -> list[dict]:
    """Each token's name, key, role (from roles.json) and creation time; never a hash."""
    try:
        roles = keys.read_roles(home)
    except keys.KeyProblem:
        roles = {}
    return [{"name": n, "key": key_name(n), "role": roles.get(key_name(n)),
             "created": t.get("created") if isinstance(t, dict) else None}
            for n, t in sorted(read(home).items())]


class TokenBook:
    """The web process's view of the token file, read again whenever it changes (a revoked
    token stops working at its next request)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self._stamp: tuple | None = None
        self._by_digest: dict[str, str] = {}
        self._lock = threading.Lock()

    def _load(self) -> None:
        try:
            st = path(self.home).stat()
            stamp: tuple | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        try:
            tokens = read(self.home) if stamp else {}
        except ValidationError:
            tokens = {}  # a broken file admits nobody
        self._by_digest = {t["sha256"]: n for n, t in tokens.items()
                           if isinstance(t, dict) and isinstance(t.get("sha256"), str)}
        self._stamp = stamp

    def name_of(self, token: str) -> str | None:
        """The name of a valid token, else None (compared in constant time)."""
        if not token or len(token) > 200:
            return None
        with self._lock:
            self._load()
            want = digest(token)
            for d, name in self._by_digest.items():
                if hmac.compare_digest(d, want):
                    return name
        return None

    def exists(self, name: str) -> bool:
        with self._lock:
            self._load()
            return name in self._by_digest.values()

    def role(self, name: str) -> str | None:
        """The role of the token's key now (None: its key was revoked or has no role)."""
        kname = key_name(name)
        if not (keys.authorized_dir(self.home) / f"{kname}{keys.PUBLIC}").exists():
            return None
        try:
            role = keys.read_roles(self.home).get(kname)
        except keys.KeyProblem:
            return None
        return role if role in TOKEN_ROLES else None
