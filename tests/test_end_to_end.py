"""End to end: a real server process, real agent processes, real tasks, over real sockets."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ServerHandle, wait_for

PROBE = r"""
import os, sys
status = open("/proc/self/status").read()
allowed = [line.split(":", 1)[1].strip() for line in status.splitlines()
           if line.startswith("Cpus_allowed_list")][0]
with open("probe.txt", "w") as f:
    f.write(allowed + "\n")
    for k in ("PILOTFISH_CORES", "OMP_NUM_THREADS", "PILOTFISH_JOB_ID", "PILOTFISH_ATTEMPT"):
        f.write(k + "=" + os.environ.get(k, "") + "\n")
print("probe done")
"""


def parse_cpu_list(text: str) -> set[int]:
    cores: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def finished(c, ids):
    counts = c.counts({"ids": ids})
    return all(s in ("JOB_FINISHED", "FAILED", "USER_KILLED") for s in counts) and counts


def test_jobs_run_to_the_end_with_outputs_and_history(server: ServerHandle, tmp_path):
    """Jobs pass every state to JOB_FINISHED, write stdout in their workdir and record history."""
    c = server.client()
    c.add_app({"name": "echo", "executable": "/bin/echo", "args": ["hello", "{who}"],
               "parameters": {"who": {"type": "str"}}})
    ids = c.add_jobs([{"name": f"greet{i}", "application": "echo", "group_identifier": "g",
                       "parameters": {"who": f"w{i}"}} for i in range(20)])
    server.agent(work_root=tmp_path / "work")
    assert wait_for(lambda: finished(c, ids), 30) == {"JOB_FINISHED": 20}
    job = c.job(ids[3])
    assert job["workdir"] == f"g/greet3.{ids[3]}"
    assert (tmp_path / "work" / job["workdir"] / "job.out").read_text() == "hello w3\n"
    assert job["attempts"] == 1 and job["exit_code"] == 0 and job["agent"] is None
    # the history, read hop by hop, is the whole pipeline in order with no gaps
    path = []
    for e in job["events"]:
        if e["from_state"] and path:
            assert e["from_state"] == path[-1]
        path += [s for s in [e["from_state"], *(e["via"] or "").split(","), e["to_state"]]
                 if s and (not path or s != path[-1])]
    assert path == ["CREATED", "READY", "STAGED_IN", "PREPROCESSED", "RUNNING",
                    "EXECUTION_FINISHED", "POSTPROCESSED", "STAGED_OUT", "JOB_FINISHED"]
    assert job["started"] <= job["ended"]


def test_tasks_are_pinned_to_exactly_their_cores(server: ServerHandle, tmp_path):
    """Each task's affinity mask is exactly the cores it was given; OMP_NUM_THREADS matches."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    c = server.client()
    c.add_app({"name": "probe", "executable": sys.executable, "args": [str(script)]})
    ncores = len(os.sched_getaffinity(0))
    one = c.add_jobs([{"name": f"one{i}", "application": "probe"} for i in range(6)])
    wide = c.add_jobs([{"name": "wide", "application": "probe", "cpus_per_process": ncores}])
    server.agent(work_root=tmp_path / "work")
    assert wait_for(lambda: finished(c, one + wide), 60) == {"JOB_FINISHED": 7}
    for job_id, want in [(j, 1) for j in one] + [(wide[0], ncores)]:
        lines = (tmp_path / "work" / c.job(job_id)["workdir"] / "probe.txt").read_text().split()
        mask = parse_cpu_list(lines[0])
        env = dict(line.split("=", 1) for line in lines[1:])
        assert len(mask) == want, (job_id, mask)
        assert mask == parse_cpu_list(env["PILOTFISH_CORES"])
        assert env["OMP_NUM_THREADS"] == str(want)
        assert env["PILOTFISH_JOB_ID"] == str(job_id) and env["PILOTFISH_ATTEMPT"] == "1"


