"""A single-core task for the tests: its affinity mask, its assigned cores and its node."""
import json
import os

with open("probe.json", "w") as f:
    json.dump({"mask": sorted(os.sched_getaffinity(0)),
               "cores": [int(c) for c in os.environ["PILOTFISH_CORES"].split(",")],
               "node": os.environ.get("SLURMD_NODENAME"),
               "job": int(os.environ["PILOTFISH_JOB_ID"])}, f)
