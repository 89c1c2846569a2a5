"""Container runtimes: golden argv per runtime, property tests, pilot-level forms, image specs,
``container build`` and a real Charliecloud run.

Shifter, Apptainer/Singularity and podman-hpc cannot run here (no setuid Shifter, no Apptainer
or podman-hpc package on this machine; Shifter and podman-hpc exist only at NERSC): their golden
command lines follow their documentation (Shifter's usage text and docs ``doc/command/
shifter.rst``, ``doc/wlm/slurm.rst``, Blue Waters and Perlmutter job scripts; ``apptainer exec``
help and user guide; NERSC's podman-hpc pages and podman-run(1)). Charliecloud's ``ch-run`` is
installed (charliecloud-runtime) and is run for real on a registry-free busybox image.
"""
from __future__ import annotations

import dataclasses
import getpass
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from pilotfish.container import (PROGRAMS, RUNTIMES, SCHEDULERS, WRAPPERS, ContainerRequest,
                                 PilotContainer, pilot_level, program, wrap)
from pilotfish.container.build import (BUILDERS, BuildError, SpecError, detect_package_manager,
                                       load_spec, parse_spec, plan, plan_dry, render_definition,
                                       render_dockerfile)
from pilotfish.errors import ValidationError

DATA = Path(__file__).parent / "data" / "container"
CMD = ("./app", "--in", "a b.dat")
BIND = (("/scratch/u/run1", "/data"),)


def creq(runtime: str, image: str = "repo/app:1.0", **kw) -> ContainerRequest:
    kw.setdefault("argv", CMD)
    return ContainerRequest(runtime, "" if runtime == "none" else image, **kw)


# ---------------------------------------------------------------- golden command lines

GOLDEN = [
    # NERSC: `shifter --image=docker:repo:tag --volume=src:dst ... -- cmd` (usage text).
    (creq("shifter", binds=BIND),
     ["shifter", "--image=docker:repo/app:1.0", "--volume=/scratch/u/run1:/data", "--", *CMD]),
    (creq("shifter", "docker:ubuntu:22.04"),
     ["shifter", "--image=docker:ubuntu:22.04", "--", *CMD]),
    (creq("shifter", "id:4f2a", env=(("OMP_NUM_THREADS", "8"), ("A", "x y"))),
     ["shifter", "--image=id:4f2a", "--env=OMP_NUM_THREADS=8", "--env=A=x y", "--", *CMD]),
    # Perlmutter: GPUs and Cray MPICH come in as shifter modules, in one list.
    (creq("shifter", "nvcr.io/nvidia/jax:25.04-py3", gpus="nvidia", mpi=True,
          binds=(("/pscratch/sd/u", "/work"), ("/global/cfs/x", "/cfs")), workdir="/work"),
     ["shifter", "--image=docker:nvcr.io/nvidia/jax:25.04-py3", "--volume=/pscratch/sd/u:/work",
      "--volume=/global/cfs/x:/cfs", "--module=gpu,mpich", "--workdir=/work", "--", *CMD]),
    (creq("shifter", mpi=True), ["shifter", "--image=docker:repo/app:1.0", "--module=mpich",
                                 "--", *CMD]),
    # `apptainer exec --bind src:dst[,..] [--nv|--rocm] [--cleanenv --env K=V] [--pwd] IMAGE`.
    (creq("apptainer", "/scratch/img/app.sif",
          binds=(("/scratch/u/run1", "/data"), ("/home/u", "/home/u"))),
     ["apptainer", "exec", "--bind", "/scratch/u/run1:/data,/home/u:/home/u", "--cleanenv",
      "/scratch/img/app.sif", *CMD]),
    (creq("apptainer", "docker://ubuntu:22.04", gpus="nvidia", workdir="/data", binds=BIND,
          env=(("OMP_NUM_THREADS", "4"), ("CUDA_VISIBLE_DEVICES", "0,1"))),
     ["apptainer", "exec", "--bind", "/scratch/u/run1:/data", "--nv", "--cleanenv",
      "--env", "OMP_NUM_THREADS=4", "--env", "CUDA_VISIBLE_DEVICES=0,1", "--pwd", "/data",
      "docker://ubuntu:22.04", *CMD]),
    # MPI ranks keep the launcher's PMI variables: no --cleanenv.
    (creq("apptainer", "/img/app.sif", gpus="amd", mpi=True),
     ["apptainer", "exec", "--rocm", "/img/app.sif", *CMD]),
    (creq("singularity", "/img/app.sif", binds=BIND, env=(("A", "1"),)),
     ["singularity", "exec", "--bind", "/scratch/u/run1:/data", "--cleanenv", "--env", "A=1",
      "/img/app.sif", *CMD]),
    # `ch-run -b SRC:DST --set-env=K=V -c DIR IMAGE -- CMD` (ch-run --help, 0.31).
    (creq("charliecloud", "/var/tmp/app.sqfs", binds=BIND, env=(("PATH", "/opt/bin:$PATH"),),
          workdir="/data"),
     ["ch-run", "-b", "/scratch/u/run1:/data", "--env-no-expand", "--set-env=PATH=/opt/bin:$PATH",
      "-c", "/data", "/var/tmp/app.sqfs", "--", *CMD]),
    (creq("charliecloud", "/var/tmp/app", mpi=True), ["ch-run", "/var/tmp/app", "--", *CMD]),
    # NERSC podman-hpc: `podman-hpc run --rm [--mpi] [--gpu] -v ... -e ... -w DIR IMAGE CMD`.
    (creq("podman-hpc", "registry.nersc.gov/proj/app:1.0", binds=BIND, gpus="nvidia", mpi=True,
          env=(("A", "1"), ("B", "x y")), workdir="/data"),
     ["podman-hpc", "run", "--rm", "--mpi", "--gpu", "-v", "/scratch/u/run1:/data", "-e", "A=1",
      "-e", "B=x y", "-w", "/data", "registry.nersc.gov/proj/app:1.0", *CMD]),
    (creq("podman-hpc"), ["podman-hpc", "run", "--rm", "repo/app:1.0", *CMD]),
    # none: the argv itself; env through env(1).
    (creq("none"), list(CMD)),
    (creq("none", env=(("A", "1"), ("B", "x y")), gpus="nvidia", mpi=True),
     ["env", "A=1", "B=x y", *CMD]),
]


