"""A task for the injection tests: it records exactly what it was given (argv after the script,
its whole environment, its working directory) in probe.json in its workdir, and does nothing
else. Run with ``python -S -I``."""
import json
import os
import sys

with open("probe.json", "w") as f:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}, f)
