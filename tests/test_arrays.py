"""Job arrays and sweeps: the spec and product arithmetic (pure), and arrays against a real
server through the Python API and the CLI, including hostile specs, templates and values."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, wait_for
from pilotfish import arrays
from pilotfish.errors import NotFound, PilotfishError, ValidationError

PREFIX = "pilotfish: error: "


def elements(spec=None, sweep=None, start=0, count=10**7):
    return list(arrays.Elements(spec, sweep).slice(start, count))


def indices(spec, start=0):
    return [i for i, _ in elements(spec, start=start)]


# -- pure ---------------------------------------------------------------------------------------
def test_spec_forms():
    """Ranges with and without steps, lists and their combinations, in the order given."""
    assert indices("1-5") == [1, 2, 3, 4, 5]
    assert indices("1-10:3") == [1, 4, 7, 10]
    assert indices("1-11:5") == [1, 6, 11]
    assert indices("1,5,9") == [1, 5, 9]
    assert indices("1-3,10") == [1, 2, 3, 10]
    assert indices("0") == [0]
    assert indices(" 7 , 2-3 ") == [7, 2, 3]
    assert indices("1-3,10,20-30:5", start=3) == [10, 20, 25, 30]
    assert len(arrays.Elements("1-1000000")) == 1_000_000
    assert arrays.Spec("1-1000000:1000").nth(999) == 999_001
    assert arrays.spec_of(range(1, 11, 3)) == "1-10:3" and indices("1-10:3") == [1, 4, 7, 10]
    assert arrays.spec_of([4, 2]) == "4,2"


@pytest.mark.parametrize("spec, why", [
    ("1-1000000000", "more than 1,000,000 elements"),            # counted, never built
    ("0-999999,0-999999", "more than 1,000,000 elements"),
    ("1-9999999999999999", "above 1,000,000,000,000,000"),
    ("1-1000000000000000000", "is not N, N-M or N-M:STEP"),
    ("9" * 17, "is not N, N-M or N-M:STEP"),
    ("5-1", "ends before it starts"),
    ("1-10:0", "step in '1-10:0' must be at least 1"),
    ("-5", "is not N"), ("1--3", "is not N"), ("1-3-5", "is not N"), ("a-b", "is not N"),
    ("1,,2", "is not N"), ("1-3:", "is not N"), ("1e3", "is not N"), ("0x10", "is not N"),
    ("", "a string like"), ("  ", "a string like"), (None, "array spec or a sweep"),
    (1.5, "a string like"), (True, "a string like"), ([1, 2], "a string like"),
    ("1," * 1001, "parts; at most 1,000"), ("1" * 10_001, "longer than 10,000"),
    ("١٢", "is not N"),                                            # non-ASCII digits
])
def test_bad_specs_are_refused(spec, why):
    with pytest.raises(ValidationError, match=None) as e:
        arrays.Elements(spec)
    assert why in str(e.value)


def test_sweep_product_order_and_index():
    """The first key varies slowest; {index} counts combinations from 0; ranges are axes too."""
    got = elements(sweep={"mode": ["fast", "exact"], "seed": {"range": "1-3"}})
    assert got == [(0, {"mode": "fast", "seed": 1}), (1, {"mode": "fast", "seed": 2}),
                   (2, {"mode": "fast", "seed": 3}), (3, {"mode": "exact", "seed": 1}),
                   (4, {"mode": "exact", "seed": 2}), (5, {"mode": "exact", "seed": 3})]
    assert elements(sweep={"a": [1, 2], "b": [3, 4]}, start=2, count=1) == [(2, {"a": 2, "b": 3})]
    assert len(arrays.Elements(sweep={"a": {"range": "1-1000"}, "b": list(range(1000))})) \
        == 1_000_000


@pytest.mark.parametrize("sweep, why", [
    ({"a": {"range": "1-1000"}, "b": {"range": "1-1001"}}, "more than 1,000,000 combinations"),
    ({"a": []}, "non-empty list"), ({"a": "1-3"}, "non-empty list"), ({}, "map of parameter"),
    ({"a": [[1]]}, "strings or numbers"), ({"a": [{"x": 1}]}, "strings or numbers"),
    ({"a": [True]}, "strings or numbers"), ({"a": [None]}, "strings or numbers"),
    ({"a": {"range": "1-3", "x": 1}}, "{range: SPEC}"), ({"index": [1]}, "not 'index'"),
    ({"a b": [1]}, "must be a parameter name"), ({"__class__": [1]}, None),
    ({f"p{i}": [1] for i in range(33)}, "at most 32 parameters"), ([1, 2], "map of parameter"),
])
def test_bad_sweeps_are_refused(sweep, why):
    try:
        arrays.Elements(sweep=sweep)
    except ValidationError as e:
        assert why is None or why in str(e)
    else:
        assert why is None  # a legal identifier: the app's parameter check decides


def test_template_filling_is_one_pass_and_typed():
    t = arrays.Template({"name": "run-{index}-{mode}", "application": "a",
                         "description": "seed {seed} of {index}",
                         "parameters": {"n": "{index}", "f": "x{index}.dat", "lit": "{{index}}",
                                        "k": 5}}, {"index", "mode", "seed"})
    job = t.fill(7, {"mode": "{index}", "seed": 0.5})
    # a value that looks like a placeholder stays text; filled values are text (the app reads
    # "7" as 7 for an int); swept values keep their own type
    assert job["name"] == "run-7-{index}"
    assert job["description"] == "seed 0.5 of 7"
    assert job["parameters"] == {"n": "7", "f": "x7.dat", "lit": "{7}", "k": 5,
                                 "mode": "{index}", "seed": 0.5}
    with pytest.raises(ValidationError, match=r"unknown placeholder\(s\) \{indx\}; known: "
                                              r"\{index\}"):
        arrays.Template({"name": "r-{indx}"}, {"index"})
    # format-string tricks are not placeholders: they stay literal for the app's checks
    job = arrays.Template({"name": "{0.__class__}{index!r}{index:>99}"}, {"index"}).fill(1, {})
    assert job["name"] == "{0.__class__}{index!r}{index:>99}"


# -- against a server ---------------------------------------------------------------------------
APP = {"name": "sim", "executable": "/bin/echo", "args": ["{seed}", "{mode}"],
       "parameters": {"seed": {"type": "int", "min": 0, "max": 1000},
                      "mode": {"type": "choice", "choices": ["fast", "exact"],
                               "default": "fast"}}}


@pytest.fixture
def sim(server):
    with server.client() as c:
        c.add_app(APP)
        c.add_app({"name": "echo", "executable": "/bin/echo", "args": ["{msg}"],
                   "parameters": {"msg": {"type": "str"}}})
    return server


def test_add_array_and_select_it(sim):
    with sim.client() as c:
        c.add_job(name="before", application="echo", parameters={"msg": "x"})
        r = c.add_array({"name": "s-{index}", "application": "sim",
                         "parameters": {"seed": "{index}"}, "tags": ["t1"]}, "1-10:3,20")
        assert r["array"] == r["ids"][0] == 2 and r["ids"] == [2, 3, 4, 5, 6]
        assert r["elements"] == 5
        c.add_job(name="after", application="echo", parameters={"msg": "y"})
        jobs = c.jobs({"array": r["array"]}, limit=0)
        assert [(j["id"], j["name"], j["array"], j["tags"]) for j in jobs] == [
            (i, f"s-{s}", 2, ["t1", "array:2"]) for i, s in zip(r["ids"], (1, 4, 7, 10, 20))]
        assert c.job(4)["parameters"] == {"seed": 7, "mode": "fast"}
        # a str parameter takes the index as text
        e = c.add_array({"name": "e", "application": "echo", "parameters": {"msg": "{index}"}},
                        "3")
        assert c.job(e["ids"][0])["argv"] == ["/bin/echo", "3"]
        c.remove_jobs({"ids": e["ids"]})
        assert c.job(1)["array"] is None
        # a sweep is an array too; the python list spec works
        s = c.add_sweep({"name": "w-{index}-{mode}", "application": "sim"},
                        {"mode": ["fast", "exact"], "seed": [1, 2]})
        assert [j["name"] for j in c.jobs({"array": s["array"]}, limit=0)] == [
            "w-0-fast", "w-1-fast", "w-2-exact", "w-3-exact"]
        assert c.add_array({"name": "l-{index}", "application": "sim",
                            "parameters": {"seed": "{index}"}}, [9, 8])["elements"] == 2
        # kill and retry by array; the counts of other jobs do not move
        assert len(c.kill_jobs({"array": 2})["changed"]) == 5
        assert c.counts({"array": 2}) == {"USER_KILLED": 5}
        assert c.counts({"array": s["array"]}) == {"READY": 4}
        assert len(c.retry_jobs({"array": 2})["changed"]) == 5
        # altering tags keeps the array: membership is not a label
        c.alter_jobs({"ids": [3]}, tags=["new"])
        assert c.job(3)["tags"] == ["new", "array:2"] and c.job(3)["array"] == 2
        assert len(c.jobs({"array": 2}, limit=0)) == 5
        c.alter_jobs({"ids": [3]}, tags=[])
        assert c.job(3)["tags"] == ["array:2"]
        with pytest.raises(ValidationError, match="filter 'array' must be an array id"):
            c.jobs({"array": "2"})
        with pytest.raises(ValidationError, match="filter 'array' must be an array id"):
            c.jobs({"array": -1})
        assert c.jobs({"array": 99}) == []


@pytest.mark.parametrize("template, spec, why", [
    # values go through the app's checks, element by element: nothing is added
    ({"name": "s-{index}", "application": "sim", "parameters": {"seed": "{index}"}}, "998-1003",
     "job #4: app 'sim' parameter 'seed' must be <= 1000, got 1001"),
    ({"name": "e", "application": "echo", "parameters": {"msg": "{index};ls"}}, "1",
     "is refused: "),
    ({"name": "e", "application": "echo", "parameters": {"msg": "$({index})"}}, "1",
     "is refused: "),
    ({"name": "e", "application": "echo", "parameters": {"msg": "-{index}"}}, "1",
     "is refused: "),
    ({"name": "../{index}", "application": "sim", "parameters": {"seed": 1}}, "1",
     "not a valid name"),
    ({"name": "{index}/x", "application": "sim", "parameters": {"seed": 1}}, "1",
     "not a valid name"),
    ({"name": "x" * 127 + "{index}", "application": "sim", "parameters": {"seed": 1}}, "1-20",
     "job #10: job name"),                                        # too long once filled
    ({"name": "s", "application": "sim", "parameters": {"seed": 1},
      "description": "d" * 9_999 + "{index}"}, "1-20", "job #10: job 's': description must"),
    ({"name": "s", "application": "sim", "parameters": {"seed": "{index.__class__}"}}, "1",
     "must be int"),
    ({"name": "s-{indx}", "application": "sim"}, "1", "unknown placeholder(s) {indx}"),
    ({"name": "s", "application": "sim", "parameters": {"seed": 1}, "tags": ["array:1"]}, "1",
     "not a valid name"),                                         # the array tag is reserved
    ({"name": "s", "application": "sim", "tags": "array:1"}, "1", "tags must be a list"),
    ({"name": "s", "application": "sim", "parameters": {"seed": 1}, "bogus": 1}, "1",
     "unknown job key(s) bogus"),
    ({"name": "s", "application": "nope"}, "1", "no app named 'nope'"),
    ({"name": "s", "application": "sim", "parameters": {"seed": 1},
      "description": "d" * 9_000}, "1-10000", "MB per request"),  # amplification
])
def test_hostile_arrays_change_nothing(sim, template, spec, why):
    with sim.client() as c:
        with pytest.raises(PilotfishError) as e:
            c.add_array(template, spec)
        assert why in str(e.value), str(e.value)
        assert c.counts() == {}
        c.ping()  # the server lives on


def test_request_arguments_are_checked(sim):
    with sim.client() as c:
        job = {"name": "s-{index}", "application": "sim", "parameters": {"seed": "{index}"}}
        for args, why in [
                (dict(array="1-10", first=5, count=6), "within the array"),
                (dict(array="1-10", count=0), "at most 100,000 per request"),
                (dict(array="1-200000", count=100_001), "at most 100,000 per request"),
                (dict(array="1-10", first=-1), "must be an integer 0.."),
                (dict(array="1-10", array_id=12345), "no array 12345"),
                (dict(array="1-10", sweep={"mode": ["fast"]}), "one of them"),
                (dict(sweep={"seed": [1]}, job=dict(job, parameters={"seed": 2})),
                 "both fixed and swept"),
                (dict(array="1-10", job=[job]), "wrong type")]:
            with pytest.raises(PilotfishError, match=None) as e:
                c.call("job_add_array", **{"job": job, **args})
            assert why in str(e.value), (args, str(e.value))
        assert c.counts() == {}
        # a job that is not an array's first job cannot be joined
        c.add_job(name="plain", application="sim", parameters={"seed": 1})
        with pytest.raises(NotFound, match="no array 1"):
            c.call("job_add_array", job=job, array="1-10", array_id=1)


def test_big_arrays_go_in_chunks(sim, monkeypatch):
    """More than a request's worth: several requests of one array; a failing later request
    leaves the earlier ones (each is all or none) and says so."""
    monkeypatch.setattr(arrays, "CHUNK", 7)
    seen = []
    with sim.client() as c:
        r = c.add_array({"name": "s-{index}", "application": "sim",
                         "parameters": {"seed": "{index}"}}, "1-20",
                        on_chunk=lambda k, n: seen.append((k, n)))
        assert seen == [(7, 20), (14, 20), (20, 20)]
        assert r["ids"] == list(range(1, 21)) and r["array"] == 1
        assert len(c.jobs({"array": 1}, limit=0)) == 20
        with pytest.raises(ValidationError, match="^job #12: app 'sim' parameter 'seed' must "
                                                  "be <= 1000, got 1001$"):
            c.add_array({"name": "s-{index}", "application": "sim",
                         "parameters": {"seed": "{index}"}}, "990-1009")
        assert len(c.jobs({"array": 21}, limit=0)) == 7  # the first request stays


def error_line(r) -> str:
    assert r.returncode == 1, f"exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert r.stderr.startswith(PREFIX) and r.stderr.count("\n") == 1, r.stderr
    return r.stderr[len(PREFIX):]


def test_cli_arrays(sim, tmp_path):
    home = sim.home
    r = run_cli(home, "job", "add", "--app", "sim", "--array", "1-3,10", "--param",
                "seed={index}", "--param", "mode=exact")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("array 1: 4 jobs added (ids 1..4) in ")
    rows = json.loads(run_cli(home, "job", "ls", "--array", "1", "--oldest", "--json").stdout)
    assert [(j["name"], j["array"]) for j in rows] == [
        ("sim-1", 1), ("sim-2", 1), ("sim-3", 1), ("sim-10", 1)]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: run-{index}-{mode}\napplication: sim\ntags: [study]\n"
                     "sweep:\n  mode: [fast, exact]\n  seed: {range: 1-2}\n")
    out = json.loads(run_cli(home, "job", "add", "-f", str(sweep), "--json").stdout)
    assert out["array"] == 5 and out["ids"] == [5, 6, 7, 8] and out["elements"] == 4
    r = run_cli(home, "job", "ls", "--array", "5", "--oldest")
    assert [ln.split()[1] for ln in r.stdout.splitlines()[1:]] == [
        "run-0-fast", "run-1-fast", "run-2-exact", "run-3-exact"]
    assert run_cli(home, "job", "kill", "--array", "5").stdout == "4 of 4 matching jobs killed\n"
    assert run_cli(home, "job", "retry", "--array", "5").stdout == \
        "4 of 4 matching jobs queued again\n"
    r = run_cli(home, "job", "wait", "--array", "1", "--timeout", "0.2", "-q")
    assert r.returncode == 2 and "RESTART_READY" not in r.stderr and "READY" in r.stderr
    # an array file may also give `array:`
    spec = tmp_path / "arr.json"
    spec.write_text(json.dumps({"name": "a-{index}", "application": "sim", "array": "7,8",
                                "parameters": {"seed": "{index}"}}))
    assert run_cli(home, "job", "add", "-f", str(spec)).stdout.startswith("array 9: 2 jobs")

    # hostile and wrong input: one line, exit 1, nothing added
    before = json.loads(run_cli(home, "job", "ls", "--all", "--json").stdout)
    both = tmp_path / "both.yaml"
    both.write_text("name: x\napplication: sim\narray: 1-2\nsweep: {seed: [1]}\n")
    for args, why in [
            (("--app", "sim", "--array", "1-1000000000", "--param", "seed={index}"),
             "has more than 1,000,000 elements; at most 1,000,000 per array"),
            (("--app", "sim", "--array", "1-5:0"), "must be at least 1"),
            (("--app", "sim", "--array", "x"), "is not N, N-M or N-M:STEP"),
            (("--app", "sim", "--array", "1-2", "--param", "seed={index};id"), "must be int"),
            (("--app", "sim", "--array", "1-2", "--name", "../{index}", "--param", "seed=1"),
             "not a valid name"),
            (("--app", "sim", "--array", "1-2", "--param", "seed={seed}"),
             "unknown placeholder(s) {seed}"),
            (("--app", "sim", "--array", "999-1001", "--param", "seed={index}"),
             "job #3: app 'sim' parameter 'seed' must be <= 1000"),
            (("-f", str(both)), "give `sweep:` or `array:`, not both"),
            (("-f", str(both), "--array", "1-2"), None)]:
        r = run_cli(home, "job", "add", *args)
        if why is None:
            assert r.returncode == 2 and "give --array with flags" in r.stderr
        else:
            assert why in error_line(r), (args, r.stderr)
    assert json.loads(run_cli(home, "job", "ls", "--all", "--json").stdout) == before


def test_array_with_parents_and_alias(sim):
    """Each element waits on the template's parents; `config_file` works as for job add."""
    with sim.client() as c:
        p = c.add_job(name="p", application="sim", parameters={"seed": 1})
        r = c.add_array({"name": "c-{index}", "application": "sim", "parents": [p],
                         "config_file": {"seed": "{index}"}}, "1-3")
        assert c.counts({"array": r["array"]}) == {"AWAITING_PARENTS": 3}
        for i, seed in zip(r["ids"], (1, 2, 3)):
            j = c.job(i)
            assert (j["parents"], j["array"], j["parameters"]["seed"]) == ([p], r["array"], seed)
        c.kill_jobs({"ids": [p]})
        wait_for(lambda: c.counts({"array": r["array"]}) == {"FAILED": 3}, 10)


