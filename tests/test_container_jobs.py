"""Apps whose tasks run inside a container image: for real with Charliecloud (``ch-run``, which
runs unprivileged here) in a registry-free busybox image the test builds, by a local agent and by
a pilot on the local Slurm; and what is refused (unknown runtime, images an app does not allow,
an image that does not exist: the job fails with the reason and the agent lives on)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import require, run_cli, sbatch, slurm_job_state, wait_for

from pilotfish.errors import ValidationError


def busybox_image(root: Path) -> Path:
    """A Charliecloud directory image: busybox-static and a marker only the image has."""
    require(bool(shutil.which("ch-run")) and bool(shutil.which("busybox")),
            "Charliecloud (ch-run) and busybox-static (scripts/test_packages)")
    img = root / "img"
    for d in ("bin", "etc", "tmp", "dev", "proc", "sys", "home", "root"):
        (img / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("busybox"), img / "bin" / "busybox")
    for tool in ("sh", "cat", "echo", "ls", "pwd", "grep"):
        (img / "bin" / tool).symlink_to("busybox")
    for f in ("passwd", "group", "hosts", "resolv.conf"):
        (img / "etc" / f).write_text("")
    (img / "MARKER").write_text("inside-the-image\n")
    os.environ.setdefault("USER", "root")  # ch-run wants it
    return img


def finished(c, ids):
    got = {}
    for j in c.jobs({"ids": ids}, limit=0):
        got[j["state"]] = got.get(j["state"], 0) + 1
    return got


def test_tasks_run_inside_a_charliecloud_image(server, tmp_path):
    img = busybox_image(tmp_path)
    c = server.client()
    # /bin/sh here is the IMAGE's busybox: the marker file exists only inside the image
    c.add_app({"name": "inside", "executable": "/bin/sh",
               "args": ["-c", "cat /MARKER > where.txt; echo $PILOTFISH_JOB_ID >> where.txt"],
               "container": {"image": str(img), "runtime": "charliecloud"}})
    ids = c.add_jobs([{"name": f"i{i}", "application": "inside"} for i in range(6)])
    server.agent(work_root=tmp_path / "work")
    wait_for(lambda: finished(c, ids) == {"JOB_FINISHED": 6}, 60, what="6 jobs in the image")
    for j in map(c.job, ids):
        text = (tmp_path / "work" / j["workdir"] / "where.txt").read_text().split()
        assert text == ["inside-the-image", str(j["id"])]
    assert not Path("/MARKER").exists()


def test_missing_image_fails_the_job_with_the_reason_and_the_agent_lives_on(server, tmp_path):
    busybox_image(tmp_path)
    c = server.client()
    c.add_app({"name": "gone", "executable": "/bin/true",
               "container": {"image": str(tmp_path / "no-such-image"),
                             "runtime": "charliecloud"}})
    c.add_app({"name": "host", "executable": "/bin/true"})
    bad = c.add_job(name="b", application="gone", max_retries=0)
    agent = server.agent(work_root=tmp_path / "work")
    wait_for(lambda: c.job(bad)["state"] == "FAILED", 60, what="the job to fail")
    assert "does not exist on this node" in c.job(bad)["message"]
    good = c.add_job(name="g", application="host")
    wait_for(lambda: c.job(good)["state"] == "JOB_FINISHED", 60, what="the next job")
    assert agent.poll() is None


def test_job_image_overrides_within_what_the_app_allows(server, tmp_path):
    c = server.client()
    c.add_app({"name": "sim", "executable": "/usr/bin/sim",
               "container": {"image": "docker:lab/sim:1.0", "runtime": "apptainer",
                             "images": ["docker:lab/sim:*"]}})
    c.add_app({"name": "fixed", "executable": "/usr/bin/sim",
               "container": {"image": "docker:lab/sim:1.0"}})
    c.add_app({"name": "host", "executable": "/bin/true"})
    j = c.add_job(name="ok", application="sim", image="docker:lab/sim:2.0")
    assert c.job(j)["image"] == "docker:lab/sim:2.0"
    cases = [({"application": "sim", "image": "docker:evil/sim:1"}, "does not allow image"),
             ({"application": "fixed", "image": "docker:lab/sim:2.0"}, "its image is fixed"),
             ({"application": "host", "image": "docker:lab/sim:2.0"}, "runs on the host"),
             ({"application": "sim", "image": "docker:lab/sim:$(id)"}, "not an image reference"),
             ({"application": "sim", "image": "../../etc"}, "not an image reference")]
    for extra, message in cases:
        with pytest.raises(ValidationError, match=message):
            c.add_job(name="x", **extra)
    assert len(c.jobs({"app": "sim"}, limit=0)) == 1


@pytest.mark.parametrize("container, message", [
    ({"image": "x", "runtime": "docker-in-docker"}, "unknown container runtime"),
    ({"image": "x", "extra": 1}, "unknown container key"),
    ({"runtime": "apptainer"}, "is not an image reference"),
    ({"image": "x", "images": "docker:*"}, "list of patterns"),
])
def test_bad_app_containers_are_refused(server, container, message):
    c = server.client()
    with pytest.raises(ValidationError, match=message):
        c.add_app({"name": "a", "executable": "/bin/true", "container": container})
    assert c.apps() == []


def test_agent_refuses_an_unknown_runtime(home):
    r = run_cli(home, "pilot", "agent", "--server", "tcp://127.0.0.1:9",
                "--container-runtime", "lxc")
    assert r.returncode == 1 and "unknown container runtime 'lxc'" in r.stderr


@pytest.mark.slow
def test_pilot_on_slurm_runs_tasks_inside_the_image(slurm, server, tmp_path):
    """A 2-node pilot on the local Slurm whose agents (--container-runtime charliecloud, as a
    site profile's `container` gives them) run every task with ch-run in the image."""
    img = busybox_image(tmp_path)
    c = server.client()
    c.add_app({"name": "inside", "executable": "/bin/sh",
               "args": ["-c", "cat /MARKER > where.txt"],
               "container": {"image": str(img), "runtime": "charliecloud"}})
    ids = c.add_jobs([{"name": f"s{i}", "application": "inside"} for i in range(20)])
    script = f"""#!/bin/bash
#SBATCH -N 2
#SBATCH --exclusive
#SBATCH -t 10
#SBATCH -o {server.home}/pilot-%j.out
exec {sys.executable} -m pilotfish --home {server.home} pilot run --server {server.address} \\
    --mpi pmi2 -- --idle-timeout 3 --container-runtime charliecloud
"""
    jid = sbatch(script)
    try:
        wait_for(lambda: finished(c, ids) == {"JOB_FINISHED": 20}, 120, 0.2,
                 "20 jobs inside the image")
        for j in map(c.job, ids):
            assert (server.home / "work" / j["workdir"] / "where.txt").read_text() == \
                "inside-the-image\n"
        wait_for(lambda: slurm_job_state(jid) is None, 60, 0.2, "the pilot to end")
    finally:
        if slurm_job_state(jid) is not None:
            subprocess_scancel(jid)


def subprocess_scancel(jid: str) -> None:
    import subprocess
    subprocess.run(["scancel", jid], capture_output=True, timeout=30)


def test_whole_pilot_inside_an_image_scripts(home):
    """Pilot-level images, checked against the documented forms (Shifter's Slurm integration:
    ``#SBATCH --image=`` with the head run by ``shifter``; Blue Waters Torque: ``#PBS -v
    UDI=...`` with ``CRAY_ROOTFS=UDI``, as the LIGO glideins ran). Neither runs here."""
    r = run_cli(home, "pilot", "submit", "--site", "perlmutter", "--nodes", "2", "--walltime",
                "30", "--image", "docker:ligo/glidein:1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --image=docker:ligo/glidein:1\n" in r.stdout
    head = [line for line in r.stdout.splitlines() if line.startswith("exec ")][0]
    assert head.startswith("exec shifter ") and " pilot run " in head
    assert "--container-runtime shifter --bind '$SCRATCH'" in head  # expanded on the node
    r = run_cli(home, "pilot", "submit", "--site", "bluewaters", "--nodes", "2", "--walltime",
                "60", "--image", "docker:ligo/glidein:1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "#PBS -v UDI=docker:ligo/glidein:1" in r.stdout
    assert "export CRAY_ROOTFS=UDI" in r.stdout
    head = [line for line in r.stdout.splitlines() if line.startswith("exec ")][0]
    assert "shifter" not in head.split(" pilot run ")[0]  # aprun itself starts in the UDI


@pytest.mark.parametrize("args, message", [
    (["--site", "localslurm", "--image", "docker:x/y:1"], "has no container runtime"),
    (["--site", "localslurm", "--runtime", "apptainer"], "--runtime goes with --image"),
    (["--site", "localslurm", "--image", "docker:x/y:1", "--runtime", "rkt"], "unknown"),
    (["--site", "polaris", "--image", "-rf"], "image"),
])
def test_bad_pilot_images_are_refused(home, args, message):
    r = run_cli(home, "pilot", "submit", "--nodes", "1", "--walltime", "10", "--dry-run", *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_agent_paths_with_unset_variables_are_refused(home):
    r = run_cli(home, "pilot", "agent", "--server", "tcp://127.0.0.1:9", "--work-root",
                "$PILOTFISH_TEST_UNSET_VAR/w")
    assert r.returncode == 1 and "is not set on this node" in r.stderr


def test_site_profile_binds_reach_the_agents_and_bad_binds_are_refused(home):
    sites = home / "sites"
    sites.mkdir()
    (sites / "mine.yaml").write_text("extends: perlmutter\n"
                                     "binds: [/global/cfs/lab, \"$HOME/data:/data\"]\n")
    r = run_cli(home, "pilot", "submit", "--site", "mine", "--nodes", "1", "--walltime", "10",
                "--dry-run")
    head = [line for line in r.stdout.splitlines() if line.startswith("exec ")][0]
    assert ("--container-runtime shifter --bind '$SCRATCH' --bind /global/cfs/lab "
            "--bind '$HOME/data:/data'") in head
    for bad in ("/a/../etc", "/a;rm", "relative/path", "/a b"):
        (sites / "bad.yaml").write_text(f"extends: perlmutter\nbinds: [{bad!r}]\n")
        r = run_cli(home, "site", "validate", "bad")
        assert r.returncode == 1 and "binds[0]" in r.stderr, (bad, r.stderr)
