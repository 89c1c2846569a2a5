"""Apps as a whitelist: declared, typed parameters become argv items; nothing reaches a shell."""
import pytest

from pilotfish.errors import NotFound, ValidationError
from pilotfish.server.apps import app_from_spec
from pilotfish import dataroots
from pilotfish.server.jobs import build_job, check_url, workdir_for

#: Jobs built here may name /data and /tmp/out (a server declares its roots with --data-root).
ROOTS = dataroots.make("/nonexistent-home", ["/data", "/tmp/out"])

SIM = {
    "name": "sim", "executable": "/opt/sim/bin/sim",
    "args": ["--steps", "{steps}", "--dt={dt}", "{mode}", "--in", "{infile}", "--label", "{label}"],
    "parameters": {
        "steps": {"type": "int", "min": 1, "max": 1000},
        "dt": {"type": "float", "default": 0.5},
        "mode": {"type": "choice", "choices": ["fast", "exact"], "default": "fast"},
        "infile": {"type": "path", "default": "input.dat"},
        "label": {"type": "str", "default": "run"},
    },
    "resources": {"cpus_per_process": 2},
}


@pytest.fixture
def app():
    return app_from_spec(SIM, 1)


def test_argv_golden(app):
    """Parameters render into exactly the argv the template describes, item for item."""
    params = app.check_params({"steps": "12", "label": "a-b.c"})
    assert app.argv(params) == ["/opt/sim/bin/sim", "--steps", "12", "--dt=0.5", "fast", "--in",
                                "input.dat", "--label", "a-b.c"]


@pytest.mark.parametrize("value", ["x; rm -rf /", "$(id)", "`id`", "a|b", "a&&b", "a\nb",
                                   "a b", "'q'", '"q"', "a>b", "../x", "/etc/passwd", "x\x00y"])
def test_shell_metacharacters_refused_by_default(app, value):
    """A str parameter without its own pattern refuses anything a shell would interpret."""
    with pytest.raises(ValidationError, match="label"):
        app.check_params({"steps": 1, "label": value})


@pytest.mark.parametrize("value", ["../secret", "/etc/passwd", "a/../../b", "a//b", "./x",
                                   "a b", "$(x)"])
def test_path_parameters_stay_inside_the_workdir(app, value):
    """A path parameter must be relative, without '..', with safe characters."""
    with pytest.raises(ValidationError, match="infile"):
        app.check_params({"steps": 1, "infile": value})


@pytest.mark.parametrize("params, words", [
    ({}, "needs parameter 'steps'"),
    ({"steps": 0}, ">= 1"),
    ({"steps": 1001}, "<= 1000"),
    ({"steps": "ten"}, "must be int"),
    ({"steps": True}, "boolean"),
    ({"steps": 1, "dt": "nan"}, "finite"),
    ({"steps": 1, "mode": "slow"}, "one of fast, exact"),
    ({"steps": 1, "colour": "red"}, "no parameter 'colour'"),
])
def test_parameter_checks(app, params, words):
    """Wrong types, limits, choices and unknown parameters are refused with the reason."""
    with pytest.raises(ValidationError, match=words):
        app.check_params(params)


def test_a_value_is_one_argv_item_even_with_a_permissive_pattern():
    """With a permissive pattern, spaces and metacharacters stay inside one argv item."""
    app = app_from_spec({"name": "echo", "executable": "/bin/echo", "args": ["{msg}"],
                         "parameters": {"msg": {"type": "str", "pattern": ".*"}}})
    v = "$(touch x); `id` | cat > y"
    assert app.argv(app.check_params({"msg": v})) == ["/bin/echo", v]


