"""Stage-in and stage-out: what is copied, devices, sizes and time.

Each step runs in a child process of the agent (the stager) with a timeout and a byte cap, so
the agent's loop, heartbeats and SIGTERM keep working whatever the input is. Real server and
agent processes throughout.
"""
from __future__ import annotations

import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from conftest import ServerHandle, wait_for


def finished(c, ids):
    jobs = [c.job(i) for i in ids]
    if all(j["state"] in ("JOB_FINISHED", "FAILED", "USER_KILLED") for j in jobs):
        return {j["state"] for j in jobs}
    return None


def stagers(tmp_path: Path) -> list[int]:
    """Pids of stager processes started by this test's agents (their work root is in it)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"pilotfish.pilot.stage" in cmd and str(tmp_path).encode() in cmd:
            out.append(int(pid))
    return out


@pytest.fixture
def c(server: ServerHandle):
    c = server.client()
    c.add_app({"name": "cat", "executable": "/bin/cat", "args": ["{f}"],
               "parameters": {"f": {"type": "path"}}})
    c.add_app({"name": "ls", "executable": "/bin/ls", "args": ["-lR"]})
    c.add_app({"name": "echo", "executable": "/bin/echo", "args": ["hi"]})
    return c


@pytest.fixture
def data(server: ServerHandle) -> Path:
    d = server.home / "data"
    d.mkdir(exist_ok=True)
    return d


def run_jobs(server: ServerHandle, c, tmp_path, jobs: list[dict], *agent_args: str,
             timeout: float = 60) -> list[dict]:
    ids = c.add_jobs([{"max_retries": 0, **j} for j in jobs])
    server.agent(*agent_args, work_root=tmp_path / "work")
    wait_for(lambda: finished(c, ids), timeout, what="the jobs to end")
    return [c.job(i) for i in ids]


def failed_with(d: dict, state: str, *words: str) -> None:
    assert d["state"] == "FAILED" and state in d["events"][-1]["via"], (d["state"], d["events"])
    for w in words:
        assert w in (d["message"] or ""), d["message"]
    assert "\n" not in d["message"]


# -- good paths -------------------------------------------------------------------------------
def test_file_and_tree_in_and_output_folder_per_job(server: ServerHandle, c, data, tmp_path):
    """A file lands in the workdir under its name, a tree under workdir/<dirname>/ (symlinks
    copied as symlinks, not followed); each job's outputs go to <output_url>/<name>.<id>/."""
    (data / "in.txt").write_text("payload\n")
    t = data / "tree"
    (t / "sub").mkdir(parents=True)
    (t / "a.txt").write_text("a\n")
    (t / "sub" / "b.txt").write_text("b\n")
    (t / "link").symlink_to("/etc/passwd")
    (t / "x.sh").write_text("#!/bin/sh\n")
    (t / "x.sh").chmod(0o755)
    out = data / "results"  # made by the first stage-out
    d1, d2 = run_jobs(server, c, tmp_path, [
        {"name": "f", "application": "cat", "parameters": {"f": "in.txt"},
         "input_url": f"file://{data}/in.txt", "output_url": str(out)},
        {"name": "t", "application": "cat", "parameters": {"f": "tree/sub/b.txt"},
         "input_url": str(t), "output_url": f"file://localhost{out}"}])
    assert d1["state"] == d2["state"] == "JOB_FINISHED", (d1["message"], d2["message"])
    f_out, t_out = out / f"f.{d1['id']}", out / f"t.{d2['id']}"
    assert (f_out / "job.out").read_text() == "payload\n"
    assert (f_out / "in.txt").read_text() == "payload\n"
    assert (t_out / "job.out").read_text() == "b\n"
    assert (t_out / "tree" / "a.txt").read_text() == "a\n"
    assert os.readlink(t_out / "tree" / "link") == "/etc/passwd"  # a link, never its content
    assert os.access(t_out / "tree" / "x.sh", os.X_OK)
    assert (f_out / ".pilotfish-job").read_text() == f"{d1['id']}\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([f_out.name, t_out.name])


