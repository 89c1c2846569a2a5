"""The provisioning rules, decided without a scheduler or a server (pilot/provision.py)."""
from __future__ import annotations

from pilotfish.pilot.batch.base import Window
from pilotfish.pilot.provision import WALL_SLACK_MINUTES, Policy, decide

P = Policy(cpus_per_node=2, nodes=2, min_walltime=10, max_walltime=60, max_queued=2,
           max_nodes=4, submit_interval=60, max_submits_per_interval=1, max_nodes_per_pilot=4)


def backlog(*shapes, idle=0):
    return {"shapes": [{"nodes": n, "cores": c, "gpus": 0, "wall_seconds": w, "ranks": 1,
                        "count": k} for n, c, w, k in shapes], "cores_idle": idle}


def test_a_backlog_gets_a_pilot_of_the_policy_size():
    plan = decide(P, backlog((1, 1, None, 500)), [], [], [], now=1000)
    assert [(s.nodes, s.walltime_minutes) for s in plan.submits] == [(2, 10)]


def test_submissions_are_staggered_and_limited():
    one_ago = [990.0]
    assert decide(P, backlog((1, 1, None, 500)), [], [], one_ago, now=1000).submits == []
    long_ago = [900.0]
    assert len(decide(P, backlog((1, 1, None, 500)), [], [], long_ago, now=1000).submits) == 1
    two = P.__class__(**{**P.__dict__, "max_submits_per_interval": 5})
    plan = decide(two, backlog((1, 1, None, 500)), [], [], [], now=1000)
    assert [s.nodes for s in plan.submits] == [2, 2]  # max_nodes 4 and max_queued 2


def test_queued_pilots_and_idle_cores_count_as_coming_capacity():
    q = [{"id": "p1", "state": "QUEUED", "nodes": 2}]
    assert decide(P, backlog((1, 1, None, 4)), q, [], [], now=1000).submits == []
    assert decide(P, backlog((1, 1, None, 3), idle=4), [], [], [], now=1000).submits == []
    r = [{"id": "p2", "state": "RUNNING", "nodes": 4}]
    plan = decide(P, backlog((1, 1, None, 500)), r, [], [], now=1000)
    assert plan.submits == [] and "max_nodes (4)" in plan.notes[0]


def test_no_work_cancels_queued_pilots_only():
    pilots = [{"id": "q", "state": "QUEUED", "nodes": 2}, {"id": "r", "state": "RUNNING",
                                                            "nodes": 2}]
    plan = decide(P, backlog(), pilots, [], [], now=1000)
    assert [c.pilot for c in plan.cancels] == ["q"] and plan.submits == []


def test_multi_node_jobs_get_pilots_wide_enough_or_a_note():
    plan = decide(P, backlog((3, 2, None, 1)), [], [], [], now=1000)
    assert [s.nodes for s in plan.submits] == [3]
    plan = decide(P, backlog((8, 2, None, 1)), [], [], [], now=1000)
    assert "jobs of 8 nodes cannot fit" in plan.notes[0]


def test_walltime_covers_the_longest_job_within_the_policy():
    plan = decide(P, backlog((1, 1, 30 * 60, 10)), [], [], [], now=1000)
    assert plan.submits[0].walltime_minutes == 30 + WALL_SLACK_MINUTES
    plan = decide(P, backlog((1, 1, 120 * 60, 10)), [], [], [], now=1000)
    assert plan.submits[0].walltime_minutes == 60 and "max_walltime" in plan.notes[0]


def test_backfill_windows_size_the_pilot():
    plan = decide(P, backlog((1, 1, None, 500)), [], [Window(1, 45.0)], [], now=1000)
    assert [(s.nodes, s.walltime_minutes) for s in plan.submits] == [(1, 45.0)]
    assert "backfill" in plan.submits[0].why
    # a window too short for the work is ignored
    plan = decide(P, backlog((1, 1, 30 * 60, 10)), [], [Window(4, 20.0)], [], now=1000)
    assert plan.submits[0].nodes == 2 and "backfill" not in plan.submits[0].why
