"""``http://`` and ``https://``: get (GET), stat (HEAD) and put (PUT, where the server takes it).

The standard library's ``http.client`` (no requests/urllib3 to install on compute nodes; it is
as fast as curl on a single stream: bench/transfer_speed.py). Bounded everywhere:

* the socket timeout is ``limits.stall`` (a server that accepts and never sends stops the
  transfer), the whole transfer ``limits.timeout``, connecting ``limits.connect_timeout``;
* a ``Content-Length`` over ``limits.max_bytes`` fails before a byte is read, and the count is
  checked while reading (a server that lies or sends no length); the received size must match
  the announced one;
* the body lands in ``.NAME.partial-XXXX`` beside the destination and is renamed when whole;
* redirects are followed (at most 5) only to http(s) URLs that pass :func:`check_url`; the
  bearer token (``token_file`` in the credentials) goes to the first host only;
* https checks certificates and host names (``ca_file`` in the credentials for a private CA).
"""
from __future__ import annotations

import errno
import http.client
import os
import socket
import ssl
import stat
import time
from urllib.parse import quote, urljoin

from .base import (Limits, Partial, Scheme, Stat, TransferError, Url, as_url, check_url,
                   over_cap)
from .credentials import NONE

#: Bytes read per call: 256 KiB measured fastest here (1 MiB was ~3x slower, 64 KiB slower).
CHUNK = 1 << 18
MAX_REDIRECTS = 5
_SAFE = "/:@!$&'()*+,;=-._~"


def target(u: Url) -> str:
    """The request target: the decoded path re-encoded, with the query as written."""
    return quote(u.path, safe=_SAFE) + (f"?{u.query}" if u.query else "")


def _reason(status: int, text: str) -> str:
    if status == 404 or status == 410:
        return "No such file"
    if status in (401, 403):
        return f"permission denied (HTTP {status})"
    if status in (405, 501):
        return f"the server does not take this method (HTTP {status} {text})"
    return f"HTTP {status} {text}"[:200]


