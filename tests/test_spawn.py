"""Starting task processes on pinned spawner threads (pilotfish.pilot.spawn), and the
executor's tasks while their process is being started: real processes, real /proc."""
from __future__ import annotations

import os
import select
import signal
import time

import pytest

from pilotfish.pilot.executor import Executor
from pilotfish.pilot.spawn import Request, Spawner, TooLate, spawn

ENV = {"PATH": "/usr/bin:/bin", "ONE": "1"}


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_spawn_runs_in_its_directory_with_its_files_argv_and_environment(tmp_path):
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pid = spawn(["/usr/bin/env"], ENV,
                [("fchdir", d), ("open", 0, "/dev/null", os.O_RDONLY, 0),
                 ("open", 1, "out", os.O_WRONLY | os.O_CREAT, 0o644)])
    finally:
        os.close(d)
    assert wait(pid) == 0
    assert sorted((tmp_path / "out").read_text().split()) == ["ONE=1", "PATH=/usr/bin:/bin"]
    pid = spawn(["/bin/pwd"], ENV, [("chdir", str(tmp_path)),
                                    ("open", 1, "pwd", os.O_WRONLY | os.O_CREAT, 0o644)])
    assert wait(pid) == 0
    assert (tmp_path / "pwd").read_text().strip() == str(tmp_path)
    assert os.getcwd() != str(tmp_path)  # never the agent's own directory


def test_spawn_gives_a_new_session_default_sigpipe_and_no_blocked_signals():
    """Python ignores SIGPIPE (and SIGXFSZ); a task must not inherit that -- `yes | head` in a
    task's script would spin on EPIPE. os.posix_spawn without setsigdef passes it on."""
    pid = spawn(["/bin/sleep", "5"], ENV, [])
    try:
        st = status(pid)
        ignored, blocked = int(st["SigIgn"], 16), int(st["SigBlk"], 16)
        assert not ignored & (1 << (signal.SIGPIPE - 1)), st["SigIgn"]
        assert not ignored & (1 << (signal.SIGXFSZ - 1)), st["SigIgn"]
        assert blocked == 0
        assert os.getsid(pid) == pid
    finally:
        os.kill(pid, signal.SIGKILL)
        wait(pid)


@pytest.mark.parametrize("argv,env,actions,exc,words", [
    (["/nonexistent/prog"], ENV, [], OSError, "No such file"),
    (["/bin/true", "a\x00b"], ENV, [], ValueError, "null byte in argv"),
    (["/bin/true", 5], ENV, [], TypeError, "int"),
    ([], ENV, [], ValueError, "must not be empty"),
    (["/bin/true"], {"A=B": "1"}, [], ValueError, "illegal environment variable name"),
    (["/bin/true"], {"": "1"}, [], ValueError, "illegal environment variable name"),
    (["/bin/true"], {"A": "x\x00y"}, [], ValueError, "null byte in env"),
    (["/bin/true"], {"A": 1}, [], TypeError, "int"),
    (["/bin/true"], ENV, [("fchdir", 987)], OSError, "Bad file descriptor"),
    ("/bin/true", ENV, [], TypeError, "argv must be a list, not str"),
    (7, ENV, [], TypeError, "argv must be a list, not int"),
])
def test_spawn_refuses_what_cannot_start(argv, env, actions, exc, words):
    with pytest.raises(exc, match=words):
        spawn(argv, env, actions)


def test_spawner_children_are_born_on_the_requested_cores(tmp_path):
    """The child reads its own mask before anything else could change it: grep of
    /proc/self/status, run on each core in turn."""
    own = os.sched_getaffinity(0)
    sp = Spawner(own, None)
    try:
        for core in sorted(own):
            out = tmp_path / f"mask.{core}"
            sp.submit(Request(None, core, ["/bin/grep", "Cpus_allowed_list", "/proc/self/status"],
                              ENV, [("open", 1, str(out), os.O_WRONLY | os.O_CREAT, 0o644)],
                              frozenset([core]), None))
            assert sp.wait(10)
            [req], ended = sp.done()
            assert req.error is None and req.pid and req.pidfd is not None
            assert wait(req.pid) == 0
            os.close(req.pidfd)
            assert out.read_text().split()[-1] == str(core)
            # the core's thread saw it end, and says so (the loop watches no such pidfd)
            until = time.monotonic() + 5
            while not ended and time.monotonic() < until:
                select.select([sp.fd], [], [], 0.1)
                ended += sp.done()[1]
            assert ended == [req]
        assert os.sched_getaffinity(0) == own  # the caller's thread is never pinned
    finally:
        sp.stop()


