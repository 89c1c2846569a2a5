"""CurveZMQ: keys on disk, a ZAP-guarded server, and clients and agents with right and wrong keys.

Everything runs against real server processes over real TCP sockets. A "foreign" home stands for
another machine: it shares nothing with the server's home but the key files a user copies.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import zmq

from conftest import ServerHandle, require, run_cli, wait_for
from pilotfish import keys
from pilotfish.client import Client
from pilotfish.errors import Forbidden, PilotfishError, ServerUnavailable
from pilotfish.server import daemon

VENV_BIN = Path(sys.executable).parent
MPIEXEC = VENV_BIN / "mpiexec"
TESTS = Path(__file__).resolve().parent
ECHO = {"name": "echo", "executable": "/bin/echo", "args": ["{x}"],
        "parameters": {"x": {"type": "str"}}}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def one_line_error(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode != 0, r.stdout
    assert r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def server_log(s: ServerHandle) -> str:
    return (s.home / "server.log").read_text(errors="replace")


def foreign_client(s: ServerHandle, home: Path, client_key: Path | None, **kw) -> Client:
    """A client of another home that has the server's public key (and maybe a client pair)."""
    return Client(s.address, home, server_key=s.home / "keys" / "server.key",
                  client_key=client_key, **kw)


def raw_dealer(address: str, curve: keys.Curve | None = None) -> zmq.Socket:
    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    keys.apply_client(d, curve)
    d.connect(address)
    return d


def job_names(s: ServerHandle) -> list[str]:
    with s.client() as c:
        return [j["name"] for j in c.jobs()]