def test_tasks_are_born_pinned(server: ServerHandle, tmp_path):
    """A task that reads its mask within a millisecond of its exec (grep of /proc/self/status)
    already sees exactly its core: the agent pins the child before it runs, not after.
    (Pinning after ``posix_spawn`` returned let 12 of these 200 see the whole mask.)"""
    c = server.client()
    c.add_app({"name": "mask", "executable": "/bin/grep",
               "args": ["Cpus_allowed_list", "/proc/self/status"]})
    jobs = c.add_jobs([{"name": f"m{i}", "application": "mask"} for i in range(200)])
    server.agent(work_root=tmp_path / "work")
    assert wait_for(lambda: finished(c, jobs), 60) == {"JOB_FINISHED": 200}
    masks = [(tmp_path / "work" / c.job(j)["workdir"] / "job.out").read_text().split(":")[1]
             for j in jobs]
    assert [j for j, m in zip(jobs, masks) if len(parse_cpu_list(m.strip())) != 1] == []


def test_failures_are_retried_then_failed(server: ServerHandle, tmp_path):
    """A failing task is retried max_retries times, then FAILED, every attempt in the history."""
    c = server.client()
    c.add_app({"name": "fail", "executable": "/bin/sh", "args": ["-c", "echo doomed >&2; exit 3"]})
    [job] = c.add_jobs([{"name": "f", "application": "fail", "max_retries": 2}])
    server.agent(work_root=tmp_path / "work")
    assert wait_for(lambda: finished(c, [job]), 30) == {"FAILED": 1}
    d = c.job(job)
    assert d["attempts"] == 3 and d["retries"] == 2 and d["exit_code"] == 3
    assert "exit code 3" in d["message"] and "doomed" in d["message"]
    tos = [e["to_state"] for e in d["events"]]
    assert tos == ["READY", "RESTART_READY", "RESTART_READY", "FAILED"]
    assert all("RUN_FAILED" in (e["via"] or "") for e in d["events"][1:])


def test_wall_time_gives_run_timeout(server: ServerHandle, tmp_path):
    """A task past wall_time_minutes is killed and recorded as RUN_TIMEOUT."""
    c = server.client()
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["{s}"],
               "parameters": {"s": {"type": "float"}}})
    [job] = c.add_jobs([{"name": "long", "application": "sleep", "parameters": {"s": 60},
                         "wall_time_minutes": 0.02, "max_retries": 0}])
    server.agent(work_root=tmp_path / "work")
    assert wait_for(lambda: finished(c, [job]), 30) == {"FAILED": 1}
    d = c.job(job)
    assert "RUN_TIMEOUT" in d["events"][-1]["via"] and "wall time" in d["message"]
    assert d["ended"] - d["started"] < 10


def test_preprocess_postprocess_and_staging(server: ServerHandle, tmp_path):
    """Input is staged in, pre/post steps run in the workdir, outputs are staged out (into a
    folder of the job's own under output_url). Both live in the default data root."""
    (server.home / "data").mkdir(exist_ok=True)
    data = server.home / "data" / "in.txt"
    data.write_text("payload\n")
    out = server.home / "data" / "results"
    pre = tmp_path / "pre.sh"
    pre.write_text("#!/bin/sh\ncp in.txt pre.txt\n")
    post = tmp_path / "post.sh"
    post.write_text("#!/bin/sh\nwc -l < job.out > post.txt\n")
    for p in (pre, post):
        p.chmod(0o755)
    c = server.client()
    c.add_app({"name": "cat", "executable": "/bin/cat", "args": ["{f}"],
               "parameters": {"f": {"type": "path"}}, "preprocess": [str(pre)],
               "postprocess": [str(post)]})
    [job] = c.add_jobs([{"name": "staged", "application": "cat", "parameters": {"f": "pre.txt"},
                         "input_url": f"file://{data}", "output_url": str(out)}])
    server.agent(work_root=tmp_path / "work")
    assert wait_for(lambda: finished(c, [job]), 30) == {"JOB_FINISHED": 1}
    assert (out / f"staged.{job}" / "job.out").read_text() == "payload\n"
    assert (out / f"staged.{job}" / "post.txt").read_text().strip() == "1"


