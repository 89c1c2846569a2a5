"""Site profiles: the schema, the loader (extends, user overrides), the bundled machines, and
``pilotfish site ls|show|validate|init`` as a user runs it."""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import yaml

import pilotfish.launcher
from conftest import run_cli
from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.site_configs import loader, schema
from pilotfish.site_configs.loader import list_sites, load_site, validate_file
from pilotfish.site_configs.schema import Site, SiteError, parse_walltime

PREFIX = "pilotfish: error: "
BUNDLED = sorted(p.stem for p in loader.BUNDLED_DIR.glob("*.yaml"))
BASES = ["slurm", "pbs", "torque", "cobalt", "lsf", "htcondor", "local"]
MACHINES = ["bluewaters", "theta", "mira", "edison", "cori", "cori-haswell", "cori-knl",
            "perlmutter", "polaris", "aurora", "frontier", "summit", "osg", "localslurm"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    (h / "sites").mkdir()
    monkeypatch.setenv("PILOTFISH_HOME", str(h))
    monkeypatch.delenv("COLUMNS", raising=False)
    return h


def write(home: Path, name: str, text: str) -> Path:
    p = home / "sites" / f"{name}.yaml"
    p.write_text(text)
    return p


def site_error(fn, *args) -> SiteError:
    with pytest.raises(SiteError) as info:
        fn(*args)
    return info.value


# -- layout: site_configs imports only the core, and its launcher names cannot drift ----------
def test_launcher_names_equal_the_launcher_room():
    assert list(schema.LAUNCHERS) == sorted(pilotfish.launcher.LAUNCHERS)


def test_site_configs_imports_only_the_core():
    core = {"pilotfish", "pilotfish.errors", "pilotfish.settings", "pilotfish.console",
            "pilotfish.textfile",
            "pilotfish.protocol", "pilotfish.validate"}
    files = list(Path(schema.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"schema.py", "loader.py", "cli.py"}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{f.name}: relative import leaves site_configs"
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                if n.startswith("pilotfish"):
                    assert n in core or n.startswith("pilotfish.site_configs"), \
                        f"site_configs/{f.name} imports {n}"


def test_site_error_is_a_one_line_validation_error():
    assert issubclass(SiteError, ValidationError) and issubclass(SiteError, PilotfishError)
    err = SiteError.from_lines(["a: one", "b: two", "c: three"])
    assert str(err).startswith("a: one (and 2 more problems") and "\n" not in str(err)
    assert err.problems == ["a: one", "b: two", "c: three"]


# -- the bundled profiles ---------------------------------------------------------------------
def test_the_expected_profiles_are_bundled():
    assert set(BASES + MACHINES) <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_profile_loads_and_validates(name, home):
    site = load_site(name, home)
    assert site.name == name
    assert site == validate_file(loader.BUNDLED_DIR / f"{name}.yaml", home)
    text = (loader.BUNDLED_DIR / f"{name}.yaml").read_text()
    assert text.startswith("#"), "every bundled profile says where its numbers come from"
    if site.queues and site.pilot.nodes:
        assert site.queue_for(site.pilot.nodes, site.pilot.min_walltime) in site.queues
        assert site.queue_for(site.pilot.nodes, site.pilot.max_walltime) in site.queues


def test_machine_facts(home):
    bw = load_site("bluewaters", home)
    assert (bw.scheduler, bw.launcher, bw.container) == ("torque", "aprun", "shifter")
    assert (bw.node.cores, bw.node.memory_gb, bw.pilot.nodes, bw.pilot.submit_interval) == \
        (32, 64, 10, 1800)
    theta = load_site("theta", home)
    assert (theta.scheduler, theta.launcher, theta.container) == ("cobalt", "aprun",
                                                                 "singularity")
    assert (theta.node.cores, theta.node.threads_per_core, theta.node.memory_gb) == (64, 4, 192)
    assert set(theta.queues) == {"default", "debug-cache-quad", "debug-flat-quad"}
    assert theta.queues["debug-flat-quad"].max_nodes == 8
    assert theta.queues["debug-flat-quad"].max_walltime == 60
    assert theta.queues["default"].min_nodes == 128
    mira = load_site("mira", home)
    assert (mira.node.cores, mira.node.threads_per_core) == (16, 4)
    assert (load_site("edison", home).node.cores, load_site("edison", home).node.threads_per_core) \
        == (24, 2)
    knl, haswell = load_site("cori-knl", home), load_site("cori-haswell", home)
    assert (knl.node.cores, knl.node.threads_per_core, haswell.node.cores) == (68, 4, 32)
    assert knl.queues["regular"].kind == "qos" and knl.extends == "cori"
    pm = load_site("perlmutter", home)
    assert (pm.node.cores, pm.node.threads_per_core, pm.node.gpus, pm.node.memory_gb) == \
        (64, 2, 4, 256)
    assert set(pm.queues) == {"regular", "debug"} and pm.container == "shifter"
    pol = load_site("polaris", home)
    assert (pol.scheduler, pol.launcher, pol.container) == ("pbs", "pals", "apptainer")
    assert {"prod", "debug", "preemptable"} <= set(pol.queues)
    assert (pol.node.cores, pol.node.gpus) == (32, 4)
    aurora = load_site("aurora", home)
    assert (aurora.launcher, aurora.node.gpus) == ("pals", 6)
    fr = load_site("frontier", home)
    assert (fr.node.cores, fr.node.threads_per_core, fr.node.gpus, fr.node.memory_gb) == \
        (56, 2, 8, 512)
    assert {"batch", "debug"} <= set(fr.queues)
    summit = load_site("summit", home)
    assert (summit.scheduler, summit.launcher, summit.node.cores, summit.node.gpus) == \
        ("lsf", "jsrun", 42, 6)
    assert load_site("osg", home).scheduler == "htcondor"


def test_localslurm_matches_the_test_cluster(home):
    s = load_site("localslurm", home)
    assert (s.scheduler, s.launcher, s.mpi) == ("slurm", "srun", "pmi2")
    assert s.node.cores == 2
    assert list(s.queues) == ["debug"] and s.queues["debug"].max_nodes == 4
    assert s.pilot.nodes == 2 and s.pilot.idle_timeout <= 15
    assert s.queue_for(s.pilot.nodes, s.pilot.max_walltime) == "debug"


# -- walltimes --------------------------------------------------------------------------------
@pytest.mark.parametrize("text,minutes", [
    ("01:30:00", 90), ("1:30", 90), ("48:00:00", 2880), ("1-00:00:00", 1440),
    ("2-12:30", 3630), (90, 90), ("90", 90), ("00:00:30", 0.5), (" 00:05:00 ", 5)])
def test_walltimes_normalise_to_minutes(text, minutes):
    assert parse_walltime(text) == minutes


@pytest.mark.parametrize("text", ["1h", "", "1:60", "1:30:75", "1-24:00:00", "::", 0, -5,
                                  True, 1.5, "00:00:00", None, [1]])
def test_bad_walltimes_say_what_is_expected(text):
    with pytest.raises(ValueError, match="expected a .*walltime as HH:MM:SS, HH:MM, D-HH:MM:SS"):
        parse_walltime(text)


def test_unquoted_walltimes_are_walltimes_not_base_60_numbers(home):
    """YAML 1.1 reads a bare 1:30:00 as the integer 5400; a profile reads it as 90 minutes."""
    write(home, "bare", "scheduler: slurm\nlauncher: srun\nqueues:\n  q: {max_walltime: 1:30:00,"
                        " min_walltime: 0:30}\n  r: {max_walltime: 2-00:00:00}\n"
                        "pilot: {max_walltime: 1:30, min_walltime: 00:45:00, submit_interval: 5}\n")
    s = load_site("bare", home)
    assert (s.queues["q"].max_walltime, s.queues["q"].min_walltime) == (90, 30)
    assert s.queues["r"].max_walltime == 2880
    assert (s.pilot.max_walltime, s.pilot.min_walltime, s.pilot.submit_interval) == (90, 45, 5)


# -- extends ----------------------------------------------------------------------------------
BASE = """\
description: my base
scheduler: slurm
launcher: srun
node: {cores: 8, threads_per_core: 2, memory_gb: 32}
queues:
  normal: {default: true, max_nodes: 100, max_walltime: "12:00:00"}
  short: {max_nodes: 4, max_walltime: 30}
batch:
  directives: ["--constraint=a", "--exclusive"]
  env: {A: "1", B: "2"}
account: baseproj
"""


def test_extends_deep_merges_mappings_and_replaces_lists(home):
    write(home, "mybase", BASE)
    write(home, "child", """\
extends: mybase
node: {gpus: 2}
queues:
  short: {max_walltime: "01:00:00"}
batch:
  directives: ["--constraint=b"]
  env: {B: "3", C: "4"}
""")
    s = load_site("child", home)
    assert (s.node.cores, s.node.threads_per_core, s.node.gpus, s.node.memory_gb) == (8, 2, 2, 32)
    assert s.queues["short"].max_walltime == 60 and s.queues["short"].max_nodes == 4
    assert s.queues["normal"].default and s.queues["normal"].max_walltime == 720
    assert s.batch.directives == ["--constraint=b"]
    assert s.batch.env == {"A": "1", "B": "3", "C": "4"}
    assert (s.account, s.description, s.name, s.extends) == ("baseproj", "my base", "child",
                                                             "mybase")


def test_extends_resolves_several_levels_and_never_inherits_name_or_extends(home):
    write(home, "a", BASE)
    write(home, "b", "extends: a\npilot: {nodes: 4, max_queued: 5}\n")
    write(home, "c", "extends: b\ndescription: c\npilot: {nodes: 2}\n")
    s = load_site("c", home)
    assert (s.pilot.nodes, s.pilot.max_queued, s.node.cores) == (2, 5, 8)
    assert (s.name, s.extends, s.description) == ("c", "b", "c")
    assert load_site("b", home).extends == "a"
    # and from the bundled ones
    write(home, "mycluster", "extends: localslurm\naccount: 12345\n")
    s = load_site("mycluster", home)
    assert (s.mpi, s.account, s.queues["debug"].max_nodes) == ("pmi2", "12345", 4)


def test_an_extends_cycle_is_an_error_naming_the_file(home):
    write(home, "a", "extends: b\nscheduler: slurm\nlauncher: srun\n")
    pb = write(home, "b", "extends: a\n")
    err = site_error(load_site, "a", home)
    assert str(err).startswith(f"{pb.resolve()}: extends: cycle a -> b -> a")
    write(home, "self", "extends: self\nscheduler: local\nlauncher: local\n")
    assert "cannot extend itself" in str(site_error(load_site, "self", home))


def test_a_missing_base_is_an_error_naming_the_file(home):
    p = write(home, "orphan", "extends: thetaa\n")
    err = str(site_error(load_site, "orphan", home))
    assert err.startswith(f"{p.resolve()}: extends: no site profile named 'thetaa'")
    assert "did you mean 'theta'?" in err and "\n" not in err


def test_a_problem_in_a_base_names_the_base_file(home):
    pb = write(home, "brokenbase", "scheduler: slurm\nlauncher: srun\nnode: {cores: 0}\n")
    pc = write(home, "kid", "extends: brokenbase\nqueues: {q: {max_walltime: soon}}\n")
    err = site_error(load_site, "kid", home)
    assert f"{pb.resolve()}: node.cores: expected an integer > 0, got 0" in err.problems
    assert any(line.startswith(f"{pc.resolve()}: queues.q.max_walltime: expected a walltime")
               for line in err.problems)


# -- user profiles over bundled ones ----------------------------------------------------------
def test_a_user_profile_replaces_the_bundled_one_of_its_name(home):
    p = write(home, "theta", "scheduler: slurm\nlauncher: srun\ndescription: not theta\n")
    s = load_site("theta", home)
    assert (s.scheduler, s.node, s.queues) == ("slurm", None, {})
    assert ("theta", p.resolve(), "not theta") in list_sites(home)
    assert load_site("polaris", home).scheduler == "pbs"  # the others stay bundled


def test_a_user_profile_may_extend_the_bundled_one_of_its_name(home):
    write(home, "theta", """\
extends: theta
account: MYPROJ
server_address: tcp://thetalogin1:5555
queues:
  debug-cache-quad: {max_walltime: 30}
pilot: {max_queued: 4}
""")
    s = load_site("theta", home)
    assert (s.account, s.server_address, s.pilot.max_queued) == ("MYPROJ", "tcp://thetalogin1:5555",
                                                                 4)
    assert s.queues["debug-cache-quad"].max_walltime == 30
    assert s.queues["debug-cache-quad"].max_nodes == 8 and s.node.cores == 64
    assert s.description.startswith("ALCF Theta")


def test_list_sites_names_each_source(home):
    write(home, "mine", "extends: slurm\n")
    write(home, "broken", "scheduler: [unclosed\n")
    rows = {name: (path, desc) for name, path, desc in list_sites(home)}
    assert set(BUNDLED) | {"mine", "broken"} == set(rows)
    assert rows["theta"][0] == (loader.BUNDLED_DIR / "theta.yaml").resolve()
    assert rows["mine"] == ((home / "sites" / "mine.yaml").resolve(), "extends slurm")
    assert rows["broken"][1].startswith("(unreadable:")


# -- bad profiles: one line naming file, key and what is expected ------------------------------
OK = "scheduler: slurm\nlauncher: srun\n"
BAD = [
    ("unknown top-level key", OK + "schedular: pbs\n", "schedular",
     "unknown key; did you mean 'scheduler'? expected one of: name, description, extends"),
    ("unknown nested key", OK + "node: {cores: 4, thread_per_core: 2}\n",
     "node.thread_per_core", "unknown key; did you mean 'threads_per_core'?"),
    ("unknown queue key", OK + "queues: {q: {max_node: 3}}\n", "queues.q.max_node",
     "did you mean 'max_nodes'?"),
    ("unknown scheduler", "scheduler: sge\nlauncher: srun\n", "scheduler",
     "expected one of 'slurm', 'pbs', 'torque', 'cobalt', 'htcondor', 'lsf' or 'local', "
     "got 'sge'"),
    ("unknown launcher", "scheduler: slurm\nlauncher: ibrun\n", "launcher",
     "expected one of 'aprun', 'jsrun', 'local', 'mpiexec', 'mpirun', 'pals' or 'srun', "
     "got 'ibrun'"),
    ("unknown container runtime", OK + "container: docker\n", "container",
     "'apptainer', 'charliecloud' or 'podman-hpc', got 'docker'"),
    ("missing scheduler", "launcher: srun\n", "scheduler", "required key is missing"),
    ("bad walltime format", OK + "queues: {debug: {max_walltime: 1h}}\n",
     "queues.debug.max_walltime", "expected a walltime as HH:MM:SS, HH:MM, D-HH:MM:SS or whole "
     "minutes such as 90, got '1h'"),
    ("minutes over 59", OK + "pilot: {max_walltime: '1:75'}\n", "pilot.max_walltime",
     "minutes and seconds below 60"),
    ("queue min_nodes above max_nodes", OK + "queues: {q: {min_nodes: 8, max_nodes: 4}}\n",
     "queues.q.min_nodes", "expected at most max_nodes (4), got 8"),
    ("queue min_walltime above max_walltime",
     OK + "queues: {q: {min_walltime: '02:00:00', max_walltime: 60}}\n", "queues.q.min_walltime",
     "expected at most max_walltime (1:00:00), got 2:00:00"),
    ("two default queues", OK + "queues: {a: {default: true}, b: {default: true}}\n",
     "queues.b.default", "only one queue may be the default, and 'a' already is"),
    ("pilot.nodes above the default queue's max", OK + "queues: {d: {default: true, max_nodes: 4}}"
     "\npilot: {nodes: 8}\n", "pilot.nodes",
     "expected at most 4 (max_nodes of the default queue 'd'), got 8"),
    ("pilot.nodes fits no queue", OK + "queues: {a: {max_nodes: 4}, b: {min_nodes: 64}}\n"
     "pilot: {nodes: 10}\n", "pilot.nodes", "no queue takes 10 nodes"),
    ("pilot walltime longer than any queue allows",
     OK + "queues: {d: {default: true, max_walltime: 60}}\npilot: {max_walltime: 90}\n",
     "pilot.max_walltime", "expected at most 1:00:00 (the longest walltime a queue allows for 10 "
     "nodes), got 1:30:00"),
    ("pilot min_walltime above max_walltime", OK + "pilot: {min_walltime: 60, max_walltime: 30}\n",
     "pilot.min_walltime", "expected at most pilot.max_walltime (0:30:00), got 1:00:00"),
    ("pilot.max_nodes below pilot.nodes", OK + "pilot: {nodes: 10, max_nodes: 5}\n",
     "pilot.max_nodes", "expected at least pilot.nodes (10), got 5"),
    ("negative cores", OK + "node: {cores: -4}\n", "node.cores",
     "expected an integer > 0, got -4"),
    ("cores as a string", OK + "node: {cores: '64'}\n", "node.cores",
     "expected an integer, got '64'"),
    ("node not a mapping", OK + "node: 64\n", "node",
     "expected a mapping with keys cores, threads_per_core, gpus, memory_gb, got 64"),
    ("yes for a bool", OK + "queues: {q: {default: 'yes'}}\n", "queues.q.default",
     "expected true or false, got 'yes'"),
    ("unknown relay", OK + "pilot: {relay: tcp}\n", "pilot.relay",
     "expected null or 'mpi', got 'tcp'"),
    ("bad server address", OK + "server_address: login1:5555\n", "server_address",
     "expected tcp://HOST:PORT with a port from 1 to 65535, got 'login1:5555'"),
    ("mpi without srun", "scheduler: pbs\nlauncher: pals\nmpi: pmi2\n", "mpi",
     "only srun takes --mpi"),
    ("qos outside slurm", "scheduler: pbs\nlauncher: pals\nqueues: {q: {kind: qos}}\n",
     "queues.q.kind", "expected 'queue': a QOS is a Slurm notion"),
    ("more than one node on the local scheduler", "scheduler: local\nlauncher: local\n"
     "pilot: {nodes: 2}\n", "pilot.nodes", "expected 1"),
    ("bad environment name", OK + "batch: {env: {'MY VAR': x}}\n", "batch.env.MY VAR",
     "expected an environment variable name"),
    ("list item of the wrong type", OK + "batch: {setup: ['ok', 3]}\n", "batch.setup[1]",
     "expected a string, got 3"),
    ("extends not a name", OK + "extends: [slurm]\n", "extends",
     "expected the name of a site profile, got ['slurm']"),
    ("name other than the file's", OK + "name: other\n", "name",
     "expected 'prof' (the file's name without .yaml), got 'other'"),
]


@pytest.mark.parametrize("what,text,key,expected", BAD, ids=[b[0] for b in BAD])
def test_a_bad_profile_gives_one_line_naming_file_key_and_expectation(home, what, text, key,
                                                                      expected):
    p = write(home, "prof", text)
    err = site_error(validate_file, p, home)
    line = str(err)
    assert "\n" not in line
    assert line.startswith(f"{p.resolve()}: {key}: "), line
    assert expected in line, line
    assert all(pl.startswith(f"{p.resolve()}: ") for pl in err.problems)


def test_every_problem_of_a_profile_is_listed(home):
    p = write(home, "prof", OK + "node: {cores: 0}\nqueues: {q: {max_walltime: x}}\nfoo: 1\n")
    err = site_error(validate_file, p, home)
    assert len(err.problems) == 3 and "(and 2 more problems;" in str(err)
    assert {pl.split(": ")[1] for pl in err.problems} == {"node.cores", "queues.q.max_walltime",
                                                          "foo"}


@pytest.mark.parametrize("text,line,what", [
    ("scheduler: slurm\nlauncher: srun\nnode: {cores: 4\n", 4, "YAML syntax error at line 4"),
    ("scheduler: slurm\nlauncher: [srun\n", 3, "YAML syntax error at line 3"),
    ("scheduler: slurm\n  launcher: srun\n", 2, "YAML syntax error at line 2"),
    ("scheduler: slurm\nlauncher: srun\nscheduler: pbs\n", 3, "duplicate key 'scheduler'"),
])
def test_a_yaml_syntax_error_names_file_and_line(home, text, line, what):
    p = write(home, "prof", text)
    err = str(site_error(validate_file, p, home))
    assert err.startswith(f"{p}: YAML syntax error at line {line}, column "), err
    assert what in err and "\n" not in err


@pytest.mark.parametrize("text,expected", [
    ("", "the file is empty; expected a mapping of site keys (scheduler, launcher, ...)"),
    ("- slurm\n- srun\n", "expected a mapping of site keys at the top level, got list"),
])
def test_a_profile_must_be_a_mapping(home, text, expected):
    p = write(home, "prof", text)
    assert str(site_error(validate_file, p, home)) == f"{p}: {expected}"


def test_unknown_profile_names_suggest_and_say_where_yours_go(home):
    err = str(site_error(load_site, "polarise", home))
    assert err.startswith("no site profile named 'polarise'; did you mean 'polaris'?")
    assert str(home / "sites" / "polarise.yaml") in err


# -- queue_for --------------------------------------------------------------------------------
def test_queue_for_prefers_the_default_then_the_first_that_fits(home):
    theta = load_site("theta", home)
    assert theta.queue_for(128, 180) == "default"
    assert theta.queue_for(4, 30) == "debug-cache-quad"  # too small for default: first fit
    pol = load_site("polaris", home)
    assert pol.queue_for(10, 60) == "prod"
    assert pol.queue_for(2, 30) == "debug"
    assert pol.queue_for(5, 48 * 60) == "preemptable"
    assert load_site("slurm", home).queue_for(100, 10_000) is None  # no queues: the scheduler's


def test_a_queue_limit_exceeded_by_a_pilot_request_says_which(home):
    theta = load_site("theta", home)
    err = str(site_error(theta.queue_for, 5000, 60))
    assert err.startswith("site theta: no queue takes a pilot of 5000 nodes for 1:00:00 (")
    assert "default: 5000 nodes exceeds max_nodes 4100" in err
    assert "debug-cache-quad: 5000 nodes exceeds max_nodes 8" in err
    err = str(site_error(theta.queue_for, 8, 90))
    assert "default: 8 nodes is below min_nodes 128" in err
    assert "debug-flat-quad: walltime 1:30:00 exceeds max_walltime 1:00:00" in err
    err = str(site_error(theta.queue_for, 128, 10))
    assert "default: walltime 0:10:00 is below min_walltime 0:30:00" in err


def test_queue_request_turns_a_qos_into_a_directive(home):
    pm = load_site("perlmutter", home)
    assert pm.queue_request(pm.queue_for(4, 20)) == (None, ["--qos=regular"])
    assert pm.queue_request("debug") == (None, ["--qos=debug"])
    pol = load_site("polaris", home)
    assert pol.queue_request("prod") == ("prod", [])
    assert pol.queue_request("somewhere") == ("somewhere", [])
    assert pol.queue_request(None) == (None, [])


@pytest.mark.parametrize("nodes,minutes", [(0, 60), (-1, 60), (2.5, 60), (True, 60), (2, 0),
                                           (2, -5), (2, math.nan), (2, "60")])
def test_queue_for_refuses_nonsense(home, nodes, minutes):
    s = load_site("localslurm", home)
    assert "site localslurm: a pilot needs" in str(site_error(s.queue_for, nodes, minutes))


def test_a_site_made_in_python_is_checked_too():
    s = Site(name="py", scheduler="slurm", launcher="srun", queues={"q": {"max_nodes": 2,
                                                                          "default": True}},
             pilot={"nodes": 2, "max_walltime": "00:45:00"})
    assert s.pilot.max_walltime == 45 and s.queue_for(2, 45) == "q"
    with pytest.raises(SiteError, match=r"^pilot.nodes: expected at most 2"):
        Site(name="py", scheduler="slurm", launcher="srun",
             queues={"q": {"max_nodes": 2, "default": True}})


# -- the CLI ----------------------------------------------------------------------------------
def ok(home, *args) -> str:
    r = run_cli(home, "site", *args)
    assert r.returncode == 0, f"site {' '.join(args)} -> {r.returncode}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def fails(home, *args, code: int = 1) -> list[str]:
    r = run_cli(home, "site", *args)
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith(PREFIX) for line in lines), r.stderr
    return [line[len(PREFIX):] for line in lines]


def test_cli_ls_table_and_json(home):
    write(home, "mine", "extends: localslurm\ndescription: my cluster\n")
    write(home, "broken", "extends: slurm\nnode: {cores: -1}\n")
    out = ok(home, "ls")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "SCHEDULER", "LAUNCHER", "CONTAINER"]
    theta = next(line for line in lines if line.startswith("theta "))
    assert theta.split()[1:6] == ["cobalt", "aprun", "singularity", "64x4", "192GB"]
    assert "bundled" in theta
    mine = next(line for line in lines if line.startswith("mine "))
    assert str(home / "sites" / "mine.yaml") in mine and "my cluster" in mine
    rows = {r["name"]: r for r in json.loads(ok(home, "ls", "--json"))}
    assert set(BUNDLED) <= set(rows)
    assert rows["theta"]["source"] == "bundled" and rows["theta"]["scheduler"] == "cobalt"
    assert rows["theta"]["node"] == "64x4 192GB" and rows["theta"]["default_queue"] == "default"
    assert rows["mine"]["source"] == str((home / "sites" / "mine.yaml").resolve())
    assert rows["broken"]["error"].endswith("node.cores: expected an integer > 0, got -1")


