#!/usr/bin/env python3
"""Before/after: the same benchmark run by two versions of pilotfish, interleaved, in one run.

``--base REV`` is any git revision of this repository (a tag, a commit): it is checked out into
a temporary worktree with its own ``.venv`` (``scripts/setup``), unless ``--base-dir`` names a
checkout that has one. Each pair of runs calls ``bench/<name>.py --repeat 1 --no-baseline``
once with each version's own Python and scripts (W2 without its xargs baseline), and alternates which goes first (ABBA...):
the machine's drift (a disk filling up with workdirs, a neighbour waking up) so falls on both
alike. Every run gets a fresh temporary home under ``--tmp``. Per benchmark one JSON line:
``value`` is the geometric mean of the paired ratios head / base (1.0: the same; 0.95: 5 %
slower), with every pair listed, and ``meets_target`` says whether it is at least
``--target`` (default 0.95). Also given: the CPU the server and the agents used per task in
each run, and the geometric mean of base / head (``cpu_ratio``): what the code costs, much less
sensitive than the rate to other work on a shared machine.

    .venv/bin/python bench/before_after.py --base e47a032 --bench w2,dispatch --pairs 6
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: per benchmark: its script, the arguments both versions get, and the figure compared
BENCHES = {
    "w2": ("w2_true.py", ["--n", "10000", "--no-baseline"], "tasks_per_second"),
    # one configuration (the first of dispatch.py's defaults, the one compared): a quarter of
    # the time per run, so four times the pairs against the machine's noise
    "dispatch": ("dispatch.py", ["--n", "50000", "--db", "sqlite", "--agents", "1",
                                 "--prefetch", "default"], "tasks_per_second"),
    # the server's capacity on PostgreSQL (issue 16's target 4): deep prefetch, two agents
    "dispatch-pg": ("dispatch.py", ["--n", "100000", "--db", "postgres", "--agents", "2",
                                    "--prefetch", "256"], "tasks_per_second"),
}


def log(msg: str) -> None:
    print(f"[before_after] {msg}", file=sys.stderr, flush=True)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def checkout(rev: str, where: Path, extras: bool = False) -> Path:
    """A worktree of ``rev`` with its own .venv (pilotfish installed from it; ``extras``: with
    the test extras too, e.g. psycopg for the PostgreSQL benchmarks)."""
    tree = where / "base"
    git("worktree", "add", "--detach", "-f", str(tree), rev)
    cmd = ["./scripts/setup", "--test"] if extras else ["./scripts/setup"]
    log(f"installing {rev} into {tree}/.venv ({' '.join(cmd)})")
    subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return tree


#: Homes of finished runs, removed at the end: removing a run's 10,000 workdirs just before
#: the next run starts taxed that run (ext4 skips recently freed inodes; the deletes' writeback)
_USED_HOMES: list[Path] = []


def run_one(tree: Path, bench: str, extra: list[str], tmp: Path) -> dict:
    """One run of ``bench`` by the version in ``tree``; its figure's JSON line."""
    script, args, figure = BENCHES[bench]
    home = Path(tempfile.mkdtemp(prefix=f"ba-{bench}-", dir=tmp))
    _USED_HOMES.append(home)
    out = subprocess.run([str(tree / ".venv/bin/python"), str(tree / "bench" / script),
                          "--repeat", "1", "--tmp", str(home), "--keep", *args,
                          *extra], cwd=tree, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PILOTFISH_BENCH_REMOVAL_WAIT": "0"})
    for line in out.stdout.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("figure") == figure:
            return r
    raise SystemExit(f"{tree.name}: bench/{script} gave no {figure} line "
                     f"(exit {out.returncode}):\n{out.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="git revision to compare against (checked out and "
                    "installed into a temporary worktree)")
    ap.add_argument("--base-dir", type=Path, help="an existing checkout with its own .venv "
                    "instead of --base")
    ap.add_argument("--bench", default="w2,dispatch",
                    help="comma list of: " + ", ".join(BENCHES) + " (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each version "
                    "before the pairs (default: %(default)s): on a fresh disk the first W2 run "
                    "was 2-3x faster than every later one, whichever version ran it")
    ap.add_argument("--pairs", type=int, default=6, help="pairs of runs per benchmark "
                    "(default: %(default)s)")
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()),
                    help="where the temporary homes go (default: %(default)s)")
    ap.add_argument("--target", type=float, default=0.95,
                    help="lowest acceptable head/base ratio (default: %(default)s)")
    a = ap.parse_args(argv)
    if not a.base and not a.base_dir:
        ap.error("say what to compare against: --base REV or --base-dir DIR")
    benches = [b for b in a.bench.split(",") if b]
    for b in benches:
        if b not in BENCHES:
            ap.error(f"--bench: {b!r} is not one of {', '.join(BENCHES)}")
    scratch = Path(tempfile.mkdtemp(prefix="before-after-"))
    try:
        pg = any("postgres" in BENCHES[b][1] for b in benches)
        base = a.base_dir.resolve() if a.base_dir else checkout(a.base, scratch, extras=pg)
        head_rev = git("rev-parse", "--short", "HEAD") + ("+dirty" if git(
            "status", "--porcelain", "--untracked-files=no") else "")
        base_rev = git("rev-parse", "--short", "HEAD", cwd=base)
        trees = {"base": base, "head": ROOT}
        for bench in benches:
            vals: dict[str, list[float]] = {"base": [], "head": []}
            cpu: dict[str, list[float]] = {"base": [], "head": []}
            ratios, cpu_ratios = [], []
            for _ in range(a.warmup):
                for who in ("base", "head"):
                    run_one(trees[who], bench, [], a.tmp)
            for i in range(a.pairs):
                order = ("base", "head") if i % 2 == 0 else ("head", "base")
                got = {}
                for who in order:
                    r = run_one(trees[who], bench, [], a.tmp)
                    got[who] = r["value"]
                    vals[who].append(r["value"])
                    # CPU the server and the agents used per task: what the code costs, much
                    # less sensitive than the rate to other work on the machine
                    # (and the server's SQLite writer process, where it has one)
                    used = (r["server_busy"] + r["agents_busy"]
                            + (r.get("server_writer_busy") or 0.0)) * r["seconds"][0] / r["n"]
                    got[who + "_cpu"] = used * 1e6
                    cpu[who].append(round(used * 1e6, 1))
                ratios.append(got["head"] / got["base"])
                cpu_ratios.append(got["base_cpu"] / got["head_cpu"])
                log(f"{bench} pair {i + 1}/{a.pairs} ({order[0]} first): base {got['base']:.1f}"
                    f", head {got['head']:.1f}, ratio {ratios[-1]:.3f}")
            geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            geo_cpu = math.exp(sum(math.log(r) for r in cpu_ratios) / len(cpu_ratios))
            print(json.dumps({
                "bench": "before_after", "figure": f"{bench}_head_over_base",
                "value": round(geo, 3), "unit": "ratio",
                "ratios": [round(r, 3) for r in ratios], "warmup_runs": a.warmup,
                "base": base_rev, "head": head_rev,
                "base_values": vals["base"], "head_values": vals["head"],
                "interval": f"bench/{BENCHES[bench][0]} --repeat 1 {' '.join(BENCHES[bench][1])}"
                            " per run; pairs alternate which version goes first",
                "target": a.target, "meets_target": geo >= a.target,
                "cpu_us_per_task_base": cpu["base"], "cpu_us_per_task_head": cpu["head"],
                "cpu_ratio": round(geo_cpu, 3), "cpu_ratios": [round(r, 3) for r in cpu_ratios],
                "cpu_note": "server (with its SQLite writer process) + agent CPU per task, base / "
                            "head (above 1: head cheaper)",
                "cores_available": len(os.sched_getaffinity(0)),
                "loadavg_1m": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }), flush=True)
    finally:
        for home in _USED_HOMES:
            shutil.rmtree(home, ignore_errors=True)
        if a.base and not a.base_dir:
            subprocess.run(["git", "worktree", "remove", "--force", str(scratch / "base")],
                           cwd=ROOT, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