# -- keys on disk ------------------------------------------------------------------------------
def test_keys_init_ls_authorize_revoke_and_owner_only_files(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    r = run_cli(home, "keys", "init", "--json", check=True)
    out = json.loads(r.stdout)
    kd = home / "keys"
    assert {Path(p).name for p in out["made"]} == {"server.key", "server.key_secret",
                                                     "client.key", "client.key_secret",
                                                     "client.key"}
    assert out["server_public_key"] == keys.read_key_file(kd / "server.key")[0].decode()
    # the files zmq's own loader reads, with matching halves
    import zmq.auth
    pub, sec = zmq.auth.load_certificate(kd / "server.key_secret")
    assert zmq.curve_public(sec) == pub == zmq.auth.load_certificate(kd / "server.key")[0]
    assert zmq.auth.load_certificate(kd / "server.key")[1] is None
    # a second init makes nothing and changes no key
    again = json.loads(run_cli(home, "keys", "init", "--json", check=True).stdout)
    assert again["made"] == [] and again["server_public_key"] == out["server_public_key"]

    r = run_cli(home, "keys", "init", "--client", "alice", check=True)
    assert "client 'alice': authorized" in r.stdout
    listed = json.loads(run_cli(home, "keys", "ls", "--json", check=True).stdout)
    assert [e["name"] for e in listed] == ["alice", "client"]
    assert listed[0]["public_key"] == keys.read_key_file(kd / "alice.key")[0].decode()
    assert "alice" in run_cli(home, "keys", "ls", check=True).stdout

    # owner-only: the home, every directory and every file
    assert mode(home) == 0o700
    for p in [kd, *kd.rglob("*")]:
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p
    # authorized/ holds public halves only
    for p in (kd / "authorized").iterdir():
        assert keys.read_key_file(p)[1] is None and "secret-key" not in p.read_text()

    assert "revoked 'alice'" in run_cli(home, "keys", "revoke", "alice", check=True).stdout
    assert not (kd / "authorized" / "alice.key").exists()
    one_line_error(run_cli(home, "keys", "revoke", "alice"), "no authorized key named 'alice'")
    # authorize from the secret file: only the public half is kept
    r = run_cli(home, "keys", "authorize", str(kd / "alice.key_secret"), check=True)
    assert "authorized 'alice'" in r.stdout
    assert keys.read_key_file(kd / "authorized" / "alice.key") == \
        (keys.read_key_file(kd / "alice.key")[0], None)
    one_line_error(run_cli(home, "keys", "authorize", str(kd / "alice.key"), "--name", "al2"),
                   "already authorized as 'alice'")
    one_line_error(run_cli(home, "keys", "init", "--client", "alice"), "already authorized")
    one_line_error(run_cli(home, "keys", "init", "--client", "server"), "server's own pair")
    one_line_error(run_cli(home, "keys", "init", "--client", "../x"), "key name '../x'")
    one_line_error(run_cli(home, "keys", "authorize", str(tmp_path / "nope.key")),
                   "no such key file")
    junk = tmp_path / "junk.key"
    junk.write_text("hello\n")
    one_line_error(run_cli(home, "keys", "authorize", str(junk)), "not a CurveZMQ key file")
    for cmd in (["keys"], ["keys", "init"], ["keys", "ls"], ["keys", "authorize"],
                ["keys", "revoke"]):
        r = run_cli(home, *cmd, "-h")
        assert r.returncode == 0 and "Usage: pilotfish " + " ".join(cmd) in r.stdout, cmd


def test_an_exposed_secret_key_is_refused(tmp_path):
    home = tmp_path / "h"
    run_cli(home, "keys", "init", check=True)
    sec = home / "keys" / "client.key_secret"
    os.chmod(sec, 0o644)
    with pytest.raises(keys.KeyProblem, match=r"readable by others \(mode 0644\); chmod 600"):
        keys.client_pair(home, sec)


def test_server_start_makes_keys_publishes_the_public_one_and_keeps_files_owner_only(server):
    home = server.home
    info = json.loads((home / "server.json").read_text())
    pub, sec = keys.server_keys(home)
    assert info["curve"] is True and info["secure"] is True and info["security"] == "curve"
    assert info["public_key"] == pub.decode()
    assert sec.decode() not in (home / "server.json").read_text()
    assert keys.authorized(home)[0]["name"] == "client"
    assert mode(home) == 0o700
    for name in ("pilotfish.db", "server.json", "server.log", "server.pid", "server.port",
                 "pilotfish.db-wal", "pilotfish.db-shm"):
        assert mode(home / name) == 0o600, name
    for p in (home / "keys").rglob("*"):
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p
    # the home's own client uses CURVE
    with server.client() as c:
        c.ping()
        assert c._sock.get(zmq.MECHANISM) == zmq.CURVE


# -- who gets in -------------------------------------------------------------------------------
def test_a_client_without_keys_gets_nothing(server, tmp_path):
    """A plain-text DEALER is refused at the handshake: no reply, no job, a line in the log."""
    with server.client() as c:
        c.add_app(ECHO)
    from pilotfish import protocol as P
    d = raw_dealer(server.address)
    try:
        d.send(P.encode(P.REQUEST, rid=1, op="job_add",
                        args={"jobs": [{"name": "sneaky", "application": "echo",
                                        "parameters": {"x": "1"}}]}))
        d.send(P.encode(P.REQUEST, rid=2, op="job_ls", args={}))
        assert not d.poll(2000), "a plain-text client got an answer"
    finally:
        d.close(linger=0)
    assert job_names(server) == []
    log = wait_for(lambda: "before authentication" in server_log(server) and server_log(server),
                   10, what="the refusal in the server log")
    # whichever side notices the mismatch first: the server, or the client that hangs up
    assert "ZAP: denied a connection" in log
    assert "mechanism mismatch" in log or "closed the connection during the handshake" in log
    # and a Client of a home without any key does not even try
    with pytest.raises(PilotfishError, match="no public key for the server"):
        Client(server.address, tmp_path / "empty")


def test_a_wrong_key_is_refused_and_the_right_one_works(server, tmp_path):
    other = tmp_path / "laptop"
    run_cli(other, "keys", "init", "--client", "mallory", check=True)  # authorized over there
    mallory = other / "keys" / "mallory.key_secret"
    with server.client() as c:
        c.add_app(ECHO)
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match="refused this client.*not an authorized key"):
        with foreign_client(server, other, mallory, timeout=20) as c:
            c.add_job(name="evil", application="echo", parameters={"x": "1"})
    assert time.monotonic() - t0 < 10, "the refusal should not wait for the timeout"
    with pytest.raises(ServerUnavailable):
        with foreign_client(server, other, mallory, timeout=20) as c:
            c.jobs()
    # the same from the command line: one line, nothing added
    r = run_cli(other, "--server", server.address, "--server-key",
                str(server.home / "keys" / "server.key"), "--client-key", str(mallory),
                "job", "ls")
    one_line_error(r, "refused this client")
    assert job_names(server) == []
    mpub = keys.read_key_file(mallory)[0].decode()
    assert f"ZAP: denied CURVE key {mpub} from 127.0.0.1" in server_log(server)

    # a pair made and authorized in the server's home, copied to the other machine, works
    run_cli(server.home, "keys", "init", "--client", "laptop", check=True)
    good = other / "laptop.key_secret"
    shutil.copy2(server.home / "keys" / "laptop.key_secret", good)
    with foreign_client(server, other, good) as c:
        c.add_job(name="fine", application="echo", parameters={"x": "1"})
        assert c._sock.get(zmq.MECHANISM) == zmq.CURVE
    # ... also through the environment and the umbrella options
    env_run = subprocess.run(
        [sys.executable, "-m", "pilotfish", "--home", str(other), "--server", server.address,
         "job", "ls", "--json"], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PILOTFISH_SERVER_KEY=str(server.home / "keys" / "server.key"),
                 PILOTFISH_CLIENT_KEY=str(good)))
    assert env_run.returncode == 0, env_run.stderr
    assert [j["name"] for j in json.loads(env_run.stdout)] == ["fine"]
    # the server key may be given as the key itself
    with Client(server.address, other, server_key=keys.server_keys(server.home)[0].decode(),
                client_key=good) as c:
        assert c.ping()


