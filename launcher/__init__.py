"""Launchers: pure argv builders for srun, aprun, mpiexec, mpirun, jsrun (issue: multi-node pilots)."""
