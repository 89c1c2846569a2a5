"""Workflows (the seed's Argo jobs): subjobs run in order or as a DAG, each one's workdir handed
to the next, the workflow's states derived from its subjobs' states with events of their own.

Real server and agent processes running real short tasks (a /bin/sh step).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import ServerHandle, run_cli, wait_for
from pilotfish.errors import PilotfishError

#: Each step lists the files it found (its inputs) and leaves out-<tag>.txt; it fails while the
#: file named by its parameter ``fail`` exists, and waits while ``slow``'s exists.
STEP = ("set -e; find . -type f ! -name 'job.*' ! -name '.pilotfish-job' | sort "
        "> \"seen-$1.txt\"; if [ -e \"$2\" ]; then echo 'told to fail' >&2; exit 7; fi; "
        "while [ -e \"$3\" ]; do sleep 0.1; done; echo \"$1\" > \"out-$1.txt\"")
LADDER = ["SUBJOB_SUBMITTED", "SUBJOB_IN_PREPROCESSED", "SUBJOB_QUEUED", "SUBJOB_RUNNING",
          "SUBJOB_RUN_FINISHED", "SUBJOB_IN_POSTPROCESSED", "SUBJOB_COMPLETED"]


@pytest.fixture
def c(server: ServerHandle):
    c = server.client()
    c.add_app({"name": "step", "executable": "/bin/sh",
               "args": ["-c", STEP, "step", "{tag}", "{fail}", "{slow}"],
               "parameters": {"tag": {"type": "str"},
                              "fail": {"type": "str", "default": "/nonexistent",
                                       "pattern": "/[A-Za-z0-9/._-]+"},
                              "slow": {"type": "str", "default": "/nonexistent",
                                       "pattern": "/[A-Za-z0-9/._-]+"}}})
    return c


@pytest.fixture
def data(server: ServerHandle) -> Path:
    d = server.home / "data"
    d.mkdir(exist_ok=True)
    (d / "input.txt").write_text("the input\n")
    return d


def sub(tag: str, fail: Path | None = None, slow: Path | None = None, **kw) -> dict:
    params = {"tag": tag}
    if fail:
        params["fail"] = str(fail)
    if slow:
        params["slow"] = str(slow)
    return {"name": f"s-{tag}", "application": "step", "parameters": params,
            "max_retries": 0, **kw}


def wf_events(c, wf: int) -> list[str]:
    return [e["to"] for e in c.workflow(wf)["events"]]


def ended(c, wf: int, *states: str):
    d = c.workflow(wf)
    return d if d["state"] in states else None


def test_chain_passes_files_and_reaches_history(server: ServerHandle, c, data, tmp_path):
    """Three subjobs in a chain: the first gets the workflow's input, each the one before's
    workdir (in <name>.<job id>/), the last's workdir goes to output_url; the workflow climbs
    the seed's ladder once per subjob, with events in the one stream, in order."""
    msg = {"name": "chain", "user_id": 7, "username": "alice", "email": "alice@example.org",
           "group_identifier": "g1", "description": "three steps",
           "input_url": str(data / "input.txt"), "output_url": str(data / "results"),
           "job_status_routing_key": "wf.status.chain",
           "subjobs": [sub("a"), sub("b"), sub("c")]}
    path = tmp_path / "wf.yaml"
    import yaml
    path.write_text(yaml.safe_dump(msg))
    r = run_cli(server.home, "workflow", "add", "-f", str(path), "--json", check=True)
    added = json.loads(r.stdout)
    wf, (ja, jb, jc) = added["id"], added["jobs"]
    assert c.workflow(wf)["state"] == "CREATED"
    server.agent(work_root=tmp_path / "work")
    d = wait_for(lambda: ended(c, wf, "HISTORY", "SUBJOB_RUN_FAILED", "SUBJOB_FAILED",
                               "STAGE_IN_FAILED", "STAGE_OUT_FAILED"), 60, what="the workflow")
    assert d["state"] == "HISTORY", d
    assert d["done"] == 3
    out = data / "results" / f"s-c.{jc}"
    assert (out / "out-c.txt").read_text() == "c\n"
    seen_c = (out / "seen-c.txt").read_text().split()
    # c saw b's workdir, which held a's, which held the workflow's input
    assert f"./s-b.{jb}/out-b.txt" in seen_c
    assert f"./s-b.{jb}/s-a.{ja}/out-a.txt" in seen_c
    assert f"./s-b.{jb}/s-a.{ja}/input.txt" in seen_c
    assert (data / f"workflow.{wf}" / f"s-a.{ja}" / "out-a.txt").exists()
    # the seed's ladder, once per subjob, every state its own event in the stream
    expected = (["CREATED", "STAGED_IN"] + LADDER + ["SUBJOB_INCREMENTED"] + LADDER
                + ["SUBJOB_INCREMENTED"] + LADDER + ["SUBJOBS_COMPLETED", "STAGED_OUT",
                                                     "HISTORY"])
    assert wf_events(c, wf) == expected
    evs = [e for e in c.events(since=0, limit=10_000, kind="workflow")["events"]]
    assert [e["to"] for e in evs] == expected
    assert all(e["workflow"] == wf and e["name"] == "chain" and e["group"] == "g1"
               for e in evs)
    ids = [e["id"] for e in evs]
    assert ids == sorted(ids)
    # each workflow event follows the job event that caused it
    jobs_ev = c.events(since=0, limit=10_000, job=[jc])["events"]
    done_c = next(e["id"] for e in jobs_ev if e["to"] == "JOB_FINISHED")
    assert next(e["id"] for e in evs if e["to"] == "HISTORY") > done_c
    assert all(e["workflow"] == wf for e in jobs_ev)
    # a workflow's filter: its own events and its subjobs', nothing else
    mine = c.events(since=0, limit=10_000, workflow=wf)["events"]
    assert {e["kind"] for e in mine} == {"job", "workflow"}
    assert {e["job"] for e in mine if e["kind"] == "job"} == {ja, jb, jc}
    assert [e["to"] for e in mine if e["kind"] == "workflow"] == expected
    # the CLI
    r = run_cli(server.home, "workflow", "ls", check=True)
    assert "chain" in r.stdout and "HISTORY" in r.stdout
    r = run_cli(server.home, "workflow", "show", str(wf), check=True)
    assert "SUBJOBS_COMPLETED" in r.stdout and "alice@example.org" in r.stdout
    r = run_cli(server.home, "events", "--kind", "workflow", check=True)
    assert f"workflow {wf} chain [g1]" in r.stdout and "-> HISTORY" in r.stdout