def test_pre_failure_and_missing_input(server: ServerHandle, tmp_path):
    """A missing input gives STAGE_IN_FAILED; a failing preprocess gives PREPROCESS_FAILED."""
    c = server.client()
    c.add_app({"name": "t", "executable": "/bin/true", "preprocess": ["/bin/false"]})
    c.add_app({"name": "t2", "executable": "/bin/true"})
    a = c.add_job(name="a", application="t", max_retries=0)
    b = c.add_job(name="b", application="t2", max_retries=0,
                  input_url=str(server.home / "data" / "missing.txt"))
    server.agent(work_root=tmp_path / "work")
    assert wait_for(lambda: finished(c, [a, b]), 30) == {"FAILED": 2}
    assert "PREPROCESS_FAILED" in c.job(a)["events"][-1]["via"]
    assert "STAGE_IN_FAILED" in c.job(b)["events"][-1]["via"]
    assert "stage-in failed" in c.job(b)["message"]


def test_parents_gate_children_and_failures_propagate(server: ServerHandle, tmp_path):
    """A child runs only after its parent finished; a failed parent fails its children."""
    c = server.client()
    c.add_app({"name": "ok", "executable": "/bin/true"})
    c.add_app({"name": "bad", "executable": "/bin/false"})
    p1 = c.add_job(name="p1", application="ok")
    p2 = c.add_job(name="p2", application="bad", max_retries=0)
    child = c.add_job(name="child", application="ok", parents=[p1])
    orphan = c.add_job(name="orphan", application="ok", parents=[p1, p2])
    grandchild = c.add_job(name="gc", application="ok", parents=[orphan])
    assert c.job(child)["state"] == "AWAITING_PARENTS"
    server.agent(work_root=tmp_path / "work")
    ids = [p1, p2, child, orphan, grandchild]
    wait_for(lambda: finished(c, ids), 30)
    st = {j: c.job(j) for j in ids}
    assert [st[j]["state"] for j in ids] == ["JOB_FINISHED", "FAILED", "JOB_FINISHED",
                                              "FAILED", "FAILED"]
    assert st[child]["started"] >= st[p1]["ended"]
    assert "parent" in st[orphan]["message"] and "parent" in st[grandchild]["message"]


def test_kill_stops_a_running_task(server: ServerHandle, tmp_path):
    """Killing a running job stops its process on the agent and frees the core."""
    c = server.client()
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["{s}"],
               "parameters": {"s": {"type": "float"}}})
    c.add_app({"name": "ok", "executable": "/bin/true"})
    job = c.add_job(name="long", application="sleep", parameters={"s": 61.4321})
    server.agent(work_root=tmp_path / "work", cores="0")
    wait_for(lambda: c.job(job)["state"] == "RUNNING", 30, what="RUNNING")
    assert c.kill_jobs({"ids": [job]})["changed"] == [job]
    wait_for(lambda: subprocess.run(["pgrep", "-f", "sleep 61.4321"]).returncode == 1, 10,
             what="the task process to be gone")
    after = c.add_job(name="after", application="ok")
    assert wait_for(lambda: finished(c, [after]), 20) == {"JOB_FINISHED": 1}
    assert c.job(job)["state"] == "USER_KILLED"


def test_sigterm_hands_tasks_back_without_using_retries(server: ServerHandle, tmp_path):
    """An agent stopped with SIGTERM hands its tasks back; another agent finishes them."""
    c = server.client()
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["{s}"],
               "parameters": {"s": {"type": "float"}}})
    ids = c.add_jobs([{"name": f"s{i}", "application": "sleep", "parameters": {"s": 2},
                       "max_retries": 0} for i in range(4)])
    first = server.agent(work_root=tmp_path / "w1")
    wait_for(lambda: c.counts({"ids": ids}).get("RUNNING"), 30, what="RUNNING")
    first.send_signal(signal.SIGTERM)
    assert first.wait(15) == 0
    counts = c.counts({"ids": ids})
    assert "RUNNING" not in counts and "FAILED" not in counts, counts
    server.agent(work_root=tmp_path / "w2")
    assert wait_for(lambda: finished(c, ids), 60) == {"JOB_FINISHED": 4}
    assert max(c.job(j)["attempts"] for j in ids) == 2