def test_cli_show_prints_the_resolved_profile(home):
    data = yaml.safe_load(ok(home, "show", "theta"))
    assert data["name"] == "theta" and data["scheduler"] == "cobalt"
    assert data["queues"]["default"]["max_walltime"] == 1440  # minutes, as an integer
    assert data["queues"]["debug-cache-quad"]["max_nodes"] == 8
    assert data["pilot"]["relay"] is None and data["batch"]["directives"] == []
    write(home, "mine", "extends: polaris\naccount: proj\n")
    data = json.loads(ok(home, "show", "mine", "--json"))
    assert (data["account"], data["launcher"], data["node"]["gpus"]) == ("proj", "pals", 4)
    path = write(home, "x", "extends: localslurm\n")
    assert json.loads(ok(home, "show", str(path), "--json"))["mpi"] == "pmi2"
    [err] = fails(home, "show", "thetta")
    assert err.startswith("no site profile named 'thetta'; did you mean 'theta'?")


def test_cli_validate_ok_and_errors(home):
    out = ok(home, "validate", "theta", "localslurm")
    assert out.splitlines() == ["ok theta (theta)", "ok localslurm (localslurm)"]
    good = write(home, "good", "extends: slurm\n")
    bad = write(home, "bad", "extends: slurm\nnode: {cores: 0}\nqueues: {q: {max_walltime: x}}\n")
    out = ok(home, "validate", str(good))
    assert out.strip() == f"ok good ({good})"
    r = run_cli(home, "site", "validate", str(good), str(bad), "theta")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"ok good ({good})", "ok theta (theta)"]
    errors = [line[len(PREFIX):] for line in r.stderr.splitlines()]
    assert errors == [f"{bad.resolve()}: node.cores: expected an integer > 0, got 0",
                      f"{bad.resolve()}: queues.q.max_walltime: expected a walltime as HH:MM:SS, "
                      f"HH:MM, D-HH:MM:SS or whole minutes such as 90, got 'x'"]
    results = json.loads(run_cli(home, "site", "validate", "--json", "bad", "good").stdout)
    assert [(x["target"], x["ok"], len(x["errors"])) for x in results] == [("bad", False, 2),
                                                                           ("good", True, 0)]
    # no arguments: every profile, bundled and the user's
    r = run_cli(home, "site", "validate")
    assert r.returncode == 1 and len(r.stdout.splitlines()) == len(BUNDLED) + 1
    bad.unlink()
    assert len(ok(home, "validate").splitlines()) == len(BUNDLED) + 1
    [err] = fails(home, "validate", "nosuchsite")
    assert err.startswith("no site profile named 'nosuchsite'")