FINAL = ("HISTORY", "STAGE_IN_FAILED", "SUBJOB_PREPROCESS_FAILED", "SUBJOB_RUN_FAILED",
         "SUBJOB_POSTPROCESS_FAILED", "SUBJOB_FAILED", "STAGE_OUT_FAILED", "USER_KILLED")


def test_dag_join_gets_both_parents(server: ServerHandle, c, data, tmp_path):
    """A diamond: 0 -> 1, 0 -> 2, (1, 2) -> 3. The join finds each parent's workdir in a folder
    of its own; every completion is a step of the ladder; the last goes to output_url."""
    msg = {"name": "diamond", "input_url": str(data / "input.txt"),
           "output_url": str(data / "out"),
           "subjobs": [sub("r"), sub("x", parents=[0]), sub("y", parents=[0]),
                       sub("j", parents=[2, 1])]}
    r = c.add_workflow(msg)
    wf, (j0, j1, j2, j3) = r["id"], r["jobs"]
    assert c.job(j3)["state"] == "AWAITING_PARENTS"
    server.agent(work_root=tmp_path / "work")
    d = wait_for(lambda: ended(c, wf, *FINAL), 60, what="the workflow")
    assert d["state"] == "HISTORY", d
    assert [s["parents"] for s in d["subjob_list"]] == [[], [0], [0], [1, 2]]
    seen = (data / "out" / f"s-j.{j3}" / "seen-j.txt").read_text().split()
    assert f"./s-x.{j1}/out-x.txt" in seen and f"./s-y.{j2}/out-y.txt" in seen
    assert f"./s-x.{j1}/s-r.{j0}/input.txt" in seen
    evs = wf_events(c, wf)
    assert evs[:2] == ["CREATED", "STAGED_IN"] and evs.count("SUBJOB_INCREMENTED") == 3
    assert evs[-3:] == ["SUBJOBS_COMPLETED", "STAGED_OUT", "HISTORY"]
    assert not (data / "out" / f"s-x.{j1}").exists()  # only the last one's go to output_url


