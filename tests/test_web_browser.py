"""The dashboard in a real headless Chromium (Debian's chromium + chromedriver, selenium):
the job table, a group filter, a job page, kill with its confirmation, a live state change
without reloading, delete, the login form, user text shown as text. Screenshots of each page
are kept under the test's tmp dir (the path is printed)."""
from __future__ import annotations

import os
import shutil

import pytest

from conftest import ServerHandle, require, wait_for
from externals import CHROMIUM, chromium_available
from web_world import WebHandle

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")
SLEEP = {"name": "sleep", "executable": "/bin/sleep", "args": ["{t}"],
         "parameters": {"t": {"type": "int", "default": 60}}}
ECHO = {"name": "echo", "executable": "/bin/echo", "args": ["{msg}"],
        "parameters": {"msg": {"type": "str"}}}


@pytest.fixture
def browser(tmp_path):
    require(chromium_available(), f"Chromium ({' and '.join(CHROMIUM)})")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM[0]
    for f in FLAGS:
        opts.add_argument(f)
    profile = tmp_path / "chromium-profile"
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMIUM[1]), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


class Shots:
    def __init__(self, driver, where) -> None:
        self.driver, self.where = driver, where
        where.mkdir(exist_ok=True)
        print(f"\nscreenshots: {where}")

    def __call__(self, name: str) -> None:
        self.driver.save_screenshot(str(self.where / f"{name}.png"))


def text_of(driver, css: str) -> str:
    from selenium.webdriver.common.by import By
    try:
        return driver.find_element(By.CSS_SELECTOR, css).text
    except Exception:  # replaced under us by a live update: ask again
        return ""