class HttpScheme(Scheme):
    names = ("http", "https")

    def _cred(self, u: Url):
        return self.credentials.for_url(u) if self.credentials is not None else NONE

    def _connect(self, u: Url, limits: Limits) -> http.client.HTTPConnection:
        host = u.host[1:-1] if u.host.startswith("[") else u.host
        if u.scheme == "https":
            cred = self._cred(u)
            ctx = ssl.create_default_context(cafile=cred.ca_file or None)
            conn = http.client.HTTPSConnection(host, u.port, timeout=limits.connect_timeout,
                                               context=ctx)
        else:
            conn = http.client.HTTPConnection(host, u.port, timeout=limits.connect_timeout)
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as exc:
            raise TransferError(f"{u}: certificate check failed ({exc.verify_message})") \
                from None
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"{u}: {_os_reason(exc)}") from None
        conn.sock.settimeout(limits.stall)
        return conn

    def _headers(self, u: Url, first: Url) -> dict:
        h = {"User-Agent": "pilotfish-transfer", "Accept-Encoding": "identity"}
        if u.endpoint == first.endpoint:
            try:
                token = self._cred(first).token()
            except Exception as exc:  # a missing token file: one line, no secret
                raise TransferError(f"{first}: {exc}") from None
            if token:
                h["Authorization"] = f"Bearer {token}"
        return h

    def _request(self, method: str, url: Url, limits: Limits, deadline: float):
        """(connection, response, final url) after redirects; the caller closes conn."""
        u = url
        for _ in range(MAX_REDIRECTS + 1):
            if time.monotonic() > deadline:
                raise TransferError(f"{url}: timed out after {limits.timeout:g} s")
            conn = self._connect(u, limits)
            try:
                conn.request(method, target(u), headers=self._headers(u, url))
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise TransferError(f"{url}: {_os_reason(exc)}") from None
            if resp.status in (301, 302, 303, 307, 308):
                loc = resp.getheader("Location") or ""
                conn.close()
                try:
                    nxt = check_url(urljoin(u.raw, loc), "redirect")
                except Exception:
                    raise TransferError(f"{url}: redirected to a URL that is refused "
                                        f"({loc[:100]!r})") from None
                if nxt.scheme not in ("http", "https"):
                    raise TransferError(f"{url}: redirected to {nxt.scheme}://: not followed")
                u = nxt
                continue
            return conn, resp, u
        raise TransferError(f"{url}: more than {MAX_REDIRECTS} redirects")

    def stat(self, url: Url | str, limits: Limits) -> Stat:
        u = as_url(url)
        conn, resp, _ = self._request("HEAD", u, limits, time.monotonic() + limits.timeout)
        try:
            if resp.status != 200:
                raise TransferError(f"{u}: {_reason(resp.status, resp.reason)}")
            length = resp.getheader("Content-Length")
            return Stat(int(length) if length and length.isdigit() else None, False)
        finally:
            conn.close()

    def get(self, url: Url | str, dest: str, limits: Limits) -> int:
        u = as_url(url)
        if os.path.lexists(dest):
            raise TransferError(f"{dest}: exists already; never overwritten")
        deadline = time.monotonic() + limits.timeout
        conn, resp, _ = self._request("GET", u, limits, deadline)
        part = Partial(dest)
        try:
            if resp.status != 200:
                raise TransferError(f"{u}: {_reason(resp.status, resp.reason)}")
            length = resp.getheader("Content-Length")
            expect = int(length) if length and length.strip().isdigit() else None
            if expect is not None and expect > limits.max_bytes:
                raise over_cap(u, limits)
            fd = part.open()
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            got = 0
            while True:
                if time.monotonic() > deadline:
                    raise TransferError(f"{u}: timed out after {limits.timeout:g} s")
                try:
                    n = resp.readinto(view)
                except socket.timeout:
                    raise TransferError(f"{u}: stalled: no data for {limits.stall:g} s") \
                        from None
                except (OSError, http.client.HTTPException) as exc:
                    raise TransferError(f"{u}: {_os_reason(exc)}") from None
                if not n:
                    break
                got += n
                if got > limits.max_bytes:
                    raise over_cap(u, limits)
                w = view[:n]
                while w:
                    w = w[os.write(fd, w):]
            if expect is not None and got != expect:
                raise TransferError(f"{u}: got {got} bytes of {expect}: size check failed")
            part.commit(0o644)
            return got
        except BaseException:
            part.discard()
            raise
        finally:
            conn.close()

    def put(self, src: str, url: Url | str, limits: Limits) -> int:
        u = as_url(url)
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            why = "a symbolic link: never followed" if exc.errno == errno.ELOOP \
                else exc.strerror
            raise TransferError(f"{u}: local {src[:100]}: {why}") from None
        deadline = time.monotonic() + limits.timeout
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TransferError(f"{u}: local {src[:100]} is not a regular file")
            size = st.st_size
            if size > limits.max_bytes:
                raise over_cap(u, limits)
            conn = self._connect(u, limits)
            try:
                conn.putrequest("PUT", target(u), skip_accept_encoding=True)
                for k, v in {**self._headers(u, u), "Content-Length": str(size)}.items():
                    conn.putheader(k, v)
                conn.endheaders()
                left = size
                while left:
                    if time.monotonic() > deadline:
                        raise TransferError(f"{u}: timed out after {limits.timeout:g} s")
                    data = os.read(fd, min(CHUNK, left))
                    if not data:
                        raise TransferError(f"{u}: local {src[:100]} shrank while sent")
                    conn.send(data)
                    left -= len(data)
                resp = conn.getresponse()
                resp.read(64 * 1024)
            except socket.timeout:
                raise TransferError(f"{u}: stalled: no progress for {limits.stall:g} s") \
                    from None
            except (OSError, http.client.HTTPException) as exc:
                raise TransferError(f"{u}: {_os_reason(exc)}") from None
            finally:
                conn.close()
            if resp.status not in (200, 201, 204):
                raise TransferError(f"{u}: {_reason(resp.status, resp.reason)}")
            return size
        finally:
            os.close(fd)


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout):
        return "timed out connecting or waiting for the server"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200] if text else type(exc).__name__


__all__ = ["HttpScheme", "target"]
