"""Stage-out by the site stager, for real: a server, a site agent (stage only) whose stager puts
outputs over sftp to a real sshd (tests/transfer_servers.py, stopped by pid), and a node agent
of the same site that hands its outputs to the shared staging directory instead of opening a
session itself (the sshd's log counts every session it accepted). A read-only sftp server
refuses the put ("Permission denied"): STAGE_OUT_FAILED with that one line, the stage-out alone
is retried (the task ran once), then FAILED. A killed stager's stage-out is taken by the next
stager; leftovers of killed/removed jobs are swept from the staging directory, the waiting
job's files are kept.
"""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import pilotfish_cmd, require, run_cli, wait_for
from transfer_servers import Silent, Sshd, sshd_available

SCRIPT = ("printf hello > a.txt && mkdir -p d && head -c 300000 /dev/urandom > d/b.bin "
          "&& ln -s /etc/passwd link")


def site(home: Path, staging: Path, creds: dict, **transfers) -> None:
    (home / "sites").mkdir(exist_ok=True)
    t = {"staging_dir": str(staging), "credentials": creds, "sweep": 1, **transfers}
    (home / "sites" / "s1.yaml").write_text(json.dumps({
        "name": "s1", "extends": "local", "transfers": t}))


def site_agent(server) -> subprocess.Popen:
    log = open(server.home / "site-agent.log", "ab")
    p = subprocess.Popen(pilotfish_cmd(server.home, "site", "agent", "--site", "s1",
                                       "--stage-only", "--poll", "0.5", "-v"),
                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    server.agents.append(p)
    return p


def accepted(sshd: Sshd) -> int:
    """Sessions the sshd accepted (LogLevel VERBOSE logs each)."""
    try:
        return sshd.log.read_text().count("Accepted publickey")
    except OSError:
        return 0


def start(server, tmp_path, creds: dict) -> tuple:
    staging = tmp_path / "staging"
    site(server.home, staging, creds)
    c = server.client()
    c.add_app({"name": "mk", "executable": "/bin/sh", "args": ["-c", SCRIPT]})
    first = site_agent(server)
    wait_for(lambda: c.call("transfer_ls")["stagers"], 30, 0.2, "the stager's first poll")
    work = tmp_path / "work"
    server.agent("--site", "s1", "--staging-dir", str(staging), work_root=work)
    return c, staging, work, first


def test_outputs_put_by_the_stager_not_the_node_agent(server, tmp_path):
    require(sshd_available() is None, sshd_available() or "")
    sshd = Sshd(tmp_path / "sshd")
    ro = Sshd(tmp_path / "sshd-ro", sftp="internal-sftp -R")  # every write refused
    try:
        # one host, two servers: sftp:// is the good one, scp:// the read-only one
        creds = {"sftp://127.0.0.1": sshd.credentials()["127.0.0.1"],
                 "scp://127.0.0.1": ro.credentials()["127.0.0.1"]}
        c, staging, work, _first = start(server, tmp_path, creds)
        remote = tmp_path / "remote"
        remote.mkdir()
        job = c.add_job(name="good", application="mk", site="s1",
                        output_url=sshd.url("sftp", str(remote)))
        wait_for(lambda: c.job(job)["state"] in ("JOB_FINISHED", "FAILED"), 40, 0.2,
                 "the job to finish")
        d = c.job(job)
        assert d["state"] == "JOB_FINISHED", d
        wd = work / d["workdir"]
        got = remote / wd.name
        assert (got / "a.txt").read_text() == "hello"
        assert (got / "d" / "b.bin").read_bytes() == (wd / "d" / "b.bin").read_bytes()
        assert not (got / "link").exists()  # a symlink is never followed nor sent
        # the stager put them in one session; the node agent opened none
        assert accepted(sshd) == 1, sshd.log.read_text()
        path = [(e["from_state"], e["to_state"]) for e in d["events"]]
        assert ("POSTPROCESSED", "JOB_FINISHED") in path, path
        msgs = " | ".join(e.get("message") or "" for e in d["events"])
        assert "staged out by s1." in msgs, msgs
        assert [e["step"] for e in d["transfers"]] == ["STAGED_OUT"], d["transfers"]
        wait_for(lambda: not (staging / "out" / str(job)).exists(), 10, 0.1,
                 "the staged copy removed after the put")

        # permission denied on the remote: STAGE_OUT_FAILED, the stage-out alone retried
        bad = c.add_job(name="ro", application="mk", site="s1", max_retries=1,
                        output_url=ro.url("scp", str(remote)))
        wait_for(lambda: c.job(bad)["state"] == "FAILED", 40, 0.2, "the read-only put to fail")
        d = c.job(bad)
        t = d["transfers"]
        assert [e["step"] for e in t] == ["STAGE_OUT_FAILED", "STAGE_OUT_FAILED"], t
        assert "permission denied" in t[0]["message"].lower() and "\n" not in t[0]["message"], t
        path = [(e["from_state"], e["via"], e["to_state"]) for e in d["events"]]
        assert ("POSTPROCESSED", "STAGE_OUT_FAILED", "POSTPROCESSED") in path, path
        assert d["attempts"] == 1, d  # the task ran once: only the stage-out was retried
        assert accepted(sshd) == 1  # still only the good job's session there
        shown = run_cli(server.home, "job", "show", str(bad), check=True).stdout
        assert "STAGE_OUT_FAILED" in shown and "permission denied" in shown.lower(), shown
        view = c.call("transfer_ls")
        ep = view["stagers"][0]["report"]["endpoints"][f"scp://127.0.0.1:{ro.port}"]
        assert ep["failed"] == 2 and "permission denied" in ep["last_error"].lower(), ep
    finally:
        sshd.stop()
        ro.stop()


def test_a_killed_stagers_stage_out_is_taken_and_leftovers_are_swept(server, tmp_path):
    silent = Silent()  # accepts and never answers: the put hangs in the first stager
    try:
        c, staging, work, first = start(server, tmp_path, {})
        job = c.add_job(name="j", application="mk", site="s1",
                        output_url=f"http://127.0.0.1:{silent.port}/out")
        s1 = wait_for(lambda: (lambda s: s and s.get("kind") == "out" and s.get("stager"))(
            c.job(job)["staging"]), 30, 0.1, "the first stager to take the stage-out")
        assert c.job(job)["state"] == "POSTPROCESSED"
        first.send_signal(signal.SIGKILL)
        first.wait()
        # leftovers beside it: a killed job's, a removed job's, a partial hand-off
        killed = c.add_job(name="k", application="mk", site="elsewhere")  # never runs here
        run_cli(server.home, "job", "kill", str(killed), check=True)
        assert c.job(killed)["state"] == "USER_KILLED"
        for p in (staging / str(killed) / "in.dat", staging / "987654" / "x",
                  staging / "out" / str(killed) / "w" / "f",
                  staging / "out" / f".{killed}.partial-abc" / "w" / "f"):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("left")
        site_agent(server)  # another pid: another stager id
        s2 = wait_for(lambda: (lambda s: s and s.get("stager") not in (None, s1) and s["stager"])(
            c.job(job)["staging"]), 30, 0.2, "the stage-out taken again")
        states = {s["id"]: s["state"] for s in c.call("transfer_ls")["stagers"]}
        assert states[s1] == "LOST" and states[s2] == "ALIVE"
        assert c.job(job)["state"] == "POSTPROCESSED"  # not counted as a failure
        view = json.loads(run_cli(server.home, "transfer", "ls", "--json", check=True).stdout)
        assert view["sites"]["s1"]["out_leased"] == 1, view["sites"]
        shown = run_cli(server.home, "job", "show", str(job), check=True).stdout
        assert "STAGING OUT now" in shown, shown
        wait_for(lambda: not any(p.exists() for p in (
            staging / str(killed), staging / "987654", staging / "out" / str(killed),
            staging / "out" / f".{killed}.partial-abc")), 20, 0.2, "leftovers swept")
        assert (staging / "out" / str(job)).is_dir()  # the waiting job's outputs stay
    finally:
        silent.stop()


def test_stage_out_books_through_a_restart_and_bad_polls(server, tmp_path):
    """The test speaks stage_poll itself: a handed job is held in POSTPROCESSED through a
    server restart (rebuilt from jobs.staged) and its stage-out adopted; bad stage-out results
    and sweeps are refused whole; the leftovers answer names only what no job needs."""
    from pilotfish.errors import PilotfishError
    staging = tmp_path / "staging"
    staging.mkdir()
    c = server.client()
    c.add_app({"name": "mk", "executable": "/bin/sh", "args": ["-c", "printf x > o.txt"]})

    def poll(**kw):
        return c.call("stage_poll", stager="st1", site="s1", **{"want": 0, **kw})

    poll()
    job = c.add_job(name="j", application="mk", site="s1",
                    output_url="http://127.0.0.1:9/out")
    server.agent("--site", "s1", "--staging-dir", str(staging), work_root=tmp_path / "work")
    wait_for(lambda: poll() and c.job(job)["state"] == "POSTPROCESSED"
             and c.job(job)["agent"] is None, 30, 0.1, "the outputs handed over")
    (handed,) = (staging / "out" / str(job)).iterdir()
    assert (handed / "o.txt").read_text() == "x"
    d = c.job(job)
    assert d["staging"]["waiting"] is True and d["attempts"] == 1, d
    assert d["runs"][-1]["message"] == "outputs handed to the site stager of s1", d["runs"]
    shown = run_cli(server.home, "job", "show", str(job), check=True).stdout
    assert "outputs WAITING in site s1's staging directory" in shown, shown
    w = poll(want=5)["work"]
    assert [(x["job"], x["kind"]) for x in w] == [(job, "out")], w
    c.close()
    server.stop()
    server.start()
    c = server.client()
    r = poll(holding=[{"job": job, "token": w[0]["token"]}])
    assert r["refused"] == [] and c.job(job)["staging"]["kind"] == "out"
    for args, words in [
            ({"done": [{"job": job, "token": w[0]["token"], "ok": True, "kind": "up"}]},
             "done.kind"),
            ({"done": [{"job": job, "token": w[0]["token"], "ok": False, "gone": "yes"}]},
             "done.gone"),
            ({"sweep": list(range(501))}, "sweep"),
            ({"sweep": [-1]}, "sweep item")]:
        with pytest.raises(PilotfishError) as err:
            poll(holding=[{"job": job, "token": w[0]["token"]}], **args)
        assert words in str(err.value) and "\n" not in str(err.value), (args, err.value)
    # the job waits for its outputs: its out dir stays; an unknown job's goes
    r = poll(holding=[{"job": job, "token": w[0]["token"]}], sweep=[job, 987654])
    assert r["remove"] == {"in": [987654], "out": [987654]}, r
    poll(done=[{"job": job, "token": w[0]["token"], "ok": True, "kind": "out", "bytes": 1,
                "seconds": 0.1}])
    d = c.job(job)
    assert d["state"] == "JOB_FINISHED" and d["attempts"] == 1, d
    assert poll(sweep=[job])["remove"] == {"in": [job], "out": [job]}