def test_a_task_stopped_just_after_its_start_is_handed_back_as_started(server: ServerHandle,
                                                                       tmp_path):
    """SIGTERM moments after a task starts (before its start is due for reporting): the
    goodbye still says it ran, so the job goes back as RESTART_READY with its attempt counted,
    not to the queue as if it never started (it has run: it may have written output)."""
    c = server.client()
    marker = tmp_path / "started"
    c.add_app({"name": "mark", "executable": "/bin/sh",
               "args": ["-c", f"touch {marker}; exec sleep 60"]})
    job = c.add_job(name="m", application="mark")
    a = server.agent(work_root=tmp_path / "w")
    wait_for(marker.exists, 30, interval=0.002, what="the task to start")
    a.send_signal(signal.SIGTERM)
    assert a.wait(15) == 0
    d = c.job(job)
    assert d["state"] == "RESTART_READY" and d["attempts"] == 1, d
    assert any("RUNNING" in [e["to_state"], *(e["via"] or "").split(",")]
               for e in d["events"]), d["events"]


def test_lost_agent_leases_expire_and_jobs_are_requeued(server: ServerHandle, tmp_path):
    """kill -9 of an agent: its leases expire after the lease period and the jobs run again."""
    c = server.client()
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["{s}"],
               "parameters": {"s": {"type": "float"}}})
    ids = c.add_jobs([{"name": f"s{i}", "application": "sleep", "parameters": {"s": 1.5}}
                      for i in range(2)])
    victim = server.agent(work_root=tmp_path / "w1")
    wait_for(lambda: c.counts({"ids": ids}).get("RUNNING") == 2, 30, what="RUNNING")
    victim.kill()
    t_kill = time.time()
    wait_for(lambda: c.counts({"ids": ids}).get("RESTART_READY") == 2, 15, what="requeue")
    delay = time.time() - t_kill
    assert delay < server.heartbeat * 3 + 2.5, delay
    lost = [a for a in c.agents(all=True) if a["state"] == "LOST"]
    assert len(lost) == 1
    server.agent(work_root=tmp_path / "w2")
    assert wait_for(lambda: finished(c, ids), 30) == {"JOB_FINISHED": 2}
    d = c.job(ids[0])
    assert d["attempts"] == 2 and d["retries"] == 1
    assert any("lost" in (e["message"] or "") for e in d["events"])


def test_server_restart_keeps_every_job(server: ServerHandle, tmp_path):
    """Jobs acknowledged before a server stop are all there after a restart, and then run."""
    c = server.client()
    c.add_app({"name": "ok", "executable": "/bin/true"})
    ids = c.add_jobs([{"name": f"j{i}", "application": "ok"} for i in range(300)])
    server.kill9()
    server.start()
    c = server.client()
    assert c.counts({"ids": ids}) == {"READY": 300}
    server.agent(work_root=tmp_path / "work")
    assert wait_for(lambda: finished(c, ids), 60) == {"JOB_FINISHED": 300}
    more = c.add_jobs([{"name": "late", "application": "ok"}])
    assert more[0] == ids[-1] + 1


def test_agent_leaves_when_idle_and_respects_its_walltime(server: ServerHandle, tmp_path):
    """An agent never takes a job longer than its time left, and leaves after its idle timeout."""
    c = server.client()
    c.add_app({"name": "ok", "executable": "/bin/true"})
    long = c.add_job(name="long", application="ok", wall_time_minutes=30)
    short = c.add_job(name="short", application="ok", wall_time_minutes=1)
    cmd = ["--walltime", "5", "--idle-timeout", "1.5"]
    p = server.agent(*cmd, work_root=tmp_path / "work")
    assert wait_for(lambda: finished(c, [short]), 30) == {"JOB_FINISHED": 1}
    assert p.wait(20) == 0
    assert c.job(long)["state"] == "READY"


