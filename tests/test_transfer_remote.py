"""Remote transfers against real servers: OpenSSH's sshd (scp://, sftp://) and an HTTP(S)
server, both started here on free loopback ports and stopped by pid (tests/transfer_servers.py);
then a job with scp:// and https:// inputs and an sftp:// output through a real server and
node agent; and every bad input of issue 13 (a host that refuses, a missing path, a stalled
server, a file over the cap, a half-written file, option-like hosts, credentials and encoded
``../`` in URLs, an unknown scheme at job add).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from conftest import ServerHandle, require, run_cli, wait_for
from pilotfish.errors import ValidationError
from pilotfish.transfer import Limits, TransferError, Url, scheme_for
from pilotfish.transfer.credentials import Credentials
from pilotfish.transfer.ssh import ALIAS, sftp_argv, ssh_config
from transfer_servers import HttpServer, Silent, Sshd, sshd_available

FAST = Limits(timeout=30, stall=5, connect_timeout=5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require(sshd_available() is None, sshd_available() or "")
    d = tmp_path_factory.mktemp("servers")
    files = d / "files"
    files.mkdir()
    (files / "in.bin").write_bytes(os.urandom(300_000))
    (files / "big.bin").write_bytes(os.urandom(8 << 20))
    (files / "dir").mkdir()
    sshd = Sshd(d / "sshd")
    http = HttpServer(files)
    https = HttpServer(files, tls_dir=d / "tls")
    creds = {**sshd.credentials(), "https://127.0.0.1": {"ca_file": str(https.cert)}}
    try:
        yield {"dir": d, "files": files, "sshd": sshd, "http": http, "https": https,
               "creds": Credentials.from_mapping(creds), "creds_map": creds}
    finally:
        for s in (sshd, http, https):
            s.stop()


def scheme(world, url: str):
    return scheme_for(url, credentials=world["creds"])


def remote_urls(world, path: str) -> list[str]:
    s = world["sshd"]
    return [s.url("scp", f"{world['files']}/{path}"), s.url("sftp", f"{world['files']}/{path}"),
            world["http"].url(f"/{path}"), world["https"].url(f"/{path}")]


# -- get, put, stat over each real scheme ---------------------------------------------------
def test_get_put_and_stat_over_each_scheme(world, tmp_path):
    want = (world["files"] / "in.bin").read_bytes()
    for i, url in enumerate(remote_urls(world, "in.bin")):
        s = scheme(world, url)
        assert s.stat(url, FAST) == (len(want), False), url
        dest = tmp_path / f"got{i}"
        assert s.get(url, str(dest), FAST) == len(want)
        assert dest.read_bytes() == want
        up = url.replace("in.bin", f"up/{i}/put.bin")
        assert s.put(str(dest), up, FAST) == len(want)
        assert (world["files"] / "up" / str(i) / "put.bin").read_bytes() == want
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert not list(world["files"].rglob("*partial*"))


def test_sftp_batch_fetches_each_and_fails_each_alone(world, tmp_path):
    s = world["sshd"]
    f = world["files"]
    pairs = [(s.url("sftp", f"{f}/in.bin"), str(tmp_path / "a")),
             (s.url("sftp", f"{f}/missing"), str(tmp_path / "b")),
             (s.url("sftp", f"{f}/dir"), str(tmp_path / "c")),
             (s.url("sftp", f"{f}/in.bin"), str(tmp_path / "d"))]
    out = scheme(world, pairs[0][0]).get_batch(pairs, FAST)
    assert out[0] == out[3] == 300_000
    assert isinstance(out[1], TransferError) and str(out[1]).endswith("missing: No such file")
    assert isinstance(out[2], TransferError) and "is a directory" in str(out[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d"]


# -- bad input: one line, fast, nothing half-written ----------------------------------------
def test_a_missing_path_fails_fast(world, tmp_path):
    for url in remote_urls(world, "no/such/file.dat"):
        t0 = time.monotonic()
        with pytest.raises(TransferError) as info:
            scheme(world, url).get(url, str(tmp_path / "x"), FAST)
        assert str(info.value) == f"{url}: No such file"
        assert time.monotonic() - t0 < 10
    assert not list(tmp_path.iterdir())


def test_a_host_that_refuses(world, tmp_path):
    from transfer_servers import free_port
    port = free_port()  # nothing listens there
    for url in (f"scp://127.0.0.1:{port}/x", f"http://127.0.0.1:{port}/x"):
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="connection refused") as info:
            scheme(world, url).get(url, str(tmp_path / "x"), FAST)
        assert "\n" not in str(info.value) and time.monotonic() - t0 < 10


def test_a_stalled_server_times_out(world, tmp_path):
    """A server that accepts and never sends a byte: stopped by the stall bound."""
    silent = Silent()
    try:
        lim = Limits(timeout=30, stall=2, connect_timeout=2)
        for url in (f"sftp://127.0.0.1:{silent.port}/x", f"http://127.0.0.1:{silent.port}/x"):
            t0 = time.monotonic()
            with pytest.raises(TransferError) as info:
                scheme(world, url).get(url, str(tmp_path / "x"), lim)
            took = time.monotonic() - t0
            assert took < 12, (url, took)
            assert str(info.value).startswith(url) and "\n" not in str(info.value)
    finally:
        silent.stop()
    assert not list(tmp_path.iterdir())


def test_a_file_over_the_cap_fails_and_leaves_nothing(world, tmp_path):
    for url in remote_urls(world, "big.bin"):
        with pytest.raises(TransferError, match="over the transfer byte cap"):
            scheme(world, url).get(url, str(tmp_path / "x"), Limits(max_bytes=1 << 20))
    assert not list(tmp_path.iterdir())


def test_a_half_written_file_is_never_visible(world, tmp_path):
    """While 8 MiB arrive, the final name is absent or whole, never partial."""
    whole = (world["files"] / "big.bin").stat().st_size
    for i, url in enumerate(remote_urls(world, "big.bin")):
        dest = tmp_path / f"big{i}"
        seen: list[int] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                try:
                    seen.append(dest.stat().st_size)
                except FileNotFoundError:
                    seen.append(-1)
                time.sleep(0.001)

        t = threading.Thread(target=watch)
        t.start()
        try:
            scheme(world, url).get(url, str(dest), FAST)
        finally:
            done.set()
            t.join()
        assert set(seen) <= {-1, whole}, (url, sorted(set(seen))[:5])
        assert dest.stat().st_size == whole


def test_option_like_hosts_never_reach_ssh(world, tmp_path):
    """Refused at check_url; and a forged Url that skipped it still cannot become an option:
    the host lives in the -F config file, the command line is fixed."""
    marker = tmp_path / "pwned"
    for url in (f"scp://-oProxyCommand=touch%20{marker}/x", f"sftp://-oProxyCommand=x@h/x",
                "scp://-F/etc/passwd/x"):
        with pytest.raises(ValidationError, match="starts with '-'"):
            scheme_for(url)
    assert sftp_argv("/c", "/b") == ["sftp", "-F", "/c", "-b", "/b", ALIAS]
    none = Credentials().for_url("scp://h/x")
    for host in (f"-oProxyCommand=touch {marker}", f"h\n  ProxyCommand touch {marker}"):
        with pytest.raises(TransferError, match="space, quote or control character"):
            ssh_config(Url("forged", "scp", host=host, path="/x"), none, FAST)
    forged = Url("forged", "scp", host=f"-oProxyCommand=touch{marker}", path="/x")
    cfg = ssh_config(forged, none, FAST)
    assert cfg.splitlines()[1] == f"  HostName -oProxyCommand=touch{marker}"
    assert "ProxyCommand none" in cfg
    with pytest.raises(TransferError):
        scheme(world, "scp://h/x").get(forged, str(tmp_path / "x"), FAST)
    assert not marker.exists()


def test_an_upload_never_follows_a_symlink(world, tmp_path):
    """put opens the local file itself with O_NOFOLLOW (a task could plant a link to a key)."""
    (tmp_path / "link").symlink_to(world["sshd"].key)
    for url in remote_urls(world, "up/link"):
        with pytest.raises(TransferError, match="symbolic link: never followed"):
            scheme(world, url).put(str(tmp_path / "link"), url, FAST)
    assert not (world["files"] / "up" / "link").exists()


def test_credentials_never_reach_a_command_line(world, tmp_path):
    """While an sftp runs, neither the key file nor the user nor the host is in any process's
    command line."""
    s = world["sshd"]
    url = s.url("sftp", f"{world['files']}/big.bin")
    found: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if b"sftp" in cmd or b"ssh" in cmd:
                        found.append(cmd.decode(errors="replace"))
            time.sleep(0.01)

    t = threading.Thread(target=watch)
    t.start()
    try:
        scheme(world, url).get(url, str(tmp_path / "b"), FAST)
    finally:
        done.set()
        t.join()
    ours = [c for c in found if ALIAS in c]
    assert ours, found[:3]
    for c in ours:
        assert str(s.key) not in c and str(s.port) not in c and "127.0.0.1" not in c, c


# -- through a real server and node agent ---------------------------------------------------
@pytest.fixture
def transfers_file(world, tmp_path, monkeypatch):
    import yaml
    f = tmp_path / "transfers.yaml"
    f.write_text(yaml.safe_dump({"credentials": world["creds_map"]}))
    monkeypatch.setenv("PILOTFISH_TRANSFERS", str(f))  # the agent (and its stager) inherit it
    monkeypatch.setenv("PILOTFISH_TRANSFER_STALL", "5")
    return f


def _finished(c, ids):
    jobs = [c.job(i) for i in ids]
    return jobs if all(j["state"] in ("JOB_FINISHED", "FAILED") for j in jobs) else None


def test_jobs_with_scp_and_https_inputs_run_end_to_end(server: ServerHandle, world, tmp_path,
                                                       transfers_file):
    s, f = world["sshd"], world["files"]
    c = server.client()
    c.add_app({"name": "sum", "executable": "/usr/bin/cksum", "args": ["{f}"],
               "parameters": {"f": {"type": "path"}}})
    out = f / "results"
    ids = c.add_jobs([
        {"name": "viascp", "application": "sum", "parameters": {"f": "in.bin"},
         "input_url": s.url("scp", f"{f}/in.bin"), "output_url": s.url("sftp", str(out)),
         "max_retries": 0},
        {"name": "viahttps", "application": "sum", "parameters": {"f": "in.bin"},
         "input_url": world["https"].url("/in.bin"), "output_url": world["http"].url("/web"),
         "max_retries": 0},
        {"name": "missing", "application": "sum", "parameters": {"f": "nope"},
         "input_url": s.url("scp", f"{f}/nope"), "max_retries": 0}])
    server.agent(work_root=tmp_path / "work")
    jobs = wait_for(lambda: _finished(c, ids), 60, what="the jobs to end")
    a, b, m = jobs
    assert a["state"] == b["state"] == "JOB_FINISHED", (a["message"], b["message"])
    import subprocess
    want = subprocess.run(["cksum", "in.bin"], cwd=f, capture_output=True, text=True).stdout
    assert (out / f"viascp.{a['id']}" / "job.out").read_text() == want
    assert (out / f"viascp.{a['id']}" / "in.bin").read_bytes() == (f / "in.bin").read_bytes()
    assert (f / "web" / f"viahttps.{b['id']}" / "job.out").read_text() == want
    assert m["state"] == "FAILED" and "STAGE_IN_FAILED" in m["events"][-1]["via"]
    assert m["message"] == f"stage-in failed: {s.url('scp', f'{f}/nope')}: No such file"


def test_job_add_refuses_bad_remote_urls(server: ServerHandle):
    """At the door, in one line, nothing added; the password of a URL is never echoed."""
    c = server.client()
    c.add_app({"name": "t", "executable": "/bin/true"})
    r = run_cli(server.home, "job", "add", "--name", "j", "--app", "t", "--input-url",
                "weird://x/y")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "unknown scheme 'weird'; supported schemes: file, local, scp, sftp, http, https, " \
        "gsiftp, globus" in r.stderr
    for url, words in [("scp://alice:secret@h/x", "credentials inside a URL are refused"),
                       ("sftp://-oProxyCommand=x/y", "starts with '-'"),
                       ("https://h/a/%2e%2e/%2e%2e/etc/passwd", "'..' part"),
                       ("scp://h/x%0a-oX", "control character")]:
        for key in ("input_url", "output_url"):
            with pytest.raises(ValidationError) as info:
                c.add_jobs([{"name": "j", "application": "t", key: url}])
            assert words in str(info.value) and "secret" not in str(info.value), info.value
    assert c.jobs({}) == []