def test_failed_subjob_fails_the_workflow_and_retry_resumes_there(server: ServerHandle, c,
                                                                    data, tmp_path):
    """b fails: the workflow goes SUBJOB_RUN_FAILED (c fails with it, never runs);
    `workflow retry` reruns b and then c, never a again."""
    marker = data / "fail-b"
    marker.write_text("")
    r = c.add_workflow({"name": "flaky", "subjobs": [sub("a"), sub("b", fail=marker),
                                                     sub("c")]})
    wf, (ja, jb, jc) = r["id"], r["jobs"]
    server.agent(work_root=tmp_path / "work")
    d = wait_for(lambda: ended(c, wf, *FINAL), 60, what="the workflow to fail")
    assert d["state"] == "SUBJOB_RUN_FAILED", d
    assert f"subjobs[1] (job {jb}) RUN_FAILED" in d["message"]
    assert [s["state"] for s in d["subjob_list"]] == ["JOB_FINISHED", "FAILED", "FAILED"]
    assert wf_events(c, wf)[-2:] == ["SUBJOB_RUNNING", "SUBJOB_RUN_FAILED"]
    marker.unlink()
    r = run_cli(server.home, "workflow", "retry", str(wf), check=True)
    assert f"1 of 1 workflows retried: {wf}" in r.stdout
    d = wait_for(lambda: ended(c, wf, *FINAL), 60, what="the retried workflow")
    assert d["state"] == "HISTORY", d
    assert c.job(ja)["attempts"] == 1 and c.job(jb)["attempts"] == 2
    evs = wf_events(c, wf)
    i = evs.index("SUBJOB_RUN_FAILED")
    assert evs[i + 1:] == (["SUBJOB_SUBMITTED"] + LADDER[1:] + ["SUBJOB_INCREMENTED"] + LADDER
                           + ["SUBJOBS_COMPLETED", "STAGED_OUT", "HISTORY"])
    # retrying a workflow that did not fail changes nothing
    assert c.retry_workflows([wf]) == {"changed": []}


def test_kill_stops_the_running_subjob_and_retry_resumes(server: ServerHandle, c, data,
                                                         tmp_path):
    slow = data / "slow"
    slow.write_text("")
    r = c.add_workflow({"name": "slowpoke", "subjobs": [sub("a", slow=slow), sub("b")]})
    wf, (ja, jb) = r["id"], r["jobs"]
    server.agent(work_root=tmp_path / "work")
    wait_for(lambda: c.workflow(wf)["state"] == "SUBJOB_RUNNING", 30, what="a to run")
    # a follower of this workflow's events, parked at the server until the kill
    import threading
    got: list = []
    newest = c.status()["events"]["newest"]
    t = threading.Thread(target=lambda: got.append(server.client().events(
        since=newest, wait=20, workflow=wf, kind="workflow")))
    t.start()
    time.sleep(0.3)
    r = run_cli(server.home, "workflow", "kill", str(wf), "--json", check=True)
    assert json.loads(r.stdout) == {"changed": [wf]}
    d = c.workflow(wf)
    assert d["state"] == "USER_KILLED"
    assert [s["state"] for s in d["subjob_list"]] == ["USER_KILLED", "USER_KILLED"]
    t.join(20)
    assert [e["to"] for e in got[0]["events"]] == ["USER_KILLED"]
    wait_for(lambda: c.status()["leases"] == 0, 15, what="the task to be stopped")
    assert c.kill_workflows([wf]) == {"changed": []}  # killed already
    slow.unlink()
    c.retry_workflows([wf])
    assert c.job(jb)["state"] == "AWAITING_PARENTS"  # waits for a again, not queued
    d = wait_for(lambda: ended(c, wf, *FINAL), 60, what="the retried workflow")
    assert d["state"] == "HISTORY", d
    evs = wf_events(c, wf)
    assert evs[evs.index("USER_KILLED") + 1] == "CREATED"  # nothing had completed: from the top


