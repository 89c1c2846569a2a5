"""Fencing under a network cut and across server restarts: real server, real agents, real tasks.

Agent A reaches the server only through ``apps/netcut.BlackholeRelay``, a TCP relay on
127.0.0.1 that the test can turn into a black hole (a dead switch: it stops reading, writing and
forwarding on every connection, closes nothing, sends no RST and no FIN) and heal. The tasks log their own
start, end or stop, pid and agent (ppid) to a file outside any workdir, so overlaps are judged
from the tasks' own words. Each test prints its timeline (seconds from the cut or the kill).
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ServerHandle, pilotfish_cmd, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps"))
from netcut import BlackholeRelay  # noqa: E402

PY = sys.executable
TASK = r"""
import os, signal, sys, time
log, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
job, att = os.environ["PILOTFISH_JOB_ID"], os.environ["PILOTFISH_ATTEMPT"]
def line(kind):  # one write per line on O_APPEND: lines of concurrent attempts never mix
    os.write(fd, f"{kind} {job} {att} {time.time():.6f} {os.getpid()} {os.getppid()}\n".encode())
def stop(signum, _frame):
    line("term")
    os._exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
line("start")
time.sleep(seconds)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
line("end")
"""


# -- helpers ---------------------------------------------------------------------------------
def add_task_app(c, log: Path) -> None:
    script = log.parent / "task.py"
    script.write_text(TASK)
    c.add_app({"name": "long", "executable": PY, "args": ["-S", "-I", str(script), str(log),
                                                         "{d}"],
               "parameters": {"d": {"type": "float", "min": 0, "max": 600}}})


def read_log(log: Path) -> list[tuple]:
    """[(kind, job, attempt, time, pid, agent pid)] in the order written."""
    if not log.exists():
        return []
    return [(w[0], int(w[1]), int(w[2]), float(w[3]), int(w[4]), int(w[5]))
            for w in (line.split() for line in log.read_text().splitlines()) if w]


def attempts_of(log: Path, job: int) -> dict[int, dict]:
    """attempt -> {start, end, how, agent}: its start, its end (ran out or stopped), from the
    task's own lines."""
    out: dict[int, dict] = {}
    for kind, j, att, t, _pid, agent in read_log(log):
        if j != job:
            continue
        a = out.setdefault(att, {"agent": agent})
        if kind == "start":
            a["start"] = t
        else:
            a["end"], a["how"] = t, kind
    return out


