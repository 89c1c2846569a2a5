"""Workdirs made ahead on the agent's preparer thread (pilot/prepare.py): real directories,
files and descriptors on the real disk; the executor around it is tested by every agent test."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from pilotfish.errors import ValidationError
from pilotfish.pilot.prepare import DONE, TAKEN, Preparer, make_workdir, plain


def task(rel: str, **spec) -> SimpleNamespace:
    return SimpleNamespace(spec={"workdir": rel, **spec}, prep=None, prepared=None)


def wait_prepared(t, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while t.prep != DONE and time.monotonic() < deadline:
        time.sleep(0.005)
    assert t.prep == DONE


def test_a_workdir_and_its_open_output_files(tmp_path):
    root = str(tmp_path.resolve())
    p = make_workdir(root, "ab/job1", set())
    try:
        assert p.workdir == f"{root}/ab/job1" and p.created and p.error is None
        os.write(p.out_fd, b"out")
        os.write(p.err_fd, b"err")
        assert (tmp_path / "ab/job1/job.out").read_bytes() == b"out"
        assert (tmp_path / "ab/job1/job.err").read_bytes() == b"err"
        assert os.get_inheritable(p.out_fd) is False  # the spawn's DUP2 gives it to the child
    finally:
        p.close()
    # a retry reuses its workdir; its files start empty again
    p = make_workdir(root, "ab/job1", set())
    p.close()
    assert not p.created and (tmp_path / "ab/job1/job.out").read_bytes() == b""


def test_symlinks_planted_by_a_task_are_never_followed(tmp_path):
    root = str(tmp_path.resolve())
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "w").mkdir()
    (tmp_path / "w/j1").symlink_to(target)          # the workdir itself
    assert make_workdir(root, "w/j1", set()) is None
    (tmp_path / "v").symlink_to(target)             # a directory on the way
    assert make_workdir(root, "v/j2", set()) is None
    assert list(target.iterdir()) == []  # the directory made through it was taken back
    (tmp_path / "w/j3").mkdir()                     # an earlier attempt's job.out
    secret = tmp_path / "secret"
    secret.write_text("keep me")
    (tmp_path / "w/j3/job.out").symlink_to(secret)
    with pytest.raises(OSError):
        make_workdir(root, "w/j3", set())
    assert secret.read_text() == "keep me"
    with pytest.raises(ValidationError):
        make_workdir(root, "../x", set())


def test_plain_tasks_only():
    assert plain({"workdir": "a"})
    assert not plain({"workdir": "a", "input_url": "/x"})
    assert not plain({"workdir": "a", "staged": "in.dat"})
    assert not plain({"workdir": "a", "pre": ["/bin/true"]})


def test_the_thread_prepares_in_order_at_most_ahead_and_drops_cleanly(tmp_path):
    """At most ``ahead`` held; once full, the thread sleeps until the loop has taken them
    down to half and refills in one go (not a wake-up per task taken)."""
    root = str(tmp_path.resolve())
    pr = Preparer(root, set(), ahead=3)
    try:
        ts = [task(f"d/{i}") for i in range(7)]
        for t in ts:
            pr.submit(t)
        for t in ts[:3]:
            wait_prepared(t)
        time.sleep(0.1)
        assert [t.prep for t in ts[3:]] == ["todo"] * 4  # held at 3 until taken down to 1
        assert not (tmp_path / "d/3").exists()
        p = pr.take(ts[0])
        assert p.workdir == f"{root}/d/0" and ts[0].prep == TAKEN
        p.close()
        time.sleep(0.1)
        assert ts[3].prep == "todo"  # 2 held: no refill yet
        pr.drop(ts[1])                                   # cancelled while queued: 1 held
        wait_prepared(ts[3])
        wait_prepared(ts[4])                             # refilled to 3 at once
        time.sleep(0.1)
        assert [t.prep for t in ts[5:]] == ["todo"] * 2
        pr.drop(ts[6])                                   # ... before the thread got to it
        assert pr.take(ts[6]) is None
        for t in (ts[2], ts[3], ts[4]):
            pr.take(t).close()
        wait_prepared(ts[5])
        pr.take(ts[5]).close()
        assert not (tmp_path / "d/6").exists()
        # every descriptor made was closed (the dropped one's by drop)
        assert all(t.prepared is None or t.prepared.out_fd is None for t in ts)
    finally:
        pr.stop()


def test_a_failure_is_the_tasks_not_the_threads(tmp_path):
    (tmp_path / "file").write_text("")
    pr = Preparer(str(tmp_path.resolve()), set(), ahead=2)
    try:
        bad, good = task("file/j"), task("ok/j")
        pr.submit(bad)
        pr.submit(good)
        wait_prepared(bad)
        wait_prepared(good)
        assert "stage-in failed" in pr.take(bad).error
        pr.take(good).close()
    finally:
        pr.stop()


def test_spawned_tasks_run_in_their_workdir_and_leave_no_descriptor_open(tmp_path):
    """The spawn enters a prepared workdir by its open descriptor (fchdir) and hands the
    descriptors to the preparer's thread to close: the task runs in its workdir, writes its
    job.out, and once the thread has closed them no descriptor is left (a real Executor)."""
    import select
    from pilotfish.pilot.executor import Executor
    fds = lambda: set(os.listdir("/proc/self/fd"))  # noqa: E731
    watched: dict = {}
    ex = Executor([sorted(os.sched_getaffinity(0))[0]], [], tmp_path / "work",
                  watch=lambda fd, t: watched.__setitem__(fd, t),
                  unwatch=lambda fd: watched.pop(fd, None))
    before = fds()
    try:
        for i in range(5):
            ex.add({"job": i, "attempt": 1, "name": f"t{i}", "argv": ["/bin/pwd"], "env": {},
                    "workdir": f"w/{i}", "cores": 1, "gpus": 0})
        ups: list = []
        while len(ups) < 5:  # (the ends come from the spawner's threads, on its eventfd)
            ex.start_ready(time.time())
            ready = select.select(list(watched), [], [], 5)[0]
            assert ready, "no task ended"
            for fd in ready:
                ex.on_fd(fd, watched[fd], time.time())
            ups += [u for u in ex.take_updates(time.time(), True) if u["end"] is not None]
        assert [u["exit"] for u in ups] == [0] * 5
        work = (tmp_path / "work").resolve()
        for i in range(5):
            assert (work / f"w/{i}/job.out").read_text().strip() == str(work / f"w/{i}")
        ex.preparer.stop()  # closes what it was handed
        # (a spawner thread closes its copy of a pidfd as it sees the process end)
        until = time.monotonic() + 2
        while fds() - before - {str(ex._guard_fd), str(ex.spawner.fd)} and \
                time.monotonic() < until:
            time.sleep(0.01)
        assert fds() - before <= {str(ex._guard_fd), str(ex.spawner.fd)}
    finally:
        ex.stop_all()
