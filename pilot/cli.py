"""``pilotfish pilot ...``: what runs inside an allocation."""
from __future__ import annotations

import os
from pathlib import Path

import click

from pilotfish import console, settings
from pilotfish.clitypes import PLAIN_FLOAT, PLAIN_INT
from pilotfish.errors import PilotfishError
from pilotfish.launcher import LAUNCHERS

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group("pilot", context_settings=CTX)
def pilot_group() -> None:
    """Run pilots and node agents."""


def _cores(text: str | None) -> list[int] | None:
    from .resources import parse_cpu_list
    if not text:
        return None
    try:
        return sorted(set(parse_cpu_list(text)))
    except ValueError:
        raise PilotfishError(f"--cores {text!r}: expected a list like 0-3,8") from None


def _home_and_server(ctx, server: str | None) -> tuple[Path, str]:
    """This command's home and the server address (--server, $PILOTFISH_SERVER, server.json)."""
    home = settings.home(ctx.obj.get("home") if ctx.obj else None)
    address = settings.server_address(home, server or (ctx.obj or {}).get("server"))
    if not address:
        raise PilotfishError("no server address: give --server or start a server for "
                             f"{home}")
    return home, address


def _expand(text: str, option: str) -> str:
    """``$SCRATCH/x`` as this node sees it (site profiles name per-node paths that way)."""
    out = os.path.expandvars(text)
    if "$" in out:
        raise PilotfishError(f"{option} {text!r}: a variable in it is not set on this node")
    return out


def default_launcher() -> str:
    """srun inside a Slurm allocation, else none (tasks of one rank only)."""
    import shutil
    return "srun" if os.environ.get("SLURM_JOB_ID") and shutil.which("srun") else "local"


def launcher_options(f):
    f = click.option("--mpi", help="PMI plugin for srun --mpi (e.g. pmi2, pmix); default: the "
                     "site's MpiDefault.")(f)
    f = click.option("--launcher", type=click.Choice(sorted(LAUNCHERS)),
                     help="How multi-rank (MPI) jobs start: srun, aprun, mpiexec (MPICH), "
                     "pals (Cray PALS), mpirun (Open MPI), jsrun, local (default: srun inside "
                     "a Slurm job, else local).")(f)
    return f


def key_options(f):
    f = click.option("--client-key", metavar="FILE", help="This client's key pair, authorized "
                     "on the server (a NAME.key_secret file; default: $PILOTFISH_CLIENT_KEY or "
                     "the home's keys/client.key_secret).")(f)
    f = click.option("--server-key", metavar="FILE", help="The server's public key (its "
                     "keys/server.key, or the key itself; default: $PILOTFISH_SERVER_KEY, the "
                     "home's server.json or keys/server.key).")(f)
    return f


def staging_options(f):
    f = click.option("--staging-dir", metavar="DIR", help="The site stager's staging directory "
                     "as this node sees it (shared with the login node): jobs whose remote "
                     "input the site stager fetched find it there.")(f)
    f = click.option("--stage-max-bytes", metavar="BYTES", help="Bytes one stage-in or "
                     "stage-out may copy, e.g. 100G (default: $PILOTFISH_STAGE_MAX_BYTES, "
                     "else 100G).")(f)
    f = click.option("--stage-timeout", type=float, metavar="SECONDS", help="Seconds one "
                     "stage-in or stage-out may take (default: $PILOTFISH_STAGE_TIMEOUT, else "
                     f"{settings.STAGE_TIMEOUT:g}).")(f)
    f = click.option("--data-root", "data_roots", multiple=True, metavar="DIR",
                     help="A directory jobs' input_url/output_url may name (repeatable; also "
                     "$PILOTFISH_DATA_ROOTS; default: HOME/data).")(f)
    return f


@pilot_group.command("agent", context_settings=CTX)
@click.option("--server", help="Server address (default: $PILOTFISH_SERVER or the home's "
              "server.json).")
@key_options
@click.option("--cores", help="Cores to use, e.g. 0-3,8 (default: this process's affinity).")
@click.option("--walltime", type=PLAIN_FLOAT, help="Minutes this agent may run (default: the batch "
              "job's end, else unlimited). Jobs that would not finish in time are not taken.")
@click.option("--work-root", type=click.Path(file_okay=False), help="Root of job workdirs "
              "(default: HOME/work).")
