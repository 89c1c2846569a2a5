"""scripts/test says what it will install and start, and which external systems it used."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import externals

ROOT = Path(__file__).resolve().parent.parent


def test_report_names_every_external_system_once():
    rows = externals.report()
    names = [r[0] for r in rows]
    for system in ("PostgreSQL", "Slurm", "Charliecloud", "MPI", "RabbitMQ", "Chromium"):
        assert sum(n.startswith(system) for n in names) == 1, names
    assert all(status in ("used", "skipped", "not run", "not used") and why
               for _, status, why in rows)


def test_report_says_where_postgresql_came_from():
    env = {**os.environ, "PILOTFISH_TEST_PG": "postgresql://u:secret@127.0.0.1:1/none"}
    out = subprocess.run([sys.executable, "externals.py"], capture_output=True, text=True,
                         env=env, cwd=ROOT / "tests", timeout=60).stdout
    line = [x for x in out.splitlines() if "PostgreSQL:" in x][0]
    assert "skipped: nothing answers at postgresql://u:***@127.0.0.1:1/none" in line
    assert "(PILOTFISH_TEST_PG)" in line and "secret" not in out
    env.pop("PILOTFISH_TEST_PG")
    out = subprocess.run([sys.executable, "externals.py"], capture_output=True, text=True,
                         env=env, cwd=ROOT / "tests", timeout=60).stdout
    assert "set PILOTFISH_TEST_PG for another" in out
    assert out.startswith("test: external systems")


def test_plans_install_and_start_nothing():
    """--plan of the two scripts that install or start things only says what they would do."""
    for script in ("test_packages", "slurm_up"):
        r = subprocess.run([str(ROOT / "scripts" / script), "--plan"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        if os.geteuid() == 0 and script == "slurm_up":
            assert "Slurm" in r.stdout and ("apt-get install" in r.stdout
                                           or "installed already" in r.stdout)
            assert "local Slurm" in r.stdout
