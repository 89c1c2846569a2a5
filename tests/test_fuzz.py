"""Fuzz and injection, beyond the hand-written battery of tests/test_bad_input.py.

* 10,000+ generated hostile messages (seeded: ``PILOTFISH_FUZZ_SEED``; printed) from 12 DEALER
  identities with the home's CurveZMQ keys -- an authenticated insider -- at a live server,
  sent without waiting for answers, while a real agent keeps running real jobs: the jobs keep
  finishing, every message is answered, no internal error, RSS bounded, a ping at the end. On
  SQLite and on PostgreSQL (where the fuzz found NUL bytes and 64-bit ints that failed writes).
* Injection: shell syntax, ``..``, absolute paths, NUL bytes, PATH/LD_PRELOAD in job parameters,
  job keys, application names, app environments, op names, pre/postprocess argv -- and hostile
  workdirs and malformed tasks sent to a real agent by a stand-in server. A canary directory and
  a scan of everything outside the work root prove nothing ran and nothing was written.
* Refusals test_bad_input.py does not cover: a multi-job state change refused for one held job
  (it used to change the others), illegal changes of finished and running jobs, an agent's
  backward state report, internal columns as job keys; each refused, the database unchanged.

The generator and the battery live in ``tests/apps/chaoslib.py`` (``bench/chaos.py`` runs them
at full size).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps"))
import chaoslib as CL  # noqa: E402
from pilotfish import protocol as P  # noqa: E402
from pilotfish.errors import IllegalTransition, PilotfishError, ValidationError  # noqa: E402

SEED = int(os.environ.get("PILOTFISH_FUZZ_SEED", "20261124"))
N_FUZZ = 10_000


def _url(request, backend):
    return request.getfixturevalue("pg_url") if backend == "postgresql" else None


def snapshot(c) -> tuple:
    return c.counts(), c.jobs(limit=0), c.apps()


# -- the fuzz ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_fuzz_while_an_agent_runs_jobs(request, tmp_path, backend):
    url = _url(request, backend)
    print(f"fuzz seed {SEED} (set PILOTFISH_FUZZ_SEED to change it), {N_FUZZ} messages")
    w = CL.World(tmp_path / "w", db_url=url, heartbeat=1.0).start_server()
    try:
        c = w.client()
        c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["{s}"],
                   "parameters": {"s": {"type": "float", "min": 0, "max": 0.5}}})
        c.add_app({"name": "decoy", "executable": "/bin/true"})
        # decoys the fuzz's kill/retry/alter/rm may hit (no agent serves their site)
        c.add_jobs([{"name": f"d{i}", "application": "decoy", "site": "decoysite",
                     "group_identifier": "decoy", "tags": ["decoy"]} for i in range(20)])
        ids = c.add_jobs([{"name": f"n{i}", "application": "nap", "parameters": {"s": 0.05}}
                          for i in range(300)])
        agent = w.start_agent()
        CL.wait_for(lambda: c.counts({"ids": ids}).get("JOB_FINISHED", 0) >= 5, 30,
                    what="the first jobs to finish")
        bad0 = c.status()["stats"]["bad_messages"]
        progress: list[tuple[float, int]] = []
        stop = threading.Event()

        def monitor():
            with w.client() as mc:
                while not stop.is_set():
                    progress.append((time.time(), mc.counts({"ids": ids}).get("JOB_FINISHED", 0)))
                    time.sleep(0.1)

        th = threading.Thread(target=monitor, daemon=True)
        th.start()
        t0 = time.time()
        r = CL.fuzz_server(w.address, N_FUZZ, SEED, w.canary, home=w.home,
                           rss_pid=w.server_pid)
        t1 = time.time()
        time.sleep(0.3)
        stop.set()
        th.join(10)
        print({k: v for k, v in r.items()})
        assert r["sent"] >= 10_000 and r["internal_errors"] == 0, r["internal_error_examples"]
        assert r["unanswered_pings"] == 0 and r["answered"] == r["sent"]
        # the agent was served throughout: jobs finished during the fuzz
        during = [n for t, n in progress if t0 <= t <= t1 + 0.3]
        assert during and during[-1] > during[0], progress
        growth = r["rss_mb"][-1] - r["rss_mb"][0]
        print(f"server RSS {r['rss_mb'][0]} -> {r['rss_mb'][-1]} MB (max {max(r['rss_mb'])})")
        assert growth < 100, r["rss_mb"]
        assert c.ping()["version"]
        assert CL.wait_final(c, len(ids), 60, {"ids": ids}) == {"JOB_FINISHED": len(ids)}
        st = c.status()
        assert st["stats"]["bad_messages"] - bad0 > N_FUZZ // 2
        # the real agent never lost a lease and no fuzz agent took real work
        assert agent.poll() is None
        assert [a["pid"] for a in c.agents()] == [agent.pid]
        rows = CL.jobs_table(w)
        assert all(rows[j]["attempts"] == 1 for j in ids)
        ev = CL.events_by_job(w, ids)
        assert all(sum(1 for e in ev[j] if e[0] == "JOB_FINISHED") == 1 for j in ids)
        cons = CL.consistency(w)
        assert cons["server_counts_match_sql"] and cons["state_vs_last_event_mismatches"] == 0
        assert CL.canaries(w.root) == []
    finally:
        w.close()


# -- regressions the fuzz found (PostgreSQL refuses NUL in text; INTEGER columns) -------------
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_nul_and_big_ints_are_refused_or_cleaned_not_written(request, tmp_path, backend):
    """Each of these failed a write on PostgreSQL ('internal server error', or a rolled-back
    turn whose other replies were dropped); a failing task's NUL in stderr ended the server."""
    url = _url(request, backend)
    w = CL.World(tmp_path / "w", db_url=url, heartbeat=1.0).start_server()
    try:
        c = w.client(timeout=10)
        c.add_app({"name": "ok", "executable": "/bin/true"})
        [job] = c.add_jobs([{"name": "j", "application": "ok", "site": "nowhere"}])
        before = snapshot(c)
        for op, args in [("pilot_add", {"id": "p1", "nodes": 2**40}),
                         ("site_report", {"site": "s1", "pid": 2**40}),
                         ("pilot_ls", {"site": "a\x00b"}), ("pilot_update", {"id": "a\x00"}),
                         ("job_ls", {"filter": {"name": "a\x00b"}}),
                         ("job_ls", {"filter": {"site": "\x00"}}),
                         ("job_counts", {"filter": {"group": "a\x00"}}),
                         ("app_show", {"name": "ok\x00"}),
                         ("job_alter", {"filter": {"ids": [job]},
                                        "changes": {"description": "x\x00y"}}),
                         ("job_alter", {"filter": {"ids": [job]},
                                        "changes": {"description": ["a list"]}}),
                         ("job_alter", {"filter": {"ids": [job]},
                                        "changes": {"description": "x" * 10_001}})]:
            with pytest.raises(ValidationError) as info:
                c.call(op, **args)
            assert "\n" not in str(info.value) and "internal" not in str(info.value)
        assert snapshot(c) == before
        # a hello with NUL in a string field gets an error (it used to fail the agents row)
        s = CL.zmq.Context.instance().socket(CL.zmq.DEALER)
        s.setsockopt(CL.zmq.LINGER, 0)
        aid = f"nul-{uuid.uuid4().hex[:8]}"
        s.setsockopt(CL.zmq.ROUTING_ID, aid.encode())
        CL.apply_client(s, CL.client_curve(w.home, w.address))
        s.connect(w.address)
        s.send(P.encode(P.HELLO, agent=aid, host="a\x00b", pid=1, site=None, pilot=None,
                        cores=[0], gpus=[], memory=1, time_left=None, running=[], ack=0))
        assert s.poll(5000)
        kind, m = P.decode(s.recv())
        s.close(linger=0)
        assert kind == P.ERROR and "must not contain a NUL byte" in m["error"]
        # a task that prints NUL to stderr and fails: stored cleaned, the server goes on
        c.add_app({"name": "nul", "executable": CL.PY, "args": [
            "-S", "-c", "import sys; sys.stderr.write('boom\\x00bang\\n'); sys.exit(3)"]})
        [bad] = c.add_jobs([{"name": "nul", "application": "nul", "max_retries": 0}])
        more = c.add_jobs([{"name": f"ok{i}", "application": "ok"} for i in range(10)])
        w.start_agent(cores="0")
        assert CL.wait_final(c, 11, 30, {"ids": [bad] + more}) == {"FAILED": 1,
                                                                   "JOB_FINISHED": 10}
        assert c.job(bad)["message"] == "exit code 3; stderr: boom\\0bang"
        assert c.ping()["version"] and c.status()["pid"] == w.server_pid
    finally:
        w.close()