def _refused(c, msg: dict, *words: str) -> None:
    before = (c.workflows(), c.counts())
    with pytest.raises(PilotfishError) as e:
        c.add_workflow(msg)
    text = str(e.value)
    assert "\n" not in text and len(text) < 600, text
    for w in words:
        assert w in text, text
    assert (c.workflows(), c.counts()) == before  # nothing stored


def test_bad_workflows_are_refused_whole(server: ServerHandle, c, data):
    ok = [sub("a"), sub("b")]
    _refused(c, {"name": "w", "subjobs": [sub("a"), {"name": "b", "application": "nope"}]},
             "subjobs[1]", "no app named 'nope'")
    _refused(c, {"name": "w", "subjobs": [sub("a", parents=[1]), sub("b", parents=[0])]},
             "cycle")
    _refused(c, {"name": "w", "subjobs": [sub("a"), sub("b", parents=[5])]},
             "subjobs[1]", "no subjob index")
    _refused(c, {"name": "w", "subjobs": [sub("a"), sub("b", parents=[True])]},
             "subjobs[1]", "no subjob index")
    _refused(c, {"name": "w", "subjobs": [sub("a"), sub("b", parents=[2**70])]}, "subjobs[1]")
    _refused(c, {"name": "w", "subjobs": [sub("a", parents=[0])]}, "its own parent")
    _refused(c, {"name": "w", "subjobs": [sub(str(i)) for i in range(1001)]}, "at most 1,000")
    _refused(c, {"name": "w", "subjobs": [sub(str(i)) for i in range(101)]}, "subjobs[100]",
             "at most 100")
    _refused(c, {"name": "w", "subjobs": []}, "non-empty list")
    _refused(c, {"name": "<b>x</b>", "subjobs": ok}, "not a valid name")
    _refused(c, {"name": "-oProxyCommand=x", "subjobs": ok}, "not a valid name")
    _refused(c, {"name": "w", "subjobs": [sub("a"), sub("b", name="-rf")]}, "subjobs[1]",
             "not a valid name")
    _refused(c, {"name": "w", "user_id": 2**70, "subjobs": ok}, "user_id")
    _refused(c, {"name": "w", "email": "a@b.org\r\nBcc: x@evil.org", "subjobs": ok},
             "not a plain address")
    _refused(c, {"name": "w", "email": ["a@b.org"] * 11, "subjobs": ok}, "at most 10")
    _refused(c, {"name": "w", "subjobs": [sub("a", input_url=str(data / "input.txt"))]},
             "subjobs[0]", "the workflow's to set")
    _refused(c, {"name": "w", "input_url": "/etc/passwd", "subjobs": ok}, "input_url")
    _refused(c, {"name": "w", "job_status_routing_key": "a.#", "subjobs": ok},
             "job_status_routing_key")
    _refused(c, {"name": "w", "subjobz": ok}, "unknown workflow key")
    _refused(c, {"name": "w", "subjobs": [sub("a", colour="red")]}, "subjobs[0]",
             "unknown job key")
    # the CLI: one line, non-zero
    r = run_cli(server.home, "workflow", "add", "-f", "/dev/zero")
    assert r.returncode != 0 and "not a regular file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert run_cli(server.home, "workflow", "show", "99").returncode != 0
    from click.testing import CliRunner
    from pilotfish.cli import cli
    for cmd in ([], ["add"], ["ls"], ["show"], ["kill"], ["retry"]):  # in this process: quick
        r = CliRunner().invoke(cli, ["workflow", *cmd, "-h"])
        assert r.exit_code == 0 and "Usage:" in r.output, r.output