def test_spawner_tells_the_guard_and_refuses_a_start_past_its_deadline(tmp_path):
    r, w = os.pipe()
    sp = Spawner(os.sched_getaffinity(0), w)
    try:
        sp.submit(Request("late", None, ["/bin/true"], ENV, [], None, time.monotonic() - 1))
        sp.submit(Request("ok", None, ["/bin/true"], ENV, [], None, time.monotonic() + 60))
        assert sp.wait(10)
        assert select.select([sp.fd], [], [], 0)[0]  # the loop is woken
        started, ended = sp.done()
        done = {q.task: q for q in started}
        assert ended == []  # (no cores: the loop watches their pidfds)
        assert not select.select([sp.fd], [], [], 0)[0] and sp.pending == 0
        assert isinstance(done["late"].error, TooLate) and done["late"].pid is None
        ok = done["ok"]
        assert wait(ok.pid) == 0
        os.close(ok.pidfd)
        assert os.read(r, 100) == b"+%d\n" % ok.pid  # the late one was never started
    finally:
        sp.stop()
        os.close(r)
        os.close(w)


def _executor(tmp_path, ncores=1):
    watched: dict = {}
    ex = Executor(sorted(os.sched_getaffinity(0))[:ncores], [], tmp_path / "work",
                  watch=lambda fd, t: watched.__setitem__(fd, t),
                  unwatch=lambda fd: watched.pop(fd, None))
    return ex, watched


def _task(job, argv, **kw):
    return {"job": job, "attempt": 1, "name": f"t{job}", "argv": argv, "env": {},
            "workdir": f"w/t.{job}", "cores": 1, "gpus": 0, **kw}


def test_a_task_cancelled_while_starting_is_killed_and_frees_its_core(tmp_path):
    """start_ready only asks a spawner thread; the pid comes back at the next look at the
    eventfd. A cancel in between cannot kill a pid it does not have: the process is killed
    as it comes back, and the core is freed only once it has been reaped."""
    ex, watched = _executor(tmp_path)
    try:
        ex.add(_task(1, ["/bin/sleep", "60"]))
        ex.start_ready(time.time())
        [t] = ex.active.values()
        assert t.spawning and t.pid is None
        assert ex.cancel(1, 1)
        assert ex.active and not ex.free_cores  # not freed: its process may be starting
        assert ex.started()
        assert t.pid is not None and t.pidfd not in watched  # (its core's thread waits)
        assert select.select([t.pidfd], [], [], 5)[0], "not killed"
        # the end comes from its core's thread, through the spawner's eventfd
        _loop(ex, watched, lambda: not ex.active)
        assert len(ex.free_cores) == 1
        assert ex.take_updates(time.time(), True) == []  # a cancelled task reports nothing
    finally:
        ex.stop_all()


def test_stop_all_stops_tasks_still_starting(tmp_path):
    ex, watched = _executor(tmp_path, ncores=2)
    try:
        for j in (1, 2):
            ex.add(_task(j, ["/bin/sleep", "60"]))
        ex.start_ready(time.time())
        ts = list(ex.active.values())
        assert all(t.spawning for t in ts)
        held = ex.stop_all(grace=1.0)
        assert sorted(h["job"] for h in held) == [1, 2]
        assert not ex.active and sorted(ex.free_cores) == sorted(os.sched_getaffinity(0))[:2]
        assert all(t.pid is None for t in ts)
        assert set(watched) == {ex.spawner.fd}
    finally:
        ex.stop_all()


def test_a_task_that_cannot_start_fails_with_why(tmp_path):
    ex, watched = _executor(tmp_path)
    try:
        ex.add(_task(1, ["/nonexistent/prog"]))
        ex.add(_task(2, ["/bin/true", "a\x00b"]))
        ex.start_ready(time.time())
        assert ex.started()
        ex.start_ready(time.time())
        assert ex.started()
        ups = {u["job"]: u for u in ex.take_updates(time.time(), True)}
        assert ups[1]["states"][-1] == "RUN_FAILED" and "RUNNING" not in ups[1]["states"]
        assert ups[1]["msg"] == "cannot start /nonexistent/prog: No such file or directory"
        assert ups[2]["states"][-1] == "RUN_FAILED"
        assert "null byte" in ups[2]["msg"]
        assert len(ex.free_cores) == 1 and not ex.active
    finally:
        ex.stop_all()


