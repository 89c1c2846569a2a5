"""`pilotfish gc`: old final jobs' workdirs and event rows, ended pilots' folders — with a real
server, real agents and real files; never a job that is not final, never outside its root."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from conftest import ServerHandle, run_cli, wait_for
from pilotfish.errors import ValidationError
from pilotfish.server.gc_files import Refused, check_relative, parse_duration

ECHO = {"name": "echo", "executable": "/bin/echo", "args": ["{x}"],
        "parameters": {"x": {"type": "str"}}}
FINAL = ("JOB_FINISHED", "FAILED", "USER_KILLED")


def gc(home: Path, *args: str) -> dict:
    r = run_cli(home, "gc", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under root: file contents, 'dir', or '-> target' for symlinks."""
    out: dict[str, bytes | str] = {}
    if not root.exists():
        return out
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top, name)
            rel = str(p.relative_to(root))
            out[rel] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                        else p.read_bytes())
    return out


def event_count(c, job_id: int) -> int:
    return len(c.job(job_id)["events"])


def run_jobs(server: ServerHandle, c, n: int, work: Path | None, group: str = "g") -> list[int]:
    ids = c.add_jobs([{"name": f"e{i}", "application": "echo", "group_identifier": group,
                       "parameters": {"x": f"line{i}"}} for i in range(n)])
    return ids


@pytest.fixture
def world(server: ServerHandle, tmp_path):
    """Finished jobs with workdirs, and jobs that are not final with workdirs of their own."""
    c = server.client()
    c.add_app(ECHO)
    work = tmp_path / "work"
    done = run_jobs(server, c, 4, work)
    server.agent(work_root=work)
    wait_for(lambda: set(c.counts({"ids": done})) == {"JOB_FINISHED"}, 30, what="jobs done")
    server.stop_agents()
    # not final: queued for a site no agent serves, and one waiting for a parent
    queued = c.add_jobs([{"name": "q", "application": "echo", "site": "nowhere",
                          "group_identifier": "g", "parameters": {"x": "q"}}])
    waiting = c.add_jobs([{"name": "w", "application": "echo", "site": "nowhere",
                           "parents": queued, "group_identifier": "g",
                           "parameters": {"x": "w"}}])
    for j in queued + waiting:  # as if an agent had staged files in for them
        d = work / c.job(j)["workdir"]
        d.mkdir(parents=True)
        (d / "input.dat").write_text("precious\n")
    return c, work, done, queued + waiting


def test_dry_run_reports_and_changes_nothing(server, world):
    c, work, done, live = world
    before = tree(work)
    events = {j: event_count(c, j) for j in done + live}
    assert all(events[j] >= 2 for j in done)
    r = gc(server.home, "--finished-before", "0s", "--work-root", str(work), "--dry-run")
    assert r["dry_run"] is True and r["jobs"] == 4 and r["workdirs"] == 4
    assert r["files"] == 8 and r["bytes"] == sum(len(f"line{i}\n") for i in range(4))
    assert r["events"] == sum(events[j] - 1 for j in done) and r["refused"] == []
    assert tree(work) == before
    assert {j: event_count(c, j) for j in done + live} == events
    text = run_cli(server.home, "gc", "--finished-before", "0s", "--work-root", str(work),
                   "--dry-run").stdout
    assert text.startswith("gc --dry-run (nothing changed): 4 final jobs older than 0s")
    assert "would be removed" in text and "would free: 8 files, 24 bytes" in text


def test_gc_removes_final_jobs_only(server, world):
    c, work, done, live = world
    states = {j: c.job(j)["state"] for j in live}
    assert not set(states.values()) & set(FINAL)
    live_events = {j: event_count(c, j) for j in live}

    r = gc(server.home, "--finished-before", "1h", "--work-root", str(work))
    assert r["jobs"] == 0 and r["files"] == 0  # too young: nothing

    r = gc(server.home, "--finished-before", "0s", "--work-root", str(work))
    assert (r["jobs"], r["workdirs"], r["missing"], r["files"]) == (4, 4, 0, 8)
    for j in done:
        job = c.job(j)
        assert not (work / job["workdir"]).exists()
        assert job["state"] == "JOB_FINISHED"  # the row stays, with how it ended
        assert [e["to_state"] for e in job["events"]] == ["JOB_FINISHED"]
    for j in live:  # untouched: files, state, history
        assert (work / c.job(j)["workdir"] / "input.dat").read_text() == "precious\n"
        assert c.job(j)["state"] == states[j] and event_count(c, j) == live_events[j]

    r = gc(server.home, "--finished-before", "0s", "--work-root", str(work))
    assert (r["jobs"], r["workdirs"], r["missing"], r["events"]) == (4, 0, 4, 0)  # idempotent


