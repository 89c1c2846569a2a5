"""Paths a job names: input_url and output_url stay under the data roots and out of the home.

Door checks (the server, job add and job alter) are lexical; the stager on the node checks the
path again after symlinks. Every refused attempt leaves the disk as it was outside the job's
workdir. Real server and agent processes throughout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pilotfish import dataroots
from pilotfish.errors import ValidationError
from pilotfish.server.jobs import check_url

from conftest import ServerHandle, run_cli, wait_for


def finished(c, ids):
    jobs = [c.job(i) for i in ids]
    if all(j["state"] in ("JOB_FINISHED", "FAILED", "USER_KILLED") for j in jobs):
        return {j["state"] for j in jobs}
    return None


def tree(path: Path) -> dict:
    """Every entry below ``path`` with its type, size and mtime: "nothing changed" checks."""
    out = {}
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def c(server: ServerHandle):
    c = server.client()
    c.add_app({"name": "t", "executable": "/bin/true"})
    c.add_app({"name": "echo", "executable": "/bin/echo", "args": ["hi"]})
    return c


# -- the door: lexical checks at job add ------------------------------------------------------
def _bad_urls(home: Path, tmp: Path) -> list:
    return [
        ("relative", "data/in.txt", "must be an absolute path"),
        ("dotdot", f"{home}/data/../keys/authorized", r"'\.\.' part"),
        ("dotdot-url", f"file://{home}/data/../keys", r"'\.\.' part"),
        ("percent-encoded-dotdot", f"file://{home}/data/%2e%2e/keys", "percent-encoding"),
        ("other-host", f"file://evil.example{home}/data/x", "names host 'evil.example'"),
        ("unknown-scheme", "weird://evil.example/x", "unknown scheme 'weird'"),
        ("keys-authorized", f"{home}/keys/authorized", "inside the pilotfish home"),
        ("keys-url", f"file://localhost{home}/keys/authorized", "inside the pilotfish home"),
        ("server-secret", f"{home}/keys/server.key_secret", "inside the pilotfish home"),
        ("server-json", f"{home}/server.json", "inside the pilotfish home"),
        ("database", f"{home}/pilotfish.db", "inside the pilotfish home"),
        ("home-itself", str(home), "inside the pilotfish home"),
        ("workdirs", f"{home}/work/default", "inside the pilotfish home"),
        ("tmp-outside", str(tmp / "x"), "not under a data root"),
        ("slash-tmp", "/tmp/x", "not under a data root"),
        ("data-prefix-trick", f"{home}/data-evil/x", "inside the pilotfish home"),
        ("nul", f"{home}/data/a\x00b", "URL string without NUL"),
        ("newline", f"{home}/data/a\nb", "URL string without NUL"),
        ("not-a-string", 5, "URL string"),
        ("long", "/" + "x" * 5000, "not under a data root"),
    ]


@pytest.mark.parametrize("field", ["input_url", "output_url"])
def test_door_refuses_paths_outside_the_roots(server: ServerHandle, c, tmp_path, field):
    """Each class of bad path is refused at job add with one line naming the field and the
    allowed roots; no job is made and nothing appears on disk."""
    home = server.home
    before = tree(tmp_path)
    for case, url, words in _bad_urls(home, tmp_path):
        with pytest.raises(ValidationError) as err:
            c.add_job(name="j", application="t", **{field: url})
        msg = str(err.value)
        assert field in msg and "\n" not in msg, (case, msg)
        import re
        assert re.search(words, msg), (case, msg)
        if "root" in words or "home" in words:
            assert f"allowed data roots: {home}/data" in msg, (case, msg)
        assert len(msg) < 600, (case, len(msg))
    assert c.jobs() == []
    after = tree(tmp_path)
    assert {p for p in after if "agent-" not in p and not p.endswith((".log", "-wal", "-shm",
                                                                        ".db", "-journal"))} \
        <= set(before) | {p for p in after if p.startswith(f"{home}/")}
    assert not (tmp_path / "x").exists() and not os.path.exists("/tmp/x/job.out")


def test_door_accepts_paths_under_the_default_root(server: ServerHandle, c):
    home = server.home
    for url in (f"{home}/data/in.txt", f"file://{home}/data/in.txt",
                f"file://localhost{home}/data/in.txt", f"{home}/data", f"{home}//data/./x/"):
        i = c.add_job(name="j", application="t", input_url=url, output_url=url)
        assert c.job(i)["input_url"].startswith(f"{home}/data")


def test_cli_output_url_outside_roots_creates_nothing(server: ServerHandle, c, tmp_path):
    """The attack battery's first finding: `job add --output-url /tmp/x` made /tmp/x/job.out."""
    target = tmp_path / "x"
    r = run_cli(server.home, "job", "add", "--name", "j", "--app", "echo", "--output-url",
                str(target))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "output_url" in r.stderr
    assert "allowed data roots" in r.stderr
    assert c.jobs() == [] and not target.exists()


