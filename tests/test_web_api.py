"""The REST API and the web's security: a real server, real `pilotfish web` processes, real
HTTP over loopback sockets (urllib). Open mode (loopback) and token mode (--token-required:
what any other bind gets), tokens and roles, CSRF on forms, headers, escaping, bad input."""
from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import ServerHandle, run_cli, wait_for
from web_world import WebHandle
from pilotfish.errors import ValidationError

SLEEP = {"name": "sleep", "executable": "/bin/sleep", "args": ["{t}"],
         "parameters": {"t": {"type": "int", "default": 60}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("web") / "home"
    home.mkdir()
    srv = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    with srv.client() as c:
        c.add_app(SLEEP)
        c.add_jobs([{"name": f"j{i}", "application": "sleep", "group_identifier":
                     "g1" if i % 2 else "g2", "tags": ["t1"]} for i in range(30)])
    from pilotfish.web import tokens as web_tokens
    # one through the command, the others directly (a CLI start costs a second or two)
    r = run_cli(home, "keys", "token", "admin1", "--role", "admin", "--json", check=True)
    tokens = {"admin": json.loads(r.stdout)["token"]}
    for name, role in (("reader1", "reader"), ("submitter1", "submitter"),
                       ("submitter2", "submitter")):
        tokens[name[:-1] if name != "submitter2" else name] = web_tokens.create(home, name, role)
    webs = []
    try:  # a web that fails to start must not leave the server running
        webs.append(WebHandle(home, srv.address))
        webs.append(WebHandle(home, srv.address, "--token-required"))
        yield srv, webs[0], webs[1], tokens
    finally:
        for w in webs:
            w.stop()
        srv.stop()


def test_open_mode_lists_filters_shows_and_changes_jobs(world):
    srv, web, _, _ = world
    jobs = web.get("/api/jobs?group=g1&limit=5").json()
    assert len(jobs) == 5 and {j["group"] for j in jobs} == {"g1"}
    nxt = web.get(f"/api/jobs?group=g1&limit=5&after={jobs[-1]['id']}").json()
    assert nxt[0]["id"] > jobs[-1]["id"]  # keyset paging
    newest = web.get("/api/jobs?limit=3&newest=true").json()
    assert newest[0]["id"] > newest[1]["id"]
    assert web.get("/api/jobs/counts?group=g1").json() == {"READY": 15}
    one = web.get(f"/api/jobs/{jobs[0]['id']}").json()
    assert one["argv"] == ["/bin/sleep", "60"] and one["events"]
    r = web.post("/api/jobs", {"jobs": [{"name": "added", "application": "sleep",
                                         "parameters": {"t": 1}}]})
    assert r.status == 201, r.text
    new = r.json()["ids"][0]
    two = web.post("/api/jobs", [{"name": "l1", "application": "sleep"},
                                 {"name": "l2", "application": "sleep"}]).json()["ids"]
    assert web.post("/api/jobs/delete", {"filter": {"ids": two}}).json() == {"removed": 2}
    assert web.post(f"/api/jobs/{new}/alter", {"priority": 7}).json()["changed"] == [new]
    assert web.get(f"/api/jobs/{new}").json()["priority"] == 7
    assert web.post(f"/api/jobs/{new}/kill", {}).json()["changed"] == [new]
    assert web.post(f"/api/jobs/{new}/retry", {}).json()["changed"] == [new]
    killed = web.post("/api/jobs/kill", {"filter": {"ids": [new]}}).json()
    assert killed == {"changed": [new], "matched": 1}
    assert web.request("DELETE", f"/api/jobs/{new}").json() == {"removed": 1}
    assert web.get(f"/api/jobs/{new}").status == 404
    assert web.get("/api/groups").json() == {"groups": ["g1", "g2"], "next": None}
    assert web.get("/api/groups?limit=1").json() == {"groups": ["g1"], "next": "g1"}
    assert web.get("/api/groups?after=g1").json()["groups"] == ["g2"]
    assert web.get("/api/groups?limit=0").status == 400
    assert 'href="/jobs?group=g2"' in web.get("/groups").text
    assert [a["name"] for a in web.get("/api/apps").json()] == ["sleep"]
    assert web.get("/api/apps/sleep").json()["jobs"]["READY"] == 30
    assert web.get("/api/pilots").json() == [] and web.get("/api/agents").json() == []
    assert web.get("/api/sites").json() == []
    st = web.get("/api/status").json()
    assert "db" not in st and st["counts"]["READY"] == 30
    # the event stream from a cursor: the added job's history and its removal
    ev = web.get(f"/api/events?since=0&job={new}&limit=100").json()
    assert ev["events"][-1]["to"] == "REMOVED"
    assert ev["cursor"] >= ev["events"][-1]["id"]
    assert web.get(f"/api/jobs/{jobs[0]['id']}/log").json()["pieces"] == []


def test_bad_input_is_refused_with_one_line_json(world):
    _, web, _, _ = world
    cases = [
        ("GET", "/api/jobs/99999999999999999999999", None, 400, "past 64 bits"),
        ("GET", "/api/jobs?limit=abc", None, 400, "limit"),
        ("GET", "/api/jobs?limit=5000", None, 400, "limit must be 1..1000"),
        ("GET", "/api/jobs?offset=-1", None, 400, "offset"),
        ("GET", "/api/jobs?colour=red", None, 400, "unknown parameter(s) 'colour'"),
        # (the server calls an unknown state an illegal transition: its code, its status)
        ("GET", "/api/jobs?state=NOPE", None, 409, "NOPE"),
        ("GET", "/api/jobs?app=nosuch", None, 404, "nosuch"),
        ("GET", "/api/jobs/123456", None, 404, "no job 123456"),
        ("POST", "/api/jobs", {"name": "x", "application": "sleep", "bogus": 1}, 400,
         "unknown job key(s) bogus"),
        ("POST", "/api/jobs", {"name": "x", "application": "sleep", "priority": 2**70}, 400,
         "past 64 bits"),
        ("POST", "/api/jobs", {"name": "x", "application": "sleep", "parameters": {"t": "z"}},
         400, "t"),
        ("POST", "/api/jobs/1/kill", {"why": 1}, 400, "takes no arguments"),
        ("POST", "/api/jobs/kill", {"filter": {"ids": [1]}, "timeout": 1}, 400,
         "unknown argument(s) timeout"),
        ("POST", "/api/jobs/kill", {}, 400, "select jobs"),
        ("POST", "/api/jobs/1/alter", {"state": "RUNNING"}, 409, "illegal"),
        ("POST", "/api/jobs/explode", {}, 404, "no action"),
        ("GET", "/api/events?wait=99", None, 400, "wait"),
    ]
    for method, path, body, status, words in cases:
        r = web.request(method, path, body)
        assert r.status == status, (path, r.status, r.text)
        msg = r.json()["error"]
        assert words in msg and "\n" not in msg and len(msg) <= 2000, (path, msg)
    # a change without a JSON body (what a page of another site could send) is refused
    r = web.request("POST", "/api/jobs/1/kill", headers={"Content-Type": "text/plain"})
    assert r.status == 415
    assert web.get("/api/jobs/1").json()["state"] == "READY"  # nothing changed


def test_headers_host_check_and_no_secrets(world):
    srv, web, _, _ = world
    r = web.get("/jobs", headers={"Accept": "text/html"})
    assert r.status == 200
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    # DNS rebinding: an open dashboard answers loopback names only
    assert web.get("/api/jobs", headers={"Host": "evil.example:80"}).status == 403
    assert web.get("/api/jobs", headers={"Host": f"localhost:{web.port}"}).status == 200
    # no key, token or database URL in any page or answer
    keydir = srv.home / "keys"
    secrets_ = [line.split("=", 1)[1].strip().strip('"') for f in keydir.glob("*.key_secret")
                for line in f.read_text().splitlines() if "secret-key" in line]
    assert secrets_
    bodies = "".join(web.get(p).text for p in (
        "/api/status", "/api/jobs?limit=50", "/api/agents", "/api/openapi.json", "/jobs",
        "/jobs/1", "/pilots", "/sites"))
    for s in secrets_:
        assert s not in bodies
    assert "pilotfish.db" not in bodies and "sqlite" not in bodies
    assert "sha256" not in bodies
    assert web.get("/api/openapi.json").json()["paths"]["/api/jobs"]["get"]


def test_user_text_is_escaped_in_pages(world):
    srv, web, _, _ = world
    ids = web.post("/api/jobs", {"name": "esc", "application": "sleep", "description":
                                 "<script>alert(1)</script>"}).json()["ids"]
    page = web.get(f"/jobs/{ids[0]}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # an action's notice comes only in the words of an action: not a link's own
    assert "job 4 killed" in web.get(f"/jobs/{ids[0]}?done=job+4+killed").text
    assert "evil" not in web.get(f"/jobs/{ids[0]}?done=go+to+evil.example").text
    assert "<script>alert" not in page
    web.request("DELETE", f"/api/jobs/{ids[0]}")


def test_tokens_roles_and_revocation(world):
    srv, _, web, tokens = world
    home = srv.home
    f = home / "keys" / "web_tokens.json"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert not any(t in f.read_text() for t in tokens.values())  # only hashes are kept
    ls = json.loads(run_cli(home, "keys", "token", "--ls", "--json", check=True).stdout)
    assert {(x["name"], x["role"]) for x in ls} >= {("reader1", "reader"),
                                                    ("admin1", "admin")}
    # no token: nothing
    assert web.get("/api/jobs").status == 401
    assert web.get("/api/jobs", token="pft_wrong").status == 401
    r = web.get("/jobs", headers={"Accept": "text/html"})
    assert r.status == 303 and r.headers["Location"] == "/login"
    # reader: views, changes nothing
    assert web.get("/api/jobs?limit=1", token=tokens["reader"]).status == 200
    r = web.post("/api/jobs/1/kill", {}, token=tokens["reader"])
    assert r.status == 403 and "needs the role submitter" in r.json()["error"]
    # submitter: adds jobs (owned by its key web-submitter1) and acts on those only
    r = web.post("/api/jobs", {"name": "mine", "application": "sleep"},
                 token=tokens["submitter"])
    mine = r.json()["ids"][0]
    assert web.get(f"/api/jobs/{mine}", token=tokens["reader"]).json()["owner"] == \
        "web-submitter1"
    assert web.post(f"/api/jobs/{mine}/kill", {}, token=tokens["submitter2"]).status == 403
    r = web.post("/api/jobs/2/kill", {}, token=tokens["submitter"])  # the home's job
    assert r.status == 403 and "not its own" in r.json()["error"]
    assert web.post(f"/api/jobs/{mine}/kill", {}, token=tokens["submitter"]).json()[
        "changed"] == [mine]
    # admin: everything
    assert web.request("DELETE", f"/api/jobs/{mine}", token=tokens["admin"]).json() == {
        "removed": 1}
    # a role change applies at the next request; a revoked token at once
    run_cli(home, "keys", "role", "web-reader1", "submitter", check=True)
    r = web.post("/api/jobs", {"name": "r", "application": "sleep"}, token=tokens["reader"])
    assert r.status == 201, r.text
    web.request("DELETE", f"/api/jobs/{r.json()['ids'][0]}", token=tokens["admin"])
    run_cli(home, "keys", "token", "--revoke", "reader1", check=True)
    assert web.get("/api/jobs", token=tokens["reader"]).status == 401
    assert not (home / "keys" / "authorized" / "web-reader1.key").exists()


def test_login_sessions_and_csrf(world):
    srv, _, web, tokens = world
    first = web.get("/login", headers={"Accept": "text/html"})
    sid = first.headers["Set-Cookie"].split(";")[0]  # pf_session=...
    csrf = first.text.split('name="csrf" value="')[1].split('"')[0]
    cookie = {"Cookie": sid, "Accept": "text/html"}
    # a login without the session's CSRF token is refused
    r = web.post("/login", form={"token": tokens["admin"]}, headers=cookie)
    assert r.status == 403
    r = web.post("/login", form={"token": tokens["admin"], "csrf": "0" * 64}, headers=cookie)
    assert r.status == 403
    r = web.post("/login", form={"token": "pft_nope", "csrf": csrf}, headers=cookie)
    assert r.status == 401
    r = web.post("/login", form={"token": tokens["admin"], "csrf": csrf}, headers=cookie)
    assert r.status == 303
    new_sid = r.headers["Set-Cookie"].split(";")[0]
    assert new_sid != sid and "HttpOnly" in r.headers["Set-Cookie"]  # rotated at login
    assert web.get("/jobs", headers={"Cookie": sid, "Accept": "text/html"}).status == 303
    page = web.get("/jobs/3", headers={"Cookie": new_sid, "Accept": "text/html"})
    assert page.status == 200 and "admin1 (admin)" in page.text
    new_csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    # an action form with the old session's token, or none, changes nothing
    for bad in (csrf, ""):
        r = web.post("/jobs/3/action", form={"action": "kill", "csrf": bad},
                     headers={"Cookie": new_sid, "Accept": "text/html"})
        assert r.status == 403
    assert web.get("/api/jobs/3", token=tokens["admin"]).json()["state"] == "READY"
    # the confirmation page, then the form with this session's token
    conf = web.get("/jobs/3/confirm?action=kill", headers={"Cookie": new_sid,
                                                           "Accept": "text/html"})
    assert conf.status == 200 and 'id="confirm"' in conf.text
    r = web.post("/jobs/3/action", form={"action": "kill", "csrf": new_csrf},
                 headers={"Cookie": new_sid, "Accept": "text/html"})
    assert r.status == 303 and r.headers["Location"].startswith("/jobs/3?done=")
    assert web.get("/api/jobs/3", token=tokens["admin"]).json()["state"] == "USER_KILLED"
    # alter: a field and a value (JSON when it parses), the server's checks
    r = web.post("/jobs/5/action", form={"action": "alter", "field": "priority", "value": "5",
                                         "csrf": new_csrf}, headers={"Cookie": new_sid})
    assert r.status == 303
    assert web.get("/api/jobs/5", token=tokens["admin"]).json()["priority"] == 5
    r = web.post("/jobs/5/action", form={"action": "alter", "field": "colour", "value": "x",
                                         "csrf": new_csrf},
                 headers={"Cookie": new_sid, "Accept": "text/html"})
    assert r.status == 400 and "cannot alter" in r.text and "<html" in r.text
    # a cookie session of a submitter cannot post as admin: roles hold for pages too
    web.post("/logout", form={"csrf": new_csrf}, headers={"Cookie": new_sid})
    assert web.get("/jobs", headers={"Cookie": new_sid, "Accept": "text/html"}).status == 303


def test_server_start_runs_the_web_beside_it(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    from web_world import free_port
    import urllib.request
    port = free_port()
    r = run_cli(home, "server", "start", "--web", f"127.0.0.1:{port}")
    try:
        assert r.returncode == 0, r.stderr
        assert f"web dashboard: http://127.0.0.1:{port}/" in r.stdout

        def up():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/counts",
                                            timeout=5) as resp:
                    return json.loads(resp.read()) == {}
            except OSError:
                return False
        wait_for(up, 30, 0.1, "the web beside the server")
        assert "OPEN web dashboard" in (home / "logs" / "web.log").read_text()
        bad = run_cli(home, "server", "start", "--web", "127.0.0.1:99999")
        assert bad.returncode != 0 and "--web 127.0.0.1:99999" in bad.stderr
    finally:
        run_cli(home, "server", "stop")
    wait_for(lambda: not (home / "web.json").exists(), 15, 0.1, "the web to stop")
    assert os.path.exists(home / "logs" / "web.log")


def test_only_loopback_runs_open():
    """Which binds may run without tokens, and the Host names an open dashboard answers."""
    from pilotfish.errors import ValidationError
    from pilotfish.web.auth import is_loopback_host, split_hostport
    from pilotfish.web.cli import parse_bind
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org", "127.0.0.1.nip.io",
                 "localhost.evil.example", ""):
        assert not is_loopback_host(host), host
    assert split_hostport("[::1]:8080") == ("::1", "8080")
    assert split_hostport("127.0.0.1:80") == ("127.0.0.1", "80")
    assert parse_bind("0.0.0.0:8443") == ("0.0.0.0", 8443)
    for bad in ("8080", "127.0.0.1:", "127.0.0.1:70000", "127.0.0.1:-1", "no.such.host.invalid:1"):
        with pytest.raises(ValidationError):
            parse_bind(bad)


def test_job_groups_and_keyset_paging_on_postgresql(tmp_path, pg_url):
    """The two server-side additions the pages stand on, on PostgreSQL too: job_groups' loose
    index scan (a recursive CTE) and job_ls's ``after``."""
    home = tmp_path / "home"
    home.mkdir()
    srv = ServerHandle(home, pg_url).start()
    try:
        with srv.client() as c:
            c.add_app(SLEEP)
            ids = c.add_jobs([{"name": f"j{i}", "application": "sleep",
                               "group_identifier": f"g{i % 3}"} for i in range(9)]
                             + [{"name": "none", "application": "sleep"}])
            assert c.groups() == {"groups": ["g0", "g1", "g2"], "next": None}
            assert c.groups(limit=2) == {"groups": ["g0", "g1"], "next": "g1"}
            assert c.groups(after="g1") == {"groups": ["g2"], "next": None}
            assert c.groups(after="g2")["groups"] == []
            page = c.jobs({"group": "g1"}, limit=2, newest=True)
            more = c.jobs({"group": "g1"}, limit=2, newest=True, after=page[-1]["id"])
            assert [j["id"] for j in page + more] == [ids[7], ids[4], ids[1]]
            assert [j["id"] for j in c.jobs({}, limit=3, after=ids[5])] == ids[6:9]
    finally:
        srv.stop()


def test_tokens_over_a_plain_server(tmp_path):
    """A server started --insecure has no keys to give: the web still checks each token's
    role itself (the server takes every plain caller for admin)."""
    from pilotfish.server import daemon
    from pilotfish.web import tokens as web_tokens
    home = tmp_path / "home"
    home.mkdir()
    info = daemon.start_background(home, f"sqlite:///{home / 'pilotfish.db'}",
                                   "tcp://127.0.0.1:*", 1.0, insecure=True)
    web = None
    try:
        reader = web_tokens.create(home, "r", "reader")
        admin = web_tokens.create(home, "a", "admin")
        web = WebHandle(home, info["address"], "--token-required")
        assert web.get("/api/jobs/counts", token=reader).json() == {}
        r = web.post("/api/jobs", {"name": "x", "application": "none"}, token=reader)
        assert r.status == 403 and "needs the role submitter" in r.json()["error"]
        r = web.post("/api/jobs", {"name": "x", "application": "none"}, token=admin)
        assert r.status == 404 and "none" in r.json()["error"]  # the server's own answer
    finally:
        if web:
            web.stop()
        daemon.stop(home, wait=15)


def test_rest_and_page_sort_with_keyset_cursors(world):
    srv, web, _, _ = world
    names = web.get("/api/jobs?sort=-name&limit=4&group=g1").json()
    assert [j["name"] for j in names] == sorted((j["name"] for j in names), reverse=True)
    nxt = web.get(f"/api/jobs?sort=-name&limit=4&group=g1&after={names[-1]['id']}"
                  f"&at={names[-1]['name']}").json()
    assert nxt and nxt[0]["name"] < names[-1]["name"]
    upd = web.get("/api/jobs?sort=updated&limit=3").json()
    more = web.get(f"/api/jobs?sort=updated&limit=3&after={upd[-1]['id']}"
                   f"&at={upd[-1]['state_time']!r}").json()
    assert (more[0]["state_time"], more[0]["id"]) > (upd[-1]["state_time"], upd[-1]["id"])
    # anything off the whitelist, or a cursor without its value: one line, 400
    for q in ("sort=priority", "sort=id%3BDROP", "sort=--id", "sort=name&after=3",
              "sort=ended&after=3&at=soon", "sort=ended&after=3&at=nan",
              "sort=updated&after=3&at=1e999", "at=x", "sort=name&newest=true"):
        r = web.get("/api/jobs?" + q)
        assert r.status == 400 and "\n" not in r.json()["error"], (q, r.text)
    r = web.get("/jobs?sort=priority", headers={"Accept": "text/html"})
    assert r.status == 400 and "unknown sort" in r.text
    page = web.get("/jobs?sort=-name&per=20").text
    assert 'id="sort-name"' in page and "▼" in page
    assert "sort=-name" in page and "at=" in page  # the next page's link carries the cursor


def test_workflows_rest_and_pages_escape_what_users_wrote(world):
    srv, web, _, tokens = world
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    with srv.client() as c:
        r = c.add_workflow({"name": "wf-one", "description": evil, "group_identifier": "gw",
                            "job_status_routing_key": "wf.status.one",
                            "subjobs": [{"name": "s0", "application": "sleep"},
                                        {"name": "s1", "application": "sleep"}]})
    wf, jobs = r["id"], r["jobs"]
    lst = web.get("/api/workflows?group=gw").json()
    assert [(w["id"], w["subjobs"], w["done"], w["job_status_routing_key"]) for w in lst] == \
        [(wf, 2, 0, "wf.status.one")]
    one = web.get(f"/api/workflows/{wf}").json()
    assert [s["job"] for s in one["subjob_list"]] == jobs and one["description"] == evil
    assert web.get("/api/workflows/999999").status == 404
    for q in ("state=NOPE", "limit=0", "limit=5000", "bogus=1", "group=%00"):
        r = web.get("/api/workflows?" + q)
        assert r.status == 400 and "\n" not in r.json()["error"], (q, r.text)
    page = web.get("/workflows").text
    assert f'href="/workflows/{wf}"' in page and "wf.status.one" in page and "0/2" in page
    assert 'href="/workflows"' in page  # in the nav
    page = web.get(f"/workflows/{wf}").text
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert all(f'href="/jobs/{j}"' in page for j in jobs)
    assert f'data-jobs="{jobs[0]},{jobs[1]}"' in page and f'data-live="workflow:{wf}"' in page
    # with a token (token mode) anyone may look; without one nobody may
    strict = world[2]
    assert strict.get("/api/workflows").status == 401
    assert strict.get("/api/workflows", token=tokens["submitter2"]).status == 200


def test_job_table_counts_are_bounded_and_say_so(world):
    """A filter's counts by state read at most the newest `limit` matching jobs; the answer
    says whether more match (the job table of a group of 20,000 jobs: see bench/web_pages)."""
    srv, web, _, _ = world
    with srv.client() as c:
        few = c.counts_bounded({"group": "g1", "tag": "t1"}, limit=5)
        assert sum(few["counts"].values()) == 5 and few["more"] is True
        exact = c.counts({"group": "g1"})
        assert c.counts_bounded({"group": "g1"}, limit=1000) == {"counts": exact, "more": False,
                                                                   "scanned": None}
        assert c.counts_bounded({}, limit=1)["more"] is False  # (all: from memory, exact)
        with pytest.raises(ValidationError, match="limit must be 1..100000"):
            c.counts_bounded({"group": "g1"}, limit=10**6)
    page = web.get("/jobs?group=g1").text
    assert "More than" not in page and f"<b>{sum(exact.values())}</b>" in page


@pytest.mark.parametrize("more,scanned,text", [
    (False, None, "all <b>3</b>"),
    (True, None, "More than 1,000 jobs match: the counts by state are of the newest 1,000"),
    (True, 100_000, "Counted among the newest 100,000 jobs only (a tag of many jobs is read row by row)")])
def test_job_table_says_how_its_counts_were_bounded(more, scanned, text):
    """The three ways the job table's counts come (exact, the newest 1,000 matching, a tag's
    newest 100,000 jobs), rendered as the page does (pure: a real table of >100,000 jobs is
    bench/web_pages.py's)."""
    from pilotfish.web.base import make_templates
    env = make_templates()
    tpl = env.get_template("jobs.html")
    html = tpl.render(
        fragment=True, notice="", poll=0, live_jobs="", open_mode=True, csrf="", rows=[],
        counts={"READY": 3}, states=["READY"], total=3, flt={}, more=more, count_limit=1_000,
        scanned=scanned, matching=3, per=50, sort="-id", sort_name="id", desc=True,
        heads={k: "/" for k in ("id", "name", "app", "state", "updated", "ended")},
        pages={"first": "", "prev": "", "next": ""}, state_link=lambda s: "/", live="jobs",
        user=None)
    assert text in html