def test_keep_tails_keeps_the_last_lines(server: ServerHandle, tmp_path):
    c = server.client()
    c.add_app({"name": "lines", "executable": "/usr/bin/seq", "args": ["{n}"],
               "parameters": {"n": {"type": "int", "min": 1, "max": 100000}}})
    ids = c.add_jobs([{"name": "s", "application": "lines", "parameters": {"n": 1000}}])
    server.agent()  # the default work root: $PILOTFISH_HOME/work
    wait_for(lambda: c.counts({"ids": ids}) == {"JOB_FINISHED": 1}, 30)
    d = server.home / "work" / c.job(ids[0])["workdir"]
    (d / "extra").mkdir()
    (d / "extra" / "big.bin").write_bytes(b"x" * 10000)
    full = (d / "job.out").stat().st_size
    dry = gc(server.home, "--finished-before", "0s", "--keep-tails", "3", "--dry-run")
    r = gc(server.home, "--finished-before", "0s", "--keep-tails", "3")
    assert (d / "job.out").read_text() == "998\n999\n1000\n" and (d / "job.err").read_bytes() == b""
    assert sorted(os.listdir(d)) == ["job.err", "job.out"]
    assert r["workdirs"] == 1 and r["bytes"] == full + 10000 - len("998\n999\n1000\n")
    assert (dry["files"], dry["bytes"]) == (r["files"], r["bytes"]) == (1, r["bytes"])


def test_symlinks_and_bad_workdirs_never_lead_outside(server: ServerHandle, tmp_path):
    """A job (or a bad row) cannot point gc at other files: symlinked workdirs, symlinked
    parent folders, symlinks inside a workdir, job.out as a symlink, '..' and absolute
    workdirs in the database."""
    c = server.client()
    c.add_app(ECHO)
    work = tmp_path / "work"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep me\n")
    (outside / "sub").mkdir()
    (outside / "sub" / "deep.txt").write_text("keep me too\n")
    ids = c.add_jobs([{"name": f"s{i}", "application": "echo", "group_identifier": f"g{i}",
                       "parameters": {"x": str(i)}} for i in range(5)])
    server.agent(work_root=work)
    wait_for(lambda: set(c.counts({"ids": ids})) == {"JOB_FINISHED"}, 30)
    server.stop_agents()
    wd = {j: work / c.job(j)["workdir"] for j in ids}
    # 0: the workdir itself replaced by a symlink to outside
    os.rename(wd[ids[0]], tmp_path / "moved0")
    wd[ids[0]].symlink_to(outside)
    # 1: its group folder replaced by a symlink to a folder holding the same name
    fake = tmp_path / "fakegroup"
    fake.mkdir()
    os.rename(wd[ids[1]], fake / wd[ids[1]].name)
    wd[ids[1]].parent.rmdir()
    wd[ids[1]].parent.symlink_to(fake)
    # 2: symlinks inside the workdir (to a dir and to a file): removed, targets untouched;
    #    job.out a symlink to a file outside: with --keep-tails neither followed nor changed
    (wd[ids[2]] / "link-dir").symlink_to(outside / "sub")
    (wd[ids[2]] / "job.out").unlink()
    (wd[ids[2]] / "job.out").symlink_to(outside / "keep.txt")
    # 3 and 4: rows whose workdir leaves the root ('..', absolute)
    (work / "victim").mkdir()
    (work / "victim" / "v.txt").write_text("v\n")
    db = server.home / "pilotfish.db"
    with sqlite3.connect(db) as con:
        con.execute("UPDATE jobs SET workdir = ? WHERE id = ?", ("g3/../victim", ids[3]))
        con.execute("UPDATE jobs SET workdir = ? WHERE id = ?", (str(outside), ids[4]))
    before_outside, before_fake = tree(outside), tree(fake)

    r = gc(server.home, "--finished-before", "0s", "--work-root", str(work), "--keep-tails", "5")
    assert tree(outside) == before_outside and tree(fake) == before_fake
    assert (work / "victim" / "v.txt").exists()
    refused = "\n".join(r["refused"])
    assert len(r["refused"]) == 4, refused
    assert f"job {ids[0]}: workdir 'g0/s0.{ids[0]}': g0/s0.{ids[0]} is a symlink" in refused
    assert f"job {ids[1]}: workdir 'g1/s1.{ids[1]}': g1 is a symlink" in refused
    assert f"job {ids[3]}: workdir 'g3/../victim': leaves the work root" in refused
    assert f"job {ids[4]}: workdir '{outside}': an absolute path" in refused
    assert sorted(os.listdir(wd[ids[2]])) == ["job.err"]  # the links went, not their targets
    assert r["workdirs"] == 1

    r = gc(server.home, "--finished-before", "0s", "--work-root", str(work))
    assert not wd[ids[2]].exists() and tree(outside) == before_outside
    text = run_cli(server.home, "gc", "--finished-before", "0s", "--work-root", str(work))
    assert text.returncode == 0 and text.stderr.count("refused: job") == 4


