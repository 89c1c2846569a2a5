"""bench/common.py: a benchmark that removed its homes marks their directory, and one that
times workdirs on that disk waits out the rest of ``REMOVAL_SETTLE`` first (ext4 without a
journal skips recently freed inodes one by one; see ``wait_for_removals``), then on until the
create probe reads quiet, within ``REMOVAL_MOST``. Real directories
under pytest's temporary directory, a settle time of a fraction of a second; the file system
type is set by the test, so the result does not depend on where pytest's directory is."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import common as C  # noqa: E402


@pytest.fixture
def disk(monkeypatch):
    """As if pytest's directory were on this machine's disk (``stat -f`` says ext2/ext3)."""
    monkeypatch.setattr(C, "fs_type", lambda path: "ext2/ext3")
    monkeypatch.delenv("PILOTFISH_BENCH_REMOVAL_WAIT", raising=False)


def test_removing_homes_marks_the_directory_and_the_next_run_waits(tmp_path, disk,
                                                                   monkeypatch):
    monkeypatch.setattr(C, "REMOVAL_SETTLE", 0.4)
    monkeypatch.setattr(C, "create_probe", lambda tmp: 50.0)  # quiet, whatever the disk is
    home = tmp_path / "pilotfish-bench-w2-x"
    (home / "work" / "1").mkdir(parents=True)
    monkeypatch.setattr(C, "_DEFERRED_RM", [home])
    C._remove_deferred()
    assert not home.exists() and (tmp_path / "pilotfish-bench-removed").exists()
    t0 = time.monotonic()
    waited = C.wait_for_removals(str(tmp_path))
    assert 0 < waited <= 0.4 and time.monotonic() - t0 >= waited - 0.01
    assert C.wait_for_removals(str(tmp_path)) == 0.0  # settled: no second wait


def test_the_wait_follows_the_probe_not_the_clock(tmp_path, disk, monkeypatch):
    """Past REMOVAL_SETTLE a slow probe keeps the next run waiting, poll by poll, until it
    reads quiet; and never past REMOVAL_MOST after the removal."""
    monkeypatch.setattr(C, "REMOVAL_SETTLE", 0.0)
    monkeypatch.setattr(C, "REMOVAL_POLL", 0.05)
    readings = iter([520.0, 450.0, 80.0, 900.0])
    monkeypatch.setattr(C, "create_probe", lambda tmp: next(readings))
    (tmp_path / "pilotfish-bench-removed").touch()
    t0 = time.monotonic()
    assert C.wait_for_removals(str(tmp_path)) == 0.1  # two slow probes, then a quiet one
    assert time.monotonic() - t0 >= 0.1
    monkeypatch.setattr(C, "REMOVAL_MOST", 0.2)  # too long ago to matter: not even probed
    time.sleep(0.25)
    assert C.wait_for_removals(str(tmp_path)) == 0.0 and next(readings) == 900.0


def test_the_probe_alone_marks_nothing(tmp_path, disk, monkeypatch):
    monkeypatch.setattr(C, "REMOVAL_SETTLE", 30.0)
    monkeypatch.setattr(C, "_DEFERRED_RM", [])
    assert C.create_probe(str(tmp_path), n=3) is not None
    [probe] = C._DEFERRED_RM  # the probe's directory, removed at the end like a home
    assert probe.name.startswith(C.PROBE_PREFIX) and probe.exists()
    C._remove_deferred()
    assert not probe.exists() and not (tmp_path / "pilotfish-bench-removed").exists()
    assert C.wait_for_removals(str(tmp_path)) == 0.0


@pytest.mark.parametrize("fs, env", [("tmpfs", None), ("ext2/ext3", "0")])
def test_tmpfs_and_the_switch_never_wait(tmp_path, monkeypatch, fs, env):
    monkeypatch.setattr(C, "REMOVAL_SETTLE", 30.0)
    monkeypatch.setattr(C, "fs_type", lambda path: fs)
    if env is None:
        monkeypatch.delenv("PILOTFISH_BENCH_REMOVAL_WAIT", raising=False)
    else:
        monkeypatch.setenv("PILOTFISH_BENCH_REMOVAL_WAIT", env)
    (tmp_path / "pilotfish-bench-removed").touch()
    t0 = time.monotonic()
    assert C.wait_for_removals(str(tmp_path)) == 0.0 and time.monotonic() - t0 < 1