def test_dashboard_in_chromium(browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    home = tmp_path / "home"
    home.mkdir()
    srv = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    web = None
    try:
        with srv.client() as c:
            c.add_app(SLEEP)
            c.add_app(ECHO)
            c.site_report("site-a", pid=4242, host="login1", paused=False)
            ids = c.add_jobs(
                [{"name": "runner", "application": "sleep", "group_identifier": "g-run"}]
                + [{"name": f"j{i}", "application": "sleep", "group_identifier":
                    "g1" if i % 2 else "g2"} for i in range(8)]
                + [{"name": "esc", "application": "sleep", "group_identifier": "g2",
                    "description": "<script>alert(1)</script><img src=x onerror=alert(2)>"}]
                + [{"name": "talker", "application": "echo", "priority": 10,
                    "parameters": {"msg": "hello-from-the-task"}}])
            srv.agent(cores="0,1")
            wait_for(lambda: c.job(ids[0])["state"] == "RUNNING"
                     and c.job(ids[-1])["state"] == "JOB_FINISHED", 60, 0.2, "jobs to run")
        web = WebHandle(home, srv.address)
        shot = Shots(browser, tmp_path / "screenshots")
        d = browser

        # the job table, then filtered by a group
        d.get(web.url + "/")
        assert d.find_element(By.ID, "jobs")
        assert "RUNNING" in text_of(d, "#counts") and "JOB_FINISHED 1" in text_of(d, "#counts")
        shot("jobs")
        box = d.find_element(By.ID, "f-group")
        box.clear()
        box.send_keys("g1")
        d.find_element(By.ID, "apply").click()
        wait_for(lambda: "group=g1" in d.current_url, 10, 0.1, "the filter")
        groups = {e.text for e in d.find_elements(By.CSS_SELECTOR, "#jobs a.group")}
        assert groups == {"g1"}, groups
        assert len(d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")) == 4
        shot("jobs-group-g1")

        # a job page: its fields, argv, attempt, history
        d.get(f"{web.url}/jobs/{ids[0]}")
        assert text_of(d, "#job-state") == "RUNNING"
        assert "/bin/sleep\n60" in text_of(d, "#argv")
        assert "RUNNING" in text_of(d, "#timeline")
        assert len(d.find_elements(By.CSS_SELECTOR, "#attempts tbody tr")) == 1
        shot("job-running")

        # killed elsewhere (a script, the CLI): the open page shows it without reloading
        d.execute_script("window.__same_page = 42;")
        with srv.client() as c:
            c.kill_jobs({"ids": [ids[0]]})
        wait_for(lambda: text_of(d, "#job-state") == "USER_KILLED", 20, 0.1,
                 "the live state change")
        assert d.execute_script("return window.__same_page;") == 42  # no reload
        assert "USER_KILLED" in text_of(d, "#timeline")
        shot("job-killed-live")

        # the job table follows too: a job killed elsewhere changes its row in place
        d.get(web.url + "/jobs?group=g2")
        d.execute_script("window.__same_page = 43;")
        with srv.client() as c:
            c.kill_jobs({"ids": [ids[1]]})  # j0, of g2
        row = f"#jobs tr[data-job='{ids[1]}'] td[data-field=state]"
        wait_for(lambda: text_of(d, row) == "USER_KILLED", 20, 0.1, "the row's live state")
        assert d.execute_script("return window.__same_page;") == 43

        # kill from the page: a confirmation step, then the state
        d.get(f"{web.url}/jobs/{ids[4]}")
        d.find_element(By.ID, "kill").click()
        assert "Kill job" in d.find_element(By.TAG_NAME, "h1").text
        shot("confirm-kill")
        d.find_element(By.ID, "confirm").click()
        wait_for(lambda: text_of(d, "#job-state") == "USER_KILLED", 10, 0.1, "the kill")
        assert "killed" in text_of(d, ".notice")

        # delete from the page, confirmed
        d.find_element(By.ID, "delete").click()
        shot("confirm-delete")
        d.find_element(By.ID, "confirm").click()
        wait_for(lambda: "deleted" in text_of(d, ".notice"), 10, 0.1, "the delete")
        assert d.current_url.startswith(web.url + "/jobs")
        with srv.client() as c:
            assert [j["id"] for j in c.jobs({"ids": [ids[4]]})] == []
        shot("jobs-after-delete")

        # a task's output, where it ran
        d.get(f"{web.url}/jobs/{ids[-1]}")
        assert text_of(d, "#log-out") == "hello-from-the-task"
        assert text_of(d, "#job-state") == "JOB_FINISHED"
        shot("job-output")

        # what a user wrote is shown as text, and never runs
        d.get(f"{web.url}/jobs/{ids[-2]}")
        cell = d.find_element(By.XPATH, "//table[@id='fields']//th[text()='description']"
                              "/following-sibling::td")
        assert cell.text == "<script>alert(1)</script><img src=x onerror=alert(2)>"
        assert not d.find_elements(By.CSS_SELECTOR, "main script, main img")
        try:
            d.switch_to.alert.dismiss()
            raise AssertionError("an alert ran")
        except NoAlertPresentException:
            pass
        shot("job-escaped")

        d.get(web.url + "/pilots")
        assert "1/" in text_of(d, "#agents") or "ALIVE" in text_of(d, "#agents")
        shot("pilots")
        d.get(web.url + "/sites")
        assert "site-a" in text_of(d, "#sites") and "login1 pid 4242" in text_of(d, "#sites")
        shot("sites")
        d.get(web.url + "/groups")
        assert [e.text for e in d.find_elements(By.CSS_SELECTOR, "#groups a")] == [
            "g-run", "g1", "g2"]
        shot("groups")
    finally:
        if web:
            web.stop()
        srv.stop_agents()
        srv.stop()


def test_login_form_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from pilotfish.web import tokens
    home = tmp_path / "home"
    home.mkdir()
    srv = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    web = None
    try:
        with srv.client() as c:
            c.add_app(SLEEP)
            c.add_jobs([{"name": "one", "application": "sleep"}])
        reader = tokens.create(home, "viewer", "reader")
        web = WebHandle(home, srv.address, "--token-required")
        shot = Shots(browser, tmp_path / "screenshots")
        d = browser
        d.get(web.url + "/jobs")
        assert d.current_url == web.url + "/login"
        d.find_element(By.ID, "token").send_keys("pft_not-a-token")
        d.find_element(By.ID, "login").click()
        # the page asks the server, then writes the error: wait for it
        wait_for(lambda: "unknown or revoked token" in text_of(d, "#error"), 10, 0.05,
                 "the login error")
        d.find_element(By.ID, "token").send_keys(reader)
        d.find_element(By.ID, "login").click()
        wait_for(lambda: d.current_url == web.url + "/jobs", 10, 0.1, "the login")
        assert "viewer (reader)" in text_of(d, "header")
        shot("jobs-as-reader")
        # the utilization page's image comes from /api/ with the same session
        d.get(web.url + "/utilization")
        img = d.find_element(By.ID, "plot")
        wait_for(lambda: d.execute_script("return arguments[0].complete", img), 20, 0.1,
                 "the plot")
        assert d.execute_script("return arguments[0].naturalWidth", img) > 0
        # a reader sees no actions, and a confirm page is refused
        d.get(web.url + "/jobs/1")
        assert not d.find_elements(By.ID, "kill")
        # the live stream works on a token's session too
        d.execute_script("window.__same_page = 7;")
        with srv.client() as c:
            c.kill_jobs({"ids": [1]})
        wait_for(lambda: text_of(d, "#job-state") == "USER_KILLED", 20, 0.1, "a live change")
        assert d.execute_script("return window.__same_page;") == 7
        d.get(web.url + "/jobs/1/confirm?action=kill")
        assert "needs the role submitter" in text_of(d, "#error")
        shot("reader-refused")
        # revoked: the session ends at its next page
        tokens.revoke(home, "viewer")
        d.get(web.url + "/jobs")
        assert d.current_url == web.url + "/login"
    finally:
        if web:
            web.stop()
        srv.stop()


def test_sort_workflows_and_live_pages_in_chromium(browser, tmp_path):
    """The job table sorted by a header click and paged by its cursor; the workflows list
    and a workflow's page (HTML in its description shown as text, subjobs linking to their
    job pages) following a kill made elsewhere without reloading; the pilots page gaining an
    agent and the sites page a backlog, live. About 10 s: starting the server, the web
    process and Chromium is 6 of them, the browsing 4; one test, not four, pays that once."""
    from selenium.webdriver.common.by import By
    home = tmp_path / "home"
    home.mkdir()
    srv = ServerHandle(home, f"sqlite:///{home / 'pilotfish.db'}").start()
    web = None
    try:
        with srv.client() as c:
            c.add_app(SLEEP)
            c.site_report("site-b", pid=4343, host="login2", paused=False)
            c.add_jobs([{"name": f"n{i % 7}-{i:02d}", "application": "sleep"}
                        for i in range(25)])
            wf = c.add_workflow({"name": "wf-live", "description": "<b>bold</b><script>"
                                 "alert(3)</script>", "job_status_routing_key": "wf.live",
                                 "subjobs": [{"name": "first", "application": "sleep"},
                                             {"name": "second", "application": "sleep"}]})
        web = WebHandle(home, srv.address)
        shot = Shots(browser, tmp_path / "screenshots")
        d = browser

        # sort by name: a header click, then the next page from the last row's cursor
        d.get(web.url + "/jobs?per=20")
        d.find_element(By.ID, "sort-name").click()
        wait_for(lambda: "sort=name" in d.current_url, 10, 0.1, "the sort")
        names = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#jobs td.name")]
        assert names == sorted(names) and len(names) == 20
        d.find_element(By.ID, "next").click()
        wait_for(lambda: "at=" in d.current_url, 10, 0.1, "the next page")
        rest = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#jobs td.name")]
        assert rest == sorted(rest) and rest[0] > names[-1] and len(names + rest) == 27
        shot("jobs-sorted-by-name")

        # the workflows list, then a workflow's page
        d.get(web.url + "/workflows")
        row = f"#workflows tr[data-workflow='{wf['id']}']"
        assert "wf.live" in text_of(d, row) and "0/2" in text_of(d, row)
        d.execute_script("window.__same_page = 51;")
        with srv.client() as c:
            c.kill_workflows([wf["id"]])
        wait_for(lambda: "USER_KILLED" in text_of(d, row + " td[data-field=state]"), 20, 0.1,
                 "the list's live state")
        assert d.execute_script("return window.__same_page;") == 51
        shot("workflows")
        with srv.client() as c:
            c.retry_workflows([wf["id"]])
        d.find_element(By.CSS_SELECTOR, row + " td.name a").click()
        wait_for(lambda: text_of(d, "#wf-state") not in ("", "USER_KILLED"), 10, 0.1,
                 "the workflow's page")
        assert "<b>bold</b><script>alert(3)</script>" in text_of(d, "#wf-fields")
        assert not d.find_elements(By.CSS_SELECTOR, "main script, #wf-fields b")
        d.execute_script("window.__same_page = 52;")
        with srv.client() as c:  # a subjob changed elsewhere: its row changes in place
            c.kill_jobs({"ids": [wf["jobs"][1]]})
        cell = f"#subjobs tr[data-job='{wf['jobs'][1]}'] td[data-field=state]"
        wait_for(lambda: text_of(d, cell) == "USER_KILLED", 20, 0.1, "the subjob's live state")
        assert d.execute_script("return window.__same_page;") == 52
        shot("workflow")
        d.find_element(By.CSS_SELECTOR, f"#subjobs a[href='/jobs/{wf['jobs'][0]}']").click()
        wait_for(lambda: d.current_url.endswith(f"/jobs/{wf['jobs'][0]}"), 10, 0.1,
                 "the subjob's job page")

        # pilots and agents: an agent that joins appears without a reload
        d.get(web.url + "/pilots")
        d.execute_script("window.__same_page = 53;")
        srv.agent("--pilot", "p-live", cores="0")
        wait_for(lambda: "p-live" in text_of(d, "#agents"), 20, 0.1, "the agent, live")
        assert d.execute_script("return window.__same_page;") == 53
        shot("pilots-live")

        # sites: jobs queued for a site change its backlog without a reload
        d.get(web.url + "/sites")
        assert "login2 pid 4343" in text_of(d, "#sites")
        d.execute_script("window.__same_page = 54;")
        before = text_of(d, "#sites")
        with srv.client() as c:
            c.add_jobs([{"name": "for-b", "application": "sleep", "site": "site-b"}] * 3)
        wait_for(lambda: text_of(d, "#sites") not in ("", before), 20, 0.1, "the backlog")
        assert d.execute_script("return window.__same_page;") == 54
        shot("sites-live")
    finally:
        if web:
            web.stop()
        srv.stop_agents()
        srv.stop()