def test_ended_pilots_folders(server: ServerHandle, tmp_path):
    c = server.client()
    pilots = server.home / "pilots"
    made = {}
    for pid, state in (("p-done", "FINISHED"), ("p-failed", "FAILED"), ("p-gone", "MISSING"),
                       ("p-run", "RUNNING"), ("p-queued", "QUEUED"), ("p-link", "CANCELLED")):
        c.call("pilot_add", id=pid, nodes=1, state=state, workdir=str(pilots / pid))
        made[pid] = pilots / pid
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("x\n")
    for pid, path in made.items():
        if pid == "p-link":
            path.symlink_to(outside)
            continue
        path.mkdir(parents=True)
        (path / "pilot.sh").write_text("#!/bin/sh\n")
        (path / "pilot.out").write_text("out\n")
    (pilots / "unknown").mkdir()  # no pilot the server knows: left alone
    # a row whose workdir column points elsewhere is ignored: folders are pilots/<id>
    c.call("pilot_add", id="p-elsewhere", nodes=1, state="FINISHED", workdir=str(outside))

    dry = gc(server.home, "--finished-before", "0s", "--dry-run")
    assert dry["pilots"] == 3 and all(p.exists() or p.is_symlink() for p in made.values())
    r = gc(server.home, "--finished-before", "0s")
    assert r["pilots"] == 3 and r["files"] == 6 and (r["files"], r["bytes"]) == (
        dry["files"], dry["bytes"])
    assert sorted(os.listdir(pilots)) == ["p-link", "p-queued", "p-run", "unknown"]
    assert tree(outside) == {"x": b"x\n"}
    assert r["refused"] == ["pilot 'p-link': p-link is a symlink (not followed)"]
    assert gc(server.home, "--finished-before", "1d")["pilots"] == 0


def test_event_rows_are_pruned_in_chunks(server: ServerHandle):
    """1,200 killed jobs: three chunks of the gc op, every job keeps exactly its last event."""
    c = server.client()
    c.add_app(ECHO)
    ids = c.add_jobs([{"name": f"k{i}", "application": "echo", "site": "nowhere",
                       "parameters": {"x": "k"}} for i in range(1200)])
    c.kill_jobs({"ids": ids})
    r = gc(server.home, "--finished-before", "0s", "--keep-events")
    assert r["jobs"] == 1200 and r["events"] == 0 and r["missing"] == 1200
    assert event_count(c, ids[0]) == 2
    r = gc(server.home, "--finished-before", "0s")
    assert r["events"] == 1200
    for j in (ids[0], ids[599], ids[-1]):
        assert [e["to_state"] for e in c.job(j)["events"]] == ["USER_KILLED"]
    # a chunk through the op itself
    first = c.call("gc", before=1e18, limit=500)
    assert len(first["jobs"]) == 500 and first["next"] == first["jobs"][-1][0]
    assert first["events"] == 0 and first["pilots"] == []
    last = c.call("gc", before=1e18, after=ids[-2], limit=500)
    assert [j[0] for j in last["jobs"]] == [ids[-1]] and last["next"] is None