@click.option("--site", help="Site name: take only jobs for this site or for any site.")
@click.option("--pilot", "pilot_id", help="Pilot (batch job) this agent belongs to.")
@click.option("--prefetch", type=PLAIN_INT, help="Cores' worth of tasks to hold beyond the free "
              "cores (default: automatic, from the tasks' run times; 0 for none).")
@click.option("--idle-timeout", type=PLAIN_FLOAT, default=300.0, show_default=True,
              help="Leave after this many seconds without work (0: never).")
@click.option("--max-tasks", type=PLAIN_INT, help="Leave after running this many tasks.")
@click.option("--leave-when-no-work", type=click.Choice(["never", "after-work", "always"]),
              default="never", show_default=True,
              help="Leave as soon as the server says no queued or pending job fits this agent "
              "(after-work: only once it has run a task; the idle timeout still applies).")
@launcher_options
@click.option("--node-name", help="This node's name as the launcher knows it (default: "
              "$SLURMD_NODENAME, else the host name).")
@click.option("--container-runtime", help="Runtime for apps that name an image without one: "
              "shifter, apptainer, singularity, charliecloud, podman-hpc (default: none).")
@click.option("--bind", "binds", multiple=True, metavar="SRC[:DST]", help="Also bind this host "
              "path into every task's container (the job's workdir always is). Repeatable.")
@click.option("--strict-affinity", is_flag=True, help="Refuse to run when this process's "
              "affinity mask is smaller than the node (the launcher pinned the agent).")
@staging_options
@click.option("--fake-exec", is_flag=True, help="BENCHMARKS ONLY: run nothing; report every "
              "task finished at once (measures the server, protocol and database alone).")
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def agent_cmd(ctx, server, server_key, client_key, cores, walltime, work_root, site, pilot_id,
              prefetch, idle_timeout, max_tasks, leave_when_no_work, mpi, launcher, node_name,
              container_runtime, binds, strict_affinity, data_roots, stage_timeout,
              stage_max_bytes, staging_dir, fake_exec, verbose, quiet) -> None:
    """Run one node agent: pull tasks that fit this node and run them pinned to cores.

    A job's input_url and output_url must lie under a data root (--data-root,
    $PILOTFISH_DATA_ROOTS; default HOME/data), never in the rest of the home or the work root;
    each stage step runs as a child process, stopped after --stage-timeout seconds and
    --stage-max-bytes bytes.
    """
    import logging
    import socket

    from .agent import Agent
    from .contain import TaskContainer, parse_bind
    from .launch import TaskLauncher
    from .resources import affinity_warning, detect, node_cpus
    console.setup_logging(verbose, quiet)
    home, address = _home_and_server(ctx, server)
    allowed = set(os.sched_getaffinity(0))
    wanted = _cores(cores)
    if wanted and not set(wanted) <= allowed:
        raise PilotfishError(f"--cores {cores}: cores {sorted(set(wanted) - allowed)} are not in "
                             f"this process's affinity mask {sorted(allowed)}")
    node = node_cpus()
    warning = affinity_warning(sorted(allowed), node)
    if warning and strict_affinity:
        raise PilotfishError(f"--strict-affinity: {warning}")
    if warning:
        logging.getLogger("pilotfish.agent").warning("AFFINITY: %s", warning)
    res = detect(walltime, wanted)
    task_container = TaskContainer(container_runtime,
                                   tuple(parse_bind(_expand(b, "--bind")) for b in binds),
                                   gpus=res.gpu_kind)
    root = Path(_expand(work_root, "--work-root")) if work_root else settings.work_root(home)
    staging = _staging(home, root.resolve(), data_roots, stage_timeout, stage_max_bytes)
    if staging_dir:
        import dataclasses
        staging = dataclasses.replace(staging, staged_dir=os.path.abspath(
            _expand(staging_dir, "--staging-dir")))
    from pilotfish import keys
    curve = keys.client_curve(home, address, server_key, client_key)  # None: a plain ipc://
    node_name = node_name or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    task_launcher = TaskLauncher(launcher or default_launcher(), node_name, mpi=mpi,
                                 overlap=bool(os.environ.get("SLURM_STEP_ID")))
    if site:  # the stager reads this site profile's transfers.credentials (remote URLs)
        os.environ["PILOTFISH_SITE"] = site
    agent = Agent(address, res, root.resolve(), site=site, pilot=pilot_id, prefetch=prefetch,
                  idle_timeout=idle_timeout, fake_exec=fake_exec, max_tasks=max_tasks,
                  node=node_name, node_cores=len(node), launcher=task_launcher,
                  container=task_container, curve=curve, staging=staging,
                  leave_when_no_work=leave_when_no_work)
    ctx.exit(agent.run())


