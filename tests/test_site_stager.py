"""The site stager's server side, for real: a server process, real node agents, and this test
speaking the stager's protocol (``stage_poll``) itself, so every rule is seen exactly: jobs with
a remote input are held for the stager and reach STAGED_IN before an agent takes them; the agent
places the staged file and skips stage-in; failures land in STAGE_IN_FAILED with the error and
are retried after a backoff; a silent stager's work is taken back and given to another; the
look-ahead window bounds how much is staged ahead of the agents.
(The stager itself, with real transfers, is tested in test_site_stager_e2e.py.)
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import ServerHandle, wait_for

URL = "http://127.0.0.1:9/data/in.dat"


@pytest.fixture
def c(server: ServerHandle):
    c = server.client()
    c.add_app({"name": "cat", "executable": "/bin/cat", "args": ["in.dat"]})
    return c


def poll(c, stager="st1", site="s1", want=0, **kw):
    return c.call("stage_poll", stager=stager, site=site, want=want, **kw)


def stage(staging: Path, work: list[dict], text: str = "payload\n") -> list[dict]:
    """Do what a stager does for each work item: the file in place; the done items."""
    done = []
    for w in work:
        d = staging / str(w["job"])
        d.mkdir(parents=True, exist_ok=True)
        (d / "in.dat").write_text(text)
        done.append({"job": w["job"], "token": w["token"], "ok": True, "name": "in.dat",
                     "bytes": len(text), "seconds": 0.01})
    return done


def state(c, job):
    return c.job(job)["state"]


def test_a_remote_input_is_staged_in_before_an_agent_takes_it(server, c, tmp_path):
    staging = tmp_path / "staging"
    poll(c)  # a stager for site s1 lives
    job = c.add_job(name="j", application="cat", input_url=URL, site="s1")
    server.agent("--site", "s1", "--staging-dir", str(staging))
    # (the stager polls on: silent for a lease period, it would count as gone, and its jobs
    # would go to the agents, which stage for themselves where no stager lives)
    wait_for(lambda: poll(c) and c.status()["agents_alive"] == 1, 30, what="the agent")
    time.sleep(1.0)  # a hungry agent: still it does not get the job
    d = c.job(job)
    assert d["state"] == "READY" and d["attempts"] == 0
    assert c.call("transfer_ls")["sites"]["s1"]["held"] == 1
    r = poll(c, want=5)
    assert [(w["job"], w["url"]) for w in r["work"]] == [(job, URL)]
    assert poll(c, want=5, holding=[{"job": job, "token": r["work"][0]["token"]}])["work"] == []
    assert c.job(job)["staging"]["stager"] == "st1"  # job show: in flight, by whom
    r2 = poll(c, done=stage(staging, r["work"]))
    assert r2["refused"] == []
    try:
        wait_for(lambda: state(c, job) == "JOB_FINISHED", 10, what="the job to finish")
    except AssertionError:
        print("JOB", c.job(job))
        print("AGENTS", c.call("agent_ls"))
        print("AGENTLOG", (server.home / "agent-0.log").read_text()[-3000:])
        raise
    d = c.job(job)
    ev = [(e["from_state"], e["to_state"]) for e in d["events"]]
    assert ev[:3] == [(None, "READY"), ("READY", "STAGED_IN"), ("STAGED_IN", "JOB_FINISHED")]
    assert "staged in by st1" in d["transfers"][0]["message"], d["transfers"]
    assert d["attempts"] == 1 and d["staged"] is None
    out = list(Path(server.home / "work").rglob("job.out"))
    assert [p.read_text() for p in out] == ["payload\n"]
    assert not (staging / str(job) / "in.dat").exists()  # moved into the workdir


def test_a_failed_transfer_is_stage_in_failed_with_its_error_and_retried(server, c):
    poll(c)
    job = c.add_job(name="j", application="cat", input_url=URL, site="s1", max_retries=1)
    w = poll(c, want=1)["work"][0]
    err = "http://127.0.0.1:9/data/in.dat: connection refused"
    poll(c, done=[{"job": job, "token": w["token"], "ok": False, "msg": err, "seconds": 0.2}])
    d = c.job(job)
    assert d["state"] == "RESTART_READY"
    assert [e["step"] for e in d["transfers"]] == ["STAGE_IN_FAILED"]
    assert err in d["transfers"][0]["message"]
    # retried, after a backoff (1 s for the first failure)
    assert poll(c, want=1)["work"] == []
    w = wait_for(lambda: poll(c, want=1)["work"], 5, 0.1, "the retry")[0]
    assert w["job"] == job and c.job(job)["state"] == "RESTART_READY"
    poll(c, done=[{"job": job, "token": w["token"], "ok": False, "msg": err}])
    d = c.job(job)
    assert d["state"] == "FAILED" and len(d["transfers"]) == 2
    # a result for work that is not its (any more) is refused and changes nothing
    r = poll(c, done=[{"job": job, "token": w["token"], "ok": True, "name": "in.dat"}])
    assert r["refused"] == [{"job": job, "token": w["token"]}]
    assert c.job(job)["state"] == "FAILED"


def test_a_silent_stagers_work_is_taken_again_never_by_two_at_once(server, c):
    poll(c, "st1")
    job = c.add_job(name="j", application="cat", input_url=URL, site="s1")
    w1 = poll(c, "st1", want=5)["work"]
    assert [w["job"] for w in w1] == [job]
    t0 = time.monotonic()
    # st1 goes silent; st2 asks meanwhile: nothing while st1's lease runs (3 heartbeats)
    assert poll(c, "st2", want=5)["work"] == []
    w2 = wait_for(lambda: poll(c, "st2", want=5)["work"], 15, 0.2, "st2 to get the job")
    assert [w["job"] for w in w2] == [job] and time.monotonic() - t0 >= 2.5
    view = c.call("transfer_ls")
    assert {s["id"]: s["state"] for s in view["stagers"]} == {"st1": "LOST", "st2": "ALIVE"}
    # st1 wakes up and reports: refused (st2 holds the job now)
    r = poll(c, "st1", done=[{"job": job, "token": w1[0]["token"], "ok": True,
                              "name": "in.dat"}])
    assert r["refused"] == [{"job": job, "token": w1[0]["token"]}]
    assert c.job(job)["state"] == "READY" and c.job(job)["staging"]["stager"] == "st2"


def test_look_ahead_stages_within_the_window_of_the_sites_agents(server, c, tmp_path):
    staging = tmp_path / "staging"
    poll(c, lookahead=2)
    jobs = c.add_jobs([{"name": f"j{i}", "application": "cat", "input_url": URL,
                        "site": "s1"} for i in range(10)])
    # no agents yet: the window is the stager's lookahead
    r = poll(c, want=10, lookahead=2)
    assert len(r["work"]) == 2 and r["window"] == 2
    poll(c, done=stage(staging, r["work"]), lookahead=2)
    r = poll(c, want=10, lookahead=2)
    assert r["work"] == [] and r["ahead"] == 2  # staged, waiting for an agent: the window
    assert sorted(j["state"] for j in c.jobs({"ids": jobs})).count("STAGED_IN") == 2
    # an agent of 2 cores comes; it runs staged jobs while the next ones are staged
    server.agent("--site", "s1", "--staging-dir", str(staging), cores="0")

    def step():
        r = poll(c, want=10, lookahead=2)
        assert r["ahead"] <= r["window"] <= 2, r  # never more staged ahead than the window
        if r["work"]:
            poll(c, done=stage(staging, r["work"]), lookahead=2)
        return c.counts({"ids": jobs}).get("JOB_FINISHED") == len(jobs)

    wait_for(step, 60, 0.2, "every job to run")


def test_a_restarted_server_keeps_staged_jobs_and_adopts_a_stagers_work(server, c, tmp_path):
    """Staged jobs wait in STAGED_IN through a server restart (rebuilt from jobs.staged);
    work a stager still holds is its lease again after the restart (no transfer twice)."""
    staging = tmp_path / "staging"
    poll(c)
    a, b = c.add_jobs([{"name": n, "application": "cat", "input_url": URL, "site": "s1"}
                       for n in ("a", "b")])
    work = {w["job"]: w for w in poll(c, want=5, lookahead=2)["work"]}
    assert set(work) == {a, b}
    poll(c, done=stage(staging, [work[a]]), holding=[{"job": b, "token": work[b]["token"]}])
    assert state(c, a) == "STAGED_IN"
    c.close()
    server.stop()
    server.start()
    c = server.client()
    # the stager polls on: it still holds b, which the new server gives back to it
    r = poll(c, holding=[{"job": b, "token": work[b]["token"]}])
    assert r["refused"] == [] and c.job(b)["staging"]["stager"] == "st1"
    assert c.call("transfer_ls")["sites"]["s1"]["staged_waiting"] == 1
    poll(c, done=stage(staging, [work[b]]))
    server.agent("--site", "s1", "--staging-dir", str(staging))
    wait_for(lambda: c.counts({"ids": [a, b]}).get("JOB_FINISHED") == 2, 30, 0.1,
             "both staged jobs to run after the restart")
    assert [e["step"] for e in c.job(b)["transfers"]] == ["STAGED_IN"]


def test_bad_polls_are_refused_whole_with_one_line_and_change_nothing(server, c):
    from pilotfish.errors import PilotfishError
    poll(c)
    job = c.add_job(name="j", application="cat", input_url=URL, site="s1")
    w = poll(c, want=1)["work"][0]
    bad = [
        ({"done": [{"job": job, "token": w["token"], "ok": True, "name": "../../keys"}]},
         "plain file name"),
        ({"done": [{"job": job, "token": w["token"], "ok": True, "name": "-oProxy"}]},
         "plain file name"),
        ({"done": [{"job": job, "token": w["token"], "ok": True, "name": "in.dat",
                    "sha256": "x" * 64}]}, "sha256"),
        ({"done": [{"job": -5, "token": 1, "ok": True}]}, "done.job"),
        ({"done": [{"job": 2**70, "token": 1, "ok": True}]}, "past 64 bits"),
        ({"want": 10**9}, "want"),
        ({"report": {"x": "y" * 70_000}}, "report"),
        ({"stager": "-oProxyCommand=x"}, "stager id"),
        ({"site": "a/../b"}, "site"),
        ({"holding": [{"job": "1"}]}, "holding.job"),
    ]
    for args, words in bad:
        kw = {"stager": "st1", "site": "s1", **args}
        with pytest.raises(PilotfishError) as err:
            c.call("stage_poll", **kw)
        assert words in str(err.value) and "\n" not in str(err.value), (args, err.value)
    # nothing changed: still leased to st1, still READY
    d = c.job(job)
    assert d["state"] == "READY" and d["staging"]["stager"] == "st1"