def test_alter_to_a_bad_output_url_is_refused(server: ServerHandle, c, tmp_path):
    home = server.home
    i = c.add_job(name="j", application="t", output_url=f"{home}/data/out", site="nowhere")
    for bad in (f"{home}/keys/authorized", str(tmp_path / "x"), "relative", f"{home}/data/../x"):
        with pytest.raises(ValidationError, match="output_url"):
            c.alter_jobs({"ids": [i]}, output_url=bad)
        r = run_cli(home, "job", "alter", str(i), "--set", f"output_url={bad}")
        assert r.returncode != 0 and "output_url" in r.stderr, r.stderr
    assert c.job(i)["output_url"] == f"{home}/data/out"
    c.alter_jobs({"ids": [i]}, output_url=f"{home}/data/other")
    assert c.job(i)["output_url"] == f"{home}/data/other"


def test_the_key_planting_attack_is_refused(server: ServerHandle, c, tmp_path):
    """Stage a public key in, stage it out to keys/authorized: both halves refused at the door
    (and the server keeps admitting only the keys it had)."""
    home = server.home
    (home / "data").mkdir(exist_ok=True)
    pub = home / "data" / "evil.key"
    pub.write_text("x" * 40 + "\n")
    authorized = sorted(os.listdir(home / "keys" / "authorized"))
    for out in (f"file://{home}/keys/authorized", f"{home}/keys/authorized/",
                f"file://{home}/keys"):
        with pytest.raises(ValidationError, match="inside the pilotfish home"):
            c.add_job(name="plant", application="t", input_url=str(pub), output_url=out)
    for secret in ("keys/server.key_secret", "keys/client.key_secret", "server.json",
                   "pilotfish.db"):
        with pytest.raises(ValidationError, match="inside the pilotfish home"):
            c.add_job(name="steal", application="t", input_url=f"{home}/{secret}")
    assert sorted(os.listdir(home / "keys" / "authorized")) == authorized


# -- roots that are declared ------------------------------------------------------------------
def test_declared_root_containing_the_home_still_excludes_it(home, db_url, tmp_path):
    """--data-root may contain the home; the home's private parts stay refused, its data/ and
    the rest of the root are allowed, and the default root no longer applies."""
    s = ServerHandle(home, db_url, data_roots=(str(tmp_path),)).start()
    try:
        c = s.client()
        c.add_app({"name": "t", "executable": "/bin/true"})
        c.add_job(name="ok", application="t", input_url=str(tmp_path / "shared" / "in.txt"))
        c.add_job(name="ok", application="t", output_url=f"{home}/data/out")
        for bad in (f"{home}/keys/authorized", f"{home}/pilotfish.db", str(home),
                    f"{home}/work/x"):
            with pytest.raises(ValidationError, match="inside the pilotfish home"):
                c.add_job(name="bad", application="t", output_url=bad)
        with pytest.raises(ValidationError, match=f"allowed data roots: {tmp_path}"):
            c.add_job(name="bad", application="t", output_url="/var/tmp/x")
        # an input directory is read whole: one that contains the home is refused
        for bad in (str(tmp_path), f"file://{tmp_path}/"):
            with pytest.raises(ValidationError, match="contains the pilotfish home"):
                c.add_job(name="bad", application="t", input_url=bad)
        c.add_job(name="ok", application="t", output_url=str(tmp_path))
    finally:
        s.stop()


