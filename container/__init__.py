"""Container runtimes: pure argv wrappers for Shifter, Apptainer, Charliecloud, podman-hpc."""
