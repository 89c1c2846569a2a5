#!/usr/bin/env python3
"""Issue 13's staging figures: the Blue Waters flood, and staging hidden behind compute.

A real OpenSSH sshd on a free loopback port (tests/transfer_servers.py) serves N files of
SIZE MB (hard links of one file: one copy on disk) as ``scp://`` URLs; a site agent in
stage-only mode runs the site stager; sessions are counted on the sshd's side (its
per-connection child processes, sampled every 5 ms).

* ``flood_*`` (the Blue Waters flood): N jobs each staging one file from the one endpoint, no
  agents (the stager's look-ahead set to N), one file per session (``batch_size: 1``), with
  ``per_endpoint: {127.0.0.1: P}``, and the same unthrottled (only ``max_concurrent``) in the
  same run; then throttled with sftp batches of 16 files a session. Figures: seconds from ``job
  add`` until every job is STAGED_IN, and the most concurrent sshd sessions seen.
* ``hidden_*`` (hidden staging): N jobs of D s compute (``sleep D``, then the input removed) on
  one agent of C cores: compute only (no inputs), inputs staged by the site stager (look-ahead),
  and inputs staged inline by the node agent itself (no site stager: today's way) in the same
  run. Figure: makespan, ``job add`` -> every job JOB_FINISHED; ``ratio`` = it / compute only.

The staging directory is emptied as files land in the flood runs (nothing consumes them
there), so N x SIZE never piles up on disk. Note ``uptime`` beside the figures: the machine
may be shared.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import common as C  # noqa: E402
from transfer_servers import Sshd, sshd_available  # noqa: E402


def load() -> str:
    return os.getloadavg().__repr__()


def sessions(pid: int) -> int:
    try:
        return len(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return 0


class Counter(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.most, self.stopped = pid, 0, False

    def run(self) -> None:
        while not self.stopped:
            self.most = max(self.most, sessions(self.pid))
            time.sleep(0.005)


class Cleaner(threading.Thread):
    """Removes staged files as they land (flood runs: nothing consumes them)."""

    def __init__(self, d: Path) -> None:
        super().__init__(daemon=True)
        self.d, self.stopped = d, False

    def run(self) -> None:
        while not self.stopped:
            try:
                for f in self.d.glob("*/in.dat"):
                    f.unlink(missing_ok=True)
            except OSError:
                pass
            time.sleep(0.1)


def profile(env: C.Env, sshd: Sshd, staging: Path, **transfers) -> None:
    (env.home / "sites").mkdir(exist_ok=True)
    (env.home / "sites" / "s1.yaml").write_text(json.dumps({
        "name": "s1", "extends": "local",
        "transfers": {"staging_dir": str(staging), "credentials": sshd.credentials(),
                      **transfers}}))


def site_agent(env: C.Env) -> subprocess.Popen:
    out = open(env.home / "site-agent.log", "ab")
    p = subprocess.Popen(C.pilotfish_cmd() + ["--home", str(env.home), "--server", env.address,
                                              "site", "agent", "--site", "s1", "--stage-only",
                                              "--poll", "0.5"],
                         stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    out.close()
    env.agents.append(p)  # stopped with the agents
    deadline = time.monotonic() + 60
    while not env.client.call("transfer_ls")["stagers"]:
        if time.monotonic() > deadline or p.poll() is not None:
            raise RuntimeError("the site stager did not start: "
                               + (env.home / "site-agent.log").read_text()[-2000:])
        time.sleep(0.1)
    return p


def wait_counts(c, ids: list[int], state: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        counts = c.counts({"ids": ids})
        final = sum(v for k, v in counts.items() if k in ("FAILED", "USER_KILLED"))
        if counts.get(state, 0) + final >= len(ids) or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def flood(a, sshd: Sshd, urls: list[str], per_endpoint: int | None, batch: int = 1) -> dict:
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label="flood") as env:
        staging = env.home / "staging"
        t = {"max_concurrent": a.max_concurrent, "lookahead": len(urls), "batch_size": batch}
        if per_endpoint:
            t["per_endpoint"] = {"127.0.0.1": per_endpoint}
        profile(env, sshd, staging, **t)
        c = env.client
        c.add_app({"name": "nap", "executable": "/bin/true", "args": []})
        site_agent(env)
        staging.mkdir(exist_ok=True)
        counter, cleaner = Counter(sshd.proc.pid), Cleaner(staging)
        counter.start()
        cleaner.start()
        t0 = time.perf_counter()
        ids = c.add_jobs([{"name": f"f{i}", "application": "nap", "site": "s1",
                           "input_url": u} for i, u in enumerate(urls)])
        counts = wait_counts(c, ids, "STAGED_IN", a.timeout)
        took = time.perf_counter() - t0
        counter.stopped = cleaner.stopped = True
        view = c.call("transfer_ls")
    if counts.get("STAGED_IN") != len(urls):
        C.log(f"WARNING: flood: {C.counts_line(counts)}")
    return {"seconds": took, "max_sessions": counter.most, "staged": counts.get("STAGED_IN", 0),
            "stager": view["stagers"][0]["report"].get("endpoints")}


def hidden(a, sshd: Sshd, urls: list[str] | None, stager: bool) -> dict:
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label="hidden") as env:
        staging = env.home / "staging"
        profile(env, sshd, staging, max_concurrent=a.per_endpoint,
                per_endpoint={"127.0.0.1": a.per_endpoint})
        c = env.client
        # the task computes, then removes its input (N x SIZE never piles up in workdirs)
        c.add_app({"name": "work", "executable": "/bin/sh",
                   "args": ["-c", f"sleep {a.duration}; rm -f in.dat"]})
        if stager:
            site_agent(env)
        extra = ["--site", "s1", "--staging-dir", str(staging)]
        env.start_agent(list(range(a.cores)), extra=extra)
        env.wait_agents(1)
        jobs = [{"name": f"h{i}", "application": "work", "site": "s1"} for i in range(a.n)]
        if urls:
            for j, u in zip(jobs, urls):
                j["input_url"] = u
        t0 = time.perf_counter()
        ids = c.add_jobs(jobs)
        counts = wait_counts(c, ids, "JOB_FINISHED", a.timeout)
        took = time.perf_counter() - t0
        s = c.summary()
    if counts.get("JOB_FINISHED") != a.n:
        C.log(f"WARNING: hidden: {C.counts_line(counts)}")
    return {"makespan": took, "agent_span": s["last_ended"] - s["first_started"],
            "finished": counts.get("JOB_FINISHED", 0)}


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=200, help="Jobs (default: %(default)s).")
    p.add_argument("--size-mb", type=float, default=20.0, help="MB per file (%(default)s).")
    p.add_argument("--per-endpoint", type=int, default=4, help="The throttle (%(default)s).")
    p.add_argument("--max-concurrent", type=int, default=64,
                   help="The stager's transfers at once in the flood (%(default)s).")
    p.add_argument("--duration", type=float, default=1.0, help="Compute seconds per job.")
    p.add_argument("--cores", type=int, default=2, help="The agent's cores (%(default)s).")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--only", choices=("flood", "hidden"), help="One of the two benchmarks.")
    a = p.parse_args()
    C.set_bench("staging")
    if sshd_available():
        C.log(f"cannot run: {sshd_available()}")
        return 2
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="pilotfish-bench-staging-", dir=a.tmp))
    sshd = Sshd(base / "sshd")
    try:
        remote = base / "remote"
        remote.mkdir()
        one = remote / "one.dat"
        with open(one, "wb") as f:
            for _ in range(int(a.size_mb)):
                f.write(os.urandom(1 << 20))
            f.write(os.urandom(int((a.size_mb % 1) * (1 << 20))))
        urls = []
        for i in range(a.n):
            (remote / f"f{i}").mkdir()
            os.link(one, remote / f"f{i}" / "in.dat")
            urls.append(sshd.url("scp", f"{remote}/f{i}/in.dat"))
        common = {"n": a.n, "size_mb": a.size_mb}
        if a.only in (None, "flood"):
            C.log(f"flood: {a.n} x {a.size_mb} MB, per_endpoint {a.per_endpoint}")
            r = flood(a, sshd, urls, a.per_endpoint)
            C.emit("flood_throttled_seconds", r["seconds"], per_endpoint=a.per_endpoint,
                   max_sessions=r["max_sessions"], staged=r["staged"], load=load(), **common)
            C.log(f"flood: unthrottled (max_concurrent {a.max_concurrent})")
            u = flood(a, sshd, urls, None)
            C.emit("flood_unthrottled_seconds", u["seconds"], max_concurrent=a.max_concurrent,
                   max_sessions=u["max_sessions"], staged=u["staged"], load=load(), **common)
            C.emit("flood_max_sessions", r["max_sessions"], limit=a.per_endpoint,
                   holds=r["max_sessions"] <= a.per_endpoint,
                   unthrottled=u["max_sessions"], **common)
            C.log(f"flood: per_endpoint {a.per_endpoint} with sftp batches of 16")
            b = flood(a, sshd, urls, a.per_endpoint, batch=16)
            C.emit("flood_throttled_batched_seconds", b["seconds"], per_endpoint=a.per_endpoint,
                   batch_size=16, max_sessions=b["max_sessions"], staged=b["staged"],
                   load=load(), **common)
        if a.only in (None, "hidden"):
            C.log(f"hidden: compute only, {a.n} x {a.duration} s on {a.cores} cores")
            base_r = hidden(a, sshd, None, stager=False)
            C.emit("hidden_compute_only_makespan", base_r["makespan"], cores=a.cores,
                   duration=a.duration, load=load(), **common)
            C.log("hidden: inputs staged by the site stager")
            st = hidden(a, sshd, urls, stager=True)
            C.emit("hidden_site_stager_makespan", st["makespan"],
                   ratio=C.ratio(st["makespan"], base_r["makespan"]),
                   target=1.15, cores=a.cores, duration=a.duration, load=load(), **common)
            C.log("hidden: inputs staged inline by the node agent")
            il = hidden(a, sshd, urls, stager=False)
            C.emit("hidden_inline_makespan", il["makespan"],
                   ratio=C.ratio(il["makespan"], base_r["makespan"]), cores=a.cores,
                   duration=a.duration, load=load(), **common)
    finally:
        sshd.stop()
        if not a.keep:
            import shutil
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    C.run(main)
