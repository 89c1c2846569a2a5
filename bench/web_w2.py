#!/usr/bin/env python3
"""W2 with a browser open on the live jobs page, beside W2 without it, in pairs.

Each pair runs W2 (N x /bin/true, one default agent, SQLite; the clock from
``Client.add_jobs`` returning to all N JOB_FINISHED seen through ``Client.counts``, as
``bench/w2_true.py`` measures it) twice on fresh servers: once plain, once with
``pilotfish web`` beside the server and a headless Chromium (Debian's, through chromedriver
and selenium) showing ``/jobs``, which follows the event stream and fetches the page again
at most once a second while jobs change. The order alternates from pair to pair.

Figure: ``w2_with_browser_ratio`` (geometric mean over pairs of rate with / rate without;
issue 14's target >= 0.97), with both rates per pair, how many times the page was refreshed
during the run, and the CPU seconds the web process and Chromium (all its processes) used
meanwhile: on a small machine the browser competes with the server and the agent for cores it
would not take on a user's desk.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# bench/array.py would shadow the standard library's array module, which selenium's websocket
# client imports: take the standard one first, with this directory out of the path
HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [x for x in sys.path if os.path.abspath(x or ".") != HERE]
import array  # noqa: E402,F401
sys.path.insert(0, HERE)

import common as C  # noqa: E402
from web_pages import free_port, timed_get  # noqa: E402

TARGET = 0.97
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def browser(profile: Path):
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM[0]
    for f in FLAGS + (f"--user-data-dir={profile}",):
        opts.add_argument(f)
    return webdriver.Chrome(service=Service(CHROMIUM[1]), options=opts)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their children so far."""
    import psutil
    total = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p] + p.children(recursive=True)
        except psutil.Error:
            continue
        for q in procs:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def w2(a, with_browser: bool) -> dict:
    with C.Env("sqlite", a.heartbeat, a.tmp, a.keep,
               label="w2-browser" if with_browser else "w2") as env:
        c = env.client
        c.add_app({"name": "true", "executable": "/bin/true"})
        env.start_agent()
        env.wait_agents(1)
        web = driver = None
        refreshes = None
        try:
            if with_browser:
                port = free_port()
                log = open(env.home / "web.log", "ab")
                web = subprocess.Popen([*C.pilotfish_cmd(), "--home", str(env.home), "--server",
                                        env.address, "web", "--bind", f"127.0.0.1:{port}"],
                                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)
                url = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 60
                while True:
                    try:
                        timed_get(url + "/api/openapi.json")
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise SystemExit("the web did not start")
                        time.sleep(0.1)
                driver = browser(env.home / "chromium")
                driver.get(url + "/jobs")
                time.sleep(1.0)  # the event stream connected
                driver.execute_script(
                    "window.__n = 0; new MutationObserver(function () { window.__n++; })"
                    ".observe(document.getElementById('live'), {childList: true});")
            jobs = [{"name": f"t{i}", "application": "true"} for i in range(a.n)]
            watched = {"web": [web.pid] if web else [],
                       "chromium": [driver.service.process.pid] if driver else []}
            before = {k: cpu_seconds(v) for k, v in watched.items()}
            c.add_jobs(jobs)
            t1 = time.perf_counter()
            t2, counts = C.wait_final(c, a.n, check=env.check_agents)
            used = {k: cpu_seconds(v) - before[k] for k, v in watched.items()}
            if driver is not None:
                refreshes = driver.execute_script("return window.__n;")
        finally:
            if driver is not None:
                driver.quit()
                shutil.rmtree(env.home / "chromium", ignore_errors=True)
            if web is not None:
                web.terminate()
                web.wait(10)
    return {"tps": a.n / (t2 - t1), "finished": counts.get("JOB_FINISHED", 0),
            "refreshes": refreshes, "seconds": t2 - t1,
            "web_cpu": used["web"], "chromium_cpu": used["chromium"]}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=10_000, help="Tasks (default: %(default)s).")
    p.add_argument("--pairs", type=int, default=4, help="Pairs (default: %(default)s).")
    a = p.parse_args()
    C.set_bench("web_w2")
    C.install_signal_handlers()
    if not all(os.access(x, os.X_OK) for x in CHROMIUM):
        print(f"skipped: no {' or '.join(CHROMIUM)} (scripts/test_packages)", file=sys.stderr)
        return 2
    ctx = C.machine(a.tmp, workdirs=True)
    pairs = []
    for k in range(a.pairs):
        order = (False, True) if k % 2 == 0 else (True, False)
        got = {b: w2(a, b) for b in order}
        pairs.append(got)
        w = got[True]
        C.log(f"pair {k + 1}/{a.pairs}: without {got[False]['tps']:,.0f} tasks/s, with a "
              f"browser {w['tps']:,.0f} ({w['refreshes']} page refreshes; CPU in "
              f"{w['seconds']:.1f} s: web {w['web_cpu']:.1f} s, chromium "
              f"{w['chromium_cpu']:.1f} s)")
    ratios = [x[True]["tps"] / x[False]["tps"] for x in pairs]
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    C.emit("w2_with_browser_ratio", geo, ratios=ratios,
           with_browser=[x[True]["tps"] for x in pairs],
           without=[x[False]["tps"] for x in pairs],
           refreshes=[x[True]["refreshes"] for x in pairs],
           seconds_with=[x[True]["seconds"] for x in pairs],
           web_cpu_seconds=[x[True]["web_cpu"] for x in pairs],
           chromium_cpu_seconds=[x[True]["chromium_cpu"] for x in pairs],
           finished=[x[True]["finished"] for x in pairs] + [x[False]["finished"] for x in pairs],
           target=TARGET, meets_target=geo >= TARGET, n=a.n, pairs=a.pairs, db="sqlite",
           interval="add_jobs returned -> all N JOB_FINISHED seen (Client.counts)",
           loadavg_1m_end=round(os.getloadavg()[0], 2), **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