def test_cli_validate_reports_a_yaml_error_with_its_line(home):
    p = write(home, "syntax", "scheduler: slurm\nlauncher: srun\nqueues: {debug: {max_nodes: 4}\n")
    [err] = fails(home, "validate", str(p))
    assert err.startswith(f"{p}: YAML syntax error at line 4")


def test_cli_init_writes_a_profile_that_validates(home):
    out = ok(home, "init", "theta")
    path = home / "sites" / "theta.yaml"
    assert f"wrote {path} (extends theta)" in out
    text = path.read_text()
    assert "extends: theta" in text
    for placeholder in ("# account:", "# server_address: tcp://", "# queues:",
                        "#   debug-cache-quad: nodes 1..8"):
        assert placeholder in text
    assert load_site("theta", home).description.endswith("(my settings)")
    [err] = fails(home, "init", "theta")
    assert err == f"{path} exists; use --force to overwrite it"
    path.write_text(text + "account: KEEP\n")
    ok(home, "init", "theta", "--force")
    assert "KEEP" not in path.read_text()

    ok(home, "init", "mycluster", "--from", "localslurm")
    s = load_site("mycluster", home)
    assert (s.extends, s.mpi, s.queues["debug"].max_nodes) == ("localslurm", "pmi2", 4)
    [err] = fails(home, "init", "newsite")
    assert err.startswith("no profile named 'newsite' to start from: give --from BASE")
    [err] = fails(home, "init", "other", "--from", "nosuch")
    assert err.startswith("no site profile named 'nosuch'")
    [err] = fails(home, "init", "bad/name", "--from", "slurm")
    assert err.startswith("site name 'bad/name': expected letters, digits")
    assert not (home / "sites" / "other.yaml").exists()


@pytest.mark.parametrize("args", [(), ("ls",), ("show",), ("validate",), ("init",)])
def test_cli_help_on_every_site_command(home, args):
    out = ok(home, *args, "-h")
    assert out.startswith("Usage: pilotfish site")
