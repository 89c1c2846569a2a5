"""Launcher argv builders: golden command lines checked against the sites' documentation
(Blue Waters and ALCF Theta aprun pages, NERSC Cori/Perlmutter srun, ALCF Polaris PALS mpiexec,
OLCF Summit jsrun, Open MPI and MPICH Hydra man pages); the launchers cannot run here, so only
the ``local`` launcher is run for real. Property tests sweep generated requests.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import sys

import pytest

from pilotfish.errors import ValidationError
from pilotfish.launcher import LAUNCHERS, LaunchRequest, build

CMD = ("./app", "--in", "a b.dat")


def req(**kw) -> LaunchRequest:
    kw.setdefault("argv", CMD)
    return LaunchRequest(**kw)


# ---------------------------------------------------------------- golden command lines

GOLDEN = [
    # Blue Waters glidein pilot (BOSS-LDG): one PE per node with the whole node as its depth.
    ("aprun", req(nodes=1, ranks_per_node=1, cpus_per_rank=32),
     ["aprun", "-n", "1", "-N", "1", "-d", "32", *CMD]),
    # ALCF Theta: 2 KNL nodes x 64 ranks, depth binding.
    ("aprun", req(nodes=2, ranks_per_node=64, cpus_per_rank=1, cpu_bind="depth"),
     ["aprun", "-n", "128", "-N", "64", "-d", "1", "-j", "1", "-cc", "depth", *CMD]),
    # NERSC Cori/Perlmutter.
    ("srun", req(nodes=2, ranks_per_node=4, cpus_per_rank=16),
     ["srun", "-N", "2", "-n", "8", "--ntasks-per-node=4", "-c", "16", "--cpu-bind=cores",
      "--export=NONE", *CMD]),
    # ALCF Polaris (PALS).
    ("pals", req(nodes=2, ranks_per_node=4, cpus_per_rank=8, cpu_bind="depth"),
     ["mpiexec", "-n", "8", "--ppn", "4", "--depth", "8", "--cpu-bind", "depth", "--envnone",
      *CMD]),
    # OLCF Summit: 2 nodes x 6 resource sets of 7 cores + 1 GPU (jsrun quick start).
    ("jsrun", req(nodes=2, ranks_per_node=6, cpus_per_rank=7, gpus_per_rank=1),
     ["jsrun", "--nrs", "12", "--tasks_per_rs", "1", "--cpu_per_rs", "7", "--gpu_per_rs", "1",
      "--rs_per_host", "6", "--bind", "packed:7", *CMD]),
    # Open MPI.
    ("mpirun", req(nodes=2, ranks_per_node=4, cpus_per_rank=8, hosts=("n1", "n2"),
                   env=(("OMP_NUM_THREADS", "8"),)),
     ["mpirun", "-np", "8", "--map-by", "ppr:4:node:PE=8", "--bind-to", "core",
      "-H", "n1:4,n2:4", "-x", "OMP_NUM_THREADS=8", *CMD]),
    # MPICH Hydra.
    ("mpiexec", req(nodes=2, ranks_per_node=4, cpus_per_rank=8, hosts=("n1", "n2"),
                    env=(("OMP_NUM_THREADS", "8"),)),
     ["mpiexec", "-n", "8", "-ppn", "4", "-bind-to", "core:8", "-hosts", "n1,n2", "-genvnone",
      "-genv", "OMP_NUM_THREADS", "8", *CMD]),
    # The pilot head's node-agent launch (docs/DESIGN.md), per launcher.
    ("srun", req(nodes=3, ranks_per_node=1, cpus_per_rank=64, cpu_bind="none",
                 env=(("PATH", "/usr/bin:/bin"), ("PILOTFISH_HOME", "/scratch/pf"))),
     ["srun", "-N", "3", "-n", "3", "--ntasks-per-node=1", "-c", "64", "--cpu-bind=none",
      "--export=PATH=/usr/bin:/bin,PILOTFISH_HOME=/scratch/pf", *CMD]),
    ("aprun", req(nodes=3, ranks_per_node=1, cpus_per_rank=32, cpu_bind="none"),
     ["aprun", "-n", "3", "-N", "1", "-d", "32", "-cc", "none", *CMD]),
    ("pals", req(nodes=3, ranks_per_node=1, cpus_per_rank=32, cpu_bind="none"),
     ["mpiexec", "-n", "3", "--ppn", "1", "--depth", "32", "--cpu-bind", "none", "--envnone",
      *CMD]),
    # Options beyond the minimal forms.
    ("srun", req(nodes=2, ranks_per_node=2, cpus_per_rank=4, threads_per_core=2,
                 gpus_per_rank=1, hosts=("nid001", "nid002"), mpi="pmix"),
     ["srun", "-N", "2", "-n", "4", "--ntasks-per-node=2", "-c", "8", "--cpu-bind=cores",
      "--gpus-per-task=1", "-w", "nid001,nid002", "--mpi=pmix", "--export=NONE", *CMD]),
    ("srun", req(nodes=1, ranks_per_node=2, cpus_per_rank=1, cpu_bind="list", cpu_list=(0, 8)),
     ["srun", "-N", "1", "-n", "2", "--ntasks-per-node=2", "-c", "1", "--cpu-bind=map_cpu:0,8",
      "--export=NONE", *CMD]),
    ("srun", req(nodes=1, ranks_per_node=2, cpus_per_rank=2, cpu_bind="list",
                 cpu_list=(0, 1, 4, 5)),
     ["srun", "-N", "1", "-n", "2", "--ntasks-per-node=2", "-c", "2",
      "--cpu-bind=mask_cpu:0x3,0x30", "--export=NONE", *CMD]),
    ("aprun", req(nodes=2, ranks_per_node=2, cpus_per_rank=2, threads_per_core=2,
                  cpu_bind="list", cpu_list=(0, 1, 2, 3), hosts=("12", "13"),
                  env=(("OMP_NUM_THREADS", "4"),)),
     ["aprun", "-n", "4", "-N", "2", "-d", "4", "-j", "2", "-cc", "0,1:2,3", "-L", "12,13",
      "-e", "OMP_NUM_THREADS=4", *CMD]),
    ("pals", req(nodes=2, ranks_per_node=2, cpus_per_rank=2, cpu_bind="list",
                 cpu_list=(0, 1, 8, 9), hosts=("x1", "x2"), env=(("A", "1 2"),)),
     ["mpiexec", "-n", "4", "--ppn", "2", "--depth", "2", "--cpu-bind", "list:0,1:8,9",
      "--hosts", "x1,x2", "--envnone", "--env", "A=1 2", *CMD]),
    ("mpiexec", req(nodes=1, ranks_per_node=2, cpus_per_rank=2, cpu_bind="list",
                    cpu_list=(0, 1, 2, 3)),
     ["mpiexec", "-n", "2", "-ppn", "2", "-bind-to", "user:0+1,2+3", "-genvnone", *CMD]),
    ("mpirun", req(nodes=1, ranks_per_node=2, cpus_per_rank=1, cpu_bind="none"),
     ["mpirun", "-np", "2", "--map-by", "ppr:2:node:PE=1", "--bind-to", "none", *CMD]),
    ("jsrun", req(nodes=1, ranks_per_node=1, cpus_per_rank=42, cpu_bind="none",
                  env=(("X", "y"),)),
     ["jsrun", "--nrs", "1", "--tasks_per_rs", "1", "--cpu_per_rs", "42", "--gpu_per_rs", "0",
      "--rs_per_host", "1", "--bind", "none", "-E", "X=y", *CMD]),
    ("local", req(nodes=1, ranks_per_node=1, cpus_per_rank=4), list(CMD)),
    ("local", req(nodes=1, ranks_per_node=1, cpus_per_rank=4, env=(("A", "1"), ("B", "x y"))),
     ["env", "-i", "A=1", "B=x y", *CMD]),
]


@pytest.mark.parametrize("launcher,request_,expected", GOLDEN,
                         ids=[f"{g[0]}-{i}" for i, g in enumerate(GOLDEN)])
def test_golden(launcher, request_, expected):
    assert build(launcher, request_) == expected
    assert LAUNCHERS[launcher](request_) == expected


def test_registry_is_complete_and_unknown_launcher_lists_known_ones():
    assert set(LAUNCHERS) == {"srun", "aprun", "mpiexec", "pals", "mpirun", "jsrun", "local"}
    with pytest.raises(ValidationError) as err:
        build("qsub", req(nodes=1, ranks_per_node=1, cpus_per_rank=1))
    msg = str(err.value)
    assert "\n" not in msg and "qsub" in msg
    assert all(name in msg for name in LAUNCHERS)


# ---------------------------------------------------------------- properties

TRICKY = ["a b", ";", "$(x)", "`id`", "'", '"', "--export=ALL", "-x", "&&", "|", "*", "",
          "é", "a,b", "=", "-genvall", "\t", "${HOME}", "a:b", "::", "-n"]


def random_request(rng: random.Random, launcher: str) -> LaunchRequest:
    local = launcher == "local"
    nodes = 1 if local else rng.randint(1, 4)
    rpn = 1 if local else rng.randint(1, 8)
    depth = rng.randint(1, 8)
    bind = rng.choice(["none", "cores", "depth"] + ([] if launcher in (
        "local", "mpirun", "jsrun") else ["list"]))
    cpu_list: tuple[int, ...] = ()
    if bind == "list":
        cpu_list = tuple(rng.sample(range(256), rpn * depth))
    hosts: tuple[str, ...] = ()
    if launcher not in ("local", "jsrun") and rng.random() < 0.5:
        hosts = tuple(str(100 + i) if launcher == "aprun" else f"nid{i:05d}"
                      for i in rng.sample(range(1000), nodes))
    env = tuple((f"V{i}_{rng.randint(0, 99)}",
                 rng.choice(TRICKY).replace(",", "" if launcher == "srun" else ","))
                for i in range(rng.randint(0, 3)))
    argv = (rng.choice(["/bin/app", "./a.out", "python3"]),
            *(rng.choice(TRICKY) for _ in range(rng.randint(0, 5))))
    return LaunchRequest(
        nodes=nodes, ranks_per_node=rpn, cpus_per_rank=depth, argv=argv,
        threads_per_core=rng.choice([1, 1, 2, 4]),
        gpus_per_rank=rng.choice([0, 1]) if launcher in ("srun", "jsrun") else 0,
        cpu_bind=bind, cpu_list=cpu_list, hosts=hosts, env=env,
        mpi=rng.choice([None, "pmi2", "pmix"]) if launcher == "srun" else None)


# Launcher options that would forward variables the request did not name.
FORWARD_ALL = {"--export=ALL", "-genvall", "--genvall", "-envall", "--envall", "-V",
               "--env_all", "-genvlist", "--envlist"}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_properties_over_generated_requests(launcher):
    rng = random.Random(f"launcher-{launcher}")
    for _ in range(300):
        r = random_request(rng, launcher)
        out = build(launcher, r)
        assert isinstance(out, list) and all(isinstance(item, str) for item in out)
        # The command comes last, item for item: never joined, split or quoted.
        assert out[len(out) - len(r.argv):] == list(r.argv)
        prefix = out[:len(out) - len(r.argv)]
        assert all("\n" not in item and "\0" not in item for item in out)
        # Hydra's -genv takes its value as a separate item (which may look like anything).
        options = [p for i, p in enumerate(prefix) if i == 0 or prefix[i - 1] != "-genv"
                   and (i < 2 or prefix[i - 2] != "-genv")]
        assert not set(options) & FORWARD_ALL
        assert passed_env(launcher, prefix) == dict(r.env)


def passed_env(launcher: str, prefix: list[str]) -> dict[str, str]:
    """The variables a built prefix hands to the ranks, parsed back per launcher's syntax."""
    pairs: list[str] = []
    if launcher == "srun":
        (export,) = [p for p in prefix if p.startswith("--export=")]
        value = export.removeprefix("--export=")
        pairs = [] if value == "NONE" else value.split(",")
    elif launcher == "mpiexec":
        assert "-genvnone" in prefix
        found = {}
        for i, item in enumerate(prefix):
            if item == "-genv":
                found[prefix[i + 1]] = prefix[i + 2]
        return found
    elif launcher == "local":
        if not prefix:
            return {}
        assert prefix[:2] == ["env", "-i"]
        pairs = prefix[2:]
    else:
        flag = {"aprun": "-e", "pals": "--env", "mpirun": "-x", "jsrun": "-E"}[launcher]
        if launcher == "pals":
            assert "--envnone" in prefix
            assert all(prefix.index("--envnone") < i for i, p in enumerate(prefix) if p == flag)
        for i, item in enumerate(prefix):
            if item == flag:
                # Always NAME=value: a bare name would copy the caller's value.
                assert "=" in prefix[i + 1]
                pairs.append(prefix[i + 1])
    return dict(p.split("=", 1) for p in pairs)


