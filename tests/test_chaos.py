"""Chaos: no work is lost. Real servers, real agents, real task processes, killed for real.

* kill -9 of random agents at random times while they run 2,000 short jobs (and a few long ones
  whose tasks outlive the lease): every job ends JOB_FINISHED exactly once, no two attempts of
  one job run at the same time, killed attempts are counted, requeue comes within the lease
  timeout plus two heartbeats;
* SIGSTOP of an agent past its lease: its late update is refused, the job finishes once;
* kill -9 of the server while a client submits and agents run: every acknowledged job survives,
  agents keep their tasks, buffer their updates and the restarted server re-adopts them;
* kill -9 of the server during heavy writes: SQLite passes ``PRAGMA integrity_check``; on
  SQLite and PostgreSQL, job rows, events and the server's counts agree.

The tasks are ``tests/apps/attempt_log.py``: each attempt logs its start and end (or the signal
that stopped it) in its workdir, in one shared work root, so overlaps are read from the logs.
The machinery is in ``tests/apps/chaoslib.py`` (``bench/chaos.py`` runs the same at full size).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps"))
import chaoslib as CL  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def world(tmp_path):
    w = CL.World(tmp_path / "w", heartbeat=1.0).start_server()
    yield w
    w.close()


def test_kill9_agents_loses_no_job_and_runs_none_twice_at_once(world):
    """2,000 short jobs and 4 long ones on 4 agents; 10 agents killed with -9 at random times
    (the first two while they run a long job) and replaced."""
    r = CL.kill_agents_chaos(world, n_jobs=2000, n_agents=4, min_kills=10, n_long=4, seed=11)
    print({k: v for k, v in r.items() if k != "kill_log"})
    assert r["kills"] >= 10
    assert r["lost"] == 0 and r["states"] == {"JOB_FINISHED": r["n_jobs"]}
    assert r["jobs_not_finished_once"] == [], "a job without exactly one JOB_FINISHED event"
    assert r["jobs_without_log"] == []
    # no two attempts of one job ran at the same time -- orphaned tasks of killed agents included
    assert r["concurrent_duplicates"] == 0, r["duplicates"]
    assert r["unended_attempts"] == 0, "an attempt was SIGKILLed (no end line, end unknown)"
    # every job whose task was running on a killed agent ran again and says so
    assert r["problems"] == []
    assert r["jobs_hit_by_kills"] > 0 and r["hit_jobs_attempts_gt1"] == r["jobs_hit_by_kills"]
    assert r["hit_jobs_with_lost_event"] > 0
    # requeue within the lease timeout (3 heartbeats of silence) plus two heartbeats
    bound = world.lease_timeout + 2 * world.heartbeat
    d = r["requeue_delay"]  # per job: kill -> the job's RESTART_READY event
    assert d["n"] > 0 and d["worst"] <= bound, d
    k = r["lost_after_kill"]  # per kill: kill -> the server's "agent ... lost" (log line)
    assert r["kills_never_declared_lost"] == 0 and k["worst"] <= bound, k
    # the killed agents' tasks were stopped by their guard, not left to run on (a short one
    # may end by itself first)
    assert r["orphans"] > 0 and r["orphans_terminated"] > 0
    assert r["orphans_alive_1s_after_kill"] == 0, r["orphan_survival"]


def test_tasks_of_a_killed_agent_are_stopped_by_its_guard(world):
    """kill -9 of an agent: its running task gets SIGTERM from the agent's guard at once,
    long before the lease expires; the guard itself leaves."""
    import os
    import signal
    import time
    c = world.client()
    CL.add_attempt_app(c)
    a = world.start_agent(cores="0")
    [job] = c.add_jobs([{"name": "long", "application": "attempt", "parameters": {"d": 60}}])
    CL.wait_for(lambda: CL.read_attempts(world.work).get(job), 30, what="the task started")
    [att] = CL.read_attempts(world.work)[job]
    guards = [p for p in _children(a.pid) if "-c" in p.cmdline()]
    assert len(guards) == 1, "the agent has no guard process"
    t = time.time()
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    CL.wait_for(lambda: CL.read_attempts(world.work)[job][0].how == "term", 5,
                what="the orphaned task to be stopped")
    [att] = CL.read_attempts(world.work)[job]
    assert att.end - t < 1.0 < world.lease_timeout
    CL.wait_for(lambda: not guards[0].is_running() or guards[0].status() == "zombie", 5,
                what="the guard to leave")


def test_guard_fences_the_tasks_of_a_silent_agent_only(tmp_path):
    """The guard leaves a task alone while its agent keeps moving the fencing deadline (lease
    renewals), and SIGTERMs it once the last deadline has passed (a real Executor, guard and
    task; no server)."""
    import os
    import select
    import signal
    import time
    from pilotfish.pilot.executor import Executor
    ex = Executor([sorted(os.sched_getaffinity(0))[0]], [], tmp_path / "work",
                  watch=lambda fd, t: None, unwatch=lambda fd: None)
    ex.set_fence(time.monotonic() + 1.5, 0.2)
    ex.add({"job": 1, "attempt": 1, "name": "t", "argv": ["/bin/sleep", "60"], "env": {},
            "workdir": "t.1", "cores": 1, "gpus": 0})
    ex.start_ready(time.time())
    assert ex.started()  # its pid is back from the spawner thread
    [t] = ex.active.values()
    end = time.time() + 4.5  # three bounds, renewed every 0.5 s
    while time.time() < end:
        ex.set_fence(time.monotonic() + 1.5, 0.2)
        assert not select.select([t.pidfd], [], [], 0.5)[0], "fenced while renewed"
    silent = time.monotonic()
    deadline = ex.fence_at
    assert select.select([t.pidfd], [], [], 10)[0], "not fenced after the renewals stopped"
    took = time.monotonic() - silent
    ex.on_exit(t, time.time())
    assert t.exit == -signal.SIGTERM and 0.9 < took < 3, (t.exit, took)
    assert time.monotonic() >= deadline
    ex.stop_all()


def test_a_passed_fencing_deadline_is_never_moved(tmp_path):
    """An agent paused past its fencing deadline must not move it when it wakes up: its guard
    may have stopped the tasks already, or -- starved as long -- may read the new deadline
    first and never stop them while the server hands their jobs on. The executor refuses the
    move (the agent then fences), and the guard, let run again, stops the task (a real
    Executor, guard and task; the guard is paused with SIGSTOP)."""
    import os
    import select
    import signal
    import time
    import psutil
    from pilotfish.pilot.executor import Executor
    before = {p.pid for p in psutil.Process().children()}
    ex = Executor([sorted(os.sched_getaffinity(0))[0]], [], tmp_path / "work",
                  watch=lambda fd, t: None, unwatch=lambda fd: None)
    [guard] = [p for p in psutil.Process().children() if p.pid not in before]
    assert ex.set_fence(time.monotonic() + 0.5, 0.2)
    ex.add({"job": 1, "attempt": 1, "name": "t", "argv": ["/bin/sleep", "60"], "env": {},
            "workdir": "t.1", "cores": 1, "gpus": 0})
    ex.start_ready(time.time())
    assert ex.started()  # its pid is back from the spawner thread
    [t] = ex.active.values()
    time.sleep(0.1)  # the guard has read the task's pid
    guard.suspend()
    try:
        time.sleep(0.7)
        passed = ex.fence_at
        assert ex.set_fence(time.monotonic() + 30, 0.2) is False, "a passed deadline moved"
        assert ex.fence_at == passed
        assert ex.set_fence(time.monotonic() - 1, 0.2) is False
    finally:
        guard.resume()
    assert select.select([t.pidfd], [], [], 5)[0], "the guard did not stop the task"
    ex.on_exit(t, time.time())
    assert t.exit == -signal.SIGTERM
    ex.stop_all()  # "no fencing" is always accepted; then a deadline may be set again
    assert ex.fence_at == 0 and ex.set_fence(time.monotonic() + 5, 0.2)


def test_no_task_starts_past_the_fencing_deadline(tmp_path):
    """An agent held up inside its loop (a workdir mkdir on a loaded disk took seconds) must
    not start queued tasks, nor spawn a task's process, once its fencing deadline has passed:
    the server may already have given those jobs to another agent. The queue waits (the agent
    fences next); a process whose deadline passed while its task was being prepared is never
    spawned and its attempt fails with a plain message (a real Executor)."""
    import os
    import time
    from pilotfish.pilot.executor import Executor
    ex = Executor([sorted(os.sched_getaffinity(0))[0]], [], tmp_path / "work",
                  watch=lambda fd, t: None, unwatch=lambda fd: None)
    marker = tmp_path / "ran"
    spec = {"job": 1, "attempt": 1, "name": "t", "argv": ["/usr/bin/touch", str(marker)],
            "env": {}, "workdir": "t.1", "cores": 1, "gpus": 0}
    ex.spawn_deadline = lambda: time.monotonic() - 0.001
    ex.add(spec)
    ex.start_ready(time.time())
    assert len(ex.queue) == 1 and not ex.active
    # passes between the check before the task and the spawn of its process
    answers = iter([time.monotonic() + 60, time.monotonic() - 0.001])
    ex.spawn_deadline = lambda: next(answers)
    ex.start_ready(time.time())
    [u] = ex.take_updates(time.time())
    assert u["states"] == ["STAGED_IN", "PREPROCESSED", "RUN_FAILED"], u
    assert u["msg"].startswith("not started: no lease renewal"), u
    assert not ex.active and not ex.queue and ex.free_cores
    time.sleep(0.2)
    assert not marker.exists(), "the process was spawned"


def _children(pid):
    import psutil
    return psutil.Process(pid).children()


def test_sigstopped_agent_late_update_is_refused(world):
    """SIGSTOP an agent past its lease, let another agent finish the job, SIGCONT it: its late
    finish is refused, the job finished once (one JOB_FINISHED event, attempts 2)."""
    r = CL.sigstop_agent(world, task_seconds=0.5)  # ends before the guard would fence it
    print(r)
    assert r["finished_while_stopped"] and r["stopped_seconds"] > world.lease_timeout
    assert r["state"] == "JOB_FINISHED" and r["attempts"] == 2
    assert r["finish_events"] == 1 and r["lost_events"] == 1
    assert r["late_update_refused"] and r["refused_delta"] >= 1
    assert [(a, how) for a, how, _, _ in r["attempt_log"]] == [(1, "end"), (2, "end")]
    assert r["overlaps"] == 0 and not r["attempt1_alive_when_attempt2_ran"]
    assert r["agent_a_alive_again"]


def test_sigstopped_agent_is_fenced_before_its_job_runs_elsewhere(world):
    """SIGSTOP an agent whose task outlasts the lease: its guard stops the task before the
    server gives the job to agent B (fencing), so the two attempts never overlap; the job
    finishes once, on B; A, continued, is told its lease is gone and lives on."""
    r = CL.sigstop_agent(world, task_seconds=world.lease_timeout + 3)
    print(r)
    assert not r["attempt1_alive_when_attempt2_ran"] and r["overlaps"] == 0
    assert r["state"] == "JOB_FINISHED" and r["attempts"] == 2 and r["finish_events"] == 1
    [(a1, how1, start1, end1), (a2, how2, start2, _)] = r["attempt_log"]
    assert (a1, how1, a2, how2) == (1, "term", 2, "end") and end1 < start2, r["attempt_log"]
    assert r["agent_a_alive_again"]


def test_server_kill9_loses_no_acknowledged_job_and_readopts_tasks(tmp_path):
    """kill -9 the server 3 times while a client submits jobs in a loop and 2 agents run them
    (4 long tasks running each time): every acknowledged id exists afterwards, every job
    finished once, tasks running across a restart were re-adopted (attempts 1, no 'lost').

    3 s heartbeats: the server is down up to 2 s plus its start (up to ~1.5 s on a loaded
    machine), which must stay below the agents' fencing bound (2.25 heartbeats after their
    last renewal, at most half a heartbeat old), or they stop their tasks (test_partition.py)."""
    world = CL.World(tmp_path / "w", heartbeat=3.0).start_server()
    try:
        r = CL.server_restarts(world, restarts=3, n_agents=2, n_long=4)
    finally:
        world.close()
    print({k: v for k, v in r.items() if k != "kill_log"})
    assert r["restarts"] == 3 and r["missing_acked"] == 0, r["missing_examples"]
    assert r["states"] == {"JOB_FINISHED": r["jobs_in_db"]}
    assert r["jobs_not_finished_once"] == []
    assert r["tasks_running_across_restart"] >= 2 * r["restarts"]
    assert r["not_readopted"] == [], r["not_readopted"]
    assert r["updates_buffered_across_restart"] >= 1
    assert r["agents_survived"] == r["agents"] == r["agents_still_registered"]
    assert r["concurrent_duplicates"] == 0


def test_hello_claims_tasks_whose_final_update_is_not_sent_yet(tmp_path):
    """The agent's hello lists every job whose final update the server has not acknowledged,
    including a task that ended while an earlier update was still in flight (so its own update
    was not sent yet). Found by the server-restart chaos test: the restarted server took such a
    job back ('no longer holds it'), counted a failed attempt and ran the finished job again.

    A real Agent object, a real task process, a ROUTER standing in for the server."""
    import os
    import select
    import time
    import zmq
    from pilotfish import protocol as P
    from pilotfish.pilot.agent import Agent
    from pilotfish.pilot.resources import Resources
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/srv"
    router.bind(address)
    agent = Agent(address, Resources([sorted(os.sched_getaffinity(0))[0]], [], 2**30, None),
                  tmp_path / "work", heartbeat=1.0)
    try:
        ex = agent.ex
        ex.add({"job": 7, "attempt": 1, "name": "t", "argv": ["/bin/true"], "env": {},
                "workdir": "g/t.7", "cores": 1, "gpus": 0})
        ex.start_ready(time.time())
        # its end comes from its core's spawner thread, through the spawner's eventfd
        deadline = time.monotonic() + 10
        while ex.active:
            assert time.monotonic() < deadline, "the task did not end"
            if select.select([ex.spawner.fd], [], [], 0.1)[0]:
                ex.on_fd(ex.spawner.fd, None, time.time())
        assert not ex.active and [x.job for x in ex.reportable] == [7]
        agent.useq, agent.acked = 5, 4  # update 5 (a heartbeat) is in flight, unanswered
        agent.last_sent = time.time()   # ... and was sent just now: no heartbeat is due
        agent.send_update(time.time())  # not sent: one update in flight at most
        assert agent.useq == 5 and agent.unacked == []
        agent.hello()  # e.g. after the restarted server said 'say hello'
        assert router.poll(5000)
        _, frame = router.recv_multipart()
        kind, m = P.decode(frame)
        assert kind == P.HELLO
        assert {"job": 7, "attempt": 1} in m["running"], m["running"]
    finally:
        agent.close()
        router.close(linger=0)


def test_server_kill9_during_heavy_writes_sqlite(tmp_path):
    """kill -9 of the server 3 times during heavy writes (fake-exec agents, bulk adds): the
    SQLite file passes PRAGMA integrity_check each time; rows, events and counts agree."""
    w = CL.World(tmp_path / "w", heartbeat=1.0).start_server()
    try:
        r = CL.crash_during_writes(w, kills=3)
    finally:
        w.close()
    print(r)
    assert r["integrity_checks"] == ["ok"] * 3 and r["integrity_after_stop"] == "ok"
    _assert_consistent(r)


def test_server_kill9_during_heavy_writes_postgresql(tmp_path, pg_url):
    """The same on PostgreSQL: the server restarts each time; rows, events and counts agree."""
    w = CL.World(tmp_path / "w", db_url=pg_url, heartbeat=1.0).start_server()
    try:
        r = CL.crash_during_writes(w, kills=3)
    finally:
        w.close()
    print(r)
    assert r["db"] == "postgresql" and r["crashes"] == 3
    _assert_consistent(r)


def _assert_consistent(r):
    assert r["missing_acked"] == 0
    assert r["states"] == {"JOB_FINISHED": r["jobs_in_db"]}
    assert r["state_vs_last_event_mismatches"] == 0
    assert r["jobs_without_events"] == 0 and r["events_without_job"] == 0
    assert r["jobs_finished_twice"] == 0
    assert r["finished_rows"] == r["jobs_with_finish_event"] == r["jobs_in_db"]
    assert r["final_jobs_still_leased"] == 0
    assert r["server_counts_match_sql"], (r["server_counts"], r["sql_counts"])