def test_without_glibc_2_29_the_spawning_thread_enters_the_directory_alone(tmp_path,
                                                                           monkeypatch):
    """glibc before 2.29 has no posix_spawn_file_actions_addfchdir_np: the spawning thread
    takes a working directory of its own (unshare(CLONE_FS)) and enters the workdir itself.
    The process's -- every other thread's -- working directory does not move."""
    import threading
    from pilotfish.pilot import spawn as S
    monkeypatch.setattr(S, "_NP", False)
    before = os.getcwd()
    out: dict = {}

    def run():
        d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            out["pid"] = S.spawn(["/bin/pwd"], ENV, [
                ("fchdir", d), ("open", 1, "pwd", os.O_WRONLY | os.O_CREAT, 0o644)])
            with pytest.raises(ValueError, match="first spawn action"):
                S.spawn(["/bin/pwd"], ENV, [("open", 0, "/dev/null", os.O_RDONLY, 0),
                                            ("chdir", "/")])
        except BaseException as exc:  # noqa: BLE001 -- reported by the test's thread
            out["error"] = exc
        finally:
            os.close(d)

    th = threading.Thread(target=run)
    th.start()
    th.join(10)
    assert "error" not in out, out.get("error")
    assert wait(out["pid"]) == 0
    assert (tmp_path / "pwd").read_text().strip() == str(tmp_path)
    assert os.getcwd() == before


# -- chained starts: a core's next task starts on its thread when the process before ends --
def _loop(ex, watched, until, seconds=10.0):
    """The agent's loop, minus the server: poll the watched descriptors, hand them to the
    executor, start what is ready, until ``until()`` is true."""
    deadline = time.monotonic() + seconds
    while not until():
        assert time.monotonic() < deadline, "timed out"
        ex.start_ready(time.time())
        for fd in select.select(list(watched), [], [], 0.05)[0]:
            if fd in watched:
                ex.on_fd(fd, watched[fd], time.time())


def _ends(ex):
    return {u["job"]: u for u in ex.take_updates(time.time(), True) if u["end"] is not None}


def _sleeper_then_true(ex):
    """Task 1 (sleep 0.3 s) started on a core, task 2 (/bin/true) queued behind it: task 1."""
    ex.add(_task(1, ["/bin/sleep", "0.3"]))
    ex.add(_task(2, ["/bin/true"]))
    ex.start_ready(time.time())
    assert ex.started()
    return ex.active[1]


def test_the_next_task_of_a_core_starts_on_its_thread_when_the_process_before_ends(tmp_path):
    """A one-core task in its last process (the run step, nothing after it): the next queued
    one-core task is handed to that core's spawner thread at once and started there the
    moment the process before it ends -- no look at the loop in between -- and never while
    it still runs."""
    ex, watched = _executor(tmp_path)
    try:
        t1 = _sleeper_then_true(ex)
        ex.start_ready(time.time())  # the core is busy: task 2 waits on its thread
        [c] = t1.cores
        t2 = ex.chained[c]
        assert t2.job == 2 and t2.spawning and t2.cores == [c] and not ex.queue
        assert select.select([t1.pidfd], [], [], 5)[0], "task 1 did not end"
        # only the spawner's eventfd: nothing reaped, nothing asked
        assert select.select([ex.spawner.fd], [], [], 5)[0], "task 2 was not started"
        assert ex.started()
        assert t2.start is not None and t1.pid is None  # (its end came with the start)
        _loop(ex, watched, lambda: not ex.active)
        ends = _ends(ex)
        assert ends[1]["exit"] == 0 and ends[2]["exit"] == 0
        assert ends[2]["start"] >= ends[1]["end"] - 0.05  # never on the core at once
        assert ex.free_cores == [c] and not ex.chained and not ex.run_last
        assert ex.spawner.pending == 0
    finally:
        ex.stop_all()


def test_a_task_waiting_behind_a_long_one_moves_to_a_core_that_frees(tmp_path):
    """Chained tasks follow queue order onto busy cores; when the process before one runs
    long and another core frees, it is withdrawn from that thread and starts on the free
    core: three short tasks end while the long one still runs."""
    ex, watched = _executor(tmp_path, ncores=2)
    try:
        ex.add(_task(1, ["/bin/sleep", "30"]))
        ex.add(_task(2, ["/bin/sleep", "0.3"]))
        ex.start_ready(time.time())
        assert ex.started()
        for j in (3, 4, 5):
            ex.add(_task(j, ["/bin/true"]))
        ex.start_ready(time.time())
        assert len(ex.chained) == 2  # one behind each
        _loop(ex, watched, lambda: set(ex.active) == {1})
        ends = _ends(ex)
        assert sorted(ends) == [2, 3, 4, 5] and all(u["exit"] == 0 for u in ends.values())
        t1 = ex.active[1]
        assert t1.pid is not None and not ex.chained
        assert ex.free_cores and t1.cores[0] not in ex.free_cores
        assert ex.spawner.pending == 0
    finally:
        ex.stop_all()