BAD = [
    dict(nodes=0), dict(nodes=-1), dict(ranks_per_node=0), dict(cpus_per_rank=0),
    dict(threads_per_core=0), dict(gpus_per_rank=-1), dict(nodes=True), dict(nodes=2.0),
    dict(cpu_bind="socket"), dict(cpu_bind="list"), dict(cpu_bind="list", cpu_list=(0,)),
    dict(cpu_bind="list", cpu_list=(0, 0)), dict(cpu_bind="list", cpu_list=(0, -1)),
    dict(cpu_bind="cores", cpu_list=(0, 1)),
    dict(argv=()), dict(argv=("",)), dict(argv=["a"]), dict(argv=("a", "b\0c")),
    dict(argv=("a", 3)),
    dict(env=(("1X", "v"),)), dict(env=(("A-B", "v"),)), dict(env=(("", "v"),)),
    dict(env=(("A", "v\0"),)), dict(env=(("A", "line\nbreak"),)), dict(env=(("A", 1),)),
    dict(env=(("A", "1"), ("A", "2"))), dict(env=(("A=B", "v"),)), dict(env=("A=1",)),
    dict(hosts=("n1",)), dict(hosts=("n1", "-n2")), dict(hosts=("n1", "a,b")),
    dict(hosts=("n1", "n1")), dict(hosts=("n1", "n\0")),
    dict(mpi="pmi x"), dict(mpi=""), dict(mpi="--pmix"),
]


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("bad", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_raise_validation_error(launcher, bad):
    base = dict(nodes=2, ranks_per_node=1, cpus_per_rank=2, argv=("app",))
    r = LaunchRequest(**{**base, **bad})
    with pytest.raises(ValidationError) as err:
        r.validate()
    assert "\n" not in str(err.value)
    with pytest.raises(ValidationError):
        build(launcher, r)


@pytest.mark.parametrize("launcher,change", [
    ("local", dict(nodes=2)), ("local", dict(ranks_per_node=2)),
    ("local", dict(env=(("A", "1"),), argv=("X=1", "app"))),
    ("srun", dict(env=(("A", "1,2"),))),
    ("aprun", dict(nodes=2, hosts=("nid1", "nid2"))),
    ("aprun", dict(gpus_per_rank=1)), ("pals", dict(gpus_per_rank=1)),
    ("mpiexec", dict(gpus_per_rank=1)), ("mpirun", dict(gpus_per_rank=1)),
    ("mpirun", dict(cpu_bind="list", cpu_list=(0,))),
    ("jsrun", dict(cpu_bind="list", cpu_list=(0,))), ("jsrun", dict(hosts=("h1",))),
    ("pals", dict(mpi="pmix")), ("aprun", dict(mpi="pmi2")),
])
def test_requests_a_launcher_cannot_express_are_refused(launcher, change):
    r = LaunchRequest(**{**dict(nodes=1, ranks_per_node=1, cpus_per_rank=1, argv=("app",)),
                         **change})
    with pytest.raises(ValidationError):
        build(launcher, r)


@pytest.mark.parametrize("launcher", sorted(set(LAUNCHERS) - {"local"}))
def test_lone_colon_in_argv_is_refused_where_it_separates_mpmd_sections(launcher):
    # `srun/aprun/mpiexec/mpirun ... app : -n 999 other` starts a second program: a job argument
    # ":" must never become launcher syntax.
    r = req(nodes=1, ranks_per_node=1, cpus_per_rank=1, argv=("app", ":", "-n", "999", "evil"))
    with pytest.raises(ValidationError, match="MPMD"):
        build(launcher, r)
    joined = req(nodes=1, ranks_per_node=1, cpus_per_rank=1, argv=("app", "a:b", "::"))
    assert build(launcher, joined)[-3:] == ["app", "a:b", "::"]


def test_local_passes_a_lone_colon_through():
    r = req(nodes=1, ranks_per_node=1, cpus_per_rank=1, argv=("app", ":", "x"))
    assert build("local", r) == ["app", ":", "x"]


def test_builders_are_pure():
    r = req(nodes=2, ranks_per_node=4, cpus_per_rank=8, env=(("A", "1"),))
    before = dataclasses.astuple(r)
    for name in LAUNCHERS:
        if name == "local":
            continue
        first = build(name, r)
        first.append("mutated")  # a caller changing its list must not change the next build
        assert build(name, r) == first[:-1]
    assert dataclasses.astuple(r) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.nodes = 3  # type: ignore[misc]


def test_no_real_mpi_launcher_is_needed_here():
    # Documents why only `local` runs for real: the others are absent on this machine.
    missing = [p for p in ("srun", "aprun", "jsrun") if shutil.which(p) is None]
    assert missing, "a real launcher is installed; add a real-run test for it"


# ---------------------------------------------------------------- a real run (local)

def test_local_launcher_really_runs_argv_unchanged(tmp_path):
    probe = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], "
             "'env': {k: v for k, v in os.environ.items() if k.startswith('PF_')}}))")
    tricky = ["a b", ";", "$(touch pwned)", "`id`", "*", "--x=1"]
    r = req(nodes=1, ranks_per_node=1, cpus_per_rank=1,
            argv=(sys.executable, "-c", probe, *tricky),
            env=(("PF_A", "x y"), ("PF_B", "$(z)"), ("LC_ALL", "C")))
    leak = {**os.environ, "PF_LEAK": "1"}
    out = subprocess.run(build("local", r), capture_output=True, text=True, cwd=tmp_path,
                         env=leak, timeout=30, check=True)
    import json
    seen = json.loads(out.stdout)
    assert seen["argv"] == tricky
    assert seen["env"] == {"PF_A": "x y", "PF_B": "$(z)"}  # PF_LEAK was not passed on
    assert not (tmp_path / "pwned").exists()

    plain = req(nodes=1, ranks_per_node=1, cpus_per_rank=1,
                argv=(sys.executable, "-c", "import sys; print(sys.argv[1:])", "a;b"))
    out = subprocess.run(build("local", plain), capture_output=True, text=True, timeout=30,
                         check=True)
    assert out.stdout.strip() == "['a;b']"


def test_srun_overlap_inside_a_pilot_allocation():
    """Slurm 20.11+: a step beside the agents' step must say --overlap or wait for them."""
    req = LaunchRequest(nodes=2, ranks_per_node=2, cpus_per_rank=1, argv=("a",), overlap=True)
    assert build("srun", req)[:9] == ["srun", "-N", "2", "-n", "4", "--ntasks-per-node=2",
                                      "-c", "1", "--cpu-bind=cores"]
    assert "--overlap" in build("srun", req)
    assert "--overlap" not in build("srun", LaunchRequest(nodes=1, ranks_per_node=1,
                                                          cpus_per_rank=1, argv=("a",)))
    for name in ("aprun", "mpiexec", "pals", "mpirun", "jsrun"):
        assert "--overlap" not in build(name, req)