def test_a_wrong_server_key_gets_no_answer(server, tmp_path):
    """A client holding another server's public key cannot complete the handshake."""
    other = tmp_path / "o"
    run_cli(other, "keys", "init", check=True)
    run_cli(server.home, "keys", "init", "--client", "o", check=True)
    with Client(server.address, other, server_key=other / "keys" / "server.key",
                client_key=server.home / "keys" / "o.key_secret", timeout=2) as c:
        with pytest.raises(ServerUnavailable):
            c.ping()


def test_an_agent_with_a_wrong_key_gets_no_tasks(server, tmp_path):
    other = tmp_path / "node"
    run_cli(other, "keys", "init", "--client", "rogue", check=True)
    with server.client() as c:
        c.add_app(ECHO)
        jid = c.add_job(name="j", application="echo", parameters={"x": "hello"})
    rogue_log = tmp_path / "rogue.log"
    rogue = server.agent("--client-key", str(other / "keys" / "rogue.key_secret"),
                         log=rogue_log, work_root=tmp_path / "w1")
    wait_for(lambda: "refused this key" in rogue_log.read_text(), 15,
             what="the rogue agent to log its refusal")
    time.sleep(1)
    with server.client() as c:
        assert c.job(jid)["state"] == "READY"
        assert c.agents(all=True) == []
    assert "ZAP: denied CURVE key" in server_log(server)
    # a refused agent still hears SIGTERM (a blocking send with no connection to queue it on
    # held it deaf until the test's 15 s kill)
    rogue.send_signal(signal.SIGTERM)
    assert rogue.wait(5) == 0
    # the right key (the home's own) gets the job done
    server.agent(work_root=tmp_path / "w2")
    with server.client() as c:
        assert c.wait({"ids": [jid]}, timeout=30) == {"JOB_FINISHED": 1}


def test_an_agent_whose_key_is_authorized_late_joins_without_a_restart(server, tmp_path):
    """An agent started with a key the server does not know yet joins soon after the key is
    authorized, without a restart: libzmq gives a refused connection up, so the agent
    connects again once a heartbeat (2 s before a welcome) and says hello on it."""
    node = tmp_path / "node"
    run_cli(node, "keys", "init", "--client", "late", check=True)
    log = tmp_path / "late.log"
    server.agent("--client-key", str(node / "keys" / "late.key_secret"), log=log,
                 work_root=tmp_path / "w")
    wait_for(lambda: "refused this key" in log.read_text(), 15,
             what="the agent to log its refusal")
    time.sleep(1.5)
    run_cli(server.home, "keys", "authorize", "--role", "agent",
            str(node / "keys" / "late.key"), check=True)
    authorized = time.monotonic()
    with server.client() as c:
        wait_for(lambda: c.agents(), 10, what="the agent to be welcomed")
    assert time.monotonic() - authorized < 4, time.monotonic() - authorized