def test_intake_key_adds_once_and_survives_a_restart(server: ServerHandle, c, data, tmp_path):
    """The same intake_key twice: one workflow. A server restarted mid-workflow follows it
    on from the database."""
    slow = data / "slow"
    slow.write_text("")
    # (a restart may outlast the agent's fencing bound at 1 s heartbeats: then a runs again)
    msg = {"name": "once", "intake_key": "k-1", "subjobs": [sub("a", slow=slow, max_retries=2),
                                                            sub("b")]}
    r1 = c.add_workflow(msg)
    r2 = c.add_workflow(msg)
    assert r2 == {"id": r1["id"], "jobs": r1["jobs"], "known": True}
    assert len(c.workflows()) == 1
    server.agent(work_root=tmp_path / "work")
    wait_for(lambda: c.workflow(r1["id"])["state"] == "SUBJOB_RUNNING", 30, what="a to run")
    server.stop()
    server.start()
    c = server.client()
    slow.unlink()
    d = wait_for(lambda: ended(c, r1["id"], *FINAL), 60, what="the workflow")
    assert d["state"] == "HISTORY", (d["message"], d["subjob_list"])


def test_on_postgresql(pg_url, home, tmp_path):
    """The same tables, index and events on PostgreSQL: a two-subjob chain whose second
    subjob fails; `job retry` of that subjob alone resumes the workflow to HISTORY."""
    s = ServerHandle(home, pg_url).start()
    try:
        c = s.client()
        c.add_app({"name": "step", "executable": "/bin/sh",
                   "args": ["-c", STEP, "step", "{tag}", "{fail}", "{slow}"],
                   "parameters": {"tag": {"type": "str"},
                                  "fail": {"type": "str", "default": "/nonexistent",
                                           "pattern": "/[A-Za-z0-9/._-]+"},
                                  "slow": {"type": "str", "default": "/nonexistent",
                                           "pattern": "/[A-Za-z0-9/._-]+"}}})
        marker = tmp_path / "fail"
        marker.write_text("")
        r = c.add_workflow({"name": "pg", "subjobs": [sub("a"), sub("b", fail=marker)]})
        s.agent(work_root=tmp_path / "work")
        d = wait_for(lambda: ended(c, r["id"], *FINAL), 60, what="the failure")
        assert d["state"] == "SUBJOB_RUN_FAILED"
        marker.unlink()
        c.retry_jobs({"ids": [r["jobs"][1]]})  # the subjob alone: its workflow resumes too
        assert c.workflow(r["id"])["state"] == "SUBJOB_SUBMITTED"
        d = wait_for(lambda: ended(c, r["id"], *FINAL), 60, what="HISTORY")
        assert d["state"] == "HISTORY"
        assert [e["to"] for e in c.events(kind="workflow")["events"]][-3:] == [
            "SUBJOBS_COMPLETED", "STAGED_OUT", "HISTORY"]
    finally:
        s.stop_agents()
        s.stop()


def test_a_submitter_changes_only_its_own_workflows(server: ServerHandle, c, data):
    from pilotfish.client import Client
    from pilotfish.errors import Forbidden
    for name in ("ann", "ben"):
        run_cli(server.home, "keys", "init", "--client", name, "--role", "submitter",
                check=True)
    as_ = {n: Client(server.address, server.home, timeout=15,
                     client_key=server.home / "keys" / f"{n}.key_secret") for n in ("ann", "ben")}
    w = as_["ann"].add_workflow({"name": "mine", "intake_key": "ann-1", "subjobs": [sub("a")]})
    assert c.job(w["jobs"][0])["owner"] == "ann" and c.workflow(w["id"])["owner"] == "ann"
    for op in (as_["ben"].kill_workflows, as_["ben"].retry_workflows):
        with pytest.raises(Forbidden, match="only the jobs it added"):
            op([w["id"]])
    with pytest.raises(Forbidden, match="belongs to a workflow of another key"):
        as_["ben"].add_workflow({"name": "x", "intake_key": "ann-1", "subjobs": [sub("a")]})
    with pytest.raises(Forbidden):  # its subjobs are ann's jobs too
        as_["ben"].kill_jobs({"ids": w["jobs"]})
    assert as_["ann"].kill_workflows([w["id"]]) == {"changed": [w["id"]]}