def test_event_pruning_on_postgresql(home, pg_url):
    """The same delete (all but each job's last event) on PostgreSQL."""
    server = ServerHandle(home, pg_url).start()
    try:
        c = server.client()
        c.add_app(ECHO)
        ids = c.add_jobs([{"name": f"k{i}", "application": "echo", "site": "nowhere",
                           "parameters": {"x": "k"}} for i in range(700)])
        c.kill_jobs({"ids": ids[:600]})
        r = gc(home, "--finished-before", "0s", "--dry-run")
        assert (r["jobs"], r["events"]) == (600, 600)
        r = gc(home, "--finished-before", "0s")
        assert (r["jobs"], r["events"]) == (600, 600)
        assert [e["to_state"] for e in c.job(ids[0])["events"]] == ["USER_KILLED"]
        assert event_count(c, ids[-1]) == 1 and c.job(ids[-1])["state"] == "READY"
    finally:
        server.stop()


def test_recheck_leaves_retried_jobs_alone(server: ServerHandle):
    """A job retried after its chunk was selected is no longer final: the re-check the CLI
    makes right before removing workdirs leaves it out."""
    c = server.client()
    c.add_app(ECHO)
    ids = c.add_jobs([{"name": f"r{i}", "application": "echo", "site": "nowhere",
                       "parameters": {"x": "r"}} for i in range(3)])
    c.kill_jobs({"ids": ids})
    chunk = c.call("gc", before=1e18)
    assert [j[0] for j in chunk["jobs"]] == ids
    c.retry_jobs({"ids": [ids[1]]})
    assert c.call("gc", before=1e18, ids=ids) == {"final": [ids[0], ids[2]]}
    assert c.call("gc", before=0, ids=ids) == {"final": []}  # none older than that
    assert c.job(ids[1])["state"] not in FINAL


@pytest.mark.parametrize("args, words", [
    ({"before": 1.0, "ids": "1,2"}, "'ids' must be a list"),
    ({"before": 1.0, "ids": [0]}, "'ids' must be a list"),
    ({"before": 1.0, "ids": [True]}, "'ids' must be a list"),
    ({"before": 1.0, "ids": list(range(1, 2002))}, "at most 2000"),
    ({}, "missing argument 'before'"),
    ({"before": "yesterday"}, "wrong type"),
    ({"before": 1.0, "limit": 0}, "'limit' must be 1..2000"),
    ({"before": 1.0, "limit": 100000}, "'limit' must be 1..2000"),
    ({"before": 1.0, "prune": "yes"}, "wrong type"),
    ({"before": 1.0, "after": -1}, "must be an integer 0.."),
])
def test_gc_op_refuses_bad_arguments(server: ServerHandle, args, words):
    c = server.client()
    with pytest.raises(ValidationError, match=words):
        c.call("gc", **args)
    assert c.call("ping")["version"]


@pytest.mark.parametrize("text, seconds", [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800),
                                           ("45s", 45), ("2w", 14 * 86400), ("1d12h", 129600),
                                           ("0s", 0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-7d", "7 d", "1.5d", "7d ago", "1e9d",
                                  "9999999w", "7d;rm", "--7d"])
def test_bad_durations(text, tmp_path):
    with pytest.raises(ValidationError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("rel", ["", "/etc", "..", "a/..", "a/../b", "./a", "a//b", "a/", "a\0b",
                                 None, 5])
def test_workdir_paths_that_leave_the_root_are_refused(rel):
    with pytest.raises(Refused):
        check_relative(rel)


def test_cli_errors_are_one_line(server: ServerHandle, home):
    for args, words in ((("--finished-before", "soon"), "duration 'soon' must look like"),
                        (("--finished-before", "1d", "--keep-tails", "-1"), "--keep-tails")):
        r = run_cli(server.home, "gc", *args)
        assert r.returncode in (1, 2) and words in r.stderr, r.stderr
    r = run_cli(server.home, "gc")
    assert r.returncode == 2 and "--finished-before" in r.stderr