# -- injection -----------------------------------------------------------------------------------
def test_injection_battery(tmp_path):
    """Every hostile value is refused with a one-line error that changes nothing, or reaches the
    task as literal data: no canary file, nothing outside the work root, even with PATH and
    LD_PRELOAD in the app's environment and a hostile server handing out workdirs."""
    w = CL.World(tmp_path / "w", heartbeat=1.0).start_server()
    try:
        r = CL.injection_battery(w)
    finally:
        w.close()
    print(f"injection attempts blocked: {r['blocked']}/{r['attempts']}; option-like values "
          f"accepted: {r['option_like_values_accepted']}")
    assert r["failures"] == [] and r["blocked"] == r["attempts"] >= 100
    assert r["canaries"] == [] and r["new_files_outside_work_root"] == []
    assert r["agent_alive"]


def test_option_like_values_are_refused(tmp_path):
    """Argument injection: a str parameter (default pattern) or a path parameter starting with
    '-' would be read as an option of the app's executable ('--output=...', '-rf')."""
    w = CL.World(tmp_path / "w", heartbeat=1.0).start_server()
    try:
        c = w.client()
        c.add_app({"name": "ls", "executable": "/bin/ls", "args": ["{p}"],
                   "parameters": {"p": {"type": "path"}}})
        c.add_app({"name": "e", "executable": "/bin/echo", "args": ["{v}"],
                   "parameters": {"v": {"type": "str"}}})
        with pytest.raises(ValidationError):
            c.add_jobs([{"name": "x", "application": "ls", "parameters": {"p": "--version"}}])
        with pytest.raises(ValidationError):
            c.add_jobs([{"name": "y", "application": "e", "parameters": {"v": "-rf"}}])
    finally:
        w.close()