def _staging(home: Path, work_root: Path, data_roots: tuple[str, ...],
             timeout: float | None, max_bytes: str | None):
    """The agent's staging settings, checked here so a bad root or limit stops it at start."""
    from pilotfish import dataroots
    from pilotfish.errors import ValidationError
    from .executor import Staging
    roots = [_expand(r, "--data-root") for r in data_roots] + dataroots.from_env()
    try:
        made = dataroots.make(home, roots, resolve=True, exclude=[str(work_root)])
        seconds, size = settings.stage_limits(timeout, max_bytes)
    except (ValidationError, ValueError) as exc:
        raise PilotfishError(str(exc)) from None
    dataroots.ensure_data_dir(made)
    return Staging(tuple(roots), str(home), seconds, size)




@pilot_group.command("run", context_settings={**CTX, "ignore_unknown_options": True})
@click.option("--server", help="Server address (default: $PILOTFISH_SERVER or the home's "
              "server.json).")
@key_options
@click.option("--nodes", help="The allocation's nodes as a hostlist (node[1-4]) or @file "
              "(default: from the batch system: SLURM_JOB_NODELIST, PBS_NODEFILE, "
              "COBALT_NODEFILE/COBALT_PARTNAME, LSB_DJOB_HOSTFILE; else this host).")
@click.option("--cpus-per-node", type=click.IntRange(1), help="CPUs each agent gets "
              "(default: this node's CPUs, all of them).")
@click.option("--walltime", type=PLAIN_FLOAT, help="Minutes the pilot may run (default: the batch "
              "job's end); agents leave a margin before it.")
@click.option("--relay", type=click.Choice(["mpi"]), help="mpi: compute nodes cannot reach "
              "the server; agents are MPI ranks and rank 0 relays for all.")
@click.option("--pilot", "pilot_id", help="Pilot id (default: from the batch job id, e.g. "
              "slurm-1234).")
@launcher_options
@click.option("--data-root", "data_roots", multiple=True, metavar="DIR", help="Passed to "
              "every agent: a directory jobs' URLs may name (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the plan (nodes, launcher, agent "
              "command) and start nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print JSON.")
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", is_flag=True)
@click.argument("agent_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run_cmd(ctx, server, server_key, client_key, nodes, cpus_per_node, walltime, relay,
            pilot_id, mpi, launcher, data_roots, dry_run, as_json, verbose, quiet,
            agent_args) -> None:
    """The pilot head (what a pilot batch script runs): one node agent per node.

    Starts the agents through the site's launcher with full-node depth and binding off (e.g.
    srun -N $N --ntasks-per-node=1 -c $CPUS --cpu-bind=none), supervises them, and ends when
    they have left: at their idle timeout, before the allocation ends, or on SIGTERM (they hand
    their tasks back). AGENT_ARGS after -- go to every `pilot agent` (e.g. -- --idle-timeout 60).
    """
    from .head import Head, plan
    console.setup_logging(verbose, quiet)
    home, address = _home_and_server(ctx, server)
    server_key, client_key = _head_keys(home, server_key, client_key, list(agent_args))
    agent_args = tuple(x for r in data_roots for x in ("--data-root", r)) + tuple(agent_args)
    agent_args += tuple(_site_staging_args(home, list(agent_args)))
    p = plan(list(agent_args), environ=dict(os.environ), server=address,
             home=str(home) if ctx.obj and ctx.obj.get("home") else None, nodes=nodes,
             launcher=launcher, mpi=mpi, cpus_per_node=cpus_per_node, walltime=walltime,
             relay=relay, pilot=pilot_id, server_key=server_key, client_key=client_key)
    if dry_run:
        if as_json:
            return console.print_json(p.to_dict())
        console.out.print(f"pilot {p.pilot}: {len(p.nodes)} nodes from {p.node_source}, "
                          f"{p.cpus_per_node} CPUs each, launcher {p.launcher}", markup=False)
        console.out.print(" ".join(p.argv), markup=False, soft_wrap=True)
        return
    ctx.exit(Head(p).run())


