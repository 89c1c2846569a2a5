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