def test_end_to_end_on_postgresql(home: Path, pg_url, tmp_path):
    """The same server runs on PostgreSQL: jobs finish and every transition is recorded."""
    s = ServerHandle(home, pg_url).start()
    try:
        c = s.client()
        c.add_app({"name": "ok", "executable": "/bin/true"})
        ids = c.add_jobs([{"name": f"j{i}", "application": "ok"} for i in range(100)])
        s.agent(work_root=tmp_path / "work")
        assert wait_for(lambda: finished(c, ids), 60) == {"JOB_FINISHED": 100}
        assert c.job(ids[-1])["events"][-1]["to_state"] == "JOB_FINISHED"
        assert "postgresql" in c.status()["db"]
    finally:
        s.stop_agents()
        s.stop()


def test_demo_runs_and_leaves_nothing_running(tmp_path):
    """`pilotfish demo` finishes its jobs, reports figures and leaves no process behind."""
    import json
    r = subprocess.run([sys.executable, "-m", "pilotfish", "demo", "--jobs", "60", "--json"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["states"] == {"JOB_FINISHED": 60}
    assert summary["seconds_to_first_task_done"] > 0 and summary["jobs_per_second"] > 0
    assert 0 < summary["efficiency"] <= 1.0 and 0 < summary["core_utilization"] <= 1.05
    assert summary["overhead_ms_per_task"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary home is gone
    left = subprocess.run(["pgrep", "-f", f"pilotfish --home {tmp_path}"], capture_output=True)
    assert left.returncode == 1, left.stdout


def test_demo_explains_busy_cores_and_work_in_words():
    """'cores busy 100%; efficiency 78%' read as a contradiction: say what each share is."""
    from pilotfish.demo import explain
    s = {"core_utilization": 1.0, "efficiency": 0.78, "cores": 2, "makespan_seconds": 6.41,
         "overhead_ms_per_task": 2.82}
    assert explain(s, 1000, 0.01) == [
        "  cores: a task was running on them 100% of the time",
        "  work: 78% of the cores' time was the tasks' own work (1000 x 0.01 s = 10.0 s of "
        "sleep on 2 cores in 6.41 s); the rest, 2.8 ms per task, went to starting and ending "
        "each task's process"]
    lines = explain({**s, "core_utilization": 0.9}, 1000, 0.01)
    assert "(idle 10%: waiting for the next task)" in lines[0] and "idle cores" in lines[1]


def test_restarted_server_readopts_running_tasks(server: ServerHandle, tmp_path):
    """kill -9 of the server mid-run: agents reconnect, report their tasks, and the restarted
    server adopts them; nothing is requeued or run twice."""
    c = server.client()
    c.add_app({"name": "sleep", "executable": "/bin/sleep", "args": ["{s}"],
               "parameters": {"s": {"type": "float"}}})
    ids = c.add_jobs([{"name": f"s{i}", "application": "sleep", "parameters": {"s": 4}}
                      for i in range(2)])
    server.agent(work_root=tmp_path / "work")
    wait_for(lambda: c.counts({"ids": ids}).get("RUNNING") == 2, 30, what="RUNNING")
    address = server.address
    server.kill9()
    server.start()
    assert server.address == address  # same port: the agent finds it again
    c = server.client()
    assert wait_for(lambda: finished(c, ids), 30) == {"JOB_FINISHED": 2}
    for j in ids:
        d = c.job(j)
        assert d["attempts"] == 1 and d["retries"] == 0
        assert [e["to_state"] for e in d["events"]] == ["READY", "RUNNING", "JOB_FINISHED"]


def test_the_random_port_is_outside_the_ephemeral_range(server: ServerHandle):
    """A server's random port comes from below the kernel's ephemeral ports, so no outgoing
    connection on the host can take it while a killed server comes back (a test of another
    process once got "Address already in use" there)."""
    from pilotfish.server.service import EPHEMERAL_PORTS, listen_ports
    port = int(server.address.rsplit(":", 1)[1])
    low, high = listen_ports()
    assert low <= port < high
    lo, hi = (int(x) for x in EPHEMERAL_PORTS.read_text().split())
    assert not lo <= port <= hi


@pytest.mark.parametrize("text, want", [
    ("32768\t60999\n", (22768, 32768)),    # Linux's default
    ("2048 60000", (60001, 65536)),          # no room below: above
    ("1024 65535", (49152, 65536)),          # no room at all: pyzmq's default
    ("garbage", (20000, 30000)), ("", (20000, 30000))])
def test_listen_ports(text, want):
    from pilotfish.server.service import listen_ports
    assert listen_ports(text) == want


def test_counts_kept_in_memory_match_the_database(server: ServerHandle, tmp_path):
    """The server's per-state counts (status, unfiltered counts) equal a fresh count from SQL
    after adds, runs, failures, kills, retries and removals, and after a restart."""
    c = server.client()
    c.add_app({"name": "ok", "executable": "/bin/true"})
    c.add_app({"name": "bad", "executable": "/bin/false"})
    ok = c.add_jobs([{"name": f"o{i}", "application": "ok"} for i in range(30)])
    bad = c.add_jobs([{"name": f"b{i}", "application": "bad", "max_retries": 1}
                      for i in range(5)])
    child = c.add_job(name="child", application="ok", parents=[bad[0]])
    server.agent(work_root=tmp_path / "work")
    wait_for(lambda: finished(c, ok + bad + [child]), 30)
    c.retry_jobs({"ids": bad[:2]})
    c.remove_jobs({"ids": ok[:7] + [bad[4]]})
    wait_for(lambda: finished(c, bad[:2]), 30)
    # ids make it a count from SQL (a states-only filter is answered from memory too)
    by_filter = c.counts({"state": [s for s in ("JOB_FINISHED", "FAILED", "READY",
                                                 "RESTART_READY", "RUNNING")],
                          "ids": ok + bad + [child]})
    assert c.counts() == by_filter == c.status()["counts"]
    assert by_filter == {"JOB_FINISHED": 23, "FAILED": 5}
    server.stop_agents()
    server.stop()
    server.start()
    assert server.client().counts() == by_filter


def test_gpus_are_handed_out_one_set_per_task(server: ServerHandle, tmp_path):
    """An agent with GPUs (CUDA_VISIBLE_DEVICES) gives each GPU task its own devices and keeps
    CPU-only tasks off them; a job needing more GPUs than any agent has stays queued."""
    script = tmp_path / "gpu.py"
    script.write_text("import os, time\n"
                      "open('gpu.txt', 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])\n"
                      "time.sleep(0.5)\n")
    c = server.client()
    c.add_app({"name": "gpu", "executable": sys.executable, "args": [str(script)]})
    one = c.add_jobs([{"name": f"g{i}", "application": "gpu", "gpus_per_process": 1}
                      for i in range(2)])
    cpu = c.add_job(name="cpu", application="gpu")
    huge = c.add_job(name="huge", application="gpu", gpus_per_process=3)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="5,7")
    log = open(tmp_path / "agent.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "pilotfish", "--home", str(server.home), "pilot",
                          "agent", "--server", server.address, "--idle-timeout", "0",
                          "--work-root", str(tmp_path / "work")], env=env, stdout=log,
                         stderr=log)
    server.agents.append(p)
    assert wait_for(lambda: finished(c, one + [cpu]), 30) == {"JOB_FINISHED": 3}
    seen = [(tmp_path / "work" / c.job(j)["workdir"] / "gpu.txt").read_text() for j in one]
    assert sorted(seen) == ["5", "7"]
    assert (tmp_path / "work" / c.job(cpu)["workdir"] / "gpu.txt").read_text() == ""
    assert c.job(huge)["state"] == "READY"
    [agent] = c.agents()
    assert agent["gpus"] == 2


def test_a_task_killed_from_outside_fails_after_a_short_grace(server: ServerHandle, tmp_path):
    """A task SIGTERMed by someone else (not the agent stopping) is a failure, reported after
    the grace in which a batch system's stop signal would have reached the agent too."""
    c = server.client()
    c.add_app({"name": "selfkill", "executable": "/bin/sh", "args": ["-c", "kill -TERM $$"]})
    job = c.add_job(name="k", application="selfkill", max_retries=0)
    server.agent(work_root=tmp_path / "work")
    wait_for(lambda: c.job(job)["state"] == "FAILED", 30, what="the job to fail")
    d = c.job(job)
    assert "signal 15" in d["message"] and d["exit_code"] == -15, d
