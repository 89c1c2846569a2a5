"""Batch-system adapters: render, submit, poll and cancel pilot batch jobs.

``get("slurm")`` gives the adapter for a scheduler by name; every adapter implements
:class:`~pilotfish.pilot.batch.base.BatchSystem`.
"""
from __future__ import annotations

from .base import (BatchError, BatchSystem, PilotSpec, PilotState, PilotStatus, Submitted,
                   Window)
from .cobalt import CobaltBatch
from .htcondor import HTCondorBatch
from .local import LocalBatch
from .lsf import LsfBatch
from .pbs import PbsBatch
from .slurm import SlurmBatch
from .torque import TorqueBatch

SCHEDULERS: dict[str, type[BatchSystem]] = {
    "slurm": SlurmBatch,
    "pbs": PbsBatch,
    "torque": TorqueBatch,
    "cobalt": CobaltBatch,
    "htcondor": HTCondorBatch,
    "lsf": LsfBatch,
    "local": LocalBatch,
}


def get(name: str, **options) -> BatchSystem:
    """The adapter for scheduler ``name`` (options go to its constructor, e.g.
    ``get("lsf", nnodes=False)``)."""
    try:
        cls = SCHEDULERS[name]
    except (KeyError, TypeError):
        raise BatchError(f"unknown scheduler {name!r}; known: {', '.join(sorted(SCHEDULERS))}") \
            from None
    return cls(**options)


__all__ = ["SCHEDULERS", "get", "BatchError", "BatchSystem", "PilotSpec", "PilotState",
           "PilotStatus", "Submitted", "Window"]