def test_agent_survives_a_hostile_server(tmp_path):
    """A stand-in server sends a real agent garbage frames and malformed tasks: it logs them,
    fails the tasks it cannot start (non-string argv/env, NUL bytes -- these used to kill it),
    refuses workdirs that leave the work root, and still runs a good task afterwards."""
    w = CL.World(tmp_path / "w")
    fs = CL.FakeServer(w.home)
    agent = w.start_agent(cores="0", server=fs.address)
    try:
        deadline = time.monotonic() + 30
        while fs.agent is None and time.monotonic() < deadline:
            fs.pump(0.1)
        assert fs.agent, "no hello"
        fz = CL.Fuzzer(SEED, w.canary, [fs.agent])
        for _ in range(500):  # garbage the agent must ignore
            fs.send(*fz.next()[1][:1])
        fs.send(P.encode(P.TASKS, seq=99, tasks=[{"job": "x"}], refused=[], uack=0))
        fs.send(P.encode(P.CANCEL, jobs=[{"job": 10**15, "attempt": 1}, 7]))
        fs.send(P.encode(P.WELCOME, agent="someone-else", heartbeat=-1, revoke=[{"x": 1}]))
        bad = {1: CL.task_spec(1, "ok/a", argv=[1, 2]),
               2: CL.task_spec(2, "ok/b", env={"A": 1}),
               3: CL.task_spec(3, "ok/c", argv=["/bin/true\x00x"]),
               4: CL.task_spec(4, "ok/d", argv=["/bin/true", "a\x00b"]),
               5: CL.task_spec(5, "ok/e", env={"A\x00": "x"}),
               6: CL.task_spec(6, "ok/f", argv=["relative/exe"]),
               7: CL.task_spec(7, "../../outside")}
        for spec in bad.values():
            fs.send_tasks([spec])
        fs.send_tasks([CL.task_spec(8, "ok/good", argv=["/bin/sh", "-c", "echo fine"])])
        fs.wait_updates(lambda u: len(fs.final_states()) >= 8, 30)
        done = fs.final_states()
        assert {j: done[j]["states"][-1] for j in bad} == {
            **{j: "RUN_FAILED" for j in range(1, 7)}, 7: "STAGE_IN_FAILED"}
        assert done[8]["states"][-1] == "JOB_FINISHED"
        assert (w.work / "ok/good/job.out").read_text() == "fine\n"
        assert agent.poll() is None
        assert not (w.root / "outside").exists() and CL.canaries(w.root) == []
    finally:
        agent.terminate()
        deadline = time.monotonic() + 10
        while agent.poll() is None and time.monotonic() < deadline:
            fs.pump(0.1)
        if agent.poll() is None:
            agent.kill()
        fs.close()
        w.close()