@pytest.mark.parametrize("root, words", [
    ("relative/dir", "must be absolute"),
    ("{home}/keys", "inside the pilotfish home"),
    ("{home}", "inside the pilotfish home"),
    ("{home}/work", "inside the pilotfish home"),
    ("/data/../etc", r"may not contain '\.\.'"),
])
def test_bad_roots_stop_the_server_and_the_agent(home, tmp_path, root, words):
    """A relative root, one with '..', or one inside the home's private parts stops the server
    (and the agent) at start with one line."""
    root = root.format(home=home)
    r = run_cli(home, "server", "start", "--data-root", root)
    assert r.returncode != 0
    assert "data root" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    import re
    assert re.search(words, r.stderr), r.stderr
    assert not (home / "server.json").exists()
    env = dict(os.environ, PILOTFISH_DATA_ROOTS=root)
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pilotfish", "--home", str(home), "pilot",
                        "agent", "--server", "ipc:///nonexistent", "--idle-timeout", "1"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "data root" in r.stderr, r.stderr


def test_pure_checks(tmp_path):
    """The rule as functions: the same answers without a server."""
    home = tmp_path / "h"
    roots = dataroots.make(home)
    assert roots.roots == (f"{home}/data",)
    assert check_url(f"file://{home}/data/x", "input_url", roots) == f"{home}/data/x"
    assert check_url(None, "input_url", roots) is None
    with pytest.raises(ValidationError, match="input_url '/tmp/y' is not under a data root"):
        check_url("/tmp/y", "input_url", roots)
    with pytest.raises(ValidationError, match=r"'… \(501 characters\)"):  # the echo is capped
        check_url("/" + "y" * 500, "input_url", roots)
    both = dataroots.make(home, ["/", str(tmp_path / "d")])
    assert both.refusal(f"{home}/keys/x") and both.refusal(f"{home}/data/x") is None
    assert both.refusal("/etc/passwd") is None  # the admin declared "/"
    agent = dataroots.make(home, [str(tmp_path)], resolve=True, exclude=[str(tmp_path / "w")])
    assert "work root" in agent.refusal(str(tmp_path / "w" / "default" / "j.1"))


# -- after symlinks: the agent's stager -------------------------------------------------------
def _run_one(server: ServerHandle, c, tmp_path, **job) -> dict:
    i = c.add_job(name=job.pop("name", "j"), application=job.pop("app", "echo"),
                  max_retries=0, **job)
    server.agent(work_root=tmp_path / "work")
    wait_for(lambda: finished(c, [i]), 60, what="the job to end")
    return c.job(i)


def test_symlink_in_a_root_into_the_home_is_refused(server: ServerHandle, c, tmp_path):
    """data/link -> keys/authorized as output_url, data/secret -> the server's secret key as
    input_url: the door passes them (lexically fine), the stager refuses them after symlinks
    and nothing reaches the keys."""
    home = server.home
    data = home / "data"
    data.mkdir(exist_ok=True)
    (data / "keys-link").symlink_to(home / "keys" / "authorized")
    (data / "secret").symlink_to(home / "keys" / "server.key_secret")
    keys_before = tree(home / "keys")
    d = _run_one(server, c, tmp_path, output_url=f"{data}/keys-link")
    assert "STAGE_OUT_FAILED" in d["events"][-1]["via"], d["events"]
    assert "inside the pilotfish home" in d["message"] and "output_url" in d["message"]
    d = _run_one(server, c, tmp_path, name="k", input_url=f"{data}/secret")
    assert "STAGE_IN_FAILED" in d["events"][-1]["via"]
    assert "inside the pilotfish home" in d["message"], d["message"]
    assert tree(home / "keys") == keys_before
    assert not list((tmp_path / "work").rglob("secret"))


def test_symlink_in_a_root_to_outside_the_roots_is_refused(server: ServerHandle, c, tmp_path):
    home = server.home
    data = home / "data"
    data.mkdir(exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "in.txt").write_text("private\n")
    (data / "out-link").symlink_to(outside)
    (data / "in-link").symlink_to(outside / "in.txt")
    (data / "work-link").symlink_to(tmp_path / "work")
    before = tree(outside)
    d = _run_one(server, c, tmp_path, output_url=f"{data}/out-link")
    assert "STAGE_OUT_FAILED" in d["events"][-1]["via"] and "not under a data root" in \
        d["message"], d["message"]
    d = _run_one(server, c, tmp_path, name="i", input_url=f"{data}/in-link")
    assert "STAGE_IN_FAILED" in d["events"][-1]["via"] and "not under a data root" in \
        d["message"]
    assert tree(outside) == before
    # output into the agent's own work root (other jobs' workdirs) through a link: refused
    d = _run_one(server, c, tmp_path, name="w", output_url=f"{data}/work-link")
    assert "STAGE_OUT_FAILED" in d["events"][-1]["via"], d["events"]
    assert "work root" in d["message"], d["message"]