def start_agent(home: Path, address: str, cores: str, work: Path,
                log: Path) -> subprocess.Popen:
    cmd = pilotfish_cmd(home, "pilot", "agent", "--server", address, "--idle-timeout", "0",
                        "--cores", cores, "--work-root", str(work))
    out = open(log, "ab")
    p = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    out.close()
    return p


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def log_times(path: Path, pattern: str) -> list[float]:
    """Wall-clock times of the log lines (``%(asctime)s`` format) that match ``pattern``."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            out.append(stamp.timestamp())
    return out


def two_cores() -> tuple[str, str]:
    cores = sorted(os.sched_getaffinity(0))
    return str(cores[0]), str(cores[-1])


def events(c, job: int) -> list[tuple[str, float, str | None]]:
    return [(e["to_state"], e["time"], e["message"]) for e in c.job(job)["events"]]


# -- the tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("heal", ["resume", "reset"])
def test_cut_agent_stops_its_task_before_the_job_runs_elsewhere(server: ServerHandle, tmp_path,
                                                                heal):
    """A black-holed network cut longer than the lease: agent A (behind the relay) stops its
    task before the server gives the job to agent B; nothing runs twice at once, the job
    finishes once (attempts 2), and A, once the cut heals, is welcomed again and runs work.
    The heal either resumes the old connections, whose buffered messages are then delivered
    late (ZeroMQ kept the dead TCP connection), or resets them (ZeroMQ reconnects)."""
    c = server.client()
    tlog = tmp_path / "tasks.log"
    add_task_app(c, tlog)
    lease = server.heartbeat * 3
    relay = BlackholeRelay(int(server.address.rsplit(":", 1)[1]))
    ca, cb = two_cores()
    alog, blog = tmp_path / "agent-a.log", tmp_path / "agent-b.log"
    a = start_agent(server.home, relay.address, ca, tmp_path / "work-a", alog)
    procs = [a]
    try:
        wait_for(lambda: len(c.agents()) == 1, 30, what="agent A")
        [aid] = [x["id"] for x in c.agents()]
        job = c.add_job(name="long", application="long", parameters={"d": 3 * lease},
                        max_retries=3)
        wait_for(lambda: attempts_of(tlog, job).get(1, {}).get("start"), 30,
                 what="attempt 1 started on A")
        time.sleep(0.3)
        t_cut = relay.blackhole()
        b = start_agent(server.home, server.address, cb, tmp_path / "work-b", blog)
        procs.append(b)
        wait_for(lambda: 2 in attempts_of(tlog, job), lease + 30, what="attempt 2 started on B")
        # keep the cut longer than the lease, then heal
        time.sleep(max(0.0, t_cut + lease + 1.0 - time.time()))
        t_heal = relay.heal(reset=heal == "reset")
        wait_for(lambda: c.job(job)["state"] == "JOB_FINISHED", 60, what="the job finished")
        t_finished = time.time()
        d = c.job(job)
        atts = attempts_of(tlog, job)
        evs = events(c, job)
        # A lives on and is welcomed again: stop B, give it a short job, it runs on A
        wait_for(lambda: any(x["id"] == aid for x in c.agents()), 30, what="A welcomed again")
        stop([b])
        after = c.add_job(name="after", application="long", parameters={"d": 0.1})
        wait_for(lambda: c.job(after)["state"] == "JOB_FINISHED", 30, what="A running work")
        [after_att] = attempts_of(tlog, after).values()
        a_alive = a.poll() is None
        fence_times = log_times(alog, r"fenced: tasks stopped")
        renew = [float(m) for m in re.findall(r"no lease renewal for ([0-9.]+) s",
                                                alog.read_text())]
        lost = [t for to, t, msg in evs if to == "RESTART_READY"]
        relet = [t for to, t, _ in evs if to == "RUNNING"]
        timeline = {"lease": lease, "cut": 0.0,
                    "last_renewal_before_cut": round(fence_times[0] - renew[0] - t_cut, 3)
                    if fence_times and renew else None,
                    "A_fences": round(fence_times[0] - t_cut, 3) if fence_times else None,
                    "attempt1_stopped": round(atts[1]["end"] - t_cut, 3),
                    "server_requeues": round(lost[0] - t_cut, 3) if lost else None,
                    "attempt2_starts_on_B": round(atts[2]["start"] - t_cut, 3),
                    "heal": round(t_heal - t_cut, 3),
                    "job_finished": round(t_finished - t_cut, 3)}
        print("timeline (s from the cut):", timeline)
        print("events:", [(to, round(t - t_cut, 3), msg) for to, t, msg in evs])
    finally:
        stop(procs)
        relay.close()
    assert atts[1]["agent"] == a.pid and atts[1]["how"] == "term", atts
    assert atts[2]["agent"] == b.pid and atts[2]["how"] == "end", atts
    assert atts[1]["end"] < atts[2]["start"], "attempt 2 began before attempt 1 was stopped"
    # A stopped it within the fencing bound of its last renewal, which was before the cut
    assert atts[1]["end"] - t_cut < lease, timeline
    assert d["state"] == "JOB_FINISHED" and d["attempts"] == 2 and set(atts) == {1, 2}
    assert [to for to, _, _ in evs].count("JOB_FINISHED") == 1
    assert [to for to, _, _ in evs] == ["READY", "RUNNING", "RESTART_READY", "RUNNING",
                                        "JOB_FINISHED"], evs
    assert t_heal - t_cut > lease
    assert a_alive and after_att["agent"] == a.pid and after_att["how"] == "end"
    assert "ignored a bad welcome" not in alog.read_text()


def test_short_server_restart_still_readopts_a_running_task(tmp_path, home, db_url):
    """kill -9 of the server and an at-once restart (shorter than the fencing bound, 2 s
    heartbeats): the agent keeps its task and the restarted server (a new epoch) adopts it:
    attempts 1, no requeue, the task ran to its end once."""
    server = ServerHandle(home, db_url, heartbeat=2.0).start()
    c = server.client()
    tlog = tmp_path / "tasks.log"
    add_task_app(c, tlog)
    ca, _ = two_cores()
    alog = tmp_path / "agent.log"
    a = start_agent(home, server.address, ca, tmp_path / "work", alog)
    try:
        wait_for(lambda: len(c.agents()) == 1, 30, what="the agent")
        job = c.add_job(name="long", application="long", parameters={"d": 8.0})
        wait_for(lambda: attempts_of(tlog, job).get(1, {}).get("start"), 30, what="started")
        time.sleep(0.5)
        epoch = c.status()["epoch"]
        server.kill9()
        t_kill = time.time()
        server.start()
        t_up = time.time()
        c = server.client()
        new_epoch = c.status()["epoch"]
        wait_for(lambda: c.job(job)["state"] == "JOB_FINISHED", 60, what="the job finished")
        d = c.job(job)
        atts = attempts_of(tlog, job)
        readopted = log_times(alog, r"the server restarted \(epoch")
        print("restart: down %.2f s; agent re-welcomed %.2f s after the kill; bound %.2f s"
              % (t_up - t_kill, readopted[0] - t_kill if readopted else -1, 2.0 * 2.25))
    finally:
        stop([a])
        server.stop()
    assert set(atts) == {1} and atts[1]["how"] == "end", atts
    assert d["attempts"] == 1 and d["retries"] == 0
    assert [e["to_state"] for e in d["events"]] == ["READY", "RUNNING", "JOB_FINISHED"]
    assert readopted and "fenced" not in alog.read_text()
    assert new_epoch == epoch + 1 and f"(epoch {epoch} -> {new_epoch})" in alog.read_text()


def test_a_busy_server_stops_no_task(tmp_path, home, db_url):
    """The server's loop is busy for longer than the fencing bound (0.5 s heartbeats: bound
    1.125 s; adding 60,000 jobs in one request holds it for seconds) while an agent runs a
    task: the link stays up (libzmq answers the agent's pings), so the agent keeps its task
    and the server, once it has read the agent's waiting messages, keeps its lease: one
    attempt, no fence. Before, every agent stopped its tasks on such a request."""
    server = ServerHandle(home, db_url, heartbeat=0.5).start()
    c = server.client(timeout=120)
    tlog = tmp_path / "tasks.log"
    add_task_app(c, tlog)
    c.add_app({"name": "idle", "executable": "/bin/true"})
    alog = tmp_path / "agent.log"
    a = start_agent(home, server.address, two_cores()[0], tmp_path / "work", alog)
    try:
        wait_for(lambda: len(c.agents()) == 1, 30, what="the agent")
        job = c.add_job(name="long", application="long", parameters={"d": 6.0})
        wait_for(lambda: attempts_of(tlog, job).get(1, {}).get("start"), 30, what="started")
        t0 = time.monotonic()
        # held back from the agent (they wait for a parent that never ends), so the server
        # only stores them
        c.kill_jobs({"ids": [c.add_job(name="gate", application="idle", parents=[job])]})
        parent = c.add_job(name="never", application="idle", parents=[job])
        c.add_jobs([{"name": f"b{i}", "application": "idle", "parents": [parent]}
                    for i in range(60_000)])
        busy = time.monotonic() - t0
        wait_for(lambda: c.job(job)["state"] == "JOB_FINISHED", 60, what="the job finished")
        d = c.job(job)
        atts = attempts_of(tlog, job)
        print(f"server busy {busy:.2f} s (bound 1.125 s, lease 1.5 s); attempts {d['attempts']}")
    finally:
        stop([a])
        server.stop()
    assert busy > 1.5, f"the server was not busy long enough ({busy:.2f} s) to show anything"
    assert set(atts) == {1} and atts[1]["how"] == "end", atts
    assert d["attempts"] == 1 and d["retries"] == 0
    assert "fenced" not in alog.read_text() and "no lease renewal" not in alog.read_text()


def test_long_server_outage_fences_the_task_and_the_job_finishes_once(tmp_path, home, db_url):
    """kill -9 of the server, down longer than the lease: the agent stops its task at the
    fencing bound of its last renewal; the restarted server (a new epoch) takes the job back
    when the agent's hello no longer claims it, runs it again, and it finishes once."""
    server = ServerHandle(home, db_url, heartbeat=1.0).start()
    c = server.client()
    tlog = tmp_path / "tasks.log"
    add_task_app(c, tlog)
    ca, _ = two_cores()
    alog = tmp_path / "agent.log"
    a = start_agent(home, server.address, ca, tmp_path / "work", alog)
    lease = 3.0
    try:
        wait_for(lambda: len(c.agents()) == 1, 30, what="the agent")
        job = c.add_job(name="long", application="long", parameters={"d": 2 * lease},
                        max_retries=3)
        wait_for(lambda: attempts_of(tlog, job).get(1, {}).get("start"), 30, what="started")
        time.sleep(0.5)
        server.kill9()
        t_kill = time.time()
        wait_for(lambda: attempts_of(tlog, job)[1].get("end"), lease, what="the task fenced")
        time.sleep(max(0.0, t_kill + lease + 1.0 - time.time()))
        server.start()
        t_up = time.time()
        c = server.client()
        wait_for(lambda: c.job(job)["state"] == "JOB_FINISHED", 60, what="the job finished")
        d = c.job(job)
        atts = attempts_of(tlog, job)
        print("outage: task stopped %.2f s after the kill, server up after %.2f s, attempt 2 "
              "started %.2f s after the kill" % (atts[1]["end"] - t_kill, t_up - t_kill,
                                                 atts[2]["start"] - t_kill))
    finally:
        stop([a])
        server.stop()
    assert atts[1]["how"] == "term" and atts[2]["how"] == "end", atts
    assert atts[1]["end"] - t_kill < 2.25 + 0.25 + 0.1 < t_up - t_kill
    assert atts[1]["end"] < atts[2]["start"]
    assert d["state"] == "JOB_FINISHED" and d["attempts"] == 2
    assert [e["to_state"] for e in d["events"]].count("JOB_FINISHED") == 1


class StandIn:
    """A ROUTER on ipc:// standing in for the server (epoch 7, 0.5 s heartbeats, 1.5 s lease):
    it welcomes hellos (echoing their useq), answers updates while ``answering``, and sends
    whatever task batches a test wants."""

    def __init__(self, where: Path) -> None:
        import zmq
        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"ipc://{where}/stand-in"
        self.sock.bind(self.address)
        self.identity = b""
        self.agent = ""
        self.answering = True
        self.welcome = True
        self.hellos: list[dict] = []
        self.useq = 0
        self.seq = 0
        self.answered_at = 0.0

    def pump(self, seconds: float) -> None:
        from pilotfish import protocol as P
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                continue
            self.identity, frame = self.sock.recv_multipart()
            kind, m = P.decode(frame)
            if kind == P.HELLO:
                self.agent = m["agent"]
                self.hellos.append(m)
                if self.welcome:
                    self.send(P.encode(P.WELCOME, agent=m["agent"], heartbeat=0.5, revoke=[],
                                       lease=1.5, epoch=7, uack=m["useq"]))
                    self.answered_at = time.monotonic()
            elif kind == P.UPDATE and self.answering:
                self.useq = m["useq"]
                self.send(P.encode(P.TASKS, seq=self.seq, tasks=[], refused=[],
                                   uack=self.useq, epoch=7))
                self.answered_at = time.monotonic()

    def send(self, frame: bytes) -> None:
        self.sock.send_multipart([self.identity, frame])

    def tasks(self, specs: list[dict], epoch: int | None = 7) -> None:
        from pilotfish import protocol as P
        self.seq += 1
        self.send(P.encode(P.TASKS, seq=self.seq, tasks=specs, refused=[], uack=self.useq,
                           epoch=epoch))

    def die(self) -> None:
        """The server process is gone: its socket closes (the agent's link drops)."""
        self.sock.close(linger=0)

    def revive(self) -> None:
        """A server on the same address again."""
        self.sock = self.ctx.socket(self.zmq.ROUTER)
        self.sock.setsockopt(self.zmq.LINGER, 0)
        self.sock.bind(self.address)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def test_agent_ignores_stale_task_batches_and_fences_when_renewals_stop(tmp_path):
    """A real agent and a stand-in server. Task batches of another epoch, and those that come
    while the agent waits for a welcome after fencing, are never started; bad welcomes (another
    agent, a zero heartbeat) are ignored; a server that stops answering while its link stays up
    is busy, not lost: the task runs on (the server reads the agent's messages before it counts
    a lease out); when the server then dies (its socket closes), the agent stops its task at
    once -- the fencing bound of the last answer is long past -- and says hello without
    claiming it; once welcomed again it runs new work."""
    from pilotfish import protocol as P
    tlog = tmp_path / "tasks.log"
    script = tmp_path / "task.py"
    script.write_text(TASK)
    srv = StandIn(tmp_path)
    alog = tmp_path / "agent.log"
    a = start_agent(tmp_path / "home", srv.address, two_cores()[0], tmp_path / "work", alog)

    def spec(job: int, seconds: float) -> dict:
        return {"job": job, "attempt": 1, "name": f"t{job}", "env": {}, "workdir": f"t/{job}",
                "argv": [PY, "-S", "-I", str(script), str(tlog), str(seconds)], "cores": 1,
                "gpus": 0}

    def started(job: int) -> bool:
        return any(k == "start" and j == job for k, j, *_ in read_log(tlog))

    try:
        deadline = time.monotonic() + 30
        while not srv.agent and time.monotonic() < deadline:
            srv.pump(0.1)
        assert srv.agent, "no hello"
        srv.pump(0.5)
        srv.tasks([spec(1, 30)], epoch=6)      # an earlier start of the server: ignored
        srv.send(P.encode(P.WELCOME, agent="someone-else", heartbeat=0.5, revoke=[], epoch=9))
        srv.send(P.encode(P.WELCOME, agent=srv.agent, heartbeat=0, revoke=[], epoch=9))
        srv.tasks([spec(2, 30)])               # epoch 7: runs
        t0 = time.monotonic()
        while not started(2) and time.monotonic() - t0 < 10:
            srv.pump(0.1)
        assert started(2) and not started(1)
        srv.pump(1.0)                          # renewed while it runs: not fenced
        assert attempts_of(tlog, 2)[1].get("end") is None
        srv.answering = srv.welcome = False    # the server falls silent, its link up: busy
        srv.pump(2.5)                          # twice the bound (1.125 s) and more
        busy_running = attempts_of(tlog, 2)[1].get("end") is None
        n_hellos = len(srv.hellos)
        srv.die()                              # now it is gone
        died = time.monotonic()
        while attempts_of(tlog, 2)[1].get("end") is None and time.monotonic() - died < 5:
            time.sleep(0.02)
        stopped = time.monotonic() - died
        srv.revive()
        srv.pump(0.6)
        srv.tasks([spec(3, 30)])               # while it waits for a welcome: ignored
        srv.pump(1.0)
        again = srv.hellos[n_hellos:]
        srv.answering = srv.welcome = True
        # its next hello comes after its backoff: up to 8 heartbeats on a connection that
        # stays up (a real server answers every hello it reads; this one dropped them)
        n_hellos = len(srv.hellos)
        t0 = time.monotonic()
        while len(srv.hellos) == n_hellos and time.monotonic() - t0 < 0.5 * 8 + 2:
            srv.pump(0.1)
        srv.pump(1.0)
        srv.tasks([spec(4, 0.1)])
        t0 = time.monotonic()
        while not attempts_of(tlog, 4).get(1, {}).get("end") and time.monotonic() - t0 < 10:
            srv.pump(0.1)
        print(f"busy server: task ran on; dead server: task stopped {stopped:.3f} s after "
              "its socket closed")
        atts = {j: attempts_of(tlog, j) for j in (1, 2, 3, 4)}
        alive = a.poll() is None
    finally:
        stop([a])
        srv.close()
    text = alog.read_text()
    assert atts[1] == {} and atts[3] == {}, atts
    assert busy_running, atts
    assert atts[2][1]["how"] == "term" and stopped < 0.6 + 0.125 + 0.5, (atts, stopped)
    assert again and all({"job": 2, "attempt": 1} not in h["running"] for h in again)
    assert atts[4][1]["how"] == "end" and alive
    assert "ignored a task batch of server epoch 6" in text
    assert text.count("ignored a bad welcome") == 2
    assert "ignored 1 tasks sent before this agent fenced" in text


def test_cut_between_fence_and_lease_hands_the_job_back_once(tmp_path, home, db_url):
    """A cut longer than the fencing bound but shorter than the lease (2 s heartbeats: bound
    4.5 s, lease 6 s after the last renewal): the agent stops its task; at the heal its hello
    no longer claims the job, so the server (whose lease had not run out) takes it back at once,
    counted once, and the job runs again and finishes once."""
    server = ServerHandle(home, db_url, heartbeat=2.0).start()
    c = server.client()
    tlog = tmp_path / "tasks.log"
    add_task_app(c, tlog)
    relay = BlackholeRelay(int(server.address.rsplit(":", 1)[1]))
    alog = tmp_path / "agent.log"
    a = start_agent(home, relay.address, two_cores()[0], tmp_path / "work", alog)
    try:
        wait_for(lambda: len(c.agents()) == 1, 30, what="the agent")
        job = c.add_job(name="long", application="long", parameters={"d": 8.0}, max_retries=3)
        wait_for(lambda: attempts_of(tlog, job).get(1, {}).get("start"), 30, what="started")
        time.sleep(0.3)
        t_cut = relay.blackhole()
        wait_for(lambda: attempts_of(tlog, job)[1].get("end"), 8, what="the task fenced")
        t_heal = relay.heal()
        wait_for(lambda: c.job(job)["state"] == "JOB_FINISHED", 60, what="the job finished")
        d = c.job(job)
        atts = attempts_of(tlog, job)
        evs = events(c, job)
        print("cut: task stopped %.2f s after the cut, heal at %.2f s; events %s" % (
            atts[1]["end"] - t_cut, t_heal - t_cut,
            [(to, round(t - t_cut, 2), m) for to, t, m in evs]))
    finally:
        stop([a])
        relay.close()
        server.stop()
    assert atts[1]["how"] == "term" and atts[2]["how"] == "end" and set(atts) == {1, 2}
    assert atts[1]["end"] < atts[2]["start"]
    assert d["attempts"] == 2 and d["retries"] == 1
    assert [(to, m and m.split(" ", 2)[-1]) for to, _, m in evs] == [
        ("READY", None), ("RUNNING", None), ("RESTART_READY", "no longer holds it"),
        ("RUNNING", None), ("JOB_FINISHED", None)], evs


def test_fencing_fields_are_checked_and_a_stale_epoch_changes_nothing(server: ServerHandle):
    """The new optional fields are type- and range-checked like every other; an update that
    names another epoch than the server's is answered "say hello" and applies nothing; the
    welcome echoes the hello's useq and names the epoch."""
    import zmq
    from conftest import curve_socket
    from pilotfish import protocol as P
    from pilotfish.errors import ProtocolError
    hello = dict(agent="a" * 32, host="h", pid=1, cores=[0], gpus=[], memory=1, running=[],
                 ack=0)
    for bad in ({"useq": "1"}, {"useq": True}, {"useq": 2**63}):
        try:
            P.decode(P.encode(P.HELLO, **hello, **bad))
        except ProtocolError:
            continue
        raise AssertionError(f"accepted {bad}")
    for kind, fields in ((P.UPDATE, dict(agent="a", useq=1, updates=[], demand={}, ack=0)),
                         (P.BYE, dict(agent="a", useq=1, updates=[], released=[])),
                         (P.TASKS, dict(seq=1, tasks=[], refused=[], uack=0))):
        for bad in ("7", 2**31, -2**31 - 1, 1.5, True):
            try:
                P.decode(P.encode(kind, **fields, epoch=bad))
            except ProtocolError:
                continue
            raise AssertionError(f"{kind} accepted epoch {bad!r}")
    c = server.client()
    ctx = zmq.Context.instance()
    s = curve_socket(ctx.socket(zmq.DEALER), server.address)
    s.setsockopt(zmq.ROUTING_ID, hello["agent"].encode())
    s.setsockopt(zmq.LINGER, 0)
    s.connect(server.address)
    try:
        s.send(P.encode(P.HELLO, **hello, useq=41))
        assert s.poll(10_000)
        kind, w = P.decode(s.recv())
        assert kind == P.WELCOME and w["uack"] == 41 and w["epoch"] == c.status()["epoch"]
        demand = {"cores": 0, "gpus": 0, "max_cores": 1, "max_gpus": 0, "time_left": None}
        before = c.status()["stats"]
        s.send(P.encode(P.UPDATE, agent=hello["agent"], useq=42, updates=[], demand=demand,
                        ack=0, epoch=w["epoch"] - 1))
        assert s.poll(10_000)
        kind, m = P.decode(s.recv())
        assert kind == P.ERROR and "say hello" in m["error"], m
        assert c.status()["stats"]["updates"] == before["updates"]
        s.send(P.encode(P.UPDATE, agent=hello["agent"], useq=43, updates=[], demand=demand,
                        ack=0, epoch=w["epoch"]))
        assert s.poll(10_000)
        kind, m = P.decode(s.recv())
        assert kind == P.TASKS and m["uack"] == 43 and m["epoch"] == w["epoch"], m
    finally:
        s.close()
