"""The one interface every batch-system adapter implements, and what they share.

An adapter turns a :class:`PilotSpec` into a batch script (from a jinja2 template, never a
hand-built bash string), submits it, maps the scheduler's job states onto :class:`PilotState`,
cancels, and reports backfill windows where the scheduler can tell. Every scheduler command runs
through :func:`run_command`, which turns any failure into a :class:`BatchError` quoting the
command and its stderr.
"""
from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pilotfish.errors import PilotfishError
from pilotfish.pilotstate import MEANINGS, PilotState  # noqa: F401  (re-exported)

#: Seconds a scheduler command may take before it counts as failed.
COMMAND_TIMEOUT = 60.0


class BatchError(PilotfishError):
    """A scheduler command failed; the message quotes the command and its stderr."""


@dataclass(frozen=True)
class PilotSpec:
    """One pilot batch job to submit."""
    name: str                     # the pilot id, also the batch job name (e.g. pf-theta-3)
    nodes: int
    walltime_minutes: int
    cores_per_node: int
    workdir: Path                 # the script, its stdout/stderr and the batch id are kept here
    #: The pilot head command (``pilotfish pilot run ...``), one argv item each; templates
    #: shell-quote every item.
    head_argv: tuple[str, ...]
    queue: str | None = None
    project: str | None = None
    gpus_per_node: int = 0
    memory_mb: int | None = None
    #: Extra scheduler directives from the site profile, written after the directive prefix
    #: (e.g. Slurm "--constraint=knl" -> "#SBATCH --constraint=knl").
    directives: tuple[str, ...] = ()
    #: Trusted lines from the site profile (module loads, sourcing an environment), run before
    #: the head. Written by the site's admin, never by a job.
    setup: tuple[str, ...] = ()
    #: Variables exported before the head runs (values shell-quoted).
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PilotStatus:
    state: PilotState
    raw: str = ""                 # the scheduler's own state word, or the unparsable text
    reason: str | None = None     # scheduler's reason (pending reason, exit code, ...)
    nodes: tuple[str, ...] = ()   # the allocation's nodes once known


@dataclass(frozen=True)
class Window:
    """A backfill window: ``nodes`` free nodes for ``minutes`` (None: no known end)."""
    nodes: int
    minutes: float | None


@dataclass
class Submitted:
    batch_id: str
    script: Path
    stdout: Path
    stderr: Path
    extra: dict = field(default_factory=dict)


def run_command(argv: Sequence[str], *, input: str | None = None,
                timeout: float = COMMAND_TIMEOUT, cwd: Path | None = None,
                ok_codes: Sequence[int] = (0,)) -> subprocess.CompletedProcess:
    """Run one scheduler command (no shell); a BatchError quoting it and its stderr on failure."""
    shown = " ".join(argv)
    try:
        r = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                           timeout=timeout, cwd=cwd)
    except FileNotFoundError:
        raise BatchError(f"`{shown}`: {argv[0]} not found on PATH (is this the site's login "
                         "node?)") from None
    except subprocess.TimeoutExpired:
        raise BatchError(f"`{shown}` did not answer within {timeout:.0f} s") from None
    except OSError as exc:
        raise BatchError(f"`{shown}`: {exc.strerror or exc}") from None
    if r.returncode not in ok_codes:
        err = (r.stderr or r.stdout).strip().replace("\n", " | ")
        raise BatchError(f"`{shown}` failed (exit {r.returncode}): {err or 'no output'}")
    return r


class BatchSystem(ABC):
    """One scheduler. Subclasses are small: a template, argv builders and output parsers."""

    name: str = ""

    @abstractmethod
    def render(self, spec: PilotSpec) -> str:
        """The batch script for ``spec`` (pure)."""

    @abstractmethod
    def submit(self, spec: PilotSpec) -> Submitted:
        """Write the script into ``spec.workdir``, submit it, keep the batch id there too."""

    @abstractmethod
    def status(self, batch_ids: Sequence[str]) -> dict[str, PilotStatus]:
        """States of these batch jobs; an id the scheduler does not know is MISSING, and
        output that cannot be parsed makes MISSING with the raw text (never an exception)."""

    @abstractmethod
    def cancel(self, batch_id: str) -> None:
        """Cancel one batch job (queued or running)."""

    def windows(self) -> list[Window]:
        """Backfill windows where the scheduler can tell; [] where it cannot."""
        return []