def _site_of(agent_args: list[str]) -> str | None:
    for i, a in enumerate(agent_args):
        if a == "--site" and i + 1 < len(agent_args):
            return agent_args[i + 1]
        if a.startswith("--site="):
            return a.split("=", 1)[1]
    return None


def _site_staging_args(home: Path, agent_args: list[str]) -> list[str]:
    """The agents' --data-root/--stage-* flags from the site profile named by their --site,
    for what the head's own arguments leave unset (a hand-written batch script; pilots the
    site agent submits carry them already)."""
    name = _site_of(agent_args)
    if not name:
        return []
    from pilotfish.site_configs.loader import load_site
    try:
        site = load_site(name, home)
    except PilotfishError as exc:
        import logging
        logging.getLogger("pilotfish.pilot").warning(
            "site %s: no data roots or staging limits from its profile: %s", name, exc)
        return []
    out: list[str] = []
    if "--data-root" not in agent_args:
        for root in site.data_roots:
            out += ["--data-root", root]
    st = site.staging
    if st is not None and st.timeout is not None and "--stage-timeout" not in agent_args:
        out += ["--stage-timeout", f"{st.timeout:g}"]
    if st is not None and st.max_bytes is not None and "--stage-max-bytes" not in agent_args:
        out += ["--stage-max-bytes", str(st.max_bytes)]
    return out


def _head_keys(home: Path, server_key: str | None, client_key: str | None,
               agent_args: list[str]) -> tuple[str | None, str | None]:
    """The key files the head hands its agents: its options, else (when the environment, which
    the agents inherit, names none) the ``keys`` of the site profile named by the agents'
    ``--site``. Checked here, so a bad path fails the pilot once, not on every node."""
    from pilotfish import keys
    if not (server_key or os.environ.get(keys.SERVER_KEY_ENV)) or \
            not (client_key or os.environ.get(keys.CLIENT_KEY_ENV)):
        name = _site_of(agent_args)
        if name:
            from pilotfish.site_configs.loader import load_site
            try:
                site_keys = load_site(name, home).keys
            except PilotfishError as exc:
                import logging
                logging.getLogger("pilotfish.pilot").warning(
                    "site %s: no key files from its profile: %s", name, exc)
                site_keys = None
            if site_keys is not None:
                if not (server_key or os.environ.get(keys.SERVER_KEY_ENV)):
                    server_key = site_keys.path("server_public")
                if not (client_key or os.environ.get(keys.CLIENT_KEY_ENV)):
                    client_key = site_keys.path("client")
    if server_key:
        keys.public_key(server_key)
        if os.path.exists(os.path.expanduser(server_key)):
            server_key = os.path.abspath(os.path.expanduser(server_key))
    if client_key:
        client_key = os.path.abspath(os.path.expanduser(client_key))
        keys.read_key_file(client_key, secret=True)
    return server_key, client_key


@pilot_group.command("relay", context_settings={**CTX, "ignore_unknown_options": True})
@click.option("--server", help="Server address, used by MPI rank 0 only (default: "
              "$PILOTFISH_SERVER or the home's server.json).")
@key_options
@click.option("-v", "--verbose", count=True)
@click.option("-q", "--quiet", is_flag=True)
@click.argument("agent_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def relay_cmd(ctx, server, server_key, client_key, verbose, quiet, agent_args) -> None:
    """Run one node agent per MPI rank; rank 0 alone talks to the server and relays for the rest.

    For machines whose compute nodes cannot reach the server. Start it with one rank per node
    (e.g. srun --ntasks-per-node=1 --mpi=pmi2); AGENT_ARGS are passed to each rank's
    `pilot agent` (after --).
    """
    from .relay import run
    console.setup_logging(verbose, quiet)
    home, address = _home_and_server(ctx, server)
    from pilotfish import keys
    # rank 0's DEALERs and every rank's agent (which inherit the environment) use these keys
    for value, var in ((server_key, keys.SERVER_KEY_ENV), (client_key, keys.CLIENT_KEY_ENV)):
        if value:
            os.environ[var] = os.path.abspath(value) if os.path.exists(value) else value
    ctx.exit(run(address, list(agent_args), home=str(home)))
