"""An MPI task for the tests: one line per rank with rank, size, node and affinity mask."""
import os
import socket

from mpi4py import MPI

comm = MPI.COMM_WORLD
node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
line = f"{comm.rank} {comm.size} {node} {','.join(map(str, sorted(os.sched_getaffinity(0))))}"
lines = comm.gather(line, root=0)
if comm.rank == 0:
    with open("ranks.txt", "w") as f:
        f.write("\n".join(lines) + "\n")