def test_symlinked_workdir_is_refused(server: ServerHandle, c, tmp_path):
    """A task could plant work/default/j.N -> keys/authorized for a later job: that job fails
    and writes nothing there; so does one whose group directory is a symlink."""
    home = server.home
    work = tmp_path / "work"
    (work / "default").mkdir(parents=True)
    (work / "evilgroup").symlink_to(home / "keys")
    keys_before = tree(home / "keys")
    first = c.add_job(name="j", application="echo", max_retries=0)
    (work / "default" / f"j.{first}").symlink_to(home / "keys" / "authorized")
    second = c.add_job(name="g", application="echo", max_retries=0,
                       group_identifier="evilgroup")
    third = c.add_job(name="s", application="echo", max_retries=0,
                      input_url=f"{home}/data/missing", group_identifier="evilgroup")
    server.agent(work_root=work)
    wait_for(lambda: finished(c, [first, second, third]), 60)
    for i in (first, second, third):
        d = c.job(i)
        assert d["state"] == "FAILED", d
        assert "not a real directory under the work root" in d["message"], d["message"]
    assert tree(home / "keys") == keys_before


def test_existing_output_target_is_never_merged_or_overwritten(server: ServerHandle, c,
                                                                tmp_path):
    home = server.home
    out = home / "data" / "out"
    i = c.add_job(name="j", application="echo", max_retries=0, output_url=str(out))
    target = out / f"j.{i}"
    target.mkdir(parents=True)
    (target / "job.out").write_text("precious\n")
    (target / "mine.txt").write_text("keep\n")
    foreign = out / f".j.{i}.partial"  # someone else's leftover: not ours to remove either
    before = tree(out)
    server.agent(work_root=tmp_path / "work")
    wait_for(lambda: finished(c, [i]), 60)
    d = c.job(i)
    assert "STAGE_OUT_FAILED" in d["events"][-1]["via"]
    assert "already exists there and is not this job's output" in d["message"], d["message"]
    assert tree(out) == before and not foreign.exists()
    assert (target / "job.out").read_text() == "precious\n"


def test_output_url_that_is_a_file_fails_cleanly(server: ServerHandle, c, tmp_path):
    home = server.home
    (home / "data").mkdir(exist_ok=True)
    f = home / "data" / "afile"
    f.write_text("x")
    d = _run_one(server, c, tmp_path, output_url=str(f))
    assert "STAGE_OUT_FAILED" in d["events"][-1]["via"] and "not a directory" in d["message"]
    assert f.read_text() == "x"


def test_jobs_json_file_with_bad_url_adds_nothing(server: ServerHandle, c, tmp_path):
    home = server.home
    jobs = [{"name": "a", "application": "t", "input_url": f"{home}/data/in"},
            {"name": "b", "application": "t", "output_url": f"{home}/keys/authorized"}]
    f = tmp_path / "jobs.json"
    f.write_text(json.dumps(jobs))
    r = run_cli(home, "job", "add", "-f", str(f))
    assert r.returncode != 0 and "job #2" in r.stderr and "output_url" in r.stderr
    assert c.jobs() == []


# -- site profiles and the pilot head ---------------------------------------------------------
def test_site_profile_data_roots_and_staging_reach_the_agents(home, tmp_path):
    """A profile's data_roots and staging limits become every agent's flags ($VARS expanded on
    the node); bad ones are refused with the key named."""
    from pilotfish.pilot.site_agent import build_spec
    from pilotfish.site_configs.loader import load_site
    sites = home / "sites"
    sites.mkdir()
    (sites / "mysite.yaml").write_text(
        "name: mysite\nextends: local\ndata_roots: [/lus/proj, $SCRATCH/pf]\n"
        "staging: {timeout: 600, max_bytes: 10G}\n")
    site = load_site("mysite", home)
    assert site.staging.max_bytes == 10 * 2**30
    spec = build_spec(site, nodes=1, walltime_minutes=10, home=home, server="tcp://h:1")
    argv = list(spec.head_argv)
    assert argv[argv.index("--") + 1:].count("--data-root") == 2
    assert "$SCRATCH/pf" in argv and "/lus/proj" in argv
    assert argv[argv.index("--stage-timeout") + 1] == "600"
    assert argv[argv.index("--stage-max-bytes") + 1] == str(10 * 2**30)
    for bad, words in (("data_roots: [relative]", "data_roots"),
                       ("data_roots: [/a/../keys]", "data_roots"),
                       ("staging: {max_bytes: lots}", "max_bytes"),
                       ("staging: {timeout: -1}", "timeout")):
        (sites / "bad.yaml").write_text(f"name: bad\nextends: local\n{bad}\n")
        with pytest.raises(ValidationError, match=words):
            load_site("bad", home)