@pytest.mark.parametrize("request_,expected", GOLDEN,
                         ids=[f"{g[0].runtime}-{i}" for i, g in enumerate(GOLDEN)])
def test_golden(request_, expected):
    assert wrap(request_) == expected
    assert WRAPPERS[request_.runtime](request_) == expected


def test_registry_programs_and_unknown_runtime():
    assert RUNTIMES == ("none", "shifter", "singularity", "apptainer", "charliecloud",
                        "podman-hpc")
    assert set(WRAPPERS) == set(RUNTIMES) == set(PROGRAMS)
    assert [program(r) for r in RUNTIMES] == [None, "shifter", "singularity", "apptainer",
                                              "ch-run", "podman-hpc"]
    for bad in ("docker", "", None, "Shifter"):
        with pytest.raises(ValidationError) as err:
            wrap(ContainerRequest(bad, "img", ("a",)))  # type: ignore[arg-type]
        assert "\n" not in str(err.value) and all(r in str(err.value) for r in RUNTIMES)
        with pytest.raises(ValidationError):
            program(bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        wrap(("shifter", "img", ("a",)))  # type: ignore[arg-type]
    # The program a wrapper starts is the one program() names.
    for r in RUNTIMES[1:]:
        assert wrap(creq(r, "/img"))[0] == program(r)


def test_schedulers_match_the_batch_adapters():
    from pilotfish.pilot.batch import SCHEDULERS as BATCH
    assert set(SCHEDULERS) == set(BATCH)


# ---------------------------------------------------------------- properties

TRICKY = ["a b", ";", "$(touch pwned)", "`id`", "'", '"', "--rm", "-v", "&&", "|", "*", "",
          "é", "a,b", "=", "\t", "${HOME}", "a:b", "::", "--", "-e", "x=y,z", "'q'", "\\"]
GOOD_PIECES = ["data", ".", "é", "-n", "ok_dir", "v1.2", "", "a=b", "x+y", "@home"]
BAD_PIECES = ["run 1", "a;b", "$x", "..", "a:b", "a,b", "`c`", "x*", "tab\t", "q'", "new\nline",
              "(s)", "a&b", "a|b", "<in", "ok?", "!x", "{y}", "back\\slash", "\x7f"]
META = set(";&|$`<>(){}*?!'\"\\\n")


def path_ok(p: str, separators: bool = True) -> bool:
    """Independent oracle for a bind path."""
    return (p.startswith("/") and len(p) <= 4096 and ".." not in p.split("/")
            and not any(c in META or c.isspace() or ord(c) < 32 or ord(c) == 127 for c in p)
            and not (separators and (":" in p or "," in p)))


def random_path(rng: random.Random) -> str:
    parts = [rng.choice(BAD_PIECES if rng.random() < 0.08 else GOOD_PIECES)
             for _ in range(rng.randint(1, 4))]
    lead = "/" if rng.random() < 0.95 else ""
    return lead + "/".join(parts)


def refused_by_runtime(req: ContainerRequest) -> bool:
    """The per-runtime refusals the module docstrings document."""
    rt = req.runtime
    if rt == "none":
        return bool(req.binds or req.workdir or (req.env and "=" in req.argv[0]))
    if rt == "shifter":
        forbidden = ("/dev", "/etc", "/opt/udiImage", "/proc", "/var")
        return req.gpus == "amd" or any(
            d == f or d.startswith(f + "/") for _, d in req.binds for f in forbidden)
    if rt in ("apptainer", "singularity"):
        return any('"' in v or ("=" in v and "," in v) for _, v in req.env)
    if rt == "charliecloud":
        return req.gpus is not None or any(v.startswith("'") or v.endswith("'")
                                           for _, v in req.env)
    return req.gpus == "amd"  # podman-hpc


def random_request(rng: random.Random, runtime: str) -> ContainerRequest:
    binds = () if runtime == "none" and rng.random() < 0.7 else tuple(
        (random_path(rng), random_path(rng)) for _ in range(rng.randint(0, 3)))
    env = tuple((f"V{i}_{rng.randint(0, 99)}", rng.choice(TRICKY))
                for i in range(rng.randint(0, 3)))
    argv = (rng.choice(["/bin/app", "./a.out", "python3", "-x", "X=1"]),
            *(rng.choice(TRICKY) for _ in range(rng.randint(0, 5))))
    workdir = None if runtime == "none" or rng.random() < 0.5 else random_path(rng)
    return ContainerRequest(runtime, "" if runtime == "none" else rng.choice(
        ["repo/app:1.0", "/scratch/app.sif", "docker://ubuntu:22.04", "id:abc"]),
        argv=argv, binds=binds, env=env, gpus=rng.choice([None, None, None, "nvidia", "amd"]),
        workdir=workdir, mpi=rng.random() < 0.3)


def parsed_back(runtime: str, prefix: list[str]) -> tuple[dict[str, str], list[str], str | None]:
    """(env, bind specs, workdir) a built prefix hands to the runtime, per its syntax."""
    env: list[str] = []
    binds: list[str] = []
    workdir = None
    if runtime == "shifter":
        assert prefix[-1] == "--"
        for item in prefix:
            if item.startswith("--env="):
                env.append(item.removeprefix("--env="))
            elif item.startswith("--volume="):
                binds.append(item.removeprefix("--volume="))
            elif item.startswith("--workdir="):
                workdir = item.removeprefix("--workdir=")
    elif runtime in ("apptainer", "singularity"):
        for i, item in enumerate(prefix[:-1]):
            if item == "--env":
                env.append(prefix[i + 1])
            elif item == "--bind":
                binds += prefix[i + 1].split(",")
            elif item == "--pwd":
                workdir = prefix[i + 1]
    elif runtime == "charliecloud":
        assert prefix[-1] == "--"
        for i, item in enumerate(prefix):
            if item.startswith("--set-env="):
                assert "--env-no-expand" in prefix[:i]  # values are taken literally
                env.append(item.removeprefix("--set-env="))
            elif item == "-b":
                binds.append(prefix[i + 1])
            elif item == "-c":
                workdir = prefix[i + 1]
    elif runtime == "podman-hpc":
        assert prefix[:3] == ["podman-hpc", "run", "--rm"]
        for i, item in enumerate(prefix[:-1]):
            if item == "-e":
                env.append(prefix[i + 1])
            elif item == "-v":
                binds.append(prefix[i + 1])
            elif item == "-w":
                workdir = prefix[i + 1]
    else:
        if prefix:
            assert prefix[0] == "env"
            env = prefix[1:]
    for item in env:
        assert "=" in item  # always NAME=value: never a bare name copying the caller's value
    return dict(e.split("=", 1) for e in env), binds, workdir


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_properties_over_generated_hostile_requests(runtime):
    rng = random.Random(f"container-{runtime}")
    built = refused = 0
    for _ in range(400):
        r = random_request(rng, runtime)
        valid = (all(path_ok(s) and path_ok(d) and d.rstrip("/") for s, d in r.binds)
                 and len({d.rstrip("/") for _, d in r.binds}) == len(r.binds)
                 and (r.workdir is None or path_ok(r.workdir, separators=False))
                 and r.argv[0] != "")
        if not valid or refused_by_runtime(r):
            with pytest.raises(ValidationError) as err:
                wrap(r)
            assert "\n" not in str(err.value)
            refused += 1
            continue
        out = wrap(r)
        built += 1
        # A list of argv items, never a shell string; the command last, item for item.
        assert isinstance(out, list) and all(isinstance(i, str) for i in out)
        assert out[len(out) - len(r.argv):] == list(r.argv)
        prefix = out[:len(out) - len(r.argv)]
        if runtime != "none":
            image_at = -2 if runtime in ("shifter", "charliecloud") else -1
            if runtime != "shifter":
                assert prefix[image_at] == r.image  # the image: one item, right before the argv
        assert all("\0" not in i and "\n" not in i for i in prefix)
        env, binds, workdir = parsed_back(runtime, prefix)
        assert env == dict(r.env)
        assert binds == [f"{s}:{d}" for s, d in r.binds]
        assert workdir == r.workdir
    assert built > 50 and refused > 50, (built, refused)


BAD = [
    dict(image=""), dict(image="-v"), dict(image="--privileged"), dict(image="a b"),
    dict(image="img\n"), dict(image="img\0"), dict(image="a;b"), dict(image="$(x)"),
    dict(image="a,b"), dict(image=3),
    dict(argv=()), dict(argv=("",)), dict(argv=["a"]), dict(argv=("a", "b\0c")),
    dict(argv=("a", 3)),
    dict(binds=(("/a/../etc", "/data"),)), dict(binds=(("/a", "/data/.."),)),
    dict(binds=(("relative", "/data"),)), dict(binds=(("/a", "data"),)),
    dict(binds=(("/my data", "/data"),)), dict(binds=(("/a", "/d\tx"),)),
    dict(binds=(("/a;rm -rf ~", "/data"),)), dict(binds=(("/a", "/$HOME"),)),
    dict(binds=(("/a`id`", "/data"),)), dict(binds=(("/a|b", "/data"),)),
    dict(binds=(("/a*", "/data"),)), dict(binds=(("/a'", "/data"),)),
    dict(binds=(("/a\nb", "/data"),)), dict(binds=(("/a:b", "/data"),)),
    dict(binds=(("/a", "/d,e"),)), dict(binds=(("/a", "/"),)),
    dict(binds=(("/a", "/d"), ("/b", "/d/"))), dict(binds=(("/a",),)),
    dict(binds=["/a:/b"]), dict(binds=(("/a", 3),)),
    dict(env=(("1X", "v"),)), dict(env=(("A-B", "v"),)), dict(env=(("", "v"),)),
    dict(env=(("A", "v\0"),)), dict(env=(("A", "line\nbreak"),)), dict(env=(("A", "cr\r"),)),
    dict(env=(("A", 1),)), dict(env=(("A", "1"), ("A", "2"))), dict(env=("A=1",)),
    dict(gpus="intel"), dict(gpus=True), dict(workdir="data"), dict(workdir="/a/../b"),
    dict(workdir="/a b"), dict(mpi="yes"),
]


@pytest.mark.parametrize("runtime", RUNTIMES[1:])
@pytest.mark.parametrize("bad", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_raise_validation_error(runtime, bad):
    r = dataclasses.replace(creq(runtime, "/img/app.sif"), **bad)
    with pytest.raises(ValidationError) as err:
        r.validate()
    assert "\n" not in str(err.value) and len(str(err.value)) < 300
    with pytest.raises(ValidationError):
        wrap(r)


@pytest.mark.parametrize("bad,words", [
    (dict(binds=(("/a/../etc", "/data"),)), "'..'"),
    (dict(binds=(("/my data", "/data"),)), "white space"),
    (dict(binds=(("/a;b", "/data"),)), "metacharacters"),
    (dict(image="-v/etc:/x"), "option"),
    (dict(binds=(("/a:b", "/data"),)), "':'"),
])
def test_error_messages_say_what_is_wrong(bad, words):
    with pytest.raises(ValidationError, match=words):
        wrap(dataclasses.replace(creq("apptainer"), **bad))


@pytest.mark.parametrize("runtime,change,words", [
    ("none", dict(binds=BIND), "cannot bind"),
    ("none", dict(workdir="/data"), "working directory"),
    ("none", dict(image="repo/app:1.0"), "runs no image"),
    ("none", dict(env=(("A", "1"),), argv=("X=1", "app")), "assignment"),
    ("shifter", dict(gpus="amd"), "nvidia"),
    ("shifter", dict(binds=(("/a", "/etc/x"),)), "/etc"),
    ("shifter", dict(binds=(("/a", "/var"),)), "/var"),
    ("apptainer", dict(env=(("A", 'say "hi"'),)), "--env"),
    ("singularity", dict(env=(("A", "k=v,w"),)), "--env"),
    ("charliecloud", dict(gpus="nvidia"), "ch-fromhost"),
    ("charliecloud", dict(env=(("A", "'quoted'"),)), "single quotes"),
    ("podman-hpc", dict(gpus="amd"), "NVIDIA"),
])
def test_requests_a_runtime_cannot_express_are_refused(runtime, change, words):
    with pytest.raises(ValidationError, match=words):
        wrap(dataclasses.replace(creq(runtime), **change))


def test_paths_a_runtime_would_misread_are_fine_elsewhere():
    # Shifter's forbidden destinations only bind Shifter; /etc-like paths are fine as sources.
    assert wrap(creq("apptainer", binds=(("/a", "/etc/x"),)))[3] == "/a:/etc/x"
    assert "--volume=/etc/hosts:/hosts" in wrap(creq("shifter", binds=(("/etc/hosts",
                                                                        "/hosts"),)))
    # Values with '=' or ',' alone are fine for Apptainer (one '=' is one pair).
    out = wrap(creq("apptainer", env=(("CUDA_VISIBLE_DEVICES", "0,1"), ("F", "a=b"))))
    assert out[out.index("--env") + 1] == "CUDA_VISIBLE_DEVICES=0,1"


def test_wrappers_are_pure():
    r = creq("apptainer", binds=BIND, env=(("A", "1"),))
    before = dataclasses.astuple(r)
    for name in RUNTIMES[1:]:
        req = dataclasses.replace(r, runtime=name)
        first = wrap(req)
        first.append("mutated")
        assert wrap(req) == first[:-1]
    assert dataclasses.astuple(r) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.image = "other"  # type: ignore[misc]


def test_no_documented_only_runtime_is_installed_here():
    # Documents why their goldens are not run: the runtimes are absent on this machine.
    missing = [p for p in ("shifter", "apptainer", "singularity", "podman-hpc")
               if shutil.which(p) is None]
    assert missing, "a documented-only runtime is installed; add a real-run test for it"


# ---------------------------------------------------------------- pilot-level forms

PILOT_GOLDEN = [
    # Shifter's Slurm integration: #SBATCH --image/--volume, then `shifter <head>`.
    (("shifter", "repo/app:1.0", "slurm", BIND),
     PilotContainer(directives=("--image=docker:repo/app:1.0",
                                "--volume=/scratch/u/run1:/data"),
                    head_prefix=("shifter",))),
    # Blue Waters (Torque, Cray): #PBS -v UDI=..., CRAY_ROOTFS=UDI, aprun runs in the image.
    (("shifter", "docker:ligo/glidein:el7", "torque", ()),
     PilotContainer(directives=("-v UDI=docker:ligo/glidein:el7",),
                    env=(("CRAY_ROOTFS", "UDI"),))),
    (("shifter", "repo/app:1.0", "pbs", BIND),
     PilotContainer(head_prefix=("shifter", "--image=docker:repo/app:1.0",
                                 "--volume=/scratch/u/run1:/data", "--"))),
    (("apptainer", "/scratch/app.sif", "slurm", BIND),
     PilotContainer(head_prefix=("apptainer", "exec", "--bind", "/scratch/u/run1:/data",
                                 "/scratch/app.sif"))),
    (("singularity", "/scratch/app.sif", "pbs", ()),
     PilotContainer(head_prefix=("singularity", "exec", "/scratch/app.sif"))),
    (("charliecloud", "/var/tmp/app.sqfs", "slurm", BIND),
     PilotContainer(head_prefix=("ch-run", "-b", "/scratch/u/run1:/data", "/var/tmp/app.sqfs",
                                 "--"))),
    (("podman-hpc", "registry.nersc.gov/p/app:1", "slurm", BIND),
     PilotContainer(head_prefix=("podman-hpc", "run", "--rm", "--env-host", "-v",
                                 "/scratch/u/run1:/data", "registry.nersc.gov/p/app:1"))),
    (("none", "", "local", ()), PilotContainer()),
]


@pytest.mark.parametrize("args,expected", PILOT_GOLDEN,
                         ids=[f"{a[0]}-{a[2]}" for a, _ in PILOT_GOLDEN])
def test_pilot_level_golden(args, expected):
    runtime, image, scheduler, binds = args
    assert pilot_level(runtime, image, scheduler, binds=binds) == expected


@pytest.mark.parametrize("args,words", [
    (("shifter", "repo/app:1.0", "torque", BIND), "no volumes"),
    (("shifter", "repo/app:1.0", "sge", ()), "unknown scheduler"),
    (("docker", "repo/app:1.0", "slurm", ()), "unknown container runtime"),
    (("apptainer", "-x.sif", "slurm", ()), "option"),
    (("apptainer", "/a.sif", "slurm", (("/a/..", "/b"),)), "'..'"),
    (("none", "repo/app:1.0", "slurm", ()), "runs no image"),
    (("shifter", "repo/app:1.0", "slurm", (("/a", "/proc/x"),)), "/proc"),
])
def test_pilot_level_refusals(args, words):
    runtime, image, scheduler, binds = args
    with pytest.raises(ValidationError, match=words):
        pilot_level(runtime, image, scheduler, binds=binds)


def test_pilot_level_prefixes_are_the_wrappers_own_forms():
    """Off the Slurm/Torque integrations, a pilot's head prefix is what wrap() builds for a task
    minus the task (env cleaning aside: the head keeps the batch job's environment)."""
    head = ("pilotfish", "pilot", "run")
    for runtime, image in (("charliecloud", "/img"), ("shifter", "repo:1")):
        pc = pilot_level(runtime, image, "pbs", binds=BIND)
        assert list(pc.head_prefix) + list(head) == wrap(ContainerRequest(runtime, image, head,
                                                                          binds=BIND))


# ---------------------------------------------------------------- image specs

@pytest.mark.parametrize("spec,stem", [("app/spec.yaml", "app"), ("rocky/hpc.yaml", "rocky")])
def test_spec_renders_golden_dockerfile_and_definition(spec, stem):
    """Golden text written from the Dockerfile reference (LABEL/ENV k="v", RUN shell form,
    COPY and ENTRYPOINT JSON forms) and Apptainer's definition-file sections (header,
    %files, %post, %environment, %runscript, %labels)."""
    s = load_spec(DATA / spec)
    assert render_dockerfile(s) == (DATA / f"{stem}.Dockerfile.golden").read_text()
    assert render_definition(s) == (DATA / f"{stem}.def.golden").read_text()


def test_spec_fields_and_package_manager_detection():
    s = load_spec(DATA / "app" / "spec.yaml")
    assert s.name == "pf-demo" and s.package_manager == "apt"
    assert s.context == (DATA / "app").resolve()
    assert load_spec(DATA / "rocky" / "hpc.yaml").name == "hpc"  # from the file name
    assert load_spec(DATA / "rocky" / "hpc.yaml").package_manager == "dnf"
    assert detect_package_manager("nvcr.io/nvidia/cuda:12.2.0-base-ubuntu22.04") == "apt"
    assert detect_package_manager("almalinux:9") == "dnf"
    assert detect_package_manager("python:3.12") is None
    assert detect_package_manager("debian-on-fedora:1") is None  # both: cannot tell


def test_pip_requirements_are_quoted_in_run_lines():
    s = load_spec(DATA / "app" / "spec.yaml")
    assert "'numpy>=1.26,<2'" in render_dockerfile(s)  # '<' and '>' are not redirections
    assert "'numpy>=1.26,<2'" in render_definition(s)


@pytest.mark.parametrize("text,words", [
    ("- a\n- b\n", "expected a mapping"),
    ("base: ubuntu:22.04\nbse: x\n", "unknown key 'bse'"),
    ("packages: [gcc]\n", "base: expected the base image"),
    ("base: 'ubuntu 22.04'\n", "base: expected an image reference"),
    ("base: ubuntu\npackages: gcc\n", "packages: expected a list of package names"),
    ("base: ubuntu\npackages: [gcc, 'x; rm -rf /']\n", "packages: expected"),
    ("base: ubuntu\npackages: [gcc, gcc]\n", "each once"),
    ("base: python:3.12\npackages: [gcc]\n", "package_manager: expected apt or dnf"),
    ("base: ubuntu\npackage_manager: yum\n", "package_manager: expected one of apt, dnf"),
    ("base: ubuntu\npip: [\"numpy'; id'\"]\n", "pip: expected"),
    ("base: ubuntu\nenv: {OMP_NUM_THREADS: 1}\n", "env.OMP_NUM_THREADS: expected a string"),
    ("base: ubuntu\nenv: {A: '$HOME'}\n", "env.A: expected a one-line string"),
    ("base: ubuntu\nenv: {1A: x}\n", "env: expected variable names"),
    ("base: ubuntu\nlabels: {'a b': x}\n", "labels: expected label keys"),
    ("base: ubuntu\nlabels: {a: 'say \"x\"'}\n", "labels.a"),
    ("base: ubuntu\nfiles: [{src: app.py}]\n", "files[0]: expected {src: ..., dst: ...}"),
    ("base: ubuntu\nfiles: [{src: ../etc/passwd, dst: /x}]\n", "files[0]"),
    ("base: ubuntu\nfiles: [{src: /etc/passwd, dst: /x}]\n", "files[0]"),
    ("base: ubuntu\nfiles: [{src: app.py, dst: relative}]\n", "files[0]: dst"),
    ("base: ubuntu\nfiles: [{src: missing.py, dst: /x}]\n", "does not exist"),
    ("base: ubuntu\nentrypoint: python3 app.py\n", "entrypoint: expected a list"),
    ("base: ubuntu\nname: My App\n", "name: expected an image name"),
    ("base: [ubuntu\n", "not valid YAML"),
])
def test_bad_specs_name_the_file_key_and_expectation(tmp_path, text, words):
    (tmp_path / "app.py").write_text("print(1)\n")
    f = tmp_path / "image.yaml"
    f.write_text(text)
    with pytest.raises(SpecError) as err:
        load_spec(f)
    msg = str(err.value)
    assert msg.startswith(str(f)) and words in msg and "\n" not in msg, msg


def test_missing_spec_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- build plans

def which_of(*present: str):
    return lambda name: f"/usr/bin/{name}" if name in present else None


def test_build_plans_per_runtime(tmp_path):
    s = load_spec(DATA / "app" / "spec.yaml")
    ctx = str(s.context)
    out = tmp_path / "out"

    p = plan(s, "apptainer", out=out, which=which_of("apptainer", "docker"))
    assert p.builder == "apptainer" and p.artifact == f"{out}/pf-demo.sif"
    # both files, always (a site with the other runtime needs the other one); apptainer reads
    # the definition file
    assert [f for f, _ in p.files] == [f"{out}/pf-demo.Dockerfile", f"{out}/pf-demo.def"]
    assert p.uses == f"{out}/pf-demo.def"
    assert p.steps[0].argv == ("apptainer", "build", "--force", f"{out}/pf-demo.sif",
                               f"{out}/pf-demo.def")
    assert p.steps[0].cwd == ctx  # %files sources are relative to the spec's directory

    p = plan(s, "charliecloud", tag="pf-demo:2", out=out, which=which_of("ch-image"))
    assert [st.argv for st in p.steps] == [
        ("ch-image", "build", "-t", "pf-demo:2", "-f", f"{out}/pf-demo.Dockerfile", ctx),
        ("ch-convert", "-i", "ch-image", "-o", "squash", "pf-demo:2", f"{out}/pf-demo.sqfs")]

    p = plan(s, "shifter", tag="registry.example.org/g/pf-demo:1", which=which_of("podman"))
    assert p.steps[0].argv == ("podman", "build", "-t", "registry.example.org/g/pf-demo:1",
                               "-f", f"{ctx}/pf-demo.Dockerfile", ctx)
    assert p.publish == ("podman push registry.example.org/g/pf-demo:1   # to a registry the "
                         "site can reach", "shifterimg pull docker:registry.example.org/g/"
                         "pf-demo:1   # on the site's login node")

    # a tag without a registry is never pushed to docker.io/library/: a placeholder to fill
    p = plan(s, "shifter", which=which_of("docker"))
    assert p.publish == (
        "# REGISTRY: a registry the site can reach, e.g. registry.example.org/group (or build "
        "with --registry)",
        "docker tag pf-demo:latest REGISTRY/pf-demo:latest",
        "docker push REGISTRY/pf-demo:latest   # to a registry the site can reach",
        "shifterimg pull docker:REGISTRY/pf-demo:latest   # on the site's login node")
    p = plan(s, "shifter", registry="localhost:5000/lab/", which=which_of("docker"))
    assert p.steps[0].argv[:3] == ("docker", "build", "-t") and p.artifact == \
        "localhost:5000/lab/pf-demo:latest"
    assert p.publish[0] == "docker push localhost:5000/lab/pf-demo:latest   # to a registry the " \
        "site can reach" and "REGISTRY" not in " ".join(p.publish)
    p = plan(s, None, tag="pf:2", registry="reg.example.org", which=which_of("podman"))
    assert p.artifact == "reg.example.org/pf:2" and p.publish == (
        "podman push reg.example.org/pf:2   # to share it through a registry",)

    p = plan(s, "podman-hpc", which=which_of("podman-hpc", "docker"))
    assert [st.argv[:2] for st in p.steps] == [("podman-hpc", "build"),
                                               ("podman-hpc", "migrate")]

    p = plan(s, None, which=which_of("ch-image", "apptainer"))
    assert p.builder == "apptainer" and p.runtime == "apptainer"


def test_no_builder_is_a_one_line_error():
    s = load_spec(DATA / "app" / "spec.yaml")
    for runtime in (None, *RUNTIMES):
        with pytest.raises(BuildError) as err:
            plan(s, runtime, which=which_of())
        assert "\n" not in str(err.value) and BUILDERS[runtime][0] in str(err.value)
        assert plan_dry(s, runtime, which=which_of()).found is False
    with pytest.raises(ValidationError, match="tag"):
        plan_dry(s, "shifter", tag="-bad", which=which_of())
    with pytest.raises(ValidationError, match="unknown container runtime"):
        plan_dry(s, "docker", which=which_of())


@pytest.mark.parametrize("registry", ["", "/", "-x", "--tag=x", "a b", "reg;rm -rf", "reg$(id)",
                                      "Reg.Example.org", "reg//x", "reg/../x", "reg:port",
                                      "reg:123456", "reg/x\n", "r" * 300])
def test_bad_registry_is_refused(registry):
    s = load_spec(DATA / "app" / "spec.yaml")
    with pytest.raises(ValidationError, match="registry|tag") as err:
        plan_dry(s, "shifter", registry=registry, which=which_of())
    assert "\n" not in str(err.value).replace(registry, "")


def pf(*args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "pilotfish", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=cwd)


def test_cli_build_dry_run():
    spec = str(DATA / "app" / "spec.yaml")
    r = pf("container", "build", spec, "--dry-run", "--runtime", "apptainer")
    assert r.returncode == 0, r.stderr
    assert (DATA / "app.def.golden").read_text() in r.stdout
    assert "build --force" in r.stdout and "pf-demo.sif" in r.stdout

    # the README promises both files: both are printed, each under its own heading
    heads = [line for line in r.stdout.splitlines() if line.startswith("# ==== ")]
    assert [h.split(":")[0] for h in heads] == [
        "# ==== Dockerfile (docker, podman, podman-hpc, ch-image)",
        "# ==== Apptainer definition file (apptainer, singularity)",
        "# ==== build with apptainer (not run", "# ==== next steps (printed, never run)"], heads
    assert heads[1].endswith("pf-demo.def; apptainer reads this one")
    assert (DATA / "app.Dockerfile.golden").read_text() in r.stdout

    r = pf("container", "build", spec, "--dry-run", "--runtime", "shifter", "--tag", "u/pf:1")
    assert r.returncode == 0, r.stderr
    assert (DATA / "app.Dockerfile.golden").read_text() in r.stdout
    assert (DATA / "app.def.golden").read_text() in r.stdout
    assert "shifterimg pull docker:u/pf:1" in r.stdout

    r = pf("container", "build", spec, "--dry-run", "--runtime", "shifter")
    assert "docker push REGISTRY/pf-demo:latest" in r.stdout.replace("podman", "docker")
    r = pf("container", "build", spec, "--dry-run", "--runtime", "shifter", "--registry",
           "registry.example.org/lab")
    assert "shifterimg pull docker:registry.example.org/lab/pf-demo:latest" in r.stdout
    r = pf("container", "build", spec, "--dry-run", "--registry", "-x;y")
    assert r.returncode == 1 and r.stderr.startswith("pilotfish: error: registry '-x;y' is not")
    assert not (DATA / "app" / "pf-demo.Dockerfile").exists()  # a dry run writes nothing

    r = pf("container", "-h")
    assert r.returncode == 0 and "build" in r.stdout
    r = pf("container", "build", "-h")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "--runtime" in r.stdout


def test_cli_build_errors_are_one_line(tmp_path):
    spec = str(DATA / "app" / "spec.yaml")
    env = {**os.environ, "PATH": str(tmp_path / "empty")}
    r = pf("container", "build", spec, "--runtime", "charliecloud", "--out", str(tmp_path),
           env=env)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "no image builder" in r.stderr, r.stderr
    assert "ch-image" in r.stderr and not list(tmp_path.iterdir())

    bad = tmp_path / "bad.yaml"
    bad.write_text("base: ubuntu\nenv: {A: 1}\n")
    r = pf("container", "build", str(bad), "--dry-run")
    assert r.returncode == 1 and "env.A: expected a string" in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr

    r = pf("container", "build", spec, "--runtime", "docker", "--dry-run")
    assert r.returncode == 2 and "docker" in r.stderr  # click refuses an unknown choice


def test_cli_build_runs_the_builder(tmp_path):
    """A fake `apptainer` on PATH records its argv and cwd: the real build path, end to end."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.txt"
    fake = bindir / "apptainer"
    fake.write_text(f"#!/bin/sh\necho \"$PWD $*\" >> {log}\ntouch \"$3\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"}
    r = pf("container", "build", str(DATA / "app" / "spec.yaml"), "--runtime", "apptainer",
           "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "pf-demo.def").read_text() == (DATA / "app.def.golden").read_text()
    assert (out / "pf-demo.Dockerfile").read_text() == \
        (DATA / "app.Dockerfile.golden").read_text()  # written too, for other sites
    assert (out / "pf-demo.sif").exists()
    assert log.read_text() == (f"{(DATA / 'app').resolve()} build --force {out}/pf-demo.sif "
                               f"{out}/pf-demo.def\n")
    assert f"built {out}/pf-demo.sif" in r.stdout

    fake.write_text("#!/bin/sh\nexit 3\n")
    r = pf("container", "build", str(DATA / "app" / "spec.yaml"), "--runtime", "apptainer",
           "--out", str(out), env=env)
    assert r.returncode == 1 and "failed with exit status 3" in r.stderr


def test_parse_spec_takes_parsed_yaml(tmp_path):
    s = parse_spec({"base": "scratch"}, tmp_path / "tiny.yaml")
    assert s.name == "tiny" and render_dockerfile(s).splitlines()[1] == "FROM scratch"


# ---------------------------------------------------------------- a real run (Charliecloud)

def busybox_image(root: Path) -> Path:
    """A directory image made of busybox alone: no registry, no package manager."""
    img = root / "img"
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "home", "work", "mnt"):
        (img / d).mkdir(parents=True)
    shutil.copy2(shutil.which("busybox"), img / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "ls", "pwd", "env", "test"):
        (img / "bin" / applet).symlink_to("busybox")
    for f in ("passwd", "group", "hosts", "resolv.conf"):
        (img / "etc" / f).touch()
    (img / "PILOTFISH_IMAGE_MARKER").write_text("inside-the-image\n")
    return img


def test_charliecloud_really_runs_argv_inside_the_image(tmp_path):
    require(bool(shutil.which("ch-run") and shutil.which("busybox")),
            "Charliecloud ch-run and busybox (apt: charliecloud-runtime busybox-static)")
    img = busybox_image(tmp_path)
    work = tmp_path / "w"
    work.mkdir()
    script = ("echo inside > /work/out.txt; cat /PILOTFISH_IMAGE_MARKER >> /work/out.txt; "
              "test -e /etc/os-release && echo host-os-release >> /work/out.txt; "
              "pwd >> /work/out.txt; echo \"$PF_A|$PF_B\" >> /work/out.txt; "
              "for a in \"$@\"; do echo \"arg[$a]\" >> /work/out.txt; done")
    tricky = ["a b", "$(touch /work/pwned)", "`id`", "*", "--x=1"]
    req = ContainerRequest("charliecloud", str(img),
                           ("/bin/sh", "-c", script, "sh", *tricky),
                           binds=((str(work), "/work"),),
                           env=(("PF_A", "x y"), ("PF_B", "$HOME:$(z)")), workdir="/work")
    argv = wrap(req)
    assert argv[0] == "ch-run"
    env = {**os.environ, "USER": os.environ.get("USER") or getpass.getuser()}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = (work / "out.txt").read_text().splitlines()
    # The marker exists only in the image; the host's /etc/os-release is not there.
    assert Path("/etc/os-release").exists()
    assert lines == ["inside", "inside-the-image", "/work", "x y|$HOME:$(z)",
                     *(f"arg[{a}]" for a in tricky)]
    assert not (work / "pwned").exists()

    plain = ContainerRequest("charliecloud", str(img), ("/bin/cat", "/PILOTFISH_IMAGE_MARKER"))
    r = subprocess.run(wrap(plain), capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout == "inside-the-image\n", r.stderr