def test_a_revoked_key_stops_working_at_its_next_message(server, tmp_path):
    run_cli(server.home, "keys", "init", "--client", "temp", check=True)
    other = tmp_path / "t"
    other.mkdir()
    pair = other / "temp.key_secret"
    shutil.copy2(server.home / "keys" / "temp.key_secret", pair)
    open_conn = foreign_client(server, other, pair)
    try:
        assert open_conn.ping()
        run_cli(server.home, "keys", "revoke", "temp", check=True)
        with pytest.raises(ServerUnavailable, match="not an authorized key"):
            with foreign_client(server, other, pair, timeout=10) as c:
                c.ping()
        # a connection made before the revocation gets nothing from its next message on
        with pytest.raises(Forbidden, match="this key may do nothing: its key is no longer "
                                            "authorized"):
            open_conn.ping()
    finally:
        open_conn.close()
    # and authorized again, it works again
    run_cli(server.home, "keys", "authorize", str(server.home / "keys" / "temp.key"),
            check=True)
    with foreign_client(server, other, pair) as c:
        assert c.ping()


# -- insecure and ipc ---------------------------------------------------------------------------
@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:*", "tcp://*:0", "tcp://192.0.2.1:5555",
                                  "tcp://eth0:*"])
def test_insecure_is_refused_off_loopback(tmp_path, bind):
    home = tmp_path / "h"
    for extra in ([], ["-f"]):
        r = run_cli(home, "server", "start", "--bind", bind, "--insecure", *extra)
        one_line_error(r, f"--insecure is refused for {bind}")
    assert not (home / "server.json").exists()


def test_insecure_on_loopback_serves_plain_text_and_says_so(tmp_path):
    home = tmp_path / "h"
    try:
        r = run_cli(home, "server", "start", "--insecure", check=True)
        assert "INSECURE" in r.stderr
        info = json.loads((home / "server.json").read_text())
        assert (info["curve"], info["secure"], info["public_key"]) == (False, False, None)
        assert info["security"].startswith("insecure")
        assert "INSECURE" in (home / "server.log").read_text()
        with Client(home=home) as c:  # the home's client follows server.json: plain text
            assert c.ping()
            assert c._sock.get(zmq.MECHANISM) == zmq.NULL
    finally:
        daemon.stop(home, wait=10)


def test_an_ipc_server_is_owner_only_and_plain(tmp_path):
    home = tmp_path / "h"
    sock = tmp_path / "s.sock"
    try:
        run_cli(home, "server", "start", "--bind", f"ipc://{sock}", check=True)
        info = json.loads((home / "server.json").read_text())
        assert info["address"] == f"ipc://{sock}"
        assert (info["curve"], info["secure"]) == (False, True)
        assert mode(sock) & 0o077 == 0
        with Client(home=home) as c:
            assert c.ping()
    finally:
        daemon.stop(home, wait=10)


# -- the wire is encrypted ----------------------------------------------------------------------
class TcpTap:
    """A TCP proxy that records every byte passing between clients and a server."""

    def __init__(self, target: str) -> None:
        host, port = target[len("tcp://"):].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            self.conns += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            with self.lock:
                self.seen += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for s in self.conns:
            s.close()


def _tap_traffic(home: Path, address: str, marker: str) -> bytes:
    tap = TcpTap(address)
    try:
        with Client(tap.address, home, timeout=20) as c:
            c.add_app({**ECHO, "description": marker})
            c.add_job(name=marker, application="echo", parameters={"x": marker})
            assert [j["name"] for j in c.jobs()] == [marker]
            assert c.app("echo")["description"] == marker
        time.sleep(0.2)
        with tap.lock:
            return bytes(tap.seen)
    finally:
        tap.close()


def test_the_traffic_is_encrypted(server, tmp_path):
    """A job whose name, parameter and app description are a unique marker goes to the server
    and comes back through a recording proxy: the marker never crosses the wire in clear.
    The same exchange with an --insecure server shows the marker (the proxy does see it)."""
    marker = f"MARKER-{uuid.uuid4().hex}"
    seen = _tap_traffic(server.home, server.address, marker)
    assert len(seen) > 1000, "nothing went through the proxy"
    assert marker.encode() not in seen and marker[7:23].encode() not in seen
    assert b"CURVE" in seen[:200]  # the ZMTP greeting names the mechanism

    plain_home = tmp_path / "plain"
    try:
        run_cli(plain_home, "server", "start", "--insecure", check=True)
        assert marker.encode() in _tap_plain_traffic(plain_home, marker)
    finally:
        daemon.stop(plain_home, wait=10)