def test_arrays_on_postgres(pg_url, home):
    """The array tag, its filter and the Core insert path on PostgreSQL."""
    from conftest import ServerHandle
    s = ServerHandle(home, pg_url).start()
    try:
        with s.client() as c:
            c.add_app(APP)
            r = c.add_array({"name": "s-{index}", "application": "sim",
                             "parameters": {"seed": "{index}"}, "tags": ["x"]}, "5-7")
            c.add_job(name="other", application="sim", parameters={"seed": 1})
            jobs = c.jobs({"array": r["array"]}, limit=0)
            assert [(j["name"], j["tags"], j["array"]) for j in jobs] == [
                (f"s-{i}", ["x", "array:1"], 1) for i in (5, 6, 7)]
            assert c.job(2)["parameters"] == {"seed": 6, "mode": "fast"}
            assert c.counts({"array": 1, "state": "ready"}) == {"READY": 3}
    finally:
        s.stop()


def test_hostile_sweeps_change_nothing(sim):
    job = {"name": "w-{index}", "application": "sim"}
    with sim.client() as c:
        for sweep, why in [
                ({"mode": ["fast", "x;y"], "seed": [1]}, "job #2: app 'sim' parameter 'mode' "
                                                         "must be one of fast, exact"),
                ({"seed": [1, 2, 5000]}, "job #3: app 'sim' parameter 'seed' must be <= 1000"),
                ({"seed": ["1", "1e400"]}, "must be int"),
                ({"nope": [1]}, "app 'sim' has no parameter 'nope'"),
                ({"seed": {"range": "1-1000"}, "mode": ["fast"] * 1001},
                 "more than 1,000,000 combinations")]:
            with pytest.raises(PilotfishError) as e:
                c.add_sweep(job, sweep)
            assert why in str(e.value), (sweep, str(e.value))
            with pytest.raises(PilotfishError) as e:  # the server checks too
                c.call("job_add_array", job=job, sweep=sweep)
            assert why in str(e.value), (sweep, str(e.value))
        assert c.counts() == {}
