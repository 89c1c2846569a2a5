"""The utilization and usage pages, their REST and their plots (issue 14): a real server, a
real node agent running real short tasks, a real `pilotfish web` over loopback (urllib), and
the pages in a real headless Chromium. The JSON must be what the CLI prints for the same
range (`pilotfish report usage --json`, `pilotfish plot utilization --json`), the figures on
the page what the Client says, the plots the drawings of that data."""
from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from urllib.parse import urlencode

import pytest

from conftest import ServerHandle, run_cli, wait_for
from test_web_browser import browser  # noqa: F401  (the fixture: a headless Chromium)
from web_world import WebHandle

SVG = "{http://www.w3.org/2000/svg}"
EVIL = "<img src=x onerror=alert(1)>"  # (names are checked names: HTML comes in forms)
NAP = {"name": "nap", "executable": "/bin/sleep", "args": ["{s}"],
       "parameters": {"s": {"type": "float"}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One agent of 2 cores (site s1, pilot pA) ran five jobs: two of group g-a, one of 2
    cores in g-big, two in g-small. ``span``: an explicit range around all of them."""
    home = tmp_path_factory.mktemp("webusage") / "home"
    home.mkdir()
    srv = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    web = None
    try:
        c = srv.client()
        c.add_app(NAP)
        t0 = time.time()
        ids = c.add_jobs(
            [{"name": f"e{i}", "application": "nap", "parameters": {"s": 0.3},
              "group_identifier": "g-a"} for i in range(2)]
            + [{"name": "big", "application": "nap", "parameters": {"s": 0.6},
                "cpus_per_process": 2, "group_identifier": "g-big", "priority": 5}]
            + [{"name": f"s{i}", "application": "nap", "parameters": {"s": 0.4},
                "group_identifier": "g-small"} for i in range(2)])
        srv.agent("--site", "s1", "--pilot", "pA", "--node-name", "nA", cores="0-1",
                  work_root=home / "work")
        wait_for(lambda: set(c.counts({"ids": ids})) == {"JOB_FINISHED"}, 60,
                 what="all finished")
        # a range closed before the tests look: the live agent's allocation is cut at "until",
        # not at "now" (which moves between the REST call and the CLI's)
        span = (f"{t0 - 1:.3f}", f"{time.time():.3f}")
        web = WebHandle(home, srv.address)
        yield srv, c, web, span
    finally:
        if web:
            web.stop()
        srv.stop_agents()
        srv.stop()


def test_rest_is_the_cli_data(world):
    srv, c, web, (since, until) = world
    rng = {"since": since, "until": until}
    # usage: the JSON is what `report usage --json` prints for the same range and keys
    for by in ("site,day", "group,month", "site,app,group,day"):
        r = web.get("/api/usage?" + urlencode({"by": by, **rng}))
        assert r.status == 200, r.text
        cli = run_cli(srv.home, "report", "usage", "--by", by, "--since", since, "--until",
                      until, "--json", check=True)
        assert r.json() == json.loads(cli.stdout)
    rep = web.get("/api/usage?" + urlencode({"by": "group", **rng})).json()
    got = {row["group"]: (row["jobs"], row["attempts"]) for row in rep["rows"]}
    assert got == {"g-a": (2, 2), "g-big": (1, 1), "g-small": (2, 2)}
    assert rep["totals"]["jobs"] == 5 and rep["totals"]["core_hours"] > 0
    everything = web.get("/api/usage?" + urlencode({"by": "", **rng})).json()  # no keys
    assert [r["jobs"] for r in everything["rows"]] == [5] and everything["by"] == []
    page = web.get("/usage?" + urlencode({"by": "", **rng}), headers={"Accept": "text/html"})
    assert page.status == 200 and 'id="totals"' in page.text, page.text
    # utilization: Client.utilization's data, as `plot utilization --json` prints it
    u = web.get("/api/utilization?" + urlencode(rng)).json()
    cli = run_cli(srv.home, "plot", "utilization", "--since", since, "--until", until,
                  "--json", check=True)
    assert u == json.loads(cli.stdout)
    assert u["attempts"] == 5 and u["max_busy"] == 2 and u["max_allocated"] == 2
    assert web.get("/api/utilization?" + urlencode({"pilot": "pA", **rng})).json()[
        "core_seconds"] == pytest.approx(u["core_seconds"], rel=1e-12)
    assert web.get("/api/utilization?" + urlencode({"site": "s1", **rng})).json()[
        "attempts"] == 5
    assert web.get("/api/utilization?since=2h").json()["attempts"] == 5  # the CLI's times
    # the plots: the drawings of that data (the busy step line; the group names as text)
    png = web.get("/api/plots/utilization.png?" + urlencode(rng))
    assert png.status == 200 and png.headers["Content-Type"] == "image/png"
    assert png.body.startswith(b"\x89PNG\r\n\x1a\n")
    svg = web.get("/api/plots/utilization.svg?" + urlencode(rng))
    assert svg.headers["Content-Type"].startswith("image/svg+xml")
    root = ET.fromstring(svg.body)
    assert root.find(f".//{SVG}g[@id='busy']") is not None
    assert root.find(f".//{SVG}g[@id='allocated']") is not None
    bars = web.get("/api/plots/usage.svg?" + urlencode({"by": "group", **rng,
                                                        "measure": "jobs"}))
    assert bars.status == 200, bars.text
    root = ET.fromstring(bars.body)
    text = "".join(root.itertext())
    assert all(g in text for g in ("g-a", "g-big", "g-small"))
    # one bar per group, as tall as its jobs (2, 1, 2)
    heights = []
    for g in root.iter(f"{SVG}g"):
        if (g.get("id") or "").startswith("usage-"):
            ys = [float(y) for y in re.findall(r"[-\d.]+ ([-\d.]+)",
                                               g.find(f"{SVG}path").get("d"))]
            heights.append(max(ys) - min(ys))
    assert len(heights) == 3
    low, *high = sorted(heights)
    assert high == pytest.approx([2 * low, 2 * low], rel=0.01)
    assert web.get("/api/plots/usage.png").body.startswith(b"\x89PNG")
    # the schema names them
    paths = web.get("/api/openapi.json").json()["paths"]
    assert {"/api/utilization", "/api/usage", "/api/plots/utilization.{fmt}",
            "/api/plots/usage.{fmt}"} <= set(paths)


def test_bad_parameters_get_one_line_errors(world):
    _, _, web, (since, until) = world
    cases = [
        ("/api/usage?by=colour", 400, "unknown usage key 'colour'"),
        ("/api/usage?by=site,day,month", 400, "per day or per month"),
        ("/api/usage?by=site,site", 400, "named twice"),
        (f"/api/usage?since={until}&until={since}", 400, "must be before until"),
        ("/api/usage?since=yesterday", 400, "since 'yesterday' must be"),
        ("/api/usage?since=1971-01-01", 400, "at most"),   # over the 20-year cap
        ("/api/utilization?since=500d", 400, "at most 400 days"),
        ("/api/utilization?since=2030-01-01", 400, "is not in the past"),
        ("/api/utilization?until=99999999999999", 400, "until"),
        ("/api/utilization?pilot=nosuch", 404, "no pilot 'nosuch'"),
        ("/api/utilization?site=nowhere", 404, "nowhere"),
        ("/api/utilization?site=-oProxyCommand%3Dx", 404, "no site '-oProxyCommand=x'"),
        ("/api/utilization?pilot=" + "p" * 3000, 400, "pilot"),
        ("/api/utilization?site=..%2F..%2Fetc", 404, "no site '../../etc'"),  # a lookup only
        ("/api/usage?by=" + "x" * 5000, 400, "unknown usage key"),
        ("/api/utilization?step=abc", 400, "step must be a number"),
        ("/api/utilization?step=nan", 400, "step"),
        ("/api/utilization?step=0.000001&since=1d", 400, "step"),
        ("/api/utilization?colour=red", 400, "unknown parameter(s) 'colour'"),
        ("/api/usage?site=s1", 400, "unknown parameter(s) 'site'"),
        ("/api/plots/usage.svg?measure=money", 400, "measure must be one of"),
        ("/api/plots/utilization.gif", 404, "png or .svg"),
        ("/api/plots/utilization.svg?since=%3Cb%3Ex", 400, "since"),
    ]
    for path, status, words in cases:
        r = web.get(path)
        assert r.status == status, (path, r.status, r.text)
        msg = r.json()["error"]
        assert words in msg and "\n" not in msg and len(msg) <= 2000, (path, msg)
    # a page with a bad form keeps the form and says what is wrong, as text
    r = web.get("/utilization?since=%3Cb%3Ebold", headers={"Accept": "text/html"})
    assert r.status == 400 and 'id="error"' in r.text
    assert "&lt;b&gt;bold" in r.text and "<b>bold" not in r.text
    r = web.get("/usage?by=%3Cscript%3E", headers={"Accept": "text/html"})
    assert r.status == 400 and "<script>" not in r.text and "&lt;script&gt;" in r.text


def test_pages_in_chromium(world, browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from test_web_browser import Shots, text_of
    _, c, web, (since, until) = world
    shot = Shots(browser, tmp_path / "screenshots")
    d = browser
    d.get(web.url + "/jobs")
    d.find_element(By.LINK_TEXT, "Utilization").click()
    wait_for(lambda: d.current_url.endswith("/utilization"), 10, 0.1, "the nav link")
    for box, value in (("f-since", since), ("f-until", until), ("f-pilot", "pA")):
        d.find_element(By.ID, box).send_keys(value)
    d.find_element(By.ID, "apply").click()
    wait_for(lambda: "pilot=pA" in d.current_url, 10, 0.1, "the form")
    img = d.find_element(By.ID, "plot")
    wait_for(lambda: d.execute_script("return arguments[0].complete", img), 20, 0.1, "the img")
    assert d.execute_script("return arguments[0].naturalWidth", img) > 0
    u = c.utilization(pilot="pA", since=float(since), until=float(until))
    assert float(d.find_element(By.ID, "core-hours").get_attribute("data-value")) == \
        pytest.approx(u["core_seconds"] / 3600, rel=1e-12)
    assert text_of(d, "#core-hours") == "%.4g" % (u["core_seconds"] / 3600)
    assert text_of(d, "#max-busy") == str(u["max_busy"]) == "2"
    assert text_of(d, "#max-allocated") == str(u["max_allocated"])
    assert text_of(d, "#attempts") == "5"
    shot("utilization")
    # download the SVG (a click on the link, as a person would): the busy step line
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                      "downloadPath": str(downloads)})
    d.find_element(By.ID, "dl-svg").click()
    wait_for(lambda: (downloads / "utilization.svg").exists(), 20, 0.1, "the download")
    root = ET.fromstring((downloads / "utilization.svg").read_bytes())
    busy = root.find(f".//{SVG}g[@id='busy']/{SVG}path")
    # the steps of the Client's data: a corner and a point per change, a height per level
    pts = re.findall(r"([-\d.]+) ([-\d.]+)", busy.get("d"))
    assert len(pts) == 2 * len(u["busy"]) - 1
    assert len({y for _, y in pts}) == len({v for _, v in u["busy"]})

    # usage by group and day: the table is the Client's report; EVIL is text
    d.find_element(By.LINK_TEXT, "Usage").click()
    wait_for(lambda: d.current_url.endswith("/usage"), 10, 0.1, "the nav link")
    Select(d.find_element(By.ID, "f-by")).select_by_visible_text("group,day")
    d.find_element(By.ID, "f-since").send_keys(since)
    d.find_element(By.ID, "f-until").send_keys(until)
    d.find_element(By.ID, "apply").click()
    wait_for(lambda: "by=group" in d.current_url, 10, 0.1, "the form")
    rep = c.usage(by="group,day", since=float(since), until=float(until))
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in d.find_elements(By.CSS_SELECTOR, "#usage tbody tr")]
    assert rows == [[r["group"], r["day"], str(r["jobs"]), str(r["finished"]),
                     str(r["attempts"]), "%.4g" % r["core_hours"]] for r in rep["rows"]]
    assert {r[0] for r in rows} == {"g-a", "g-big", "g-small"}
    assert text_of(d, "#totals").split()[1:4] == [str(rep["totals"][k]) for k in
                                                 ("jobs", "finished", "attempts")]
    img = d.find_element(By.ID, "plot")
    wait_for(lambda: d.execute_script("return arguments[0].complete", img), 20, 0.1, "the img")
    assert d.execute_script("return arguments[0].naturalWidth", img) > 0
    shot("usage")

    # what a user types is shown as text, and never runs (the server refuses the name)
    box = d.find_element(By.ID, "f-since")
    box.clear()
    box.send_keys(EVIL)
    d.find_element(By.ID, "apply").click()
    wait_for(lambda: text_of(d, "#error"), 10, 0.1, "the error")
    assert EVIL in text_of(d, "#error")
    assert d.find_element(By.ID, "f-since").get_attribute("value") == EVIL
    assert not d.find_elements(By.CSS_SELECTOR, "main script, main img")
    try:
        d.switch_to.alert.dismiss()
        raise AssertionError("an alert ran")
    except NoAlertPresentException:
        pass
    shot("usage-bad-form")

    # from the pilots page, a pilot's plot (the last day: all five attempts)
    d.get(web.url + "/pilots")
    d.find_element(By.CSS_SELECTOR, "#pilots a.util").click()
    wait_for(lambda: "/utilization?pilot=pA" in d.current_url, 10, 0.1, "the pilot's plot")
    assert text_of(d, "#attempts") == "5" and "pilot pA" in text_of(d, "#span")


def test_tokens_are_needed_beyond_the_open_mode(world):
    srv, _, _, (since, until) = world
    from pilotfish.web import tokens
    reader = tokens.create(srv.home, "usage-reader", "reader")
    web = WebHandle(srv.home, srv.address, "--token-required")
    try:
        q = "?" + urlencode({"since": since, "until": until})
        for path in ("/api/utilization", "/api/usage", "/api/plots/utilization.png",
                     "/api/plots/usage.svg"):
            assert web.get(path + q).status == 401, path
            r = web.get(path + q, token=reader)
            assert r.status == 200, (path, r.text)
        assert web.get("/api/usage" + q, token=reader).json()["totals"]["jobs"] == 5
        page = web.get("/utilization", headers={"Accept": "text/html"})
        assert page.status in (302, 303, 307) and page.headers["Location"].endswith("/login")
    finally:
        web.stop()


def test_recent_answers_are_kept_for_fixed_ranges_only():
    """web/reports.Recent, pure: the page, its image and a download ask the server once."""
    from pilotfish.web.auth import User
    from pilotfish.web.reports import Recent
    asked = []

    def ask(n):
        return lambda: asked.append(n) or n
    r = Recent(size=2, ttl=60)
    alice, bob = User("alice", "reader", "web-alice"), User("bob", "reader", "web-bob")
    past = {"since": 1.0, "until": time.time() - 10, "by": ["site", "day"]}
    assert r.get(alice, "usage", past, ask(1)) == 1
    assert r.get(alice, "usage", dict(past), ask(2)) == 1          # kept
    assert r.get(bob, "usage", past, ask(3)) == 3                  # per user
    assert r.get(alice, "utilization", past, ask(4)) == 4          # per kind
    assert r.get(alice, "usage", past, ask(5)) == 5                # (size 2: dropped)
    for moving in ({"since": 1.0, "until": None}, {"since": None, "until": 5.0},
                   {"since": 1.0, "until": time.time() + 3600}):
        assert r.get(alice, "usage", moving, ask(6)) == 6
        assert r.get(alice, "usage", moving, ask(7)) == 7          # never kept
    r.ttl = 0
    assert r.get(alice, "usage", past, ask(8)) == 8                # expired
    assert asked == [1, 3, 4, 5, 6, 7, 6, 7, 6, 7, 8]


def test_a_page_and_its_links_name_the_same_answer():
    """The page keeps its answer under the range the server fixed; its image and download
    links, read back as the routes read them, name that same entry (one scan per view)."""
    from starlette.datastructures import QueryParams
    from pilotfish.web.auth import OWNER
    from pilotfish.web.reports import Recent, usage_args, usage_link, util_args, util_link
    past = time.time() - 7 * 86400 + 0.123456789
    for since in (past, float(int(past)), 86400.123456, 0.0):
        u = {"site": "s1", "pilot": None, "since": since, "until": since + 3600.25}
        page = util_args(QueryParams("site=s1&since=1h"))
        page.update(since=u["since"], until=u["until"])
        link = util_args(QueryParams(util_link(u)))
        key = Recent._key(OWNER, "utilization", page)
        assert key is not None and key == Recent._key(OWNER, "utilization", link) or \
            since < 1e8 and abs(link["since"] - since) < 1e-6, (since, page, link)
        rep = {"by": ["group", "day"], "since": since, "until": since + 86400}
        page = usage_args(QueryParams("by=group,day"))
        page.update(since=rep["since"], until=rep["until"])
        link = usage_args(QueryParams(usage_link(rep)))
        assert Recent._key(OWNER, "usage", page) == Recent._key(OWNER, "usage", link) or \
            since < 1e8 and abs(link["since"] - since) < 1e-6
