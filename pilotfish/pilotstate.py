"""The states of a pilot (one batch job), shared by the batch adapters, the site agent and the
server: one place for the names and what each means."""
from __future__ import annotations

import enum


class PilotState(str, enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    MISSING = "MISSING"

    @property
    def meaning(self) -> str:
        return MEANINGS[self]

    @property
    def final(self) -> bool:
        return self not in (PilotState.QUEUED, PilotState.RUNNING)


MEANINGS = {
    PilotState.QUEUED: "submitted; waiting in the batch queue (held or pending)",
    PilotState.RUNNING: "the batch job runs: its head and agents are (being) started",
    PilotState.FINISHED: "the batch job ended normally (agents left at idle timeout or walltime)",
    PilotState.FAILED: "the batch job ended with an error (non-zero exit, node failure, ...)",
    PilotState.CANCELLED: "cancelled (pilot cancel, scancel/qdel by someone, or preempted)",
    PilotState.TIMEOUT: "killed by the scheduler at the end of its walltime",
    PilotState.MISSING: "the scheduler no longer knows it, or its answer could not be parsed",
}


def derive(recorded: str | None, reason: str | None, agents: int, alive: int, lost: int,
           nodes: int) -> tuple[str, str | None]:
    """What a pilot is now, from the batch system's last word (``recorded``, with its
    ``reason``) and what the server knows at once: its agents (how many said hello, how many are
    alive, how many were lost). The batch system's word wins once it says how the job ended;
    until then agents that said hello mean RUNNING, and agents that are all gone mean it ended
    (FINISHED when they left, FAILED when one was lost) -- the batch view, polled later, then
    tells how (TIMEOUT, CANCELLED, ...)."""
    st = PilotState(recorded) if recorded else None
    if st is not None and st.final and not (st is PilotState.MISSING and agents and not alive):
        return st.value, reason
    if alive:
        if st is PilotState.RUNNING and reason and "agents" in reason:
            return st.value, reason
        return PilotState.RUNNING.value, f"{alive} of {max(nodes, agents)} agents said hello"
    if agents:
        gone = "; the scheduler no longer lists it" if st is PilotState.MISSING else ""
        if lost:
            return PilotState.FAILED.value, (f"{lost} of its {agents} agents were lost (no "
                                             f"heartbeat){gone}")
        return PilotState.FINISHED.value, (f"its {agents} agents left (idle timeout, end of "
                                           f"walltime or stop){gone}")
    return (st or PilotState.QUEUED).value, reason