@pytest.mark.parametrize("spec, words", [
    ({"name": "a", "executable": "bin/x"}, "absolute path"),
    ({"name": "a", "executable": "/bin/x", "args": ["{nope}"]}, "no parameter 'nope'"),
    ({"name": "a", "executable": "/bin/x", "colour": 1}, "unknown app key"),
    ({"name": "../a", "executable": "/bin/x"}, "not a valid name"),
    ({"name": "a", "executable": "/bin/x", "parameters": {"p": {"type": "list"}}}, "type must be"),
    ({"name": "a", "executable": "/bin/x", "parameters": {"p": {"type": "int", "step": 2}}},
     "unknown key"),
    ({"name": "a", "executable": "/bin/x", "environment": {"A B": "x"}}, "environment"),
    ({"name": "a", "executable": "/bin/x", "resources": {"cores": 2}}, "unknown resource"),
    ({"name": "a", "executable": "/bin/x", "preprocess": ["pre.sh"]}, "absolute executable"),
    ({"name": "a", "executable": "/bin/x", "parameters": {"p": {"type": "str", "pattern": "("}}},
     "bad pattern"),
])
def test_bad_app_definitions(spec, words):
    """Each bad app definition is refused with an error naming the problem."""
    with pytest.raises(ValidationError, match=words):
        app_from_spec(spec)


def _lookup(app):
    def by_name(name):
        if name != app.name:
            raise NotFound(f"no app named {name!r}")
        return app
    return by_name


def test_job_takes_app_resources_and_seed_keys(app):
    """A seed-style job message (config_file as the parameters) becomes a complete row."""
    row = build_job({"name": "j1", "application": "sim", "config_file": {"steps": 3},
                     "wall_time_minutes": 5, "num_nodes": 1, "processes_per_node": 2,
                     "site": "theta", "queue": "debug", "project": "proj", "input_url": None,
                     "output_url": "file:///tmp/out", "tags": ["a", "b"], "priority": 4,
                     "group_identifier": "g1", "description": "d", "parents": [3, 2, 3]},
                    _lookup(app), ROOTS)
    assert row["cpus_per_process"] == 2 and row["processes_per_node"] == 2
    assert row["parameters"]["steps"] == 3 and row["tags"] == ",a,b,"
    assert row["output_url"] == "/tmp/out" and row["parents"] == [2, 3]
    assert workdir_for(7, "j1", "g1") == "g1/j1.7"


@pytest.mark.parametrize("msg, words", [
    ({"name": "j", "application": "sim", "parameters": {"steps": 1}, "colour": 1},
     "unknown job key"),
    ({"name": "j", "application": "nope"}, "no app named"),
    ({"name": "../j", "application": "sim"}, "not a valid name"),
    ({"name": "j/k", "application": "sim"}, "not a valid name"),
    ({"name": "j;rm", "application": "sim"}, "not a valid name"),
    ({"name": "j", "application": "sim", "parameters": {"steps": 1}, "tags": ["a b"]}, "tag"),
    ({"name": "j", "application": "sim", "parameters": {"steps": 1}, "group_identifier": ".."},
     "group_identifier"),
    ({"name": "j", "application": "sim", "parameters": {"steps": 1}, "num_nodes": 0}, "num_nodes"),
    ({"name": "j", "application": "sim", "parameters": {"steps": 1}, "priority": "high"},
     "priority"),
    ({"name": "j", "application": "sim", "parameters": {"steps": 1}, "parents": ["x"]}, "parents"),
    ({"name": "j", "application": "sim", "parameters": {"steps": 1}, "config_file": {}},
     "not both"),
])
def test_bad_job_messages(app, msg, words):
    """Each bad job message is refused with an error naming the key."""
    with pytest.raises((ValidationError, NotFound), match=words):
        build_job(msg, _lookup(app), ROOTS)


@pytest.mark.parametrize("url, ok", [
    ("file:///data/in.txt", "/data/in.txt"), ("/data/in.txt", "/data/in.txt"), (None, None),
    ("weird://x/y", None), ("http://x/y", "http://x/y"), ("scp://h/in", "scp://h/in"),
    ("scp://u:pw@h/in", None), ("scp://-oProxyCommand=x/in", None), ("relative/path", None), ("/a/../b", None), ("/etc/passwd", None),
    ("file://localhost/data/x", "/data/x"), ("file://host/data/x", None)])
def test_urls(url, ok):
    """file:// and absolute paths under a data root are staged, remote URLs of a known scheme
    pass as written (tests/test_transfer_urls.py has every bad URL, tests/test_data_paths.py
    every class of bad path)."""
    if ok is None and url is not None:
        with pytest.raises(ValidationError):
            check_url(url, "input_url", ROOTS)
    else:
        assert check_url(url, "input_url", ROOTS) == ok