def _tap_plain_traffic(home: Path, marker: str) -> bytes:
    tap = TcpTap(json.loads((home / "server.json").read_text())["address"])
    try:
        d = raw_dealer(tap.address)  # plain text, as an insecure server speaks
        from pilotfish import protocol as P
        d.send(P.encode(P.REQUEST, rid=1, op="app_add", args={"spec": ECHO}))
        d.send(P.encode(P.REQUEST, rid=2, op="job_add", args={"jobs": [
            {"name": marker, "application": "echo", "parameters": {"x": marker}}]}))
        replies = 0
        while replies < 2 and d.poll(10000):
            d.recv()
            replies += 1
        d.close(linger=0)
        assert replies == 2
        with tap.lock:
            return bytes(tap.seen)
    finally:
        tap.close()


# -- pilots: the head hands keys to agents, the relay's rank 0 uses them -----------------------
def test_the_head_passes_key_files_to_agents_and_relays(tmp_path):
    from pilotfish.pilot.head import plan
    # a plan only: the launcher must be on PATH, it is never run (no Slurm needed here)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    p = plan(["--idle-timeout", "5"], environ=env, server="tcp://login1:5555", nodes="n1",
             launcher="local", server_key="/shared/server.key", client_key="/shared/c.key_secret")
    i = p.argv.index("agent")
    assert p.argv[i + 1:i + 7] == ["--server", "tcp://login1:5555", "--server-key",
                                   "/shared/server.key", "--client-key", "/shared/c.key_secret"]
    p = plan([], environ=env, server="tcp://login1:5555", nodes="n[1-2]", launcher="srun",
             relay="mpi", server_key="/shared/server.key", client_key="/shared/c.key_secret")
    i = p.argv.index("relay")
    assert p.argv[i + 1:i + 8] == ["--server", "tcp://login1:5555", "--server-key",
                                   "/shared/server.key", "--client-key", "/shared/c.key_secret",
                                   "--"]
    p = plan([], environ=env, server="tcp://login1:5555", nodes="n1", launcher="local")
    assert "--server-key" not in p.argv and "--client-key" not in p.argv


