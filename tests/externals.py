"""The external systems the tests use for real, each found or not, in one place.

``python tests/externals.py`` (scripts/test runs it before pytest) prints one line per system:
used, with where it was found, or skipped and why, so a run says what it really tested.
conftest.py takes PG_ADMIN_URL and the checks from here. Imports nothing of pilotfish.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
PG_ADMIN_URL = os.environ.get("PILOTFISH_TEST_PG", PG_DEFAULT)
VENV_BIN = Path(os.path.normpath(os.path.abspath(sys.executable))).parent  # not resolved: a venv


def pg_available() -> bool:
    try:
        import psycopg
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


RABBITMQ = ("127.0.0.1", 5672)


def rabbitmq_available() -> bool:
    """A RabbitMQ that admits guest/guest on 127.0.0.1:5672 (what the AMQP bridge tests use)."""
    try:
        import pika
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            *RABBITMQ, credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1, socket_timeout=3, blocked_connection_timeout=5))
        conn.close()
        return True
    except Exception:
        return False


def slurm_nodes() -> list[str]:
    """Names of the Slurm nodes that are up (idle/mix/alloc), or [] without a Slurm."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return []
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({n for n, t in (line.split() for line in out.splitlines() if line.strip())
                   if t.rstrip("*") in ("idle", "mix", "alloc", "comp")})


def torque_wrappers() -> bool:
    qsub = shutil.which("qsub")
    return bool(qsub and shutil.which("qstat")
                and "slurm" in Path(qsub).read_text(errors="replace").lower())


CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromedriver")


def chromium_available() -> bool:
    """Debian's chromium and its chromedriver (the web dashboard's browser tests)."""
    return all(os.access(p, os.X_OK) for p in CHROMIUM)


def _safe_url(url: str) -> str:
    """The URL without its password."""
    head, sep, tail = url.partition("@")
    if sep and ":" in head.split("//", 1)[-1]:
        user = head.split("//", 1)[-1].split(":", 1)[0]
        return f"{head.split('//', 1)[0]}//{user}:***@{tail}"
    return url


def report() -> list[tuple[str, str, str]]:
    """(system, "used" / "skipped" / "not run", where it was found or why not) for every
    external system the tests know."""
    rows = []
    where = ("PILOTFISH_TEST_PG" if "PILOTFISH_TEST_PG" in os.environ
             else "the default URL; set PILOTFISH_TEST_PG for another")
    if pg_available():
        rows.append(("PostgreSQL", "used", f"{_safe_url(PG_ADMIN_URL)} ({where})"))
    else:
        rows.append(("PostgreSQL", "skipped", f"nothing answers at {_safe_url(PG_ADMIN_URL)} "
                     f"({where})"))
    nodes = slurm_nodes()
    if len(nodes) >= 4:
        shown = ", ".join(nodes[:6]) + (" ..." if len(nodes) > 6 else "")
        rows.append(("Slurm", "used", f"{len(nodes)} nodes up: {shown}"))
    elif os.environ.get("PILOTFISH_NO_SLURM"):
        rows.append(("Slurm", "skipped", "PILOTFISH_NO_SLURM is set"))
    elif not shutil.which("sinfo"):
        rows.append(("Slurm", "skipped", "no sinfo on PATH (scripts/slurm_up starts one, as "
                     "root)"))
    else:
        rows.append(("Slurm", "skipped", f"{len(nodes)} nodes up, the tests need 4"))
    rows.append(("Torque (on Slurm)", *(("used", "Slurm's qsub/qstat/qdel wrappers")
                                        if torque_wrappers() else
                                        ("skipped", "no Slurm qsub wrapper (apt: "
                                         "slurm-wlm-torque, from scripts/slurm_up)"))))
    ch, bb = shutil.which("ch-run"), shutil.which("busybox")
    if ch and bb:
        rows.append(("Charliecloud", "used", f"{ch}, busybox for the test image"))
    else:
        gone = " and ".join(n for n, p in (("ch-run", ch), ("busybox", bb)) if not p)
        rows.append(("Charliecloud", "skipped", f"no {gone} (scripts/test_packages installs "
                     "them, as root)"))
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else "")
    rows.append(("OpenSSH sshd", *(("used", f"{sshd} on a loopback port (transfer tests)")
                                   if sshd and shutil.which("sftp") else
                                   ("skipped", "no sshd or sftp (scripts/test_packages installs "
                                               "openssh-server and openssh-client, as root)"))))
    mpiexec = VENV_BIN / "mpiexec"
    rows.append(("MPI", *(("used", f"Hydra {mpiexec} (pip mpich) with mpi4py")
                          if mpiexec.exists() else
                          ("skipped", f"no {mpiexec} (pip install mpich)"))))
    rows.append(("PBS Pro, Cobalt, HTCondor, LSF", "not run",
                 "not installable here: golden scripts and transcribed output"))
    rows.append(("Shifter, Apptainer, podman-hpc", "not run",
                 "not installed here: golden command lines"))
    if chromium_available():
        rows.append(("Chromium", "used", f"{CHROMIUM[0]} with {CHROMIUM[1]} (selenium)"))
    else:
        rows.append(("Chromium", "skipped", "no /usr/bin/chromium or /usr/bin/chromedriver "
                     "(scripts/test_packages installs chromium and chromium-driver, as root)"))
    if rabbitmq_available():
        rows.append(("RabbitMQ", "used", f"amqp://guest@{RABBITMQ[0]}:{RABBITMQ[1]}/"))
    else:
        rows.append(("RabbitMQ", "skipped", f"nothing admits guest at {RABBITMQ[0]}:"
                     f"{RABBITMQ[1]} (apt: rabbitmq-server)"))
    return rows


def main() -> int:
    required = os.environ.get("PILOTFISH_REQUIRE_EXTERNAL") == "1"
    print("test: external systems" + (" (PILOTFISH_REQUIRE_EXTERNAL=1: a missing one fails "
                                      "its tests)" if required else
                                      " (a missing one skips its tests)"))
    for name, status, how in report():
        print(f"  {name + ':':32} {status}: {how}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
