"""Utilization and usage (issue 14, part 4): real server, real agents running real short tasks;
the step function, the sums and the plots are checked against the attempts that ran."""
from __future__ import annotations

import json
import math
import re
import time
import xml.etree.ElementTree as ET

import pytest

from conftest import ServerHandle, run_cli, wait_for
from pilotfish.errors import NotFound, ValidationError
from pilotfish.timespec import parse_when
from pilotfish import usage as U

SVG = "{http://www.w3.org/2000/svg}"


def _expected_steps(intervals: list[tuple[float, float, int]]) -> tuple[int, float]:
    """(most cores busy at once, core-seconds) of (start, end, cores) intervals."""
    marks = sorted([(s, c) for s, e, c in intervals] + [(e, -c) for s, e, c in intervals],
                   key=lambda m: (m[0], m[1]))  # an end before a start at the same time
    level = top = 0
    for _, d in marks:
        level += d
        top = max(top, level)
    return top, sum((e - s) * c for s, e, c in intervals)


def _binned_top(intervals, u: dict) -> int:
    """The most cores busy at once with each start and end at its nearest step of ``u`` (as
    the server bins them: overlaps shorter than a step may merge, none is invented)."""
    since, step = u["since"], u["step"]

    def k(t: float) -> int:
        return math.floor((min(max(t, since), u["until"]) - since) / step + 0.5)
    deltas: dict[int, int] = {}
    for s, e, c in intervals:
        deltas[k(s)] = deltas.get(k(s), 0) + c
        deltas[k(e)] = deltas.get(k(e), 0) - c
    level = top = 0
    for key in sorted(deltas):
        level += deltas[key]
        top = max(top, level)
    return top


def _runs(c, ids) -> list[tuple[float, float, int, dict]]:
    out = []
    for j in ids:
        d = c.job(j)
        cores = d["num_nodes"] * d["processes_per_node"] * d["cpus_per_process"]
        for r in d["runs"]:
            if r["started"] is not None and r["ended"] is not None:
                out.append((r["started"], r["ended"], cores, r))
    return out


@pytest.fixture
def ran(server: ServerHandle, tmp_path):
    """Two agents (2 cores each, pilots pA and pB of site s1); seven jobs: two of 2 cores, four
    of 1 core, one of 1 core that fails once and then runs again (two attempts)."""
    c = server.client()
    c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["{s}"],
               "parameters": {"s": {"type": "float"}}})
    marker = tmp_path / "marker"
    c.add_app({"name": "once", "executable": "/bin/sh",
               "args": ["-c", f"sleep 0.4; if [ -e {marker} ]; then exit 0; else touch {marker}; "
                              "exit 5; fi"]})
    t0 = time.time()
    ids = c.add_jobs(
        [{"name": f"big{i}", "application": "nap", "parameters": {"s": 1.2},
          "cpus_per_process": 2, "group_identifier": "g-big", "priority": 5} for i in range(2)]
        + [{"name": f"small{i}", "application": "nap", "parameters": {"s": 0.8},
            "group_identifier": "g-small"} for i in range(4)]
        + [{"name": "retry", "application": "once", "max_retries": 2,
            "group_identifier": "g-small"}])
    for p in ("pA", "pB"):
        server.agent("--site", "s1", "--pilot", p, "--node-name", f"n{p}", cores="0-1",
                     work_root=tmp_path / p)
    wait_for(lambda: set(c.counts({"ids": ids})) == {"JOB_FINISHED"}, 60, what="all finished")
    return c, ids, t0