# -- refusals ------------------------------------------------------------------------------------
@pytest.fixture
def live(tmp_path):
    w = CL.World(tmp_path / "w", heartbeat=1.0).start_server()
    yield w
    w.close()


def test_refused_state_change_of_a_held_job_changes_no_other_job(live):
    """`job alter --set state=RESTART_READY` on a FAILED job and a RUNNING one: refused, and the
    FAILED job is not retried either (it was, before the fix)."""
    c = live.client()
    c.add_app({"name": "bad", "executable": "/bin/false"})
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["30"]})
    [f] = c.add_jobs([{"name": "f", "application": "bad", "max_retries": 0}])
    [r] = c.add_jobs([{"name": "r", "application": "sleep"}])
    live.start_agent(cores="0,1")
    CL.wait_for(lambda: c.job(f)["state"] == "FAILED" and c.job(r)["state"] == "RUNNING", 30,
                what="one FAILED, one RUNNING")
    before = snapshot(c)
    with pytest.raises(IllegalTransition, match=r"held by agent .*only a kill"):
        c.alter_jobs({"ids": [f, r]}, state="RESTART_READY")
    time.sleep(1.0)
    assert snapshot(c) == before
    assert [e["to_state"] for e in c.job(f)["events"]] == ["READY", "FAILED"]


