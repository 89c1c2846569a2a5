"""Run under an MPI launcher by tests/test_relay.py (not collected by a plain `pytest` run):

    mpiexec -n 3 python -m pytest --with-mpi -p no:cacheprovider -q mpi/relay_under_mpi.py

The outer test starts the server and queues the jobs; it passes the server's address, the home,
the expected world size and the agents' options in PILOTFISH_TEST_* variables.
"""
from __future__ import annotations

import os
import shlex

import pytest


def expected_size() -> int:
    return int(os.environ["PILOTFISH_TEST_MPI_SIZE"])


@pytest.mark.mpi
def test_world_has_the_expected_size():
    """A wrong PMI gives every rank "0 of 1" (and min_size would then just skip the relay test)."""
    from mpi4py import MPI
    assert MPI.COMM_WORLD.size == expected_size(), (
        f"MPI_COMM_WORLD has {MPI.COMM_WORLD.size} ranks, expected {expected_size()}: "
        "wrong launcher or PMI (srun needs --mpi=pmi2 with pip's MPICH)?")


@pytest.mark.mpi(min_size=2)
def test_relay_runs_the_queued_jobs_and_every_rank_leaves_cleanly():
    """Every rank runs an agent through the relay; they run the queue, leave when idle, exit 0."""
    from mpi4py import MPI

    from pilotfish.pilot import relay
    comm = MPI.COMM_WORLD
    assert comm.size == expected_size()
    args = shlex.split(os.environ.get("PILOTFISH_TEST_AGENT_ARGS", "--idle-timeout 3"))
    code = relay.run(os.environ["PILOTFISH_TEST_SERVER"], args,
                     home=os.environ["PILOTFISH_TEST_HOME"])
    codes = comm.allgather(code)  # before asserting, so no rank is left waiting for another
    assert codes == [0] * comm.size