def test_utilization_matches_the_attempts_that_ran(server, ran, tmp_path):
    c, ids, t0 = ran
    runs = _runs(c, ids)
    assert len(runs) == len(ids) + 1  # the retried job ran twice
    top, core_secs = _expected_steps([(s, e, n) for s, e, n, _ in runs])
    assert top >= 2
    until = time.time() + 1
    u = c.utilization(since=t0 - 1, until=until)
    assert u["attempts"] == len(runs)
    assert u["core_seconds"] == pytest.approx(core_secs, rel=1e-9)
    assert u["max_busy"] == _binned_top([(s, e, n) for s, e, n, _ in runs], u) <= top
    assert u["max_busy"] >= top - 2  # (only an overlap shorter than a step may be lost)
    assert U.integral(u["busy"]) == pytest.approx(core_secs, rel=0.02)
    assert u["busy"][0][0] == t0 - 1 and u["busy"][-1] == [until, 0]
    assert all(v >= 0 for _, v in u["busy"])
    # the agents' cores: two agents of 2 cores alive for the whole run
    assert u["max_allocated"] == 4 and u["agents"] == 2
    assert all(b <= 4 for _, b in u["busy"])
    # a pilot: only the attempts its agent ran
    for p in ("pA", "pB"):
        mine = [(s, e, n) for s, e, n, r in runs if r["pilot"] == p]
        up = c.utilization(pilot=p, since=t0 - 1, until=until)
        assert up["attempts"] == len(mine)
        assert up["core_seconds"] == pytest.approx(_expected_steps(mine)[1], rel=1e-9)
        assert up["max_busy"] == _binned_top(mine, up) <= _expected_steps(mine)[0] <= 2
        assert up["max_allocated"] == 2
    assert c.utilization(site="s1", since=t0 - 1, until=until)["attempts"] == len(runs)
    # asked 2 jobs at a time, the chunks add up to the same
    small = c.utilization(since=t0 - 1, until=until, chunk=2)
    assert small["requests"] == 4 and u["requests"] == 1
    assert small["core_seconds"] == pytest.approx(u["core_seconds"], rel=1e-12)
    assert (small["busy"], small["attempts"]) == (u["busy"], u["attempts"])
    # a range before the jobs were made stops at the first chunk: nothing later ran in it
    old = c.utilization(since=t0 - 3 * 3600, until=t0 - 7200, chunk=2)
    assert (old["requests"], old["attempts"], old["max_busy"]) == (1, 0, 0)
    assert c.usage(by="day", since=t0 - 3 * 3600, until=t0 - 7200, chunk=2)["requests"] == 1
    # a window cuts the attempts at its edges
    mid = sorted(s for s, *_ in runs)[len(runs) // 2]
    half = c.utilization(since=mid, until=until)
    clipped = [(max(s, mid), e, n) for s, e, n, _ in runs if e > mid]
    assert half["core_seconds"] == pytest.approx(_expected_steps(clipped)[1], rel=1e-9)

    # the SVG: one step path whose corners are the change points, at the heights of the values
    out = tmp_path / "util.svg"
    r = run_cli(server.home, "plot", "utilization", "--since", str(t0 - 1), "--until",
                str(until), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"at most {u['max_busy']} busy" in r.stdout
    root = ET.fromstring(out.read_bytes())
    busy_g = root.find(f".//{SVG}g[@id='busy']")
    assert busy_g is not None and root.find(f".//{SVG}g[@id='allocated']") is not None
    d = busy_g.find(f".//{SVG}path").get("d")
    pts = [tuple(map(float, p)) for p in re.findall(r"([-\d.]+) ([-\d.]+)", d)]
    # steps-post: each change point after the first adds a corner and a point
    assert len(pts) == 2 * len(u["busy"]) - 1
    ys = sorted({y for _, y in pts})  # SVG y grows downwards: the lowest y is the most busy
    levels = sorted({v for _, v in u["busy"]})
    assert len(ys) == len(levels)
    # heights are proportional to the values: (baseline - y) / value is one scale
    base = ys[-1]
    scales = [(base - y) / v for y, v in zip(ys[::-1][1:], levels[1:])]
    assert max(scales) == pytest.approx(min(scales), rel=0.01)

    # the PNG: the busy colour (tab:blue) is drawn, inside the axes, not only somewhere
    png = tmp_path / "util.png"
    assert run_cli(server.home, "plot", "utilization", "--since", str(t0 - 1), "--until",
                   str(until), "-o", str(png)).returncode == 0
    from PIL import Image
    img = Image.open(png).convert("RGB")
    w, h = img.size
    raw = img.tobytes()
    blue = [(i // 3 % w, i // 3 // w) for i in range(0, len(raw), 3)
            if raw[i + 2] > raw[i] + 80 and raw[i + 2] > raw[i + 1] + 30]
    assert len(blue) > 200, len(blue)
    assert min(x for x, _ in blue) > w * 0.05 and max(y for _, y in blue) < h * 0.95

    # --json: the same data for scripts
    js = json.loads(run_cli(server.home, "plot", "utilization", "--since", str(t0 - 1),
                            "--until", str(until), "--json").stdout)
    assert js["busy"] == u["busy"] and js["max_busy"] == u["max_busy"]


def test_usage_sums_match_the_jobs(server, ran, tmp_path):
    c, ids, t0 = ran
    runs = _runs(c, ids)
    core_h = sum((e - s) * n for s, e, n, _ in runs) / 3600
    day = time.strftime("%Y-%m-%d", time.gmtime(runs[-1][1]))
    rep = c.usage(by="group,day", since=t0 - 1)
    by_group = {r["group"]: r for r in rep["rows"]}
    assert set(by_group) == {"g-big", "g-small"} and {r["day"] for r in rep["rows"]} == {day}
    assert by_group["g-big"]["jobs"] == 2 and by_group["g-small"]["jobs"] == 5
    assert by_group["g-small"]["attempts"] == 6  # the retried job's two
    assert by_group["g-big"]["core_hours"] == pytest.approx(
        sum((e - s) * n for s, e, n, r in runs if n == 2) / 3600, rel=1e-6)
    assert rep["totals"]["core_hours"] == pytest.approx(core_h, rel=1e-5)
    assert rep["totals"]["finished"] == 7
    small = c.usage(by="group,day", since=t0 - 1, chunk=3)
    assert small["requests"] == 3
    assert [dict(r, core_hours=0) for r in small["rows"]] == [dict(r, core_hours=0)
                                                              for r in rep["rows"]]
    assert [r["core_hours"] for r in small["rows"]] == pytest.approx(
        [r["core_hours"] for r in rep["rows"]], rel=1e-12)
    sites = c.usage(by=["site", "app", "month"], since=t0 - 1)["rows"]
    assert {(r["site"], r["app"]) for r in sites} == {("s1", "nap"), ("s1", "once")}
    assert sum(r["attempts"] for r in sites) == len(runs)
    assert sites[0]["month"] == day[:7]
    # the CLI: a table for people, JSON for scripts, bars
    r = run_cli(server.home, "report", "usage", "--by", "site,day", "--since", "1h")
    assert r.returncode == 0, r.stderr
    assert re.search(rf"s1\s+{day}\s+7\s+7\s+8\s+{core_h:.4f}\s*\n", r.stdout), r.stdout
    assert "total" in r.stdout
    js = json.loads(run_cli(server.home, "report", "usage", "--by", "app", "--since", "1h",
                            "--json").stdout)
    assert {x["app"]: x["jobs"] for x in js["rows"]} == {"nap": 6, "once": 1}
    svg = tmp_path / "usage.svg"
    r = run_cli(server.home, "plot", "usage", "--by", "group,day", "--since", "1h", "-o",
                str(svg))
    assert r.returncode == 0, r.stderr
    root = ET.fromstring(svg.read_bytes())
    bars = sorted(g.get("id") for g in root.iter(f"{SVG}g")
                  if (g.get("id") or "").startswith("usage-"))
    assert bars == ["usage-0-0", "usage-1-0"]  # a series per group, a bar per day each
    heights = {}
    for g in root.iter(f"{SVG}g"):
        if (g.get("id") or "").startswith("usage-"):
            ys = [float(y) for y in re.findall(r"[-\d.]+ ([-\d.]+)", g.find(f"{SVG}path").get("d"))]
            heights[g.get("id")] = max(ys) - min(ys)
    # stacked bars as tall as their core-hours
    ratio = heights["usage-0-0"] / heights["usage-1-0"]
    assert ratio == pytest.approx(by_group["g-small"]["core_hours"] / by_group["g-big"]["core_hours"],
                                  rel=0.02) or ratio == pytest.approx(
        by_group["g-big"]["core_hours"] / by_group["g-small"]["core_hours"], rel=0.02)
    assert "g-big" in svg.read_text() and "g-small" in svg.read_text()


def test_bad_input_gets_one_line_errors(server: ServerHandle, tmp_path):
    c = server.client()
    with pytest.raises(NotFound, match="no pilot 'nope'"):
        c.utilization(pilot="nope")
    with pytest.raises(NotFound, match="no site"):
        c.utilization(site="nowhere")
    with pytest.raises(ValidationError, match="at most 400 days"):
        c.utilization(since=0, until=time.time())
    with pytest.raises(ValidationError, match="must be before"):
        c.call("usage", by=["site"], since=200.0, until=100.0)
    with pytest.raises(ValidationError, match="unknown usage key 'x"):
        c.call("usage", by=["site", "x<script>"])
    with pytest.raises(ValidationError, match="unknown argument"):
        c.call("utilization", sql="drop table jobs")
    for args in ({"since": float("nan")}, {"until": 1e300}, {"step": 0.0},
                 {"step": 1e-9}, {"after": -1}, {"chunk": 0}, {"chunk": 10**6}):
        with pytest.raises(ValidationError):
            c.call("utilization", **args)
    home = server.home
    cases = [
        (("report", "usage", "--by", "site,week"), "unknown usage key 'week'"),
        (("report", "usage", "--by", "day,month"), "per day or per month"),
        (("report", "usage", "--since", "2026-12-02", "--until", "2026-12-01"),
         "must be before --until"),
        (("report", "usage", "--since", "yesterday"), "--since 'yesterday' must be"),
        (("plot", "utilization", "--since", "1990-01-01", "-o", str(tmp_path / "u.png")),
         "at most 400 days"),
        (("plot", "utilization", "--pilot", "nope", "-o", str(tmp_path / "u.png")),
         "no pilot 'nope'"),
        (("plot", "utilization", "-o", str(tmp_path / "u.gif")), "must end in .png or .svg"),
        (("plot", "utilization", "-o", str(tmp_path / "no" / "u.svg")), "cannot write"),
    ]
    for args, text in cases:
        r = run_cli(home, *args)
        assert r.returncode != 0 and text in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "u.png").exists()
    # nothing ran: an empty, well-formed answer
    u = c.utilization()
    assert u["busy"][0][1] == 0 and u["max_busy"] == 0 and u["attempts"] == 0
    assert c.usage(by="site,day")["rows"] == []
    assert c.ping()


def test_time_parsing():
    now = 1_800_000_000.0
    assert parse_when("now", now) == now
    assert parse_when("2h", now) == now - 7200
    assert parse_when("1d12h", now) == now - 129600
    assert parse_when("2026-12-01", now) == 1796083200.0
    assert parse_when("2026-12-01T10:30", now) == 1796083200.0 + 37800
    assert parse_when("2026-12-01T10:30:00+02:00", now) == 1796083200.0 + 30600
    assert parse_when("2026-12-01T10:30:00Z", now) == 1796083200.0 + 37800
    assert parse_when("1796083200", now) == 1796083200.0
    assert parse_when("20261201", now) == 1796083200.0  # ISO's basic form, not an epoch
    for bad in ("", "yesterday", "-2h", "2x", "1960-01-01", "nan", "1e400",
                "99999999999999", "2026-13-01", "--since"):
        with pytest.raises(ValidationError):
            parse_when(bad, now)


def test_steps_and_usage_sums_are_pure():
    pts = U.steps({0: 2, 5: 1, 10: -3}, 100.0, 120.0, 1.0)
    assert pts == [[100.0, 2], [105.0, 3], [110.0, 0], [120.0, 0]]
    assert U.integral(pts) == 2 * 5 + 3 * 5
    s = U.UsageSums(["site", "month"])
    s.add([["a", 20423, 1, 1, 1, 3600.0], ["a", 20424, 2, 1, 3, 7200.0], [None, 20423, 1, 0, 1,
                                                                           0.0]])
    rows = s.rows()
    assert rows == [{"site": None, "month": "2025-12", "jobs": 1, "finished": 0, "attempts": 1,
                     "core_hours": 0.0},
                    {"site": "a", "month": "2025-12", "jobs": 3, "finished": 2, "attempts": 4,
                     "core_hours": 3.0}]
    with pytest.raises(ValidationError):
        U.parse_by("site,site")


def test_utilization_and_usage_on_postgresql(pg_url, home, tmp_path):
    """The day and step arithmetic in PostgreSQL's SQL (floor, not a rounding cast)."""
    s = ServerHandle(home, pg_url).start()
    try:
        c = s.client()
        c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["{s}"],
                   "parameters": {"s": {"type": "float"}}})
        t0 = time.time()
        ids = c.add_jobs([{"name": f"n{i}", "application": "nap", "parameters": {"s": 0.5},
                           "group_identifier": "pg"} for i in range(3)])
        s.agent("--site", "pgsite", "--pilot", "pgp", cores="0-1", work_root=tmp_path / "w")
        wait_for(lambda: c.counts({"ids": ids}) == {"JOB_FINISHED": 3}, 60, what="finished")
        runs = _runs(c, ids)
        top, secs = _expected_steps([(a, b, n) for a, b, n, _ in runs])
        u = c.utilization(pilot="pgp", since=t0 - 1, until=time.time() + 1)
        assert (u["attempts"], u["max_busy"]) == (3, _binned_top([(a, b, n) for a, b, n, _ in
                                                                  runs], u))
        assert 1 <= u["max_busy"] <= top
        assert u["core_seconds"] == pytest.approx(secs, rel=1e-9)
        day = time.strftime("%Y-%m-%d", time.gmtime(runs[-1][1]))
        rows = c.usage(by="site,group,day", since=t0 - 1)["rows"]
        assert [(r["site"], r["group"], r["day"], r["jobs"], r["attempts"]) for r in rows] == [
            ("pgsite", "pg", day, 3, 3)]
        assert rows[0]["core_hours"] == pytest.approx(secs / 3600, rel=1e-6)
    finally:
        s.stop_agents()
        s.stop()


def test_plots_escape_names_and_fold_many_series_into_other():
    """web/plots.py, pure: names are SVG text, never markup; 12 series at most."""
    from pilotfish.web import plots
    rows = [{"group": "<script>alert(1)</script>" if i == 0 else f"g{i}", "day": "2026-12-01",
             "jobs": 1, "finished": 1, "attempts": 1, "core_hours": float(i + 1)}
            for i in range(20)]
    rep = {"by": ["group", "day"], "rows": rows}
    periods, series = plots.usage_series(rep)
    assert periods == ["2026-12-01"] and len(series) == plots.MAX_SERIES
    assert series["other"] == [sum(range(1, 10))]  # the 9 smallest: 1..9 core-hours
    rows[0]["core_hours"] = 100.0
    svg = plots.usage_image(rep, "svg")
    assert b"<script>" not in svg and b"&lt;script&gt;alert(1)&lt;/script&gt;" in svg
    ET.fromstring(svg)
    assert plots.usage_image(rep, "png").startswith(b"\x89PNG")
    assert plots.format_of("a/b.SVG") == "svg"
    for bad in ("plot", "plot.gif", "x.png/", ".png.d/plot"):
        with pytest.raises(ValueError):
            plots.format_of(bad)
