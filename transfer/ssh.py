"""``scp://`` and ``sftp://``: the system OpenSSH ``sftp`` client in batch mode.

Why the system client, not paramiko or asyncssh: it is as fast as plain ``scp`` (it is the same
code: OpenSSH 9's ``scp`` speaks the SFTP protocol too), while paramiko's pure-Python SFTP moves
a fraction of that; it reads the user's keys, agents and known_hosts the way the user's own
``scp`` does; and it is on every HPC login node already (no wheel with C extensions to build).
Both URL schemes use it: ``scp://`` names "over SSH" and is served by the same SFTP subsystem.

Safety:

* Nothing from the URL reaches a command line. Host, port, user, key file and known_hosts go
  into a private ``-F`` config file (mode 0600, in a private temporary directory, removed
  after), under the fixed alias ``pilotfish-target``; ``-F`` also keeps ``~/.ssh/config`` and
  ``/etc/ssh/ssh_config`` out (no ProxyCommand, LocalCommand or forwarding of theirs). The
  command line is ``sftp -F CONFIG -b BATCH pilotfish-target``, the same for every job.
* Host keys are always checked (``StrictHostKeyChecking yes``, ``BatchMode yes``: no prompt
  can hang a transfer); no agent or X11 forwarding.
* Paths go into the batch file quoted; remote paths with glob or quote characters are refused
  (sftp expands globs); percent-decoding and ``..`` were handled by :func:`check_url`.
* A local file being uploaded is opened here with ``O_NOFOLLOW`` and handed to sftp as
  ``/dev/fd/N``: a symlink a task planted is never followed.
* Downloads land in ``.NAME.partial-XXXX`` beside the destination (created here with
  ``O_EXCL|O_NOFOLLOW``), are size-checked against the server's listing, and renamed; uploads
  go to ``.NAME.partial-XXXX`` on the server and are renamed there (``posix-rename``).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from typing import Sequence

from .base import (Limits, Partial, Scheme, Stat, TransferError, Url, as_url, over_cap)
from .credentials import NONE
from .process import run

ALIAS = "pilotfish-target"
_BAD_REMOTE = re.compile(r'[*?\[\]"\\\x00-\x1f\x7f]')
#: sftp's buffer and requests in flight: the defaults of OpenSSH's scp/sftp (kept equal to the
#: baseline on purpose; bench/transfer_speed.py measures it).
SFTP = "sftp"


def remote_path(u: Url) -> str:
    """The path as sftp names it: ``/~/rel`` is ``rel`` (the login's home), others absolute."""
    path = u.path
    if _BAD_REMOTE.search(path):
        raise TransferError(f"{u}: the remote path holds a glob, quote or backslash "
                            "character: refused (sftp would expand it)")
    if path.startswith("/~/"):
        path = path[3:]
    elif path == "/~":
        path = "."
    return path


def q(path: str) -> str:
    """A path quoted for an sftp batch file (remote ones are checked by remote_path)."""
    if _BAD_REMOTE.search(path):
        raise TransferError(f"{path[:100]}: a local path with a glob, quote or backslash "
                            "character is not handed to sftp")
    return f'"{path}"'


def _cfg_value(value: str, what: str) -> str:
    if '"' in value or any(ord(c) < 32 for c in value):
        raise TransferError(f"transfers credentials: {what} may not hold quotes or control "
                            "characters")
    return '"' + value.replace("%", "%%") + '"'


def ssh_config(u: Url, cred, limits: Limits) -> str:
    """The ``-F`` file for one endpoint (pure)."""
    host = u.host[1:-1] if u.host.startswith("[") else u.host
    user = u.user or cred.user
    for what, v in (("host", host), ("user", user or "")):  # again: a Url may be built by hand
        if re.search(r"[\s\x00-\x1f\x7f\"#]", v):
            raise TransferError(f"{u}: the {what} holds a space, quote or control character")
    lines = [f"Host {ALIAS}", f"  HostName {host}", f"  Port {u.port or cred.port or 22}"]
    if user:
        lines.append(f"  User {user}")
    if cred.key_file:
        lines += [f"  IdentityFile {_cfg_value(cred.key_file, 'key_file')}",
                  "  IdentitiesOnly yes"]
    if cred.known_hosts:
        lines.append(f"  UserKnownHostsFile {_cfg_value(cred.known_hosts, 'known_hosts')}")
    alive = max(1, int(limits.stall // 3))
    lines += ["  StrictHostKeyChecking yes", "  BatchMode yes", "  UpdateHostKeys no",
              f"  ConnectTimeout {max(1, int(limits.connect_timeout))}",
              f"  ServerAliveInterval {alive}", "  ServerAliveCountMax 3",
              "  ForwardAgent no", "  ForwardX11 no", "  ClearAllForwardings yes",
              "  PermitLocalCommand no", "  ProxyCommand none", "  ControlMaster no",
              "  ControlPath none", "  LogLevel ERROR"]
    return "\n".join(lines) + "\n"


def sftp_argv(config: str, batch: str) -> list[str]:
    """The command line (pure): the same for every job; no host, user or key on it."""
    return [SFTP, "-F", config, "-b", batch, ALIAS]


_REASONS = [
    (re.compile(r"not found|No such file", re.I), "No such file"),
    (re.compile(r"Connection refused", re.I), "connection refused"),
    (re.compile(r"Connection timed out|timed out during banner", re.I), "connection timed out"),
    (re.compile(r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|"
                r"No .* host key is known", re.I), "host key verification failed"),
    (re.compile(r"Permission denied \(", re.I), "permission denied (login refused)"),
    (re.compile(r"Permission denied", re.I), "permission denied"),
    (re.compile(r"Could not resolve hostname", re.I), "unknown host"),
    (re.compile(r"Is a directory|not a regular file", re.I), "is a directory"),
]


def reason(stderr: str) -> str:
    """One short reason from sftp's and ssh's standard error."""
    for pattern, words in _REASONS:
        if pattern.search(stderr):
            return words
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()
             and not ln.startswith("sftp>")]
    return (lines[-1][:200] if lines else "sftp failed")


def _ls_size(listing: str, path: str) -> int | None:
    """The size of ``path`` from ``ls -ln PATH`` output when it is a regular file."""
    for line in listing.splitlines():
        parts = line.split(None, 8)
        if len(parts) == 9 and parts[0].startswith("-") and parts[8] == path:
            try:
                return int(parts[4])
            except ValueError:
                return None
    return None


class _Session:
    """A private directory holding the -F config and batch file of one sftp run."""

    def __init__(self, u: Url, cred, limits: Limits) -> None:
        self.dir = tempfile.mkdtemp(prefix="pilotfish-sftp-")
        self.config = os.path.join(self.dir, "config")
        self.batch = os.path.join(self.dir, "batch")
        self.out = os.path.join(self.dir, "out")
        self._write(self.config, ssh_config(u, cred, limits))

    @staticmethod
    def _write(path: str, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def run(self, commands: list[str], limits: Limits, what: str, **kw) -> tuple[int, str]:
        try:
            os.unlink(self.batch)
        except FileNotFoundError:
            pass
        self._write(self.batch, "\n".join(commands) + "\n")
        return run(sftp_argv(self.config, self.batch), limits, what, **kw)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _SshScheme(Scheme):
    batch = True

    def _cred(self, u: Url):
        return self.credentials.for_url(u) if self.credentials is not None else NONE

    def _listing(self, s: _Session, u: Url, limits: Limits) -> str:
        """``ls -ln`` of the remote path into a local file (sftp prints listings on stdout)."""
        path = remote_path(u)
        rc, err = s.run([f"ls -ln {q(path)}"], limits, str(u), stdout_path=s.out)
        if rc != 0:
            raise TransferError(f"{u}: {reason(err)}")
        with open(s.out, errors="replace") as f:
            return f.read(1 << 20)

    def stat(self, url: Url | str, limits: Limits) -> Stat:
        u = as_url(url)
        s = _Session(u, self._cred(u), limits)
        try:
            listing = self._listing(s, u, limits)
        finally:
            s.close()
        size = _ls_size(listing, remote_path(u))
        return Stat(size, size is None)

    def get(self, url: Url | str, dest: str, limits: Limits) -> int:
        r = self.get_batch([(url, dest)], limits)[0]
        if isinstance(r, TransferError):
            raise r
        return r

    def put(self, src: str, url: Url | str, limits: Limits) -> int:
        r = self.put_batch([(src, url)], limits)[0]
        if isinstance(r, TransferError):
            raise r
        return r

    def get_batch(self, pairs: Sequence[tuple[Url | str, str]],
                  limits: Limits) -> list[int | TransferError]:
        """All pairs of one endpoint in one sftp session: each file is listed (its size) and
        fetched into its partial file; a missing file fails its own pair only; the byte cap
        is watched while files grow; sizes are checked against the listing, then renamed."""
        out: list[int | TransferError] = [0] * len(pairs)
        urls = [as_url(u) for u, _ in pairs]
        if not urls:
            return out
        if len({u.endpoint for u in urls}) != 1 or len({u.user for u in urls}) != 1:
            raise TransferError(f"{urls[0]}: a batch must name one endpoint and user")
        s = _Session(urls[0], self._cred(urls[0]), limits)
        todo: list[tuple[int, str, Partial]] = []
        try:
            for i, (u, (_, dest)) in enumerate(zip(urls, pairs)):
                try:
                    rp = remote_path(u)
                    if os.path.lexists(dest):
                        raise TransferError(f"{dest}: exists already; never overwritten")
                    p = Partial(dest)
                    p.open()  # made here: O_EXCL|O_NOFOLLOW, so nothing planted is written
                    p.close()
                    todo.append((i, rp, p))
                except TransferError as exc:
                    out[i] = exc
            if not todo:
                return out
            cmds = []
            for _, rp, p in todo:
                cmds += [f"-ls -ln {q(rp)}", f"-get {q(rp)} {q(p.tmp)}"]

            def largest() -> int:
                return max((_size(p.tmp) for _, _, p in todo), default=0)
            try:
                rc, err = s.run(cmds, limits, str(urls[todo[0][0]]), growing=largest,
                                stdout_path=s.out)
            except TransferError as exc:  # stopped: over the cap, stalled or timed out
                for i, _, p in todo:
                    out[i] = over_cap(urls[i], limits) if _size(p.tmp) > limits.max_bytes \
                        else exc
                return out
            with open(s.out, errors="replace") as f:
                listing = f.read(16 << 20)
            if rc != 0 and "Connected to" not in listing:  # the session itself failed
                why = reason(err)
                for i, _, _ in todo:
                    out[i] = TransferError(f"{urls[i]}: {why}")
                return out
            for i, rp, p in todo:
                size = _ls_size(listing, rp)
                got = _size(p.tmp)
                if size is None:
                    gone = f'"{rp}" not found' in err or rp not in listing
                    out[i] = TransferError(f"{urls[i]}: " + (
                        "No such file" if gone
                        else "is a directory or not a regular file; remote inputs are files"))
                elif got != size:
                    out[i] = TransferError(f"{urls[i]}: got {got} bytes of {size}: size "
                                           "check failed")
                else:
                    p.fd = os.open(p.tmp, os.O_RDONLY | os.O_NOFOLLOW)
                    p.commit(0o644)
                    out[i] = got
            return out
        finally:
            for _, _, p in todo:
                if os.path.lexists(p.tmp):
                    p.discard()
            s.close()

    def put_batch(self, pairs: Sequence[tuple[str, Url | str]],
                  limits: Limits) -> list[int | TransferError]:
        """Upload each local regular file (opened here without following symlinks) to its
        URL under a temporary name, then rename it there; parent directories are made."""
        out: list[int | TransferError] = [0] * len(pairs)
        urls = [as_url(u) for _, u in pairs]
        if not urls:
            return out
        if len({u.endpoint for u in urls}) != 1 or len({u.user for u in urls}) != 1:
            raise TransferError(f"{urls[0]}: a batch must name one endpoint and user")
        s = _Session(urls[0], self._cred(urls[0]), limits)
        fds: list[int] = []
        try:
            cmds, sent = [], []
            for i, ((src, _), u) in enumerate(zip(pairs, urls)):
                try:
                    rp = remote_path(u)
                    fd = _open_regular(src, u)
                    fds.append(fd)
                    size = os.fstat(fd).st_size
                    if size > limits.max_bytes:
                        raise over_cap(u, limits)
                    d, name = os.path.split(rp)
                    tmp = os.path.join(d, f".{name}.partial-{os.urandom(4).hex()}")
                    for parent in _parents(d):
                        cmds.append(f"-mkdir {q(parent)}")
                    cmds += [f"put /dev/fd/{fd} {q(tmp)}", f"rename {q(tmp)} {q(rp)}"]
                    sent.append((i, size))
                except TransferError as exc:
                    out[i] = exc
            if cmds:
                rc, err = s.run(cmds, limits, str(urls[0]), pass_fds=fds)
                if rc != 0:  # sftp -b stops at the first failed put/rename
                    for i, _ in sent:
                        out[i] = TransferError(f"{urls[i]}: {reason(err)}")
                    return out
                for i, size in sent:
                    out[i] = size
            return out
        finally:
            for fd in fds:
                os.close(fd)
            s.close()


def _parents(d: str) -> list[str]:
    """Directories to make for ``d`` (relative ones from the home; absolute from the top
    below the first level)."""
    if d in ("", "/", "."):
        return []
    parts = d.strip("/").split("/")
    lead = "/" if d.startswith("/") else ""
    return [lead + "/".join(parts[:n]) for n in range(2 if lead else 1, len(parts) + 1)]


def _open_regular(src: str, u: Url) -> int:
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        why = "a symbolic link: never followed" if exc.errno == errno.ELOOP else exc.strerror
        raise TransferError(f"{u}: local {src[:100]}: {why}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise TransferError(f"{u}: local {src[:100]} is not a regular file")
    os.set_inheritable(fd, True)
    return fd


def _size(path: str) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except OSError:
        return -1


class ScpScheme(_SshScheme):
    names = ("scp",)


class SftpScheme(_SshScheme):
    names = ("sftp",)


__all__ = ["ALIAS", "ScpScheme", "SftpScheme", "reason", "remote_path", "sftp_argv",
           "ssh_config"]
