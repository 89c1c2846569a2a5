"""The site stager for real: a server, a site agent (stage only) whose stager fetches scp://
inputs from a real sshd (tests/transfer_servers.py, stopped by pid), and a node agent that runs
the staged jobs. The sshd's sessions are counted on the server side (its per-connection
children), so the per-endpoint limit is seen where it matters; a missing file ends in
STAGE_IN_FAILED with the scheme's one line and is retried; inputs are staged while other jobs
compute; a killed site agent's staging work is taken by the next one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import pilotfish_cmd, require, run_cli, wait_for
from transfer_servers import Silent, Sshd, sshd_available


def sessions(pid: int) -> int:
    """The sshd's live connections: its children (one privilege-separated process each)."""
    try:
        return len(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return 0


class Counter(threading.Thread):
    """The most concurrent sessions an sshd served, sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.most, self.stopped = pid, 0, False

    def run(self) -> None:
        while not self.stopped:
            self.most = max(self.most, sessions(self.pid))
            time.sleep(0.005)


@pytest.fixture
def sshd(tmp_path):
    require(sshd_available() is None, sshd_available() or "")
    s = Sshd(tmp_path / "sshd")
    yield s
    s.stop()


def site(home: Path, staging: Path, creds: dict, **transfers) -> None:
    (home / "sites").mkdir(exist_ok=True)
    t = {"staging_dir": str(staging), "credentials": creds, **transfers}
    (home / "sites" / "s1.yaml").write_text(json.dumps({
        "name": "s1", "extends": "local", "transfers": t}))


def site_agent(server, *args: str) -> subprocess.Popen:
    log = open(server.home / "site-agent.log", "ab")
    p = subprocess.Popen(pilotfish_cmd(server.home, "site", "agent", "--site", "s1",
                                       "--stage-only", "--poll", "0.5", "-v", *args),
                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    server.agents.append(p)
    return p


def files(root: Path, n: int, size: int = 200_000) -> list[Path]:
    out = []
    for i in range(n):
        d = root / f"f{i}"
        d.mkdir(parents=True)
        (d / "in.dat").write_bytes(os.urandom(size))
        out.append(d / "in.dat")
    return out


def test_scp_inputs_staged_within_the_endpoint_limit_then_run(server, sshd, tmp_path):
    staging = tmp_path / "staging"
    site(server.home, staging, sshd.credentials(), per_endpoint={"127.0.0.1": 2},
         max_concurrent=8)
    src = files(tmp_path / "remote", 12)
    c = server.client()
    c.add_app({"name": "sum", "executable": "/usr/bin/md5sum", "args": ["in.dat"]})
    site_agent(server)
    wait_for(lambda: c.call("transfer_ls")["stagers"], 30, 0.2, "the stager's first poll")
    count = Counter(sshd.proc.pid)
    count.start()
    ids = c.add_jobs([{"name": f"j{i}", "application": "sum", "site": "s1",
                       "input_url": sshd.url("scp", str(p))} for i, p in enumerate(src)])
    bad = c.add_job(name="bad", application="sum", site="s1", max_retries=1,
                    input_url=sshd.url("scp", f"{tmp_path}/remote/nothing/in.dat"))
    # every input is staged before any agent runs: the jobs wait in STAGED_IN
    wait_for(lambda: c.counts({"ids": ids}).get("STAGED_IN") == len(ids) or
             c.call("transfer_ls")["sites"]["s1"]["staged_waiting"] >= 8, 60, 0.2,
             "inputs staged ahead of any agent")
    server.agent("--site", "s1", "--staging-dir", str(staging))
    wait_for(lambda: c.counts({"ids": ids}).get("JOB_FINISHED") == len(ids), 90, 0.2,
             "every job to run")
    count.stopped = True
    assert 1 <= count.most <= 2, count.most  # the sshd never served more than per_endpoint
    import hashlib
    for i, p in zip(ids, src):
        d = c.job(i)
        assert [e["step"] for e in d["transfers"]] == ["STAGED_IN"], d["transfers"]
        assert (d["events"][1]["from_state"], d["events"][1]["to_state"]) == \
            ("READY", "STAGED_IN")
        out = b"".join(b for _o, b in c.job_log(i)["pieces"]).decode()
        assert hashlib.md5(p.read_bytes()).hexdigest() in out, out
    # the missing file: STAGE_IN_FAILED with the scheme's one line, retried, then FAILED
    wait_for(lambda: c.job(bad)["state"] == "FAILED", 30, 0.2, "the bad job to fail")
    t = c.job(bad)["transfers"]
    assert [e["step"] for e in t] == ["STAGE_IN_FAILED", "STAGE_IN_FAILED"], t
    assert "nothing/in.dat" in t[0]["message"] and "\n" not in t[0]["message"], t
    shown = run_cli(server.home, "transfer", "ls", check=True).stdout
    assert f"scp://127.0.0.1:{sshd.port}" in shown and "nothing/in.dat" in shown, shown
    view = c.call("transfer_ls")
    ep = view["stagers"][0]["report"]["endpoints"][f"scp://127.0.0.1:{sshd.port}"]
    assert ep["limit"] == 2 and ep["done"] == len(ids) and ep["failed"] == 2
    assert "nothing/in.dat" in ep["last_error"]
    shown = run_cli(server.home, "job", "show", str(bad), check=True).stdout
    assert "transfers:" in shown and "STAGE_IN_FAILED" in shown


def test_a_killed_site_agents_staging_work_is_taken_again(server, tmp_path):
    silent = Silent()  # a server that accepts and never answers: the transfer hangs
    try:
        staging = tmp_path / "staging"
        site(server.home, staging, {})
        c = server.client()
        c.add_app({"name": "sum", "executable": "/usr/bin/md5sum", "args": ["in.dat"]})
        first = site_agent(server)
        wait_for(lambda: c.call("transfer_ls")["stagers"], 30, 0.2, "the first stager")
        job = c.add_job(name="j", application="sum", site="s1",
                        input_url=f"http://127.0.0.1:{silent.port}/in.dat")
        s1 = wait_for(lambda: (c.job(job)["staging"] or {}).get("stager"), 30, 0.1,
                      "the first stager to take the job")
        first.send_signal(signal.SIGKILL)
        first.wait()
        site_agent(server)  # another pid: another stager id
        s2 = wait_for(lambda: (lambda s: s and s != s1 and s)(
            (c.job(job)["staging"] or {}).get("stager")), 30, 0.2, "the job taken again")
        assert s2 != s1
        states = {s["id"]: s["state"] for s in c.call("transfer_ls")["stagers"]}
        assert states[s1] == "LOST" and states[s2] == "ALIVE"
        assert c.job(job)["state"] == "READY"  # never two at once, never counted as a failure
    finally:
        silent.stop()
