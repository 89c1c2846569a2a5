"""The one request shape every launcher builder reads: how many ranks, where, and how pinned.

Units: ``cpus_per_rank`` (the *depth*) counts physical cores per rank; ``threads_per_core`` says
how many hardware threads of each of those cores the rank may use. Builders for launchers that
count logical CPUs (srun ``-c``, aprun ``-d``, PALS ``--depth``) multiply the two; builders that
count cores (Open MPI ``PE=``, jsrun ``--cpu_per_rs``, Hydra ``core:N``) use the depth as is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pilotfish.errors import ValidationError
from pilotfish.validate import check_command, check_env_pairs

BIND_MODES = ("none", "cores", "depth", "list")

# Host names end up inside comma-joined launcher options: no separators, no option look-alikes.
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
_MPI_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


@dataclass(frozen=True)
class LaunchRequest:
    """One launch: ``nodes`` x ``ranks_per_node`` ranks of ``argv``; see the module docstring."""

    nodes: int
    ranks_per_node: int
    cpus_per_rank: int
    argv: tuple[str, ...]
    threads_per_core: int = 1
    gpus_per_rank: int = 0
    cpu_bind: str = "cores"
    #: For ``cpu_bind="list"``: ranks_per_node groups of cpus_per_rank CPU ids, rank by rank.
    cpu_list: tuple[int, ...] = ()
    hosts: tuple[str, ...] = ()
    #: The ONLY variables the launch passes on; builders never forward the whole environment.
    env: tuple[tuple[str, str], ...] = ()
    #: PMI flavour for srun ``--mpi=`` (e.g. "pmi2", "pmix"); ignored by launchers without one.
    mpi: str | None = None
    #: The launch runs inside an allocation whose CPUs another step already holds (a pilot's
    #: node agents): srun needs ``--overlap`` or it waits for them forever.
    overlap: bool = False

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    def cpu_groups(self) -> list[tuple[int, ...]]:
        """``cpu_list`` cut into one group of ``cpus_per_rank`` CPU ids per rank on a node."""
        d = self.cpus_per_rank
        return [tuple(self.cpu_list[i:i + d]) for i in range(0, len(self.cpu_list), d)]

    def validate(self) -> LaunchRequest:
        """Refuse a request no launcher could honour; returns self so calls can chain."""
        for name in ("nodes", "ranks_per_node", "cpus_per_rank", "threads_per_core"):
            _positive(getattr(self, name), name)
        if not _is_int(self.gpus_per_rank) or self.gpus_per_rank < 0:
            raise ValidationError(f"gpus_per_rank must be an integer >= 0, "
                                  f"not {self.gpus_per_rank!r}")
        if self.cpu_bind not in BIND_MODES:
            raise ValidationError(f"cpu_bind {self.cpu_bind!r} is not one of "
                                  f"{', '.join(BIND_MODES)}")
        self._validate_cpu_list()
        self._validate_argv()
        self._validate_hosts()
        self._validate_env()
        if not isinstance(self.overlap, bool):
            raise ValidationError("overlap must be True or False")
        if self.mpi is not None and (not isinstance(self.mpi, str)
                                     or not _MPI_RE.fullmatch(self.mpi)):
            raise ValidationError(f"mpi {self.mpi!r} is not a plugin name like 'pmi2' or 'pmix'")
        return self

    def _validate_cpu_list(self) -> None:
        if not isinstance(self.cpu_list, tuple):
            raise ValidationError("cpu_list must be a tuple of CPU ids")
        if self.cpu_bind != "list":
            if self.cpu_list:
                raise ValidationError(f"cpu_list is only used with cpu_bind='list', "
                                      f"not {self.cpu_bind!r}")
            return
        want = self.ranks_per_node * self.cpus_per_rank
        if len(self.cpu_list) != want:
            raise ValidationError(f"cpu_bind='list' needs a cpu_list of ranks_per_node x "
                                  f"cpus_per_rank = {want} CPU ids, got {len(self.cpu_list)}")
        if any(not _is_int(c) or c < 0 for c in self.cpu_list):
            raise ValidationError("cpu_list holds CPU ids: integers >= 0")
        if len(set(self.cpu_list)) != len(self.cpu_list):
            raise ValidationError("cpu_list names a CPU twice; two ranks would share it")

    def _validate_argv(self) -> None:
        check_command(self.argv)

    def _validate_hosts(self) -> None:
        if not isinstance(self.hosts, tuple):
            raise ValidationError("hosts must be a tuple of host names")
        for host in self.hosts:
            if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
                raise ValidationError(f"host {host!r} is not a plain host name (letters, digits, "
                                      "'_.-', starting with a letter or digit)")
        if self.hosts and len(self.hosts) != self.nodes:
            raise ValidationError(f"{len(self.hosts)} hosts given for {self.nodes} nodes; "
                                  "give one host per node or none")
        if len(set(self.hosts)) != len(self.hosts):
            raise ValidationError("hosts names a node twice")

    def _validate_env(self) -> None:
        check_env_pairs(self.env)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: object, name: str) -> None:
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise ValidationError(f"{name} must be a positive integer, not {value!r}")