def test_pilot_run_passes_data_roots_to_its_agents(home, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pilotfish", "--home", str(home), "pilot", "run",
                        "--server", "tcp://127.0.0.1:5", "--data-root", "/lus/x", "--dry-run",
                        "--json", "--", "--idle-timeout", "5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)["argv"]
    i = argv.index("--data-root")
    assert argv[i + 1] == "/lus/x" and "agent" in argv[:i]


def test_server_start_with_a_site_takes_its_data_roots(home, tmp_path):
    """`server start --site S` allows S's data_roots at the door; an unset $VAR in one stops
    the start with one line."""
    from pilotfish.client import Client
    shared = tmp_path / "shared"
    shared.mkdir()
    (home / "sites").mkdir()
    (home / "sites" / "mysite.yaml").write_text(
        f"name: mysite\nextends: local\ndata_roots: [{shared}]\n")
    (home / "sites" / "unset.yaml").write_text(
        "name: unset\nextends: local\ndata_roots: [$PILOTFISH_NO_SUCH_VAR/x]\n")
    r = run_cli(home, "server", "start", "--site", "unset")
    assert r.returncode != 0 and "not set" in r.stderr and "data_roots" in r.stderr, r.stderr
    run_cli(home, "server", "start", "--site", "mysite", check=True)
    try:
        with Client(home=home) as c:
            c.add_app({"name": "t", "executable": "/bin/true"})
            c.add_job(name="j", application="t", site="elsewhere", input_url=f"{shared}/in")
            with pytest.raises(ValidationError, match=f"allowed data roots: {shared}"):
                c.add_job(name="j", application="t", site="elsewhere",
                          input_url=f"{home}/data/in")
    finally:
        run_cli(home, "server", "stop")


def test_pilot_run_takes_the_sites_data_roots(home):
    """A hand-written batch script (`pilot run -- --site S`): the head adds S's roots and
    limits to the agents' flags unless given."""
    import subprocess
    import sys
    (home / "sites").mkdir()
    (home / "sites" / "mysite.yaml").write_text(
        "name: mysite\nextends: local\ndata_roots: [/lus/a, $SCRATCH/b]\n"
        "staging: {timeout: 60}\n")
    base = [sys.executable, "-m", "pilotfish", "--home", str(home), "pilot", "run",
            "--server", "tcp://127.0.0.1:5", "--dry-run", "--json", "--", "--site", "mysite"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)["argv"]
    assert argv.count("--data-root") == 2 and "$SCRATCH/b" in argv
    assert argv[argv.index("--stage-timeout") + 1] == "60"
    r = subprocess.run(base + ["--data-root", "/x", "--stage-timeout", "5"],
                       capture_output=True, text=True, timeout=60)
    argv = json.loads(r.stdout)["argv"]
    assert argv.count("--data-root") == 1 and argv.count("--stage-timeout") == 1


def test_hard_link_to_a_home_secret_is_refused(server: ServerHandle, c, tmp_path):
    """A hard link in a data root to the server's secret key (same file, other name), alone or
    inside a tree: the stage-in refuses it and copies nothing."""
    home = server.home
    data = home / "data"
    (data / "tree").mkdir(parents=True)
    os.link(home / "keys" / "server.key_secret", data / "innocent.txt")
    os.link(home / "keys" / "client.key_secret", data / "tree" / "notes.txt")
    d = _run_one(server, c, tmp_path, input_url=str(data / "innocent.txt"))
    assert "STAGE_IN_FAILED" in d["events"][-1]["via"]
    assert "hard link to a private file of the pilotfish home" in d["message"], d["message"]
    d = _run_one(server, c, tmp_path, name="t", input_url=str(data / "tree"))
    assert "hard link to a private file" in d["message"], d["message"]
    assert not list((tmp_path / "work").rglob("innocent.txt"))
    assert not list((tmp_path / "work").rglob("notes.txt"))
