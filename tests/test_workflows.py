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

#: Each step lists the files it found (its inputs) and leaves out-<tag>.txt; FAIL_MARK, when
#: it exists, makes step "b" fail once per creation (the retry test removes it).
STEP = ("set -e; find . -type f ! -name 'job.*' ! -name '.pilotfish-job' | sort "
        "> \"seen-$1.txt\"; if [ \"$1\" = \"$2\" ]; then echo 'told to fail' >&2; exit 7; fi; "
        "echo \"$1\" > \"out-$1.txt\"")
LADDER = ["SUBJOB_SUBMITTED", "SUBJOB_IN_PREPROCESSED", "SUBJOB_QUEUED", "SUBJOB_RUNNING",
          "SUBJOB_RUN_FINISHED", "SUBJOB_IN_POSTPROCESSED", "SUBJOB_COMPLETED"]


@pytest.fixture
def c(server: ServerHandle):
    c = server.client()
    c.add_app({"name": "step", "executable": "/bin/sh",
               "args": ["-c", STEP, "step", "{tag}", "{fail}"],
               "parameters": {"tag": {"type": "str"},
                              "fail": {"type": "str", "default": "none"}}})
    return c


@pytest.fixture
def data(server: ServerHandle) -> Path:
    d = server.home / "data"
    d.mkdir(exist_ok=True)
    (d / "input.txt").write_text("the input\n")
    return d


def sub(tag: str, **kw) -> dict:
    return {"name": f"s-{tag}", "application": "step", "parameters": {"tag": tag},
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
    # the CLI
    r = run_cli(server.home, "workflow", "ls", check=True)
    assert "chain" in r.stdout and "HISTORY" in r.stdout
    r = run_cli(server.home, "workflow", "show", str(wf), check=True)
    assert "SUBJOBS_COMPLETED" in r.stdout and "alice@example.org" in r.stdout
    r = run_cli(server.home, "events", "--kind", "workflow", check=True)
    assert f"workflow {wf} chain [g1]" in r.stdout and "-> HISTORY" in r.stdout
