"""Real servers for the transfer tests and bench: OpenSSH's sshd and an HTTP(S) server.

* :class:`Sshd`: Debian's ``/usr/sbin/sshd`` (scripts/test_packages installs openssh-server) on
  a free loopback port, with its own host key, config, authorized key and log in a temporary
  directory; key authentication only; stopped by its pid.
* :class:`HttpServer`: ``python transfer_servers.py http ROOT PORT [CERT KEY]``, a threading
  HTTP/1.1 server in its own process (GET and HEAD with sendfile, PUT to a temporary name then
  renamed), optionally TLS with a self-signed certificate made by ``openssl``.
* :class:`Silent`: accepts connections and never sends a byte (a stalled server).

Imports nothing of pilotfish (the bench uses it too).
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def sshd_available() -> str | None:
    """None when sshd, ssh-keygen and sftp are here; else why not."""
    for tool in (SSHD, shutil.which("ssh-keygen"), shutil.which("sftp"), shutil.which("scp")):
        if not tool or not os.path.exists(tool):
            return "OpenSSH (openssh-server, openssh-client) is not installed"
    return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Sshd:
    """An sshd of the tests' own; ``user``, ``key``, ``known_hosts`` and ``port`` to log in."""

    def __init__(self, d: Path, max_startups: str = "200:30:400",
                 sftp: str = "internal-sftp") -> None:
        """``sftp``: its sftp subsystem (``internal-sftp -R``: a read-only server, whose every
        write is refused with "Permission denied", even for root)."""
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.key = d / "client_ed25519"
        self.known_hosts = d / "known_hosts"
        self.log = d / "sshd.log"
        for name in ("host_ed25519", "client_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                           check=True, stdin=subprocess.DEVNULL)
        shutil.copy(d / "client_ed25519.pub", d / "authorized_keys")
        host_pub = (d / "host_ed25519.pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(host_pub)}\n")
        (d / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {d}/host_ed25519",
            f"PidFile {d}/sshd.pid", f"AuthorizedKeysFile {d}/authorized_keys",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "UsePAM no",
            "StrictModes no", f"Subsystem sftp {sftp}", f"MaxStartups {max_startups}",
            "MaxSessions 100", "LogLevel VERBOSE", ""]))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", 0o755, exist_ok=True)  # sshd's privilege separation dir
        self.proc = subprocess.Popen([SSHD, "-D", "-f", str(d / "sshd_config"), "-E",
                                      str(self.log)], start_new_session=True,
                                     stdin=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def credentials(self) -> dict:
        """The transfers.credentials mapping for this server."""
        return {"127.0.0.1": {"user": self.user, "key_file": str(self.key),
                              "known_hosts": str(self.known_hosts), "port": self.port}}

    def url(self, scheme: str, path: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        _stop(self.proc)


def make_cert(d: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), as (cert, key)."""
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True)
    return cert, key


class HttpServer:
    def __init__(self, root: Path, tls_dir: Path | None = None) -> None:
        self.root = root
        self.port = free_port()
        argv = [sys.executable, __file__, "http", str(root), str(self.port)]
        self.cert = None
        if tls_dir is not None:
            tls_dir.mkdir(parents=True, exist_ok=True)
            self.cert, key = make_cert(tls_dir)
            argv += [str(self.cert), str(key)]
        self.scheme = "https" if tls_dir is not None else "http"
        self.proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        _stop(self.proc)


class Silent:
    """Accepts and holds connections, never sending a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
                self.held.append(c)
            except OSError:
                return

    def stop(self) -> None:
        self.stopped = True
        self.sock.close()
        for c in self.held:
            c.close()


def serve_http(root: str, port: int, cert: str | None = None, key: str | None = None) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote, urlsplit

    base = os.path.realpath(root)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def _path(self) -> str | None:
            p = unquote(urlsplit(self.path).path)
            full = os.path.realpath(os.path.join(base, p.lstrip("/")))
            return full if full.startswith(base + "/") else None

        def _head(self, body: bool) -> None:
            p = self._path()
            if p is None or not os.path.isfile(p):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.flush()
                    self.connection.sendfile(f)

        def do_HEAD(self) -> None:
            self._head(False)

        def do_GET(self) -> None:
            self._head(True)

        def do_PUT(self) -> None:
            p = self._path()
            n = int(self.headers.get("Content-Length") or 0)
            if p is None:
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.upload-{os.getpid()}-{threading.get_ident()}"
            with open(tmp, "wb") as f:
                left = n
                while left:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    f.write(chunk)
                    left -= len(chunk)
            if left:
                os.unlink(tmp)
                return
            os.rename(tmp, p)
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if cert:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "http":
        serve_http(sys.argv[2], int(sys.argv[3]), *sys.argv[4:6])