def test_illegal_changes_of_finished_and_running_jobs(live):
    """A finished job cannot be set back to RESTART_READY or RUNNING; a running job cannot be
    declared finished by a user; kill/retry of a finished job change nothing."""
    c = live.client()
    c.add_app({"name": "ok", "executable": "/bin/true"})
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["{s}"],
               "parameters": {"s": {"type": "float"}}})
    [done] = c.add_jobs([{"name": "done", "application": "ok"}])
    [run] = c.add_jobs([{"name": "run", "application": "sleep", "parameters": {"s": 3}}])
    live.start_agent(cores="0")
    CL.wait_for(lambda: c.job(done)["state"] == "JOB_FINISHED" and
                c.job(run)["state"] == "RUNNING", 30, what="one finished, one running")
    before = snapshot(c)
    for ids, state, pattern in [([done], "RESTART_READY", "illegal state change JOB_FINISHED"),
                                ([done], "RUNNING", "illegal state change JOB_FINISHED"),
                                ([run], "JOB_FINISHED", "illegal state change RUNNING"),
                                ([run], "RESTART_READY", "held by agent"),
                                ([done, run], "FAILED", "illegal state change")]:
        with pytest.raises(IllegalTransition, match=pattern):
            c.alter_jobs({"ids": ids}, state=state)
    assert c.kill_jobs({"ids": [done]}) == {"changed": [], "matched": 1}
    assert c.retry_jobs({"ids": [done, run]}) == {"changed": [], "matched": 2}
    assert snapshot(c) == before
    assert CL.wait_final(c, 1, 30, {"ids": [run]}) == {"JOB_FINISHED": 1}
    assert [e["to_state"] for e in c.job(done)["events"]] == ["READY", "JOB_FINISHED"]


def test_agent_backward_and_stale_reports_are_refused(live):
    """A greeted raw agent reports RUNNING, then STAGED_IN again (backwards), then the finish
    of an attempt it does not hold, then a finish twice: the illegal ones are refused, the
    finish is applied once."""
    c = live.client()
    c.add_app({"name": "ok", "executable": "/bin/true"})
    [job] = c.add_jobs([{"name": "j", "application": "ok"}])
    aid = f"raw-{uuid.uuid4().hex[:8]}"
    s = CL.zmq.Context.instance().socket(CL.zmq.DEALER)
    s.setsockopt(CL.zmq.LINGER, 0)
    s.setsockopt(CL.zmq.ROUTING_ID, aid.encode())
    CL.apply_client(s, CL.client_curve(live.home, live.address))
    s.connect(live.address)

    def recv():
        assert s.poll(5000), "no answer"
        return P.decode(s.recv())

    try:
        s.send(P.encode(P.HELLO, agent=aid, host="h", pid=1, site=None, pilot=None, cores=[0],
                        gpus=[], memory=2**30, time_left=None, running=[], ack=0))
        assert recv()[0] == P.WELCOME
        demand = {"cores": 1, "gpus": 0, "max_cores": 1, "max_gpus": 0, "time_left": None}
        s.send(P.encode(P.UPDATE, agent=aid, useq=1, updates=[], demand=demand, ack=0))
        tasks = []
        while not tasks:
            kind, m = recv()
            if kind == P.TASKS:
                tasks, seq = m["tasks"], m["seq"]
        att = tasks[0]["attempt"]
        none = {**demand, "cores": 0}

        def update(useq, items):
            s.send(P.encode(P.UPDATE, agent=aid, useq=useq, updates=items, demand=none, ack=seq))
            kind, m = recv()
            assert kind == P.TASKS and m["uack"] == useq
            return m["refused"]

        assert update(2, [{"job": job, "attempt": att,
                           "states": ["STAGED_IN", "PREPROCESSED", "RUNNING"]}]) == []
        back = {"job": job, "attempt": att, "states": ["STAGED_IN"]}
        stale = {"job": job, "attempt": att + 1, "states": ["EXECUTION_FINISHED"]}
        assert update(3, [back, stale]) == [{"job": job, "attempt": att},
                                            {"job": job, "attempt": att + 1}]
        assert c.job(job)["state"] == "RUNNING"
        fin = {"job": job, "attempt": att, "states": ["EXECUTION_FINISHED", "POSTPROCESSED",
                                                      "STAGED_OUT", "JOB_FINISHED"], "exit": 0}
        assert update(4, [fin]) == []
        assert update(5, [fin]) == [{"job": job, "attempt": att}]  # the lease is gone
        d = c.job(job)
        assert d["state"] == "JOB_FINISHED" and d["attempts"] == 1
        assert [e["to_state"] for e in d["events"]] == ["READY", "RUNNING", "JOB_FINISHED"]
    finally:
        s.close(linger=0)