def test_a_chained_task_cancelled_or_stopped_never_starts(tmp_path):
    """A task waiting behind a core's process is taken back from its thread: a cancel
    releases it (the core stays the running task's), stop_all hands it back with the rest at
    once (its thread would otherwise wait for the running process)."""
    ex, watched = _executor(tmp_path)
    try:
        for j, argv in ((1, ["/bin/sleep", "30"]), (2, ["/bin/touch", "started"]),
                        (3, ["/bin/touch", "started"])):
            ex.add(_task(j, argv))
        ex.start_ready(time.time())
        assert ex.started()
        ex.start_ready(time.time())
        [c] = ex.active[1].cores
        assert ex.chained[c].job == 2
        assert ex.cancel(2, 1)
        assert 2 not in ex.active and not ex.chained and not ex.free_cores
        ex.start_ready(time.time())
        assert ex.chained[c].job == 3
        t0 = time.monotonic()
        held = ex.stop_all(grace=1.0)
        assert time.monotonic() - t0 < 3
        assert sorted(h["job"] for h in held) == [1, 3]
        assert not ex.active and not ex.chained and ex.free_cores == [c]
        assert ex.spawner.pending == 0
        time.sleep(0.3)
        assert not list((tmp_path / "work").rglob("started"))  # neither ever ran
    finally:
        ex.stop_all()


def test_a_chained_start_asks_the_fencing_deadline_of_its_moment(tmp_path):
    """A chained task may wait as long as the process before it runs: its thread asks the
    agent's fencing deadline when the core frees, not the one of the moment it was queued.
    Renewed meanwhile: it starts; passed: it never starts and fails as not started."""
    ex, watched = _executor(tmp_path)
    deadline = {"at": time.monotonic() + 0.2}
    ex.spawn_deadline = lambda: deadline["at"]
    try:
        for renewed, (j, k) in ((True, (1, 2)), (False, (3, 4))):
            ex.add(_task(j, ["/bin/sleep", "0.5"]))
            ex.add(_task(k, ["/bin/touch", "started"]))
            ex.start_ready(time.time())
            assert ex.started()
            ex.start_ready(time.time())
            assert [t.job for t in ex.chained.values()] == [k]
            deadline["at"] = time.monotonic() + (60 if renewed else -1)
            _loop(ex, watched, lambda: not ex.active)
            ends = _ends(ex)
            assert ends[j]["exit"] == 0
            if renewed:
                assert ends[k]["exit"] == 0 and "RUNNING" in ends[k]["states"]
                assert (tmp_path / f"work/w/t.{k}/started").exists()
                deadline["at"] = time.monotonic() + 0.2
            else:
                assert ends[k]["states"][-1] == "RUN_FAILED"
                assert "RUNNING" not in ends[k]["states"]
                assert ends[k]["msg"].startswith("not started: no lease renewal")
                assert not (tmp_path / f"work/w/t.{k}/started").exists()
    finally:
        ex.stop_all()


def test_a_thread_that_cannot_wait_for_its_process_leaves_it_to_the_loop(tmp_path, monkeypatch):
    """Out of descriptors for its own copy of the pidfd, a core's thread does not wait for
    the process: the loop watches its pidfd, as for a process with no cores, no task is
    chained behind it, and the task ends as any other (nothing is lost or left running)."""
    from pilotfish.pilot import spawn as S

    def no_dup(fd):
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(S, "_dup", no_dup)
    ex, watched = _executor(tmp_path)
    try:
        t = _sleeper_then_true(ex)
        assert t.pidfd in watched
        ex.start_ready(time.time())
        # nothing waits behind it: its thread would start the next one while it runs
        assert not ex.chained and [q.job for q in ex.queue] == [2]
        _loop(ex, watched, lambda: not ex.active and not ex.queue)
        ends = _ends(ex)
        assert ends[1]["exit"] == 0 and ends[2]["exit"] == 0
        assert set(watched) == {ex.spawner.fd}
    finally:
        ex.stop_all()
