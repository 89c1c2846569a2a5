"""Which environment variables reach what: the one place for these lists.

Three lists, each with its reason:

- :data:`PASS_ENV`: the variables of the pilot head's environment that it hands to its agents
  through the launcher (the launchers are told exactly what to pass, never the whole
  environment) and that an agent hands to the ranks of an MPI task.
- :data:`TASK_ENV` and :data:`TASK_ENV_PREFIXES`: the variables of the agent's environment a
  task inherits. A task gets this declared set, then its app's ``environment``, then the
  ``PILOTFISH_*`` task variables — never the rest of the agent's environment (its key paths
  ``PILOTFISH_SERVER_KEY`` / ``PILOTFISH_CLIENT_KEY``, tokens, whatever the login shell had).
- :func:`refused_env_name`: the names an app's ``environment`` may not set (checked at
  ``app add`` and ``app alter``; an agent drops them too, for apps stored by older versions).
"""
from __future__ import annotations

from typing import Mapping

#: Head -> agents (and agent -> MPI ranks): what a Python agent needs to start and find its
#: code, and what a user's session means by "me" and "here".
PASS_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
            "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")

#: Agent -> task, by exact name: the session (who, where, language, time zone, terminal),
#: where programs and libraries are (module systems set these), and what the agent's pilot
#: tells its tasks (when the allocation ends; the relay rank of the agent).
TASK_ENV = frozenset(PASS_ENV) | {"TERM", "HOSTNAME", "MODULEPATH", "LOADEDMODULES",
                                  "MODULESHOME", "PILOTFISH_END_TIME", "PILOTFISH_RELAY_RANK",
                                  "PILOTFISH_RELAY_SIZE"}
#: Agent -> task, by prefix: locale, and what the batch system, the MPI library and the
#: accelerator runtimes tell a process about its allocation and how to behave (a task's own
#: srun or mpiexec reads them; CUDA_VISIBLE_DEVICES is set per task after this).
TASK_ENV_PREFIXES = (
    "LC_",
    "SLURM_", "SLURMD_", "SBATCH_", "SRUN_", "PBS_", "COBALT_", "LSB_", "LSF_", "_CONDOR_",
    "FLUX_",
    "MPICH_", "I_MPI_", "MV2_", "CRAY_", "ALPS_", "UCX_", "FI_", "NCCL_",
    "CUDA_", "ROCR_", "HIP_", "HSA_", "ZE_", "ONEAPI_",
    "OMP_", "KMP_", "GOMP_",
)
#: The MPI launcher's per-rank variables (who am I, where is my PMI server) of an agent that was
#: started as a rank: they reach neither the agent under the relay nor any task, which would
#: otherwise take itself for a rank of the agent's own launch (an MPI task hangs in MPI_Init).
LAUNCHER_ENV = ("PMI_", "PMIX_", "HYDI_", "HYDRA_", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                "OMPI_", "PALS_")


def task_base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` a task inherits (computed once per agent, not per task)."""
    return {k: v for k, v in environ.items()
            if (k in TASK_ENV or k.startswith(TASK_ENV_PREFIXES))
            and not k.startswith(LAUNCHER_ENV)}


#: Names an app's environment may not set, by exact name, with why. The loader group follows
#: glibc's own list of variables it ignores in setuid programs (unsecvars.h); the shell and
#: runtime groups are the variables that make bash, sh, Python, Perl, Ruby, Node and Java run
#: code or options nobody wrote in the app's argv.
REFUSED_ENV = {
    # the dynamic loader runs code or reads files named here before main() of every program
    # (LD_LIBRARY_PATH stays allowed: it names where the app's libraries live)
    "GCONV_PATH": "loads code into every program (glibc)",
    "GLIBC_TUNABLES": "changes the C library of every program (and had exploits of its own)",
    "LOCPATH": "makes the C library read locale files from anywhere",
    "HOSTALIASES": "redirects every host name lookup",
    "RESOLV_HOST_CONF": "redirects every host name lookup",
    "MALLOC_TRACE": "makes the C library of every program write a file wherever it names",
    "NLSPATH": "makes the C library read message catalogs from anywhere",
    # shells read and run these at start: any script or system() call of the app would run them
    "BASH_ENV": "a file every non-interactive bash runs first",
    "ENV": "a file every sh runs first",
    "SHELLOPTS": "changes how every bash script runs (e.g. xtrace)",
    "BASHOPTS": "changes how every bash script runs",
    "PS4": "runs commands in a traced bash",
    "PROMPT_COMMAND": "runs commands in bash",
    "IFS": "changes how every shell script splits words",
    # language runtimes run code named here before the program (PYTHONPATH stays allowed:
    # it names where the app's code lives)
    "PYTHONSTARTUP": "runs a file in Python",
    "PYTHONINSPECT": "drops Python into an interactive prompt",
    "PYTHONWARNINGS": "imports modules named in it",
    "PERL5OPT": "adds options (-M: load a module) to every perl",
    "PERL5DB": "runs code in perl",
    "PERLLIB": "loads perl code from anywhere first",
    "RUBYOPT": "adds options (-r: load code) to every ruby",
    "NODE_OPTIONS": "adds options (--require: load code) to every node",
    "JAVA_TOOL_OPTIONS": "adds options (-javaagent: load code) to every JVM",
    "_JAVA_OPTIONS": "adds options to every JVM",
    "JDK_JAVA_OPTIONS": "adds options to every java launcher",
}
#: Names an app's environment may not set, by prefix, with why.
REFUSED_ENV_PREFIXES = {
    "LD_": "the dynamic loader runs code named here in every program (LD_PRELOAD, LD_AUDIT, "
           "...); only LD_LIBRARY_PATH is allowed",
    "BASH_FUNC_": "bash imports functions from it, replacing commands of every script",
    "PILOTFISH_": "reserved: the agent sets these for each task",
}
ALLOWED_ENV = frozenset({"LD_LIBRARY_PATH"})


def refused_env_name(name: str) -> str | None:
    """Why an app's environment may not set ``name``, or None when it may."""
    if name in ALLOWED_ENV:
        return None
    why = REFUSED_ENV.get(name)
    if why is not None:
        return why
    for prefix, why in REFUSED_ENV_PREFIXES.items():
        if name.startswith(prefix):
            return why
    return None