def test_the_head_takes_key_files_from_the_site_profile(tmp_path):
    home = tmp_path / "h"
    run_cli(home, "keys", "init", "--client", "theta", check=True)
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy2(home / "keys" / "server.key", shared / "server.key")
    shutil.copy2(home / "keys" / "theta.key_secret", shared / "theta.key_secret")
    (home / "sites").mkdir()
    (home / "sites" / "mysite.yaml").write_text(
        "scheduler: local\nlauncher: local\npilot: {nodes: 1}\n"
        "keys:\n  server_public: $SHARED/server.key\n  client: $SHARED/theta.key_secret\n")
    env = dict(os.environ, SHARED=str(shared))
    env.pop("PILOTFISH_SERVER_KEY", None)
    env.pop("PILOTFISH_CLIENT_KEY", None)
    r = subprocess.run([sys.executable, "-m", "pilotfish", "--home", str(home), "pilot", "run",
                        "--server", "tcp://login1:5555", "--dry-run", "--json", "--",
                        "--site", "mysite"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)["argv"]
    i = argv.index("--server-key")
    assert argv[i:i + 4] == ["--server-key", str(shared / "server.key"), "--client-key",
                             str(shared / "theta.key_secret")]
    # a profile key that is not there fails the pilot once, in one line
    os.chmod(shared / "theta.key_secret", 0o640)
    r = subprocess.run([sys.executable, "-m", "pilotfish", "--home", str(home), "pilot", "run",
                        "--server", "tcp://login1:5555", "--dry-run", "--", "--site", "mysite"],
                       capture_output=True, text=True, env=env, timeout=60)
    one_line_error(r, "readable by others")
    # and the schema checks the keys' own keys
    (home / "sites" / "bad.yaml").write_text("scheduler: local\nlauncher: local\n"
                                             "pilot: {nodes: 1}\nkeys:\n  server: /x\n")
    r = run_cli(home, "site", "validate", "bad")
    assert r.returncode != 0 and "keys.server" in r.stderr, r.stderr


def test_agents_behind_the_mpi_relay_use_the_given_keys(server, tmp_path):
    """`pilot relay --server-key --client-key` from a home that has no keys of its own: rank 0's
    agent and its DEALER for rank 1 both get in with the given pair, and the jobs run."""
    require(MPIEXEC.exists(), f"Hydra mpiexec next to {sys.executable} (pip install mpich)")
    # one key for everything here (apps, jobs, both agents): admin
    run_cli(server.home, "keys", "init", "--client", "relay", "--role", "admin", check=True)
    other = tmp_path / "node-home"
    other.mkdir()
    shutil.copy2(server.home / "keys" / "relay.key_secret", other / "relay.key_secret")
    shutil.copy2(server.home / "keys" / "server.key", other / "server.key")
    # the home's default client is revoked: only the given pair can work
    run_cli(server.home, "keys", "revoke", "client", check=True)
    try:
        _run_relay(server, tmp_path, other)
    finally:  # the fixture stops the server with the home's client
        run_cli(server.home, "keys", "authorize", str(server.home / "keys" / "client.key"),
                check=True)


def _run_relay(server: ServerHandle, tmp_path: Path, other: Path) -> None:
    with Client(server.address, server.home, client_key=other / "relay.key_secret") as c:
        c.add_app(ECHO)
        ids = c.add_jobs([{"name": f"r{i}", "application": "echo", "parameters": {"x": "r"},
                           "max_retries": 0} for i in range(20)])
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "pilotfish", "--home", str(other),
           "pilot", "relay", "--server", server.address,
           "--server-key", str(other / "server.key"),
           "--client-key", str(other / "relay.key_secret"), "--",
           "--idle-timeout", "3", "--prefetch", "0", "--work-root", str(tmp_path / "work")]
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    with Client(server.address, server.home, client_key=other / "relay.key_secret") as c:
        assert c.counts({"ids": ids}) == {"JOB_FINISHED": 20}
        agents = c.agents(all=True)
    # rank 1's agent said hello (and goodbye) through rank 0's DEALER: that one got in too
    assert len(agents) == 2 and sum(a["tasks_done"] for a in agents) == 20, agents
    assert {a["state"] for a in agents} == {"EXITED"}, agents


def test_a_server_whose_home_client_is_revoked_still_starts_and_stops(tmp_path):
    """Revoking the home's own client key locks the home's CLI out, not the server: it starts
    (the refusal proves it is up) and stops (SIGTERM when it will not listen to us)."""
    home = tmp_path / "h"
    run_cli(home, "keys", "init", check=True)
    run_cli(home, "keys", "revoke", "client", check=True)
    try:
        t0 = time.monotonic()
        r = run_cli(home, "server", "start", check=True)
        assert time.monotonic() - t0 < 15
        assert "refused this client" in r.stderr
        one_line_error(run_cli(home, "job", "ls"), "refused this client")
        pid = json.loads((home / "server.json").read_text())["pid"]
        assert run_cli(home, "server", "stop", check=True).stdout == f"server {pid} stopped\n"
        assert daemon.exited(pid)  # exited (a zombie until init reaps it)
    finally:
        daemon.stop(home, wait=10)


def test_a_client_monitor_never_takes_a_closed_sockets_endpoint(server: ServerHandle):
    """pyzmq names a socket's monitor endpoint after the socket's file descriptor, and the
    endpoint of a closed socket's monitor can outlive that number (libzmq tears both down on
    its reaper thread). A Client made then, given the same number, failed with 'Address
    already in use' (seen in a two-process test run). Here such stale endpoints are made on
    purpose, for every number the Client's socket could get: its monitor has an address of its
    own and the call goes through."""
    ctx = zmq.Context.instance()
    stale = ctx.socket(zmq.PAIR)
    for n in range(4096):
        stale.bind(f"inproc://monitor.s-{n}")  # pyzmq's default address for number n
    try:
        with server.client() as c:
            assert c.ping()
            assert c._sock.FD < 4096
    finally:
        stale.close(linger=0)
