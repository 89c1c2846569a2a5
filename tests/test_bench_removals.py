"""bench/common.py: a benchmark that removed its homes marks their directory, and one that
times workdirs on that disk waits out the rest of ``REMOVAL_SETTLE`` first (ext4 without a
journal skips recently freed inodes one by one; see ``wait_for_removals``). Real directories
under pytest's temporary directory, a settle time of a fraction of a second."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import common as C  # noqa: E402


@pytest.fixture
def disk_dir(tmp_path):
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                        text=True).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        pytest.skip("external system missing: a disk file system under pytest's tmp_path")
    return tmp_path


def test_removing_homes_marks_the_directory_and_the_next_run_waits(disk_dir, monkeypatch):
    monkeypatch.setattr(C, "REMOVAL_SETTLE", 0.4)
    monkeypatch.delenv("PILOTFISH_BENCH_REMOVAL_WAIT", raising=False)
    home = disk_dir / "pilotfish-bench-w2-x"
    (home / "work" / "1").mkdir(parents=True)
    monkeypatch.setattr(C, "_DEFERRED_RM", [home])
    C._remove_deferred()
    assert not home.exists() and (disk_dir / "pilotfish-bench-removed").exists()
    t0 = time.monotonic()
    waited = C.wait_for_removals(str(disk_dir))
    assert 0 < waited <= 0.4 and time.monotonic() - t0 >= waited - 0.01
    assert C.wait_for_removals(str(disk_dir)) == 0.0  # settled: no second wait


def test_the_probe_alone_marks_nothing_and_the_wait_can_be_turned_off(disk_dir, monkeypatch):
    monkeypatch.setattr(C, "REMOVAL_SETTLE", 30.0)
    probe = disk_dir / "pilotfish-bench-probe-abc"
    probe.mkdir()
    monkeypatch.setattr(C, "_DEFERRED_RM", [probe])
    C._remove_deferred()
    assert not probe.exists() and not (disk_dir / "pilotfish-bench-removed").exists()
    assert C.wait_for_removals(str(disk_dir)) == 0.0
    (disk_dir / "pilotfish-bench-removed").touch()
    monkeypatch.setenv("PILOTFISH_BENCH_REMOVAL_WAIT", "0")
    assert C.wait_for_removals(str(disk_dir)) == 0.0
