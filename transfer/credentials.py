"""Where transfers find their credentials: the site profile, else the user's transfers file.

Never a URL (``check_url`` refuses ``user:password@``), never a job message, never a command
line: a scheme reads the files named here itself (ssh through a private ``-F`` config file,
http through a header it builds, Globus through a token file), and nothing here is logged
(``repr`` names the hosts only).

Shape, in a site profile under ``transfers.credentials`` or at the top of the user's file
(``$PILOTFISH_TRANSFERS``, else ``~/.config/pilotfish/transfers.yaml``)::

    credentials:
      data.example.org:            # a host; or scheme://host; or "*" for any host
        user: alice                # ssh login (a URL's user@ wins)
        key_file: ~/.ssh/id_ed25519
        known_hosts: ~/.ssh/known_hosts
        port: 22
      "https://files.example.org":
        token_file: ~/.config/pilotfish/files.token   # sent as "Authorization: Bearer ..."
        ca_file: /etc/pki/site-ca.pem                 # https: a private CA
      gridftp.example.org:
        x509_proxy: /tmp/x509up_u1000                 # gsiftp: X509_USER_PROXY
      "globus://*":
        token_file: ~/.config/pilotfish/globus.token  # a Transfer API access token
        local_endpoint: 6c54cade-bde5-45c1-bdea-f4bd71dba2cc  # the collection of our files

Lookup order for a URL: ``scheme://host``, ``host``, ``scheme://*``, ``*``; the site profile's
entries win over the user's file for the same key.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from pilotfish.errors import ValidationError
from pilotfish.validate import echo

from .base import Url, as_url

ENV = "PILOTFISH_TRANSFERS"
DEFAULT_FILE = "~/.config/pilotfish/transfers.yaml"
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_PATH_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,4096}$")


@dataclass(frozen=True)
class Credential:
    """What one host needs. Paths are expanded (``~``, ``$VARS``) when loaded."""
    user: str | None = None
    key_file: str | None = None
    known_hosts: str | None = None
    port: int | None = None
    token_file: str | None = None
    ca_file: str | None = None
    x509_proxy: str | None = None  #: gsiftp: the proxy certificate (X509_USER_PROXY)
    local_endpoint: str | None = None  #: globus: the collection that sees this file system

    def __repr__(self) -> str:  # paths to secrets are not shown either
        return f"Credential(user={self.user!r}, ...)"

    def token(self) -> str | None:
        """The bearer token in ``token_file`` (first line), or None."""
        if not self.token_file:
            return None
        from pilotfish.textfile import read_text
        try:
            text = read_text(self.token_file, 64 * 1024)
        except OSError as exc:
            raise ValidationError(f"token_file {self.token_file}: {exc.strerror}") from None
        return text.strip().splitlines()[0] if text.strip() else None


NONE = Credential()


def _entry(key: str, value: Any, where: str) -> Credential:
    if not isinstance(value, Mapping):
        raise ValidationError(f"{where}: credentials.{key} must be a mapping")
    known = {f.name for f in fields(Credential)}
    unknown = set(value) - known
    if unknown:
        raise ValidationError(f"{where}: credentials.{key}: unknown key(s) "
                              f"{', '.join(sorted(map(str, unknown)))}; expected "
                              f"{', '.join(sorted(known))}")
    out: dict[str, Any] = {}
    for name, v in value.items():
        if v is None:
            continue
        if name == "port":
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
                raise ValidationError(f"{where}: credentials.{key}.port must be 1..65535")
            out[name] = v
        elif name == "local_endpoint":
            if not isinstance(v, str) or not re.match(r"^[0-9a-fA-F-]{32,36}$", v):
                raise ValidationError(f"{where}: credentials.{key}.local_endpoint must be a "
                                      "Globus collection UUID")
            out[name] = v
        elif name == "user":
            if not isinstance(v, str) or not _USER_RE.match(v):
                raise ValidationError(f"{where}: credentials.{key}.user {echo(v)}: expected "
                                      "letters, digits, '.', '_' or '-', not starting with '-'")
            out[name] = v
        else:
            if not isinstance(v, str) or not _PATH_RE.match(v):
                raise ValidationError(f"{where}: credentials.{key}.{name} must be a file path")
            out[name] = os.path.expanduser(os.path.expandvars(v))
    return Credential(**out)


class Credentials:
    """Credentials by host (see the module's docstring)."""

    def __init__(self, entries: Mapping[str, Credential] | None = None) -> None:
        self.entries = dict(entries or {})

    def __repr__(self) -> str:
        return f"Credentials(hosts={sorted(self.entries)!r})"

    @classmethod
    def from_mapping(cls, data: Any, where: str = "transfers") -> "Credentials":
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValidationError(f"{where}: credentials must be a mapping of host to entry")
        return cls({str(k).lower(): _entry(str(k), v, where) for k, v in data.items()})

    @classmethod
    def load(cls, site: Any = None, path: str | None = None,
             environ: Mapping[str, str] | None = None) -> "Credentials":
        """The site profile's ``transfers.credentials`` (a mapping, or None) over the user's
        file (``path``, else ``$PILOTFISH_TRANSFERS``, else the default file if it exists)."""
        env = os.environ if environ is None else environ
        user = cls()
        file = path or env.get(ENV) or None
        default = os.path.expanduser(DEFAULT_FILE)
        if file is None and os.path.exists(default):
            file = default
        if file:
            user = cls.from_file(file)
        site_creds = cls.from_mapping(site, "site profile transfers")
        return cls({**user.entries, **site_creds.entries})

    @classmethod
    def from_file(cls, path: str) -> "Credentials":
        import yaml

        from pilotfish.textfile import read_text
        try:
            data = yaml.safe_load(read_text(path, 1 << 20)) or {}
        except OSError as exc:
            raise ValidationError(f"transfers file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ValidationError(f"transfers file {path}: not YAML "
                                  f"({str(exc).splitlines()[0]})") from None
        if not isinstance(data, Mapping) or set(data) - {"credentials"}:
            raise ValidationError(f"transfers file {path}: expected one key, credentials")
        return cls.from_mapping(data.get("credentials"), f"transfers file {path}")

    def for_url(self, url: Url | str) -> Credential:
        u = as_url(url)
        for key in (f"{u.scheme}://{u.host}", u.host, f"{u.scheme}://*", "*"):
            if key in self.entries:
                return self.entries[key]
        return NONE


__all__ = ["Credential", "Credentials", "DEFAULT_FILE", "ENV", "NONE"]
