"""Who is asking the web process, and may they: tokens, sessions, CSRF, the loopback rule.

- Open mode (a loopback bind without ``--token-required``): one user, the home's owner, acts
  with the home's own client key (as the CLI would) and is admin. Still: every form POST needs
  the CSRF token of its session cookie, every REST change a JSON body, and the Host header must
  be a loopback name (a DNS-rebinding page cannot reach it under its own name).
- Token mode (any other bind): REST calls carry ``Authorization: Bearer <token>``; pages log in
  with the token once, which makes a session (HttpOnly, SameSite=Strict cookie, id rotated at
  login) that lives in this process only. Each request re-checks that the token still exists
  and reads its key's role, so a revocation or a role change applies at the next request.
- CSRF: a form carries HMAC(process secret, session id); a cookie set by another site is never
  sent (SameSite=Strict), and another site cannot read the form's value.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pilotfish import keys

from .tokens import TokenBook, key_name

COOKIE = "pf_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000
ROLE_RANK = {keys.READER: 0, keys.SUBMITTER: 1, keys.ADMIN: 2}


@dataclass(frozen=True)
class User:
    name: str | None       # the token's name; None in open mode
    role: str
    key: str | None        # the client key the web acts with for this user

    def may(self, role: str) -> bool:
        return ROLE_RANK.get(self.role, -1) >= ROLE_RANK[role]

    @property
    def label(self) -> str:
        return f"token {self.name} ({self.role})" if self.name else f"local user ({self.role})"


OWNER = User(None, keys.ADMIN, None)


@dataclass
class Session:
    token: str | None      # the token's name once logged in
    created: float


def is_loopback_host(host: str) -> bool:
    """Is ``host`` (a bind address or a Host header's name) a loopback one?"""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_hostport(value: str) -> tuple[str, str]:
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest.lstrip(":")
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    return host, port


class Auth:
    def __init__(self, home: Path, open_mode: bool) -> None:
        self.home = Path(home)
        self.open_mode = open_mode
        self.tokens = TokenBook(home)
        self.secret = secrets.token_bytes(32)
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    # -- sessions --------------------------------------------------------------------------
    def session(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 100:
            return None
        with self._lock:
            s = self.sessions.get(sid)
            if s is not None and time.time() - s.created > SESSION_SECONDS:
                del self.sessions[sid]
                return None
            return s

    def new_session(self, token_name: str | None = None) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            if len(self.sessions) >= MAX_SESSIONS:
                # drop a tenth: anonymous ones first (a flood of page views must not log
                # people out), the oldest first
                for old in sorted(self.sessions, key=lambda k: (
                        self.sessions[k].token is not None, self.sessions[k].created))[
                        :MAX_SESSIONS // 10]:
                    del self.sessions[old]
            self.sessions[sid] = Session(token_name, time.time())
        return sid

    def end_session(self, sid: str | None) -> None:
        with self._lock:
            self.sessions.pop(sid or "", None)

    def csrf(self, sid: str) -> str:
        return hmac.new(self.secret, b"csrf:" + sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, sid: str | None, value: str | None) -> bool:
        return bool(sid and value and self.session(sid) is not None
                    and hmac.compare_digest(self.csrf(sid), value))

    # -- users -----------------------------------------------------------------------------
    def user_of_token(self, token: str) -> User | None:
        name = self.tokens.name_of(token)
        return self._user(name) if name else None

    def user_of_session(self, sid: str | None) -> User | None:
        if self.open_mode:
            return OWNER
        s = self.session(sid)
        if s is None or s.token is None:
            return None
        if not self.tokens.exists(s.token):  # revoked: the session ends with it
            self.end_session(sid)
            return None
        return self._user(s.token)

    def _user(self, name: str) -> User | None:
        role = self.tokens.role(name)
        return User(name, role, key_name(name)) if role else None
