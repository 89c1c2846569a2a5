#!/usr/bin/env python3
"""Job arrays and sweeps at bulk speed, each against a plain ``job add`` of the same jobs.

Every run adds N jobs (default 100,000) of app ``work`` (``/bin/echo {i} {j}``) into a fresh
server and database; the configurations of one repeat run back to back (interleaved), so the
baseline sees the same machine:

* ``add_array_cli``: ``pilotfish job add --app work --array 1-N --param i={index} --param j=0``,
  whole command. Baseline: ``add_plain_cli``, ``pilotfish job add -f jobs.json`` of the same N
  job messages (names, parameters) from a JSON file, whole command.
* ``add_array_client``: ``Client.add_array(template, "1-N")``, the call. Baseline:
  ``add_plain_client``, one ``Client.add_jobs`` call with the same N messages (built before the
  clock starts).
* ``add_sweep_cli``: ``pilotfish job add -f sweep.yaml`` with ``sweep: {i: {range: 1-N/10},
  j: [0..9]}`` (N jobs), whole command.
* ``add_array_cli_chunked`` (``--big M``, default 250,000; 0 skips it): one ``--array 1-M``,
  which the CLI sends in requests of 100,000, whole command.

Each figure's ``ratio`` is its rate over its baseline's (above 1: faster than plain add).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

TARGET = 20_000  # jobs/s
APP = {"name": "work", "executable": "/bin/echo", "args": ["{i}", "{j}"],
       "parameters": {"i": {"type": "int"}, "j": {"type": "int"}}}


def plain_jobs(n: int) -> list[dict]:
    return [{"name": f"work-{i}", "application": "work", "parameters": {"i": i, "j": 0}}
            for i in range(1, n + 1)]


def check(env: C.Env, n: int) -> None:
    got = env.client.counts().get("READY", 0)
    if got != n:
        raise RuntimeError(f"{got} jobs READY, not {n}")


def run_cli(a, label: str, argv_of) -> float:
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label=label) as env:
        env.client.add_app(APP)
        argv, n = argv_of(env.home)
        with C.profile(a, label, {"server": env.server_pid}):
            dt, _ = C.timed_cli([*C.pilotfish_cmd(), "--home", str(env.home), "job", "add",
                                 *argv])
        check(env, n)
    return n / dt


def run_client(a, label: str, call) -> float:
    with C.Env(a.db, a.heartbeat, a.tmp, a.keep, label=label) as env:
        env.client.add_app(APP)
        go, n = call(env.client)
        with C.profile(a, label, {"server": env.server_pid}):
            t0 = time.perf_counter()
            go()
            dt = time.perf_counter() - t0
        check(env, n)
    return n / dt


def main() -> int:
    p = C.parser(__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n", type=int, default=100_000,
                   help="Jobs per run, a multiple of 10 (default: %(default)s).")
    p.add_argument("--big", type=int, default=250_000,
                   help="Jobs of the chunked CLI array (0: skip) (default: %(default)s).")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    a = p.parse_args()
    C.set_bench("array")
    C.install_signal_handlers()
    n = a.n - a.n % 10
    ctx = C.machine(a.tmp)

    def plain_file(home: Path):
        path = home / "jobs.json"
        path.write_text(json.dumps(plain_jobs(n)))
        return ["-f", str(path)], n

    def sweep_file(home: Path):
        path = home / "sweep.yaml"
        path.write_text(json.dumps({"name": "work-{index}", "application": "work",
                                    "sweep": {"i": {"range": f"1-{n // 10}"},
                                              "j": list(range(10))}}))
        return ["-f", str(path)], n

    configs = {
        "add_plain_cli": lambda: run_cli(a, "plain-cli", plain_file),
        "add_array_cli": lambda: run_cli(a, "array-cli", lambda h: (
            ["--app", "work", "--array", f"1-{n}", "--param", "i={index}", "--param", "j=0"],
            n)),
        "add_sweep_cli": lambda: run_cli(a, "sweep-cli", sweep_file),
        "add_plain_client": lambda: run_client(a, "plain-client", lambda c: (
            (lambda jobs: (lambda: c.add_jobs(jobs)))(plain_jobs(n)), n)),
        "add_array_client": lambda: run_client(a, "array-client", lambda c: (
            lambda: c.add_array({"name": "work-{index}", "application": "work",
                                 "parameters": {"i": "{index}", "j": 0}}, f"1-{n}"), n)),
    }
    if a.big:
        configs["add_array_cli_chunked"] = lambda: run_cli(a, "array-big", lambda h: (
            ["--app", "work", "--array", f"1-{a.big}", "--param", "i={index}", "--param", "j=0"],
            a.big))
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(a.repeat):
        for name, go in configs.items():
            rates[name].append(go())
            C.log(f"repeat {r + 1}/{a.repeat}: {name} {rates[name][-1]:,.0f} jobs/s")
    baselines = {"add_array_cli": "add_plain_cli", "add_sweep_cli": "add_plain_cli",
                 "add_array_cli_chunked": "add_plain_cli", "add_array_client": "add_plain_client"}
    how = {
        "add_plain_cli": "`pilotfish job add -f jobs.json` (N plain messages), whole command",
        "add_array_cli": "`pilotfish job add --app work --array 1-N --param i={index} "
                         "--param j=0`, whole command",
        "add_sweep_cli": "`pilotfish job add -f sweep.yaml` (i: range 1-N/10 x j: 10 values), "
                         "whole command",
        "add_plain_client": "one Client.add_jobs call with N messages built beforehand",
        "add_array_client": "one Client.add_array(template, '1-N') call",
        "add_array_cli_chunked": f"`pilotfish job add --array 1-{a.big} ...` sent in requests "
                                 "of 100,000, whole command",
    }
    for name, vals in rates.items():
        med = C.median(vals)
        extra = {}
        if name in baselines:
            b = C.median(rates[baselines[name]])
            extra = dict(baseline=baselines[name], baseline_value=b,
                         baseline_values=rates[baselines[name]], ratio=C.ratio(med, b))
        C.emit(name, med, unit="jobs/s", values=vals, target=TARGET, meets_target=med >= TARGET,
               interval=how[name], n=a.big if name == "add_array_cli_chunked" else n,
               repeat=a.repeat, db=a.db, **extra, **ctx)
    return 0


if __name__ == "__main__":
    C.run(main)
