#!/usr/bin/env python3
"""Chaos: prove that no work is lost. Kills agents and the server for real while they work,
fuzzes the protocol and tries injections; prints one JSON line per figure, then a summary line
with all of them.

Sections (``--only`` picks some; each builds its own server, database and agents in a temporary
directory and removes them, tasks of killed agents included):

* ``kill``: N short jobs (default 10,000; each a ``python -S -I`` task that logs its attempt:
  tests/apps/attempt_log.py) and a few long ones (2.7 lease timeouts) on 4 agents; kill -9 a
  random agent at random times (the first kills hit agents running a long job) and start a
  replacement, until ``--kills`` kills. Figures: jobs_run, kills_survived, lost_jobs (must be
  0), concurrent_duplicates (two attempts of one job overlapping in time, read from the
  attempts' own logs, orphaned tasks included; must be 0), requeue_delay_mean/worst (kill ->
  the server requeues the dead agent's jobs; bound: lease timeout + 2 heartbeats).
* ``sigstop``: SIGSTOP an agent past its lease, SIGCONT it after another agent finished its
  job: late_update_refused (its stale finish is refused, the job finished once); and the same
  with a task longer than the lease: paused_agent_overlap (must be false: the paused agent's
  guard fences its task before the job is re-run elsewhere).
* ``cut``: an agent reaches the server through a TCP relay on 127.0.0.1 that black-holes (no
  byte through, nothing closed) for a lease timeout plus 2 heartbeats while it runs a job of 3
  lease timeouts; another agent takes the requeued job: cut_agent_overlap (must be false: the
  cut-off agent stops its task before the server may re-lease it), with the timeline (cut ->
  task stopped -> requeued -> restarted elsewhere -> heal -> finished).
* ``restart``: kill -9 the server ``--restarts`` times while a client submits jobs in a loop
  and long tasks run: server_restarts_survived, acked_jobs_missing (must be 0),
  tasks_readopted (running across a restart, kept attempt 1).
* ``crash``: kill -9 the server ``--crashes`` times during heavy writes (fake-exec agents, bulk
  adds) on SQLite (PRAGMA integrity_check each time) and PostgreSQL (skipped without one):
  db_crashes_survived, with the consistency of rows, events and counts.
* ``fuzz``: ``--fuzz`` seeded hostile messages from 12 keyed DEALERs while an agent runs jobs:
  fuzz_messages_survived, server RSS before/after.
* ``inject``: the injection battery of tests/test_fuzz.py: injection_attempts_blocked.

Run it after ``pip install .`` (agents start as ``python -m pilotfish`` outside the checkout).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

sys.path.insert(0, str(C.REPO / "tests" / "apps"))
import chaoslib as CL  # noqa: E402
import netcut  # noqa: E402

SECTIONS = ("kill", "sigstop", "cut", "restart", "crash", "fuzz", "inject")


def world(a, label: str, db_url: str | None = None) -> CL.World:
    root = Path(tempfile.mkdtemp(prefix=f"pilotfish-bench-chaos-{label}-", dir=a.tmp))
    if not a.keep:
        C._DEFERRED_RM.append(root)
    return CL.World(root, db_url=db_url, heartbeat=a.heartbeat).start_server()


def run_kill(a, out: dict, ctx: dict) -> None:
    w = world(a, "kill")
    try:
        r = CL.kill_agents_chaos(w, n_jobs=a.jobs, n_agents=a.agents, min_kills=a.kills,
                                 n_long=a.long_jobs, seed=a.seed, targeted=3,
                                 pause=(a.kill_pause[0], a.kill_pause[1]), log=C.log)
    finally:
        w.close()
    bound = r["lease_timeout"] + 2 * r["heartbeat"]
    common = dict(n=r["n_jobs"], agents=a.agents, heartbeat=r["heartbeat"],
                  lease_timeout=r["lease_timeout"], seconds=r["elapsed"], **ctx)
    C.emit("jobs_run", r["finished"], unit="jobs", states=r["states"],
           attempts_logged=r["attempts_logged"], jobs_with_retries=r["jobs_with_retries"],
           max_attempts=r["max_attempts"], **common)
    C.emit("kills_survived", r["kills"], unit="kill -9 of an agent", agents_started=
           r["agents_started"], jobs_hit_by_kills=r["jobs_hit_by_kills"],
           hit_jobs_with_more_attempts=r["hit_jobs_attempts_gt1"],
           hit_jobs_with_lost_event=r["hit_jobs_with_lost_event"],
           leases_never_started=r["leases_never_started"], **common)
    C.emit("lost_jobs", r["lost"], unit="jobs", target=0, meets_target=r["lost"] == 0,
           not_finished_exactly_once=len(r["jobs_not_finished_once"]), **common)
    C.emit("concurrent_duplicates", r["concurrent_duplicates"], unit="overlapping attempt pairs",
           target=0, meets_target=r["concurrent_duplicates"] == 0,
           examples=r["duplicates"], unended_attempts=r["unended_attempts"],
           orphans=r["orphans"], orphans_terminated=r["orphans_terminated"],
           orphans_alive_1s_after_kill=r["orphans_alive_1s_after_kill"],
           orphan_survival_worst=r["orphan_survival"]["worst"], **common)
    for stat in ("mean", "worst"):
        C.emit(f"requeue_delay_{stat}", r["lost_after_kill"][stat], unit="s",
               target=bound, meets_target=(r["lost_after_kill"]["worst"] or 0) <= bound,
               interval="kill -9 of an agent -> the server declares it lost and requeues its "
                        "jobs (server log); bound = lease timeout + 2 heartbeats",
               per_job=r["requeue_delay"], rerun_after_kill=r["rerun_delay"],
               kills_measured=r["lost_after_kill"]["n"], **common)
    out.update(jobs_run=r["finished"], kills_survived=r["kills"], lost_jobs=r["lost"],
               concurrent_duplicates=r["concurrent_duplicates"],
               requeue_delay_mean=r["lost_after_kill"]["mean"],
               requeue_delay_worst=r["lost_after_kill"]["worst"], requeue_bound=bound)


def run_sigstop(a, out: dict, ctx: dict) -> None:
    w = world(a, "sigstop")
    try:
        r = CL.sigstop_agent(w, task_seconds=max(0.5, w.lease_timeout / 3))
        w2 = world(a, "sigstop-long")
        try:
            long = CL.sigstop_agent(w2, task_seconds=w2.lease_timeout + 3, until_overlap=True)
        finally:
            w2.close()
    finally:
        w.close()
    ok = (r["late_update_refused"] and r["finish_events"] == 1 and r["overlaps"] == 0
          and r["state"] == "JOB_FINISHED")
    C.emit("late_update_refused", ok, attempts=r["attempts"], finish_events=r["finish_events"],
           refused=r["refused_delta"], stopped_seconds=r["stopped_seconds"],
           attempt_log=r["attempt_log"], heartbeat=a.heartbeat, **ctx)
    C.emit("paused_agent_overlap", long["attempt1_alive_when_attempt2_ran"],
           note="must be false: a SIGSTOPped (not dead) agent's task longer than the lease is "
                "stopped by the agent's guard before the server re-runs the job elsewhere",
           task_seconds=long["task_seconds"], lease_timeout=long["lease_timeout"], **ctx)
    out.update(late_update_refused=ok,
               paused_agent_overlap=long["attempt1_alive_when_attempt2_ran"])


def run_cut(a, out: dict, ctx: dict) -> None:
    w = world(a, "cut")
    try:
        r = netcut.cut_agent(w, task_seconds=3 * w.lease_timeout,
                             cut_seconds=w.lease_timeout + 2 * w.heartbeat)
    finally:
        w.close()
    overlap = r["overlaps"] > 0 or r["attempt1_stopped"] is None or (
        r["attempt2_started"] is not None and r["attempt2_started"] < r["attempt1_stopped"])
    C.emit("cut_agent_overlap", overlap,
           note="must be false: an agent cut off from the server (black hole) stops its task "
                "before the server gives the job to another agent",
           finished_once=r["state"] == "JOB_FINISHED" and r["finish_events"] == 1,
           attempts=r["attempts"], agent_back=r["agent_a_back"],
           timeline={k: r[k] for k in ("attempt1_stopped", "server_requeued",
                                        "attempt2_started", "heal", "finished")},
           lease_timeout=r["lease_timeout"], heartbeat=a.heartbeat, **ctx)
    out.update(cut_agent_overlap=overlap)


def run_restart(a, out: dict, ctx: dict) -> None:
    w = world(a, "restart")
    try:
        r = CL.server_restarts(w, restarts=a.restarts, n_agents=2, n_long=4, seed=a.seed,
                               log=C.log)
    finally:
        w.close()
    C.emit("server_restarts_survived", r["restarts"], unit="kill -9 of the server",
           acked_jobs=r["acked"], acked_jobs_missing=r["missing_acked"],
           submit_calls_timed_out=r["submit_calls_failed"],
           unacked_but_stored=r["unacked_but_stored"], states=r["states"],
           tasks_running_across_restart=r["tasks_running_across_restart"],
           tasks_readopted=r["readopted_ok"], not_readopted=r["not_readopted"],
           updates_buffered_across_restart=r["updates_buffered_across_restart"],
           agents_survived=r["agents_survived"], restart_seconds=r["restart_seconds"],
           concurrent_duplicates=r["concurrent_duplicates"],
           meets_target=r["missing_acked"] == 0 and not r["not_readopted"], **ctx)
    out.update(server_restarts_survived=r["restarts"], acked_jobs_missing=r["missing_acked"],
               tasks_readopted=f"{r['readopted_ok']}/{r['tasks_running_across_restart']}")


def run_crash(a, out: dict, ctx: dict) -> None:
    for db in a.db:
        scratch = None
        try:
            if db == "postgres":
                try:
                    scratch = C.ScratchDB("postgres", Path(tempfile.gettempdir()))
                except Exception as exc:
                    C.log(f"skipped: PostgreSQL crash test: {exc}")
                    C.emit("db_crashes_survived", None, db=db, skipped=str(exc)[:200], **ctx)
                    continue
            w = world(a, f"crash-{db}", scratch.url if scratch else None)
            try:
                r = CL.crash_during_writes(w, kills=a.crashes, seed=a.seed, log=C.log)
            finally:
                w.close()
        finally:
            if scratch is not None:
                scratch.drop()
        ok = (r["missing_acked"] == 0 and r["integrity_ok"]
              and r.get("integrity_after_stop", "ok") == "ok"
              and r["state_vs_last_event_mismatches"] == 0 and r["jobs_finished_twice"] == 0
              and r["server_counts_match_sql"] and r["final_jobs_still_leased"] == 0)
        C.emit("db_crashes_survived", r["crashes"], db=db, consistent=ok,
               integrity_checks=r["integrity_checks"],
               integrity_after_stop=r.get("integrity_after_stop"), acked_jobs=r["acked"],
               acked_jobs_missing=r["missing_acked"], jobs_in_db=r["jobs_in_db"],
               states=r["states"],
               state_vs_last_event_mismatches=r["state_vs_last_event_mismatches"],
               jobs_finished_twice=r["jobs_finished_twice"],
               server_counts_match_sql=r["server_counts_match_sql"], **ctx)
        out[f"db_crashes_survived_{db}"] = r["crashes"] if ok else f"{r['crashes']} (INCONSISTENT)"


def run_fuzz(a, out: dict, ctx: dict) -> None:
    w = world(a, "fuzz")
    try:
        c = w.client()
        c.add_app({"name": "nap", "executable": "/bin/sleep", "args": ["{s}"],
                   "parameters": {"s": {"type": "float", "min": 0, "max": 0.5}}})
        ids = c.add_jobs([{"name": f"n{i}", "application": "nap", "parameters": {"s": 0.05}}
                          for i in range(400)])
        agent = w.start_agent()
        CL.wait_for(lambda: c.counts({"ids": ids}).get("JOB_FINISHED", 0) >= 5, 60)
        f0 = c.counts({"ids": ids}).get("JOB_FINISHED", 0)
        r = CL.fuzz_server(w.address, a.fuzz, a.seed, w.canary, home=w.home,
                           rss_pid=w.server_pid)
        f1 = c.counts({"ids": ids}).get("JOB_FINISHED", 0)
        pong = bool(c.ping()["version"])
        final = CL.wait_final(c, len(ids), 120, {"ids": ids})
        alive = agent.poll() is None
        found = CL.canaries(w.root)
        c.close()
    finally:
        w.close()
    C.emit("fuzz_messages_survived", r["sent"], seed=r["seed"], kinds=r["kinds"],
           answered=r["answered"], internal_errors=r["internal_errors"],
           messages_per_second=r["messages_per_second"], rss_mb_before=r["rss_mb"][0],
           rss_mb_after=r["rss_mb"][-1], rss_mb_max=max(r["rss_mb"]),
           jobs_finished_during_fuzz=f1 - f0, jobs=final, agent_alive=alive,
           ping_after=pong, canaries=found, **ctx)
    out.update(fuzz_messages_survived=r["sent"], fuzz_internal_errors=r["internal_errors"],
               fuzz_rss_mb=f"{r['rss_mb'][0]} -> {r['rss_mb'][-1]}")


def run_inject(a, out: dict, ctx: dict) -> None:
    w = world(a, "inject")
    try:
        r = CL.injection_battery(w)
    finally:
        w.close()
    C.emit("injection_attempts_blocked", r["blocked"], attempts=r["attempts"],
           failures=r["failures"], canaries=r["canaries"],
           files_outside_work_root=r["new_files_outside_work_root"],
           option_like_values_accepted=r["option_like_values_accepted"],
           meets_target=r["blocked"] == r["attempts"], **ctx)
    out.update(injection_attempts_blocked=f"{r['blocked']}/{r['attempts']}",
               option_like_values_accepted=len(r["option_like_values_accepted"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="Comma list of sections to run (default: %(default)s).")
    p.add_argument("--jobs", type=int, default=10_000, help="Short jobs (default: %(default)s).")
    p.add_argument("--long-jobs", type=int, default=8,
                   help="Jobs of 2.7 lease timeouts, run first (default: %(default)s).")
    p.add_argument("--agents", type=int, default=4, help="Agents (default: %(default)s).")
    p.add_argument("--kills", type=int, default=20,
                   help="kill -9 of agents, at least (default: %(default)s).")
    p.add_argument("--kill-pause", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"),
                   help="Seconds between kills, uniform (default: 1 4).")
    p.add_argument("--restarts", type=int, default=5,
                   help="kill -9 of the server in 'restart' (default: %(default)s).")
    p.add_argument("--crashes", type=int, default=5,
                   help="kill -9 of the server per database in 'crash' (default: %(default)s).")
    p.add_argument("--db", default="sqlite,postgres",
                   help="Databases for 'crash' (default: %(default)s; PostgreSQL at "
                        "$PILOTFISH_BENCH_PG, skipped when it cannot be reached).")
    p.add_argument("--fuzz", type=int, default=50_000, help="Fuzz messages (default: "
                                                            "%(default)s).")
    p.add_argument("--seed", type=int, default=20261124, help="Random seed (default: "
                                                              "%(default)s).")
    p.add_argument("--heartbeat", type=float, default=2.0,
                   help="Server heartbeat in seconds; the lease timeout is 3 of them "
                        "(default: %(default)s).")
    p.add_argument("--tmp", help="Directory for the temporary worlds (default: the system's).")
    p.add_argument("--keep", action="store_true", help="Keep the temporary worlds (logs, "
                                                       "databases, attempt logs).")
    a = p.parse_args()
    a.db = C.str_list(a.db)
    only = C.str_list(a.only)
    bad = set(only) - set(SECTIONS)
    if bad:
        p.error(f"unknown section(s) {', '.join(sorted(bad))}; sections: {', '.join(SECTIONS)}")
    C.set_bench("chaos")
    C.install_signal_handlers()
    ctx = C.machine(a.tmp)
    out: dict = {}
    failed = []
    runners = {"kill": run_kill, "sigstop": run_sigstop, "cut": run_cut, "restart": run_restart,
               "crash": run_crash, "fuzz": run_fuzz, "inject": run_inject}
    for name in SECTIONS:
        if name not in only:
            continue
        C.log(f"section {name}")
        t0 = time.perf_counter()
        try:
            runners[name](a, out, ctx)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # report and go on with the next section
            C.log(f"section {name} FAILED: {exc}\n{traceback.format_exc()}")
            failed.append(name)
            out[f"{name}_error"] = str(exc)[:300]
        C.log(f"section {name}: {time.perf_counter() - t0:.1f} s")
    C.emit("summary", None, **out, sections_failed=failed, **ctx)
    return 1 if failed else 0


if __name__ == "__main__":
    C.run(main)
