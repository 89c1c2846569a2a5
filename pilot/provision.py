"""Elastic provisioning, the decision half: from a site's backlog and pilots to what to submit
and what to cancel. Pure (no scheduler, no server), so every policy rule is tested directly.

The rules, after the LIGO glidein runs on Blue Waters: many pilots of modest size
(``policy.nodes``, default 10) rather than a few huge ones; at most ``max_submits_per_interval``
submissions per ``submit_interval`` (staggered starts, so stage-in does not flood the file
server); never more than ``max_queued`` pilots waiting or ``max_nodes`` nodes in all; prefer
backfill windows when the scheduler reports them; cancel queued pilots nobody needs any more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from pilotfish.pilotstate import PilotState

#: A pilot asks for this much more than the longest queued job's wall time (minutes), so the
#: job fits after the pilot's ramp-up and inside the agents' end margin.
WALL_SLACK_MINUTES = 5.0


@dataclass(frozen=True)
class Policy:
    cpus_per_node: int
    nodes: int = 10
    min_walltime: float = 10.0          # minutes
    max_walltime: float = 60.0
    max_queued: int = 2
    max_nodes: int = 100
    submit_interval: float = 60.0       # seconds
    max_submits_per_interval: int = 1
    prefer_backfill: bool = True
    max_nodes_per_pilot: int | None = None  # the largest queue's limit, when known


@dataclass(frozen=True)
class Submit:
    nodes: int
    walltime_minutes: float
    why: str


@dataclass(frozen=True)
class Cancel:
    pilot: str
    why: str


@dataclass
class Plan:
    submits: list[Submit] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def demand(backlog: dict, cpus_per_node: int) -> tuple[int, int, float]:
    """(CPUs of queued work, the largest job in nodes, the longest wall time in minutes)."""
    cpus = 0
    widest = 0
    longest = 0.0
    for s in backlog.get("shapes", []):
        if s["nodes"] > 1:
            cpus += s["count"] * s["nodes"] * cpus_per_node   # whole nodes
        else:
            cpus += s["count"] * s["cores"]
        widest = max(widest, s["nodes"])
        if s["wall_seconds"]:
            longest = max(longest, s["wall_seconds"] / 60.0)
    return cpus, widest, longest


def decide(policy: Policy, backlog: dict, pilots: Sequence[dict], windows: Sequence,
           recent_submits: Sequence[float], now: float) -> Plan:
    """What to do this round. ``pilots``: this site's recorded pilots that are not final
    (dicts with id, state, nodes); ``recent_submits``: times of submissions so far."""
    plan = Plan()
    queued = [p for p in pilots if p["state"] == PilotState.QUEUED.value]
    active = [p for p in pilots if not PilotState(p["state"]).final]
    want_cpus, widest, longest = demand(backlog, policy.cpus_per_node)
    if want_cpus == 0:
        for p in queued:
            plan.cancels.append(Cancel(p["id"], "no queued work for this site any more"))
        return plan
    cpn = policy.cpus_per_node
    coming = sum(p["nodes"] for p in queued) * cpn + backlog.get("cores_idle", 0)
    deficit = want_cpus - coming
    if deficit <= 0:
        return plan
    per_pilot_cap = min(policy.nodes if widest <= policy.nodes else widest,
                        policy.max_nodes_per_pilot or 10**9)
    if widest > per_pilot_cap:
        plan.notes.append(f"jobs of {widest} nodes cannot fit any pilot of this site (at most "
                          f"{per_pilot_cap} nodes); they stay queued")
        widest = 0
    wall = max(policy.min_walltime, longest + WALL_SLACK_MINUTES if longest else 0.0)
    if wall > policy.max_walltime:
        plan.notes.append(f"jobs of {longest:.0f} min need pilots longer than the policy's "
                          f"max_walltime {policy.max_walltime:.0f} min; pilots use the maximum")
        wall = policy.max_walltime
    in_window = sum(1 for t in recent_submits if now - t < policy.submit_interval)
    slots = min(policy.max_submits_per_interval - in_window, policy.max_queued - len(queued))
    nodes_left = policy.max_nodes - sum(p["nodes"] for p in active)
    free = [w for w in windows if w.nodes > 0 and (w.minutes is None or w.minutes >= wall)] \
        if policy.prefer_backfill else []
    free.sort(key=lambda w: -w.nodes)
    while deficit > 0 and slots > 0 and nodes_left > 0:
        size = min(per_pilot_cap, math.ceil(deficit / cpn), nodes_left)
        size = max(size, min(widest, per_pilot_cap, nodes_left))
        pilot_wall = wall
        why = f"{want_cpus} CPUs of queued work, {coming} coming"
        if free:
            w = free.pop(0)
            if w.nodes >= max(1, widest):
                size = min(size, w.nodes)
                if w.minutes is not None:
                    pilot_wall = max(wall, min(policy.max_walltime, w.minutes))
                why += f"; fits a backfill window of {w.nodes} nodes"
        if size < 1 or (widest and size < widest):
            break
        plan.submits.append(Submit(size, pilot_wall, why))
        deficit -= size * cpn
        nodes_left -= size
        slots -= 1
    if deficit > 0 and not plan.submits:
        if slots <= 0:
            plan.notes.append("waiting: submission limits reached (max_queued or "
                              "max_submits_per_interval)")
        elif nodes_left <= 0:
            plan.notes.append(f"waiting: the site's max_nodes ({policy.max_nodes}) are in use")
    return plan