def test_retry_replaces_its_own_earlier_output(server: ServerHandle, c, data, tmp_path):
    """A folder with this job's marker (an earlier attempt that staged out, then crashed) is
    replaced whole; leftovers of a killed stage-out of this job are cleared."""
    out = data / "out"
    [i] = c.add_jobs([{"name": "r", "application": "echo", "output_url": str(out)}])
    mine = out / f"r.{i}"
    mine.mkdir(parents=True)
    (mine / ".pilotfish-job").write_text(f"{i}\n")
    (mine / "stale.txt").write_text("old\n")
    partial = out / f".r.{i}.partial"
    partial.mkdir()
    (partial / ".pilotfish-job").write_text(f"{i}\n")
    server.agent(work_root=tmp_path / "work")
    wait_for(lambda: finished(c, [i]), 60)
    assert c.job(i)["state"] == "JOB_FINISHED", c.job(i)["message"]
    assert (mine / "job.out").read_text() == "hi\n" and not (mine / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == [mine.name]


def test_declared_roots_from_flags_and_environment(home, db_url, tmp_path):
    """Roots declared on the server (--data-root) and the agent ($PILOTFISH_DATA_ROOTS)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("x\n")
    s = ServerHandle(home, db_url, data_roots=(str(shared),)).start()
    try:
        c = s.client()
        c.add_app({"name": "cat", "executable": "/bin/cat", "args": ["in.txt"]})
        i = c.add_job(name="j", application="cat", input_url=str(shared / "in.txt"),
                      output_url=str(shared / "out"), max_retries=0)
        os.environ["PILOTFISH_DATA_ROOTS"] = f"/nonexistent{os.pathsep}{shared}"
        try:
            s.agent(work_root=tmp_path / "work")
        finally:
            del os.environ["PILOTFISH_DATA_ROOTS"]
        wait_for(lambda: finished(c, [i]), 60)
        assert c.job(i)["state"] == "JOB_FINISHED", c.job(i)["message"]
        assert (shared / "out" / f"j.{i}" / "job.out").read_text() == "x\n"
    finally:
        s.stop_agents()
        s.stop()


def test_agent_without_the_root_refuses(home, db_url, tmp_path):
    """The server allows a root the agent does not: the agent's own rule wins on its node."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("x\n")
    s = ServerHandle(home, db_url, data_roots=(str(shared),)).start()
    try:
        c = s.client()
        c.add_app({"name": "t", "executable": "/bin/true"})
        i = c.add_job(name="j", application="t", input_url=str(shared / "in.txt"),
                      max_retries=0)
        s.agent(work_root=tmp_path / "work")
        wait_for(lambda: finished(c, [i]), 60)
        failed_with(c.job(i), "STAGE_IN_FAILED", "not under a data root", f"{home}/data")
    finally:
        s.stop_agents()
        s.stop()


# -- devices, FIFOs, sockets ------------------------------------------------------------------
@pytest.fixture
def wide(home, db_url):
    """A server that declares "/" as a data root (the widest an admin can go)."""
    s = ServerHandle(home, db_url, data_roots=("/",)).start()
    yield s
    s.stop_agents()
    s.stop()


def test_devices_fifos_and_sockets_are_refused(wide: ServerHandle, tmp_path):
    """With "/" declared (the widest an admin can go), /dev/zero, /dev/ptmx, /dev/urandom, a
    FIFO and a socket are refused without being opened, and the agent keeps serving; inside a
    tree, a FIFO or a device fails the stage-in naming the entry."""
    server, c = wide, wide.client()
    c.add_app({"name": "echo", "executable": "/bin/echo", "args": ["hi"]})
    data = server.home / "data"
    data.mkdir(exist_ok=True)
    os.mkfifo(data / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(data / "sock"))
    t = data / "tree"
    (t / "sub").mkdir(parents=True)
    (t / "ok.txt").write_text("ok\n")
    os.mkfifo(t / "sub" / "pipe")
    t2 = data / "tree2"
    t2.mkdir()
    (t2 / "ok.txt").write_text("ok\n")
    (data / "zero-link").symlink_to("/dev/zero")
    (data / "up").symlink_to(tmp_path)  # a directory that contains the home and the work root
    try:
        urls = ["/dev/zero", "file:///dev/ptmx", "/dev/urandom", str(data / "fifo"),
                str(data / "sock"), str(data / "zero-link"), str(t), str(data / "up")]
        jobs = [{"name": f"d{n}", "application": "echo", "input_url": u}
                for n, u in enumerate(urls)]
        jobs.append({"name": "good", "application": "echo", "input_url": str(t2)})
        ds = run_jobs(server, c, tmp_path, jobs, "--data-root", "/", timeout=90)
    finally:
        sock.close()
    kinds = ["character device", "character device", "character device", "FIFO", "socket",
             "character device", "sub/pipe is a FIFO", "contains the pilotfish home"]
    for d, k in zip(ds, kinds):
        failed_with(d, "STAGE_IN_FAILED", "stage-in failed", k)
    assert ds[-1]["state"] == "JOB_FINISHED", ds[-1]["message"]
    # the half-copied tree is gone from the workdir; the good tree is there whole
    assert not (tmp_path / "work" / "default" / f"d6.{ds[6]['id']}" / "tree").exists()
    assert (tmp_path / "work" / "default" / f"good.{ds[-1]['id']}" / "tree2" / "ok.txt").exists()


def test_device_in_a_workdir_fails_the_stage_out(server: ServerHandle, c, data, tmp_path):
    """A task that leaves a FIFO (or a hard link to a file elsewhere) in its workdir: the
    stage-out fails, and its partial folder is removed."""
    mk = tmp_path / "mk.sh"
    mk.write_text("#!/bin/sh\nmkfifo pipe\n")
    mk.chmod(0o755)
    ln = tmp_path / "ln.sh"
    ln.write_text(f"#!/bin/sh\nln {data}/victim.txt stolen\n")
    ln.chmod(0o755)
    (data / "victim.txt").write_text("secret\n")
    c.add_app({"name": "mk", "executable": str(mk)})
    c.add_app({"name": "ln", "executable": str(ln)})
    out = data / "out"
    d1, d2 = run_jobs(server, c, tmp_path, [
        {"name": "m", "application": "mk", "output_url": str(out)},
        {"name": "l", "application": "ln", "output_url": str(out)}])
    failed_with(d1, "STAGE_OUT_FAILED", "pipe is a FIFO")
    failed_with(d2, "STAGE_OUT_FAILED", "stolen has 2 hard links")
    assert sorted(os.listdir(out)) == []


# -- sizes ------------------------------------------------------------------------------------
def test_byte_cap_stops_big_files_and_trees(server: ServerHandle, c, data, tmp_path):
    (data / "big").write_bytes(b"x" * (2 << 20))
    t = data / "tree"
    t.mkdir()
    for n in range(3):
        (t / f"f{n}").write_bytes(b"y" * (400 << 10))
    (data / "small").write_bytes(b"z" * (500 << 10))
    writer = tmp_path / "w.sh"
    writer.write_text("#!/bin/sh\nhead -c 3000000 /dev/zero > big.out\n")
    writer.chmod(0o755)
    c.add_app({"name": "w", "executable": str(writer)})
    ds = run_jobs(server, c, tmp_path, [
        {"name": "b", "application": "echo", "input_url": str(data / "big")},
        {"name": "t", "application": "echo", "input_url": str(t)},
        {"name": "s", "application": "echo", "input_url": str(data / "small")},
        {"name": "o", "application": "w", "output_url": str(data / "out")}],
        "--stage-max-bytes", "1M")
    for d in ds[:2]:
        failed_with(d, "STAGE_IN_FAILED", "more than 1 MiB to copy", "byte cap")
    assert ds[2]["state"] == "JOB_FINISHED"
    failed_with(ds[3], "STAGE_OUT_FAILED", "more than 1 MiB", "byte cap")
    assert os.listdir(data / "out") == []
    work = tmp_path / "work" / "default"
    assert not (work / f"b.{ds[0]['id']}" / "big").exists()
    assert not (work / f"t.{ds[1]['id']}" / "tree").exists()


def _grow(path: Path, stop: threading.Event, copies: Path) -> None:
    """Once the stager has started copying ``path`` (its copy appears under ``copies``), make
    it 1 TiB long (sparse: no disk used)."""
    while not stop.is_set() and not any(copies.rglob(f"*{path.name}*")):
        time.sleep(0.0005)
    if not stop.is_set():
        with open(path, "r+b") as fh:
            fh.truncate(1 << 40)


def test_growing_file_is_stopped_at_the_cap(server: ServerHandle, c, data, tmp_path):
    """A file under the cap when the stager looks, that grows while it is copied, is stopped
    at the cap (the cap counts what is read, not what stat said)."""
    f = data / "growing"
    with open(f, "wb") as fh:  # 200 MiB at the look (sparse), under the 256 MiB cap
        fh.truncate(200 << 20)
    stop = threading.Event()
    (tmp_path / "work").mkdir(exist_ok=True)
    th = threading.Thread(target=_grow, args=(f, stop, tmp_path / "work"), daemon=True)
    th.start()
    try:
        [d] = run_jobs(server, c, tmp_path, [
            {"name": "g", "application": "echo", "input_url": str(f)}],
            "--stage-max-bytes", str(256 << 20))
    finally:
        stop.set()
        th.join()
    failed_with(d, "STAGE_IN_FAILED", "more than 256 MiB to copy")
    assert not list((tmp_path / "work").rglob("growing"))


# -- time -------------------------------------------------------------------------------------
def _huge(data: Path) -> Path:
    """A sparse 1 TiB file: reading it takes minutes, it costs no disk."""
    f = data / "huge"
    with open(f, "wb") as fh:
        fh.truncate(1 << 40)
    return f


def test_stage_in_over_its_timeout_is_stopped(server: ServerHandle, c, data, tmp_path):
    f = _huge(data)
    start = time.monotonic()
    [d] = run_jobs(server, c, tmp_path, [
        {"name": "slow", "application": "echo", "input_url": str(f)}],
        "--stage-timeout", "2", "--stage-max-bytes", "2T")
    failed_with(d, "STAGE_IN_FAILED", "stage-in timed out after 2 s")
    assert time.monotonic() - start < 30
    wait_for(lambda: not stagers(tmp_path), 10, what="the stager to be gone")


def test_agent_heartbeats_during_a_long_stage_in(server: ServerHandle, c, data, tmp_path):
    """A stage-in longer than the lease (3 heartbeats): the agent is never declared lost, its
    other cores keep running jobs, and the job ends with the stager's timeout."""
    f = _huge(data)
    slow = c.add_job(name="slow", application="echo", input_url=str(f), max_retries=0)
    server.agent("--stage-timeout", "6", "--stage-max-bytes", "2T", "--cores",
                 str(sorted(os.sched_getaffinity(0))[0]), work_root=tmp_path / "work")
    wait_for(lambda: c.job(slow)["agent"], 30, what="the job to be leased")
    agent_id = c.job(slow)["agent"]
    seen = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        a = {x["id"]: x for x in c.agents(all=True)}[agent_id]
        seen.add(a["state"])
        assert a["silent_seconds"] < 3.0, a  # the lease: 3 heartbeats of 1 s
        time.sleep(0.25)
    assert seen == {"ALIVE"}, seen
    wait_for(lambda: finished(c, [slow]), 30)
    d = c.job(slow)
    failed_with(d, "STAGE_IN_FAILED", "timed out after 6 s")
    assert d["attempts"] == 1  # never requeued by a lost lease
    assert "LOST" not in str(d["events"])


def test_sigterm_during_stage_in_stops_it_promptly(server: ServerHandle, c, data, tmp_path):
    """SIGTERM to the agent during a stage-in: the stager is stopped, the job handed back, and
    the agent exits within seconds (the attack battery's agent ignored SIGTERM)."""
    f = _huge(data)
    i = c.add_job(name="slow", application="echo", input_url=str(f))
    p = server.agent("--stage-max-bytes", "2T", work_root=tmp_path / "work")
    wait_for(lambda: stagers(tmp_path), 30, what="the stager to start")
    time.sleep(0.5)
    start = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait(20)
    assert time.monotonic() - start < 10
    wait_for(lambda: not stagers(tmp_path), 10, what="the stager to be gone")
    wait_for(lambda: c.job(i)["state"] in ("READY", "RESTART_READY"), 30,
             what="the job to be handed back")


def test_cancel_during_stage_in_kills_the_stager(server: ServerHandle, c, data, tmp_path):
    f = _huge(data)
    i = c.add_job(name="slow", application="echo", input_url=str(f))
    server.agent("--stage-max-bytes", "2T", work_root=tmp_path / "work")
    wait_for(lambda: stagers(tmp_path), 30, what="the stager to start")
    c.kill_jobs({"ids": [i]})
    wait_for(lambda: not stagers(tmp_path), 15, what="the stager to be killed")
    assert c.job(i)["state"] == "USER_KILLED"


def test_no_url_no_stager(server: ServerHandle, c, tmp_path):
    """Jobs without URLs never start a stager (their spawn path is unchanged)."""
    ds = run_jobs(server, c, tmp_path, [{"name": f"n{k}", "application": "echo"}
                                        for k in range(20)])
    assert all(d["state"] == "JOB_FINISHED" for d in ds)
    log = (server.home / "agent-0.log").read_text()
    assert "stage" not in log.lower()


def test_stager_module_imports_light():
    """The stager starts once per staged job: no click, zmq, sqlalchemy, pydantic."""
    import subprocess
    import sys
    code = ("import pilotfish.pilot.stage, sys; print(sorted(m.split('.')[0] for m in "
            "sys.modules))")
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout
    for heavy in ("click", "zmq", "sqlalchemy", "pydantic", "yaml", "rich", "psutil"):
        assert f"'{heavy}'" not in mods, heavy
    assert stat.S_ISREG(os.stat(sys.executable).st_mode)


# -- the stager itself, in-process ------------------------------------------------------------
def test_stager_checks_what_it_opened_and_its_usage(tmp_path):
    """The rule runs on the path the kernel opened (a symlink swapped in after realpath is
    caught there); a workdir reached through a symlink is refused; bad usage exits 2."""
    from pilotfish.pilot import stage
    home, work, root = tmp_path / "h", tmp_path / "w", tmp_path / "r"
    for d in (home, work / "default" / "j.1", root):
        d.mkdir(parents=True)
    roots = stage.roots_of(str(home), str(work), [str(root)])
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(stage.StageError, match="not under a data root"):
            stage.check_opened(fd, roots, "input_url", "/x")
        os.fstat(fd)  # still open: the caller closes it
    finally:
        os.close(fd)
    (root / "in.txt").write_text("x")
    (work / "default" / "link").symlink_to(work / "default" / "j.1")
    with pytest.raises(stage.StageError, match="not a real directory under the work root"):
        stage.stage_in(str(root / "in.txt"), str(work / "default" / "link"), roots, 100)
    (work / "grp").symlink_to(work / "default")  # a parent that is a symlink
    with pytest.raises(stage.StageError, match="not a real directory under the work root"):
        stage.stage_in(str(root / "in.txt"), str(work / "grp" / "j.1"), roots, 100)
    assert stage.main(["in", "1"]) == 2
    assert stage.main(["in", "1", str(work / "default" / "j.1"), str(root / "in.txt"), "100",
                       str(home), str(work), str(root)]) == 0
    assert (work / "default" / "j.1" / "in.txt").read_text() == "x"
    assert stage.main(["in", "1", str(work / "default" / "j.1"), str(root / "in.txt"), "100",
                       str(home), str(work), "relative"]) == 1  # a bad root: refused
