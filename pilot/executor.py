"""Runs leased tasks on this node: stage-in, preprocess, run, postprocess, stage-out.

Each task gets its own cores (and GPUs). Processes start with glibc's ``posix_spawn`` (its
vfork path, about twice as fast as ``subprocess.Popen`` here) on a spawner thread pinned to the
task's cores (:mod:`pilotfish.pilot.spawn`), so the child is born pinned: it inherits the mask
before its first instruction. (Pinning the child after ``posix_spawn`` returned was a race: the
vfork child keeps the CPU after its exec, and under load a task read, or an OpenMP runtime
bound its threads to, the agent's whole mask -- seen once in CI. ``taskset`` as an exec shim is
race-free too but costs each task another exec, 0.65 ms here. Pinning the loop's own thread, as
the agent did before, cost the loop a migration to the task's core and a wait behind the
child there.) The workdir is a file action of the spawn (``fchdir`` on a descriptor), never a
process-wide ``chdir``. A core's next one-core task may wait on that core's thread while the
task before it runs its last process, and start there as it ends (:meth:`Executor._chain`).
A task is "starting" (``spawning``, no pid) until its thread returns; the end of its
process comes from the same thread, which waits for it (through the spawner's eventfd, after
the core's next start), or, for a process with no cores, as its readable pidfd in the agent's
poll loop: a finished task is noticed at once. Nothing runs through a shell.

Tasks start in their own session (``setsid``), so they outlive an agent that dies without
stopping them (kill -9, the OOM killer, a crash) -- and the server requeues such an agent's
jobs once its lease expires, which would run the same job twice at once. ``posix_spawn`` cannot
set ``PR_SET_PDEATHSIG`` in the child, so each agent has a **guard**: a tiny process that holds
the read end of a pipe; the agent writes ``+pid`` when a task starts and ``-pid`` just before it
reaps it. When the agent dies the pipe closes, and the guard sends SIGTERM, then (after up to
1 s) SIGKILL, to the process group of every task still listed, well within the lease timeout.
The guard starts with the executor (not in fake-exec mode), works from ``/``, ignores SIGINT,
SIGTERM and SIGHUP (the agent stops its tasks itself on those) and leaves at end of file.

The guard also **fences** an agent whose leases the server may expire while its tasks still
run -- an agent stopped (SIGSTOP, a debugger), swapped out or stuck, or one cut off from the
server: each time the server renews the agent's leases, the agent tells the guard the new
fencing deadline, a ``CLOCK_MONOTONIC`` time (one clock for every process of the machine):
the send time of the renewed message plus ``settings.fence_timing``. At that deadline the guard
stops the tasks it holds, half a heartbeat before the server may count the lease out. A live
agent stops them itself at the same deadline (:meth:`Executor.stop_all`); the guard covers the
agent that cannot.

**Stage-in and stage-out** run the same way, as steps of the task: one child process each, the
stager (:mod:`pilotfish.pilot.stage`, with ``/`` as its working directory, the agent's own
environment and its standard error on a pipe, whose one line becomes the job's message),
registered with the guard, watched by its pidfd, stopped at its deadline (the staging timeout)
like a task at its wall time, by ``stop_all`` and by a cancel. A hostile or slow input (a
device, a FIFO, a huge or growing file, a hung file server) so never holds the agent's loop:
heartbeats go on. Jobs without URLs pay nothing for it.

**Workdirs** must be real directories below the work root: before each spawn the agent opens
the workdir without following a symlink as its last part and compares its ``/proc/self/fd``
path with the path it built from the (resolved) work root; a task that replaced a workdir or
its parent with a symlink (to the keys, say) fails the step instead of having its files written
there. A workdir made ahead on the preparer's thread was opened and checked there the same way.
The spawn enters it with ``fchdir`` on that descriptor.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pilotfish.envpolicy import refused_env_name, task_base_env
from pilotfish.errors import ValidationError
from pilotfish.validate import check_relpath

from .prepare import Preparer, open_real_dir, plain
from .spawn import Request, Spawner, TooLate

log = logging.getLogger("pilotfish.agent")

STAGED_IN, PREPROCESSED, RUNNING = "STAGED_IN", "PREPROCESSED", "RUNNING"
EXECUTION_FINISHED, POSTPROCESSED = "EXECUTION_FINISHED", "POSTPROCESSED"
STAGED_OUT, JOB_FINISHED = "STAGED_OUT", "JOB_FINISHED"
#: Everything a task passes through when every step succeeds at once (fake-exec mode).
SUCCESS_PATH = [STAGED_IN, PREPROCESSED, RUNNING, EXECUTION_FINISHED, POSTPROCESSED,
                STAGED_OUT, JOB_FINISHED]
#: What places a staged input into a workdir (coreutils; see Executor._place).
MV = "/bin/mv" if os.path.exists("/bin/mv") else "/usr/bin/mv"


def _plain_name(name: object) -> bool:
    """One plain path part (the name of a staged input, from the task message)."""
    return isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..") \
        and "/" not in name and "\x00" not in name and not name.startswith((".", "-"))


#: Seconds a task's progress may wait so that it can be reported together with its end.
REPORT_DELAY = 0.2
KILL_GRACE = 3.0
#: Seconds a task killed by SIGTERM/SIGKILL from outside waits for the agent's own stop signal
#: before it counts as failed (scancel and walltime kills signal every process of the job, one
#: by one: on a loaded node the agent's turn came more than 0.5 s after its tasks').
SIGNAL_GRACE = 2.0
#: The guard naps 10 ms after each read (``NAP`` in its code), so lines gather in the pipe: woken
#: by every line (two per task), it cost ~40 us of CPU per task and the agent a context switch
#: per write (W2 on 2 cores: the agent's loop waited ~100 us per task in those writes). The nap
#: delays nothing that matters: at its deadline, or at end of file, it reads every line written
#: before it acts, as before, and fencing and an agent's death are seen at most 10 ms later.
#: The guard (see the module doc): reads lines on stdin: "+pid" / "-pid" (a task started / is
#: being reaped), "D<deadline> <grace>" (fence at that time.monotonic(); "D0 0": no fencing). At
#: end of file, or once the deadline has passed while tasks are listed, it stops their process
#: groups. Run with ``python -S -I -c``.
_GUARD = r"""
import os, select, signal, time
os.chdir("/")  # not the workdir of the task being spawned
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
live, buf, deadline, grace = set(), b"", 0.0, 1.0
NAP = 0.01  # seconds between reads: lines gather in the pipe meanwhile
def signal_all(sig):
    for g in list(live):
        try:
            os.killpg(g, sig)
        except OSError:
            live.discard(g)
def stop_all(grace):
    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        time.sleep(min(0.05, grace))
        signal_all(0)
    signal_all(signal.SIGKILL)
    live.clear()
while True:
    wait = max(0.0, deadline - time.monotonic()) if deadline and live else None
    if not select.select([0], [], [], wait)[0]:
        # (a line written just before the deadline is read first: it may move it)
        if time.monotonic() >= deadline and not select.select([0], [], [], 0)[0]:
            stop_all(grace)  # no lease renewal for too long: its jobs go to others soon
        continue
    try:
        data = os.read(0, 65536)
    except InterruptedError:
        continue
    if not data:
        break
    *lines, buf = (buf + data).split(b"\n")
    for line in filter(None, lines):
        if line[:1] == b"+":
            live.add(int(line[1:]))
        elif line[:1] == b"-":
            live.discard(int(line[1:]))
        elif line[:1] == b"D":
            deadline, grace = map(float, line[1:].split())
    time.sleep(NAP)
stop_all(1.0)
"""


@dataclass(eq=False)
class Task:
    spec: dict
    job: int
    attempt: int
    ncores: int
    ngpus: int
    cores: list[int] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    workdir: str | None = None  # absolute
    step: str = "queued"
    pid: int | None = None
    pidfd: int | None = None
    deadline: float | None = None
    kill_at: float | None = None
    timed_out: bool = False
    cancelled: bool = False
    pending: list[str] = field(default_factory=list)
    pending_since: float = 0.0
    start: float | None = None
    end: float | None = None
    exit: int | None = None
    msg: str | None = None
    done: bool = False
    created: bool = False                 # we made the workdir (not a retry's)
    handoff: bool = False                 # its stage-out step hands outputs to a site stager
    handed: bool = False                  # ... and it did: reported with "handed"
    errfd: int | None = None              # the stager's standard error (read end)
    prep: str | None = None               # its workdir made ahead? (see pilot/prepare.py)
    prepared: object = None               # ... the Prepared: workdir, open job.out/job.err
    spawning: bool = False                # a process of it is being started (no pid yet)
    req: object = None                    # its Request while it waits behind a core's process
    watched: bool = False                 # its pidfd is in the loop's poll (no core's thread)


class _Ctx:
    """What the loop keeps about one process being started: how its step fails, its deadline
    (seconds after the start), the Prepared whose descriptors it gets, the stager's standard
    error (write end), the opened workdir, the argv (for messages)."""
    __slots__ = ("failure", "deadline", "made", "errw", "dir_fd", "argv")

    def __init__(self, failure: str, deadline: float | None, made, argv) -> None:
        self.failure, self.deadline, self.made, self.argv = failure, deadline, made, argv
        self.errw: int | None = None
        self.dir_fd: int | None = None


@dataclass(frozen=True)
class Staging:
    """What the stager needs besides the job: the agent's declared data roots (none: the home's
    data directory), the home, and the limits of one step."""
    roots: tuple[str, ...]
    home: str
    timeout: float
    max_bytes: int
    #: The site stager's staging directory (shared with the login node): a task with
    #: ``staged: NAME`` finds its input at ``<staged_dir>/<job>/NAME`` (None: none here).
    staged_dir: str | None = None


#: Variables of the agent's environment its stager keeps (see pilotfish.pilot.stage_remote).
STAGE_ENV = ("HOME", "USER", "LOGNAME", "PILOTFISH_TRANSFERS", "PILOTFISH_SITE",
             "PILOTFISH_TRANSFER_STALL", "SSH_AUTH_SOCK")


class Executor:
    def __init__(self, cores: list[int], gpus: list[str], work_root: Path,
                 watch: Callable[[int, Task], None], unwatch: Callable[[int], None],
                 fake: bool = False,
                 launch: Callable[[Task, list[str]], list[str]] | None = None,
                 contain: Callable[[Task, list[str]], list[str]] | None = None,
                 staging: Staging | None = None,
                 gpu_env: Callable[[list[str]], dict] | None = None) -> None:
        self.all_cores = list(cores)
        self.free_cores = list(cores)
        self.all_gpus = list(gpus)
        self.free_gpus = list(gpus)
        self.work_root = work_root
        #: Workdirs are built as PREFIX/REL and must equal getcwd() there: no "//" for a "/" root.
        self._root_prefix = os.path.realpath(work_root).rstrip("/")
        self.watch, self.unwatch = watch, unwatch
        self.fake = fake
        #: Builds the launcher argv of a task with several ranks (spec["launch"]); may raise
        #: ValidationError, which fails the task with that message.
        self.launch = launch
        #: Wraps a task's argv with its container runtime (spec["container"]); inside the
        #: launcher, so binding applies to the containerized processes.
        self.contain = contain
        #: A task's GPU variables from its GPU ids (pilot/gpus.py: CUDA_VISIBLE_DEVICES,
        #: ROCR_VISIBLE_DEVICES, ZE_AFFINITY_MASK by vendor); None: NVIDIA's.
        self.gpu_env = gpu_env or (lambda ids: {"CUDA_VISIBLE_DEVICES": ",".join(ids)})
        self.staging = staging
        #: The stager's command: the pilotfish this agent runs (installed or a source checkout)
        #: and nothing else first on sys.path; ``-P``: not even "/" (its working directory).
        import pilotfish
        code = os.path.dirname(os.path.dirname(os.path.abspath(pilotfish.__file__)))
        self._stager = [sys.executable] + (["-P"] if sys.version_info >= (3, 11) else []) + \
            ["-c", f"import sys; sys.path.insert(0, {code!r}); "
             "from pilotfish.pilot.stage import main; sys.exit(main())"]
        #: Set when the agent is told to stop: a batch system that ends the allocation (scancel,
        #: the walltime) signals every process of the job, tasks included, at the same moment
        #: as the agent; a task killed so is handed back, not failed.
        self.stopping = False
        self.queue: deque[Task] = deque()
        self.active: dict[int, Task] = {}          # job -> task being worked on
        self.reportable: list[Task] = []            # tasks with states to report
        # a declared set of the agent's variables, computed once (not per task): never its key
        # paths or anything else not declared (see pilotfish.envpolicy)
        self.base_env = task_base_env(os.environ)
        #: The stager's: a task's, plus what remote transfers read (the user's transfers file,
        #: the site whose profile holds credentials, the stall bound, an ssh agent).
        self.stage_env = {**self.base_env, **{k: os.environ[k] for k in STAGE_ENV
                                              if k in os.environ}}
        # Never import from the current directory (the agent's start directory may be anyone's).
        sys.path[:] = [p for p in sys.path if p not in ("", ".")]
        self.avg_run: float | None = None    # moving average of run-step seconds
        self._guard_fd: int | None = None    # write end of the guard's pipe (see module doc)
        self.fence_at: float = 0.0           # the guard's fencing deadline (monotonic); 0: none
        #: The agent's own fencing deadline (time.monotonic(); None: none), asked before each
        #: task starts and before each process spawns: past it the server may soon give the
        #: job to another agent, so nothing new starts (see :meth:`start_ready`, :meth:`_spawn`).
        self.spawn_deadline: Callable[[], float | None] = lambda: None
        self._made_dirs: set[str] = set()
        #: Chained starts (see :meth:`_chain`): core -> the one-core task whose run step, its
        #: last process, runs there; and core -> the task queued on that core's spawner
        #: thread to start the moment that process ends.
        self.run_last: dict[int, Task] = {}
        self.chained: dict[int, Task] = {}
        #: Makes queued tasks' workdirs and output files on a thread (None in fake-exec mode).
        self.preparer: Preparer | None = None
        #: Starts processes on threads pinned to tasks' cores (None in fake-exec mode); its
        #: eventfd is watched with the task None (see :meth:`on_fd`).
        self.spawner: Spawner | None = None
        if not fake:
            self._start_guard()
            self.spawner = Spawner(os.sched_getaffinity(0), self._guard_fd,
                                   lambda: self.spawn_deadline())
            self.watch(self.spawner.fd, None)
            # (three descriptors each held: at most 510, half the usual soft limit of 1024;
            # at least 32, so the thread works in bursts of 16 on a small node)
            self.preparer = Preparer(self._root_prefix, self._made_dirs,
                                     min(170, max(32, 2 * len(self.all_cores) + 2)))

    # -- bookkeeping ------------------------------------------------------------------------
    def add(self, spec: dict) -> None:
        t = Task(spec, spec["job"], spec["attempt"], spec["cores"], spec["gpus"])
        self.queue.append(t)
        if self.preparer is not None and plain(spec):
            self.preparer.submit(t)

    def queued_cores(self) -> int:
        return sum(t.ncores for t in self.queue)

    def queued_gpus(self) -> int:
        return sum(t.ngpus for t in self.queue)

    def idle(self) -> bool:
        return not self.queue and not self.active

    def held(self) -> list[dict]:
        return ([{"job": t.job, "attempt": t.attempt} for t in self.queue]
                + [{"job": t.job, "attempt": t.attempt} for t in self.active.values()])

    def next_deadline(self) -> float | None:
        """When a running step's wall time ends or its kill grace runs out."""
        times = [t.kill_at or t.deadline for t in self.active.values()
                 if (t.kill_at or t.deadline) is not None]
        return min(times) if times else None

    def next_report(self) -> float | None:
        """When progress becomes due for reporting: at once for an ended task, else after
        REPORT_DELAY (see :meth:`take_updates`)."""
        if not self.reportable:
            return None
        return min(0.0 if t.done else t.pending_since + REPORT_DELAY for t in self.reportable)

    # -- starting ---------------------------------------------------------------------------
    def start_ready(self, now: float) -> None:
        """Start queued tasks in order while their cores and GPUs are free (first fit)."""
        if self.chained and self.free_cores:
            self._unchain()
        if not self.queue:
            return
        until = self.spawn_deadline()
        skipped = deque()
        while self.queue and self.free_cores:
            if until is not None and time.monotonic() >= until:
                break  # fencing is due (a slow workdir on a loaded disk can take that long)
            t = self.queue.popleft()
            if t.ncores > len(self.free_cores) or t.ngpus > len(self.free_gpus):
                skipped.append(t)
                continue
            t.cores = self.free_cores[:t.ncores]
            del self.free_cores[:t.ncores]
            t.gpus = self.free_gpus[:t.ngpus]
            del self.free_gpus[:t.ngpus]
            self.active[t.job] = t
            self._begin(t, now)
        skipped.extend(self.queue)
        self.queue = skipped
        if self.queue and len(self.chained) < len(self.run_last):  # (a core left to chain on)
            self._chain(now, until)

    def _chain(self, now: float, until: float | None) -> None:
        """Start the next queued one-core tasks on the spawner threads of cores whose one-core
        task is in its last process (a run step with no post step or stage-out after it):
        each thread starts its next task as soon as the process before it ends, where the
        loop would first have to notice the end, reap, report and ask again (W2: ~0.3 of the
        2 cores idle, the /bin/true tasks 0.6 ms each). Queue order stays first come, first
        served; a chained task that a free core could start sooner moves there
        (:meth:`_unchain`)."""
        if until is not None and time.monotonic() >= until:
            return
        queue, chained = self.queue, self.chained
        for c, prev in list(self.run_last.items()):
            if not queue:
                return
            if c in chained or prev.step != "run" or prev.pid is None:
                continue
            t = queue[0]
            if t.ncores != 1 or t.ngpus or not plain(t.spec) or t.spec.get("launch"):
                return
            queue.popleft()
            t.cores = [c]
            chained[c] = t
            self.active[t.job] = t
            self._begin(t, now)

    def _unchain(self) -> None:
        """Tasks wait on busy cores while others are free (the process before one runs
        longer than the rest): withdraw their starts and ask the free cores' threads."""
        for c, t in list(self.chained.items()):
            if not self.free_cores:
                return
            req = t.req
            if req is None or not self.spawner.withdraw(req):
                continue  # its thread has it: it starts there now
            del self.chained[c]
            t.cores = [self.free_cores.pop(0)]
            req = Request(t, req.ctx, req.argv, self._env(t), req.actions,
                          frozenset(t.cores), req.until)
            t.req = None
            self.spawner.submit(req)

    def _withdraw(self, t: Task, now: float) -> bool:
        """A chained task leaves before its start (cancelled, stopped): True if its start was
        taken back (the task is released), False if its thread is starting it."""
        req = t.req
        if req is None or not self.spawner.withdraw(req):
            return False
        t.req = None
        t.spawning = False
        if req.ctx.made is not None:
            self._done_with(req.ctx.made)
        t.cancelled = True
        self._spawn_failed(t, req.ctx, now, TooLate())
        return True

    def _report(self, t: Task, now: float, *states: str) -> None:
        if not t.pending:
            t.pending_since = now
            self.reportable.append(t)
        t.pending.extend(states)

    def _begin(self, t: Task, now: float) -> None:
        if self.fake:
            self.avg_run = 0.0  # instant tasks: the automatic prefetch goes to its maximum
            t.start = t.end = now
            t.exit = 0
            self._report(t, now, *SUCCESS_PATH)
            self._finish(t, now)
            return
        spec = t.spec
        p = self.preparer.take(t) if self.preparer is not None else None
        if p is not None:  # made ahead on the preparer's thread
            if p.error:
                return self._fail(t, now, "STAGE_IN_FAILED", p.error)
            t.workdir, t.created, t.prepared = p.workdir, p.created, p
            return self._staged_in(t, now)
        try:
            check_relpath(spec["workdir"], "workdir")
            t.workdir = f"{self._root_prefix}/{spec['workdir']}"
            parent = t.workdir.rpartition("/")[0]
            if parent not in self._made_dirs:
                os.makedirs(parent, exist_ok=True)
                self._made_dirs.add(parent)
            try:
                os.mkdir(t.workdir)
                t.created = True
            except FileExistsError:
                pass  # a retry reuses its workdir (checked before anything runs in it)
            if spec.get("staged"):  # a site stager fetched it: move it in, off the loop
                why = self._check_workdir(t)
                if why:
                    return self._fail(t, now, "STAGE_IN_FAILED", f"stage-in failed: {why}")
                self._place(t, now, spec["staged"])
                return
            if spec.get("input_url"):
                why = self._check_workdir(t)
                if why:
                    return self._fail(t, now, "STAGE_IN_FAILED", f"stage-in failed: {why}")
                self._stage(t, now, "in", spec["input_url"])
                return
        except (OSError, ValidationError) as exc:
            return self._fail(t, now, "STAGE_IN_FAILED", f"stage-in failed: {exc}")
        self._staged_in(t, now)

    def _staged_in(self, t: Task, now: float) -> None:
        self._report(t, now, STAGED_IN)
        if t.spec.get("pre"):
            self._spawn(t, now, "pre", t.spec["pre"], "preprocess", "PREPROCESS_FAILED")
        else:
            self._report(t, now, PREPROCESSED)
            self._run(t, now)

    def _run(self, t: Task, now: float) -> None:
        argv = t.spec["argv"]
        if t.spec.get("container"):
            if self.contain is None:
                return self._fail(t, now, "RUN_FAILED", "this agent runs no containers")
            try:
                argv = self.contain(t, argv)
            except ValidationError as exc:
                return self._fail(t, now, "RUN_FAILED", f"cannot run in the container: {exc}")
        if t.spec.get("launch"):
            if self.launch is None:
                return self._fail(t, now, "RUN_FAILED", "this agent has no launcher for "
                                  "multi-rank jobs")
            try:
                argv = self.launch(t, argv)
            except ValidationError as exc:
                return self._fail(t, now, "RUN_FAILED", f"cannot launch: {exc}")
        # (started, reported RUNNING and given its wall time in _spawned)
        self._spawn(t, now, "run", argv, "job", "RUN_FAILED", deadline=t.spec.get("timeout"))

    def _post(self, t: Task, now: float) -> None:
        if t.spec.get("post"):
            self._spawn(t, now, "post", t.spec["post"], "postprocess", "POSTPROCESS_FAILED")
        else:
            self._report(t, now, POSTPROCESSED)
            self._stage_out(t, now)

    def _stage_out(self, t: Task, now: float) -> None:
        url = t.spec.get("output_url")
        st = self.staging
        if url and t.spec.get("site_out") and st is not None and st.staged_dir:
            # a site stager puts them: copy them to the shared staging directory (a child,
            # off the loop; see pilotfish.pilot.stage_site_out) and end in POSTPROCESSED
            self._stage(t, now, "handoff", st.staged_dir)
            return
        if url:
            self._stage(t, now, "out", url)
            return
        self._report(t, now, STAGED_OUT, JOB_FINISHED)
        self._finish(t, now)

    def _stage(self, t: Task, now: float, mode: str, url: str) -> None:
        """Start the stager for one stage step, with the staging timeout as its deadline."""
        st = self.staging or Staging((), str(self.work_root.parent), 3600.0, 100 * 2**30)
        argv = self._stager + [mode, str(t.job), t.workdir, url, str(st.max_bytes), st.home,
                               self._root_prefix or "/", *st.roots]
        failure = "STAGE_IN_FAILED" if mode == "in" else "STAGE_OUT_FAILED"
        step = "stage_out" if mode == "handoff" else f"stage_{mode}"
        t.handoff = mode == "handoff"
        self._spawn(t, now, step, argv, "", failure, timeout=st.timeout, deadline=st.timeout)

    def _place(self, t: Task, now: float, name: str) -> None:
        """Move the input a site stager staged (``<staged_dir>/<job>/<name>``) into the
        workdir: ``mv -f -T`` as a child process, run like a stage step (off the loop, with
        the staging deadline). A rename on the shared file system, a copy across devices;
        ``mv`` moves a symlink as a symlink, never what it points to. (A Python child cost
        each job 0.15-0.2 s of start-up on a loaded node: 15 % of a 1 s task.)"""
        st = self.staging
        if st is None or not st.staged_dir:
            return self._fail(t, now, "STAGE_IN_FAILED", "stage-in failed: the site stager "
                              "staged this job's input, but this agent has no --staging-dir")
        if not _plain_name(name):
            return self._fail(t, now, "STAGE_IN_FAILED", f"stage-in failed: staged file name "
                              f"{name[:80]!r} is not one plain path part: refused")
        argv = [MV, "-f", "-T", "--", f"{st.staged_dir}/{t.job}/{name}", f"{t.workdir}/{name}"]
        self._spawn(t, now, "stage_in", argv, "", "STAGE_IN_FAILED", deadline=st.timeout)

    def _open_workdir(self, t: Task) -> tuple[int | None, str | None]:
        """The task's workdir, opened (close-on-exec) when it is a real directory at the path
        built from the work root; else (None, why): a symlink on the way or as the workdir
        itself (a task could have planted one), or not a directory at all."""
        try:
            fd = open_real_dir(t.workdir)
        except OSError as exc:
            return None, f"workdir {t.workdir}: {exc.strerror or exc}"
        if fd is not None:
            return fd, None
        if t.created:  # made through the symlink: take back the empty directory we made
            t.created = False
            try:
                os.rmdir(t.workdir)
            except OSError:
                pass
        return None, (f"workdir {t.workdir} is not a real directory under the work root (a "
                      "symlink on the way?): refused")

    def _check_workdir(self, t: Task) -> str | None:
        """Why the task's workdir cannot be used (see :meth:`_open_workdir`); None: it can."""
        fd, why = self._open_workdir(t)
        if fd is not None:
            os.close(fd)
        return why

    def _env(self, t: Task) -> dict:
        env = dict(self.base_env)
        app_env = t.spec.get("env")
        if app_env:  # names refused at `app add` are dropped here too (apps of older versions)
            env.update({k: v for k, v in app_env.items() if refused_env_name(k) is None})
        env.update(PILOTFISH_JOB_ID=str(t.job), PILOTFISH_ATTEMPT=str(t.attempt),
                   PILOTFISH_JOB_NAME=t.spec["name"], PILOTFISH_WORKDIR=str(t.workdir),
                   PILOTFISH_CORES=",".join(map(str, t.cores)), OMP_NUM_THREADS=str(t.ncores))
        if self.all_gpus:
            for k, v in self.gpu_env(t.gpus).items():
                if v is None:
                    env.pop(k, None)
                else:
                    env[k] = v
        return env

    def _spawn(self, t: Task, now: float, step: str, argv: list[str], stem: str,
               failure: str, timeout: float | None = None,
               deadline: float | None = None) -> None:
        """Have one process of the task started on its cores (see the module doc); it is
        watched, and the step's ``deadline`` (seconds) set, in :meth:`_spawned`, or the task
        fails with ``failure`` there or here.

        A stage step (``stage_in``/``stage_out``) runs the stager from ``/`` with the agent's
        environment (``timeout``: its step's timeout, in its environment) and its standard
        error on a pipe; the others run in the workdir."""
        t.step = step
        stage = step.startswith("stage_")
        # the run step's output files, opened ahead (pilot/prepare.py): the child gets them
        made, t.prepared = (t.prepared, None) if stem == "job" else (None, t.prepared)
        req = None
        try:
            req = self._request(t, now, step, argv, stem, failure, timeout, deadline, stage,
                                made)
        finally:
            if req is None and made is not None:
                self._done_with(made)
        if req is not None:
            t.spawning = True
            if self.chained.get(t.cores[0] if t.cores else None) is t:
                t.req = req  # it waits behind the core's process: it may be withdrawn
            self.spawner.submit(req)

    def _request(self, t: Task, now: float, step: str, argv: list[str], stem: str,
                 failure: str, timeout: float | None, deadline: float | None, stage: bool,
                 made) -> Request | None:
        """The spawner's request for one process, or None when the task failed already."""
        ctx = _Ctx(failure, deadline, made, argv)
        if stage:
            t.errfd, ctx.errw = os.pipe()  # both close-on-exec; the child gets errw as its fd 2
            os.set_blocking(t.errfd, False)
            actions = [("chdir", "/"), ("open", 0, "/dev/null", os.O_RDONLY, 0),
                       ("open", 1, "/dev/null", os.O_WRONLY, 0), ("dup2", ctx.errw, 2)]
        else:
            if made is not None and made.dir_fd is not None:
                # checked on the preparer's thread (opened without following a symlink, its
                # /proc path compared): entered by that descriptor
                dir_fd = made.dir_fd
            else:
                dir_fd, why = self._open_workdir(t)
                if why:
                    self._fail(t, now, failure, why)
                    return None
                ctx.dir_fd = dir_fd
            actions = [("fchdir", dir_fd), ("open", 0, "/dev/null", os.O_RDONLY, 0)]
            if made is not None and made.out_fd is not None:
                actions += [("dup2", made.out_fd, 1), ("dup2", made.err_fd, 2)]
            else:
                actions += [("open", 1, f"{stem}.out", _WRITE, 0o644),
                            ("open", 2, f"{stem}.err", _WRITE, 0o644)]
        until = self.spawn_deadline()
        if until is not None and time.monotonic() >= until:
            self._spawn_failed(t, ctx, now, TooLate())
            return None
        try:
            # a stager learns its step's timeout (remote transfers bound themselves by it)
            env = {**self.stage_env, "PILOTFISH_STAGE_TIMEOUT": f"{timeout:g}"} \
                if stage and timeout else self.stage_env if stage else self._env(t)
        except (TypeError, ValueError) as exc:  # a malformed name or environment
            self._spawn_failed(t, ctx, now, exc)
            return None
        # the spawner's thread checks ``until`` again just before it starts the process: past
        # it the server may soon count the lease out and the process could not be stopped
        # again in time
        return Request(t, ctx, argv, env, actions, frozenset(t.cores) or None, until)

    def started(self, timeout: float = 10.0) -> bool:
        """Wait until every process being started has its pid (or failed), and take them in;
        False after ``timeout`` seconds. The agent's loop never waits: it polls the spawner's
        eventfd (:meth:`on_fd`); this is for stopping, and for tests."""
        if self.spawner is None:
            return True
        ok = self.spawner.wait(timeout)
        self._from_spawner(time.time())
        return ok

    def on_fd(self, fd: int, task: Task | None, now: float) -> None:
        """A watched descriptor is readable: a task's process ended, or (task None) the
        spawner has results."""
        if task is not None:
            self.on_exit(task, now)
        elif self.spawner is not None and fd == self.spawner.fd:
            self._from_spawner(now)

    def _from_spawner(self, now: float) -> None:
        """Processes started (or not), then processes a core's thread saw end (a task's
        process on one of its cores: the loop does not watch its pidfd, see
        pilot/spawn.py). An end whose process the loop reaped itself meanwhile (stop_all)
        is old news."""
        started, ended = self.spawner.done()
        for req in started:
            self._spawned(req, now)
        for req in ended:
            t = req.task
            if t.pid is not None and t.pid == req.pid:
                # (the time the thread saw the end: ``now`` may predate the start just taken)
                self.on_exit(t, req.ended)

    def _spawned(self, req: Request, now: float) -> None:
        """A spawner thread is back with the task's process, or with why it did not start."""
        t, ctx = req.task, req.ctx
        t.spawning = False
        t.req = None
        if ctx.dir_fd is not None:
            os.close(ctx.dir_fd)
            ctx.dir_fd = None
        if ctx.made is not None:
            self._done_with(ctx.made)
        if req.pin_error is not None:
            log.warning("job %d: could not pin to cores %s: %s; it runs on %s", t.job,
                        sorted(req.cores or ()), req.pin_error, sorted(self.spawner.own_mask))
        if req.error is not None:
            return self._spawn_failed(t, ctx, now, req.error)
        if ctx.errw is not None:
            os.close(ctx.errw)
        t.pid, t.pidfd = req.pid, req.pidfd
        if not req.waited:  # (else its core's thread tells us of its end)
            self.watch(t.pidfd, t)
            t.watched = True
        if t.cancelled:  # taken back while it was starting: on_exit releases it
            _killpg(t.pid, signal.SIGKILL)
            return
        if ctx.deadline:
            t.deadline = req.at + ctx.deadline
        if t.step == "run":
            t.start = req.at
            self._report(t, now, RUNNING)
            if req.waited and t.ncores == 1 and not t.ngpus and not t.spec.get("post") \
                    and not t.spec.get("output_url"):
                # its last process, and its thread waits for it: the core's next may wait
                # there (a thread that does not wait would start the next one at once)
                self.run_last[t.cores[0]] = t

    def _spawn_failed(self, t: Task, ctx: "_Ctx", now: float, exc: BaseException) -> None:
        """The task's process did not start: its step fails with why (a cancelled task is
        only released)."""
        for fd in (ctx.errw, ctx.dir_fd):
            if fd is not None:
                os.close(fd)
        ctx.errw = ctx.dir_fd = None
        if t.errfd is not None:
            self._close_err(t)
        if t.cancelled:
            return self._release(t, now)
        argv = ctx.argv
        if isinstance(exc, TooLate):
            # the lease may be counted out before this process could be stopped again: never
            # start it (the agent fences next); the attempt fails and is retried elsewhere
            msg = ("not started: no lease renewal from the server in time (this agent stops "
                   "its tasks)")
        elif isinstance(exc, OSError):
            msg = f"cannot start {argv[0] if argv else argv}: {exc.strerror or exc}"
        else:
            # a malformed task (argv or env items not strings, a NUL byte, no argv): it fails,
            # the agent and its other tasks go on
            msg = f"cannot start {str(argv)[:200]}: {exc}"
        self._fail(t, now, ctx.failure, msg)

    def _done_with(self, made) -> None:
        """The spawn is done with a Prepared's descriptors (the child has its copies)."""
        if self.preparer is not None:
            self.preparer.close_later(made)  # the preparer's thread closes them
        else:
            made.close()

    def _start_guard(self) -> None:
        """Start the guard (see the module doc) with the read end of a new pipe as its stdin."""
        r, w = os.pipe()  # both ends close-on-exec: tasks never inherit them
        try:
            os.posix_spawn(sys.executable, [sys.executable, "-S", "-I", "-c", _GUARD],
                           self.base_env, file_actions=[(os.POSIX_SPAWN_DUP2, r, 0)])
        except OSError as exc:
            log.error("cannot start the task guard (%s): tasks of this agent would outlive "
                      "it if it were killed", exc)
            os.close(w)
            return
        finally:
            os.close(r)
        self._guard_fd = w

    def set_fence(self, deadline: float, grace: float) -> bool:
        """Have the guard stop our tasks (SIGTERM, SIGKILL ``grace`` later) at ``deadline``, a
        ``time.monotonic()`` time, unless moved again; 0: never. False when the deadline was
        not moved because it or the current one has passed: the guard may have stopped our
        tasks already, or would at once; the agent must fence now."""
        now = time.monotonic()
        if deadline and self.fence_at and now >= self.fence_at:
            # An agent that was paused past its deadline (a loaded node, SIGSTOP) and wakes up
            # sending: moving the deadline now would leave its tasks stopped by the guard, or
            # not, unknown to it -- and a guard starved as long reads the new deadline before
            # its timeout and does not stop them. Either way the agent fences first.
            return False
        if deadline and deadline <= now:
            return False  # the agent fences now itself (the guard would race it, see above)
        if self.fence_at and self.fence_at < deadline < self.fence_at + grace:
            # a small step later: the guard keeps the earlier deadline (stopping a silent
            # agent's tasks at most ``grace`` early is safe), and is not woken per renewal --
            # an agent renews with every answer, hundreds a second under short tasks
            return True
        self.fence_at = deadline
        self._guard(b"D%.6f %.3f\n" % (deadline, grace))
        return True

    def _guard(self, line: bytes) -> None:
        """Tell the guard that a task started (+pid) or is about to be reaped (-pid)."""
        if self._guard_fd is None:
            return
        try:
            os.write(self._guard_fd, line)
        except OSError as exc:
            log.error("the task guard is gone (%s): tasks of this agent would outlive it if "
                      "it were killed", exc)
            # not closed: a spawner thread may write its "+pid" lines to it at any time (they
            # fail the same way); a closed number could be reused by another file
            self._guard_fd = None

    # -- ending -----------------------------------------------------------------------------
    def _unwatch(self, t: Task) -> None:
        if t.watched:
            self.unwatch(t.pidfd)
            t.watched = False

    def on_exit(self, t: Task, now: float) -> None:
        """A task's process ended (its pidfd became readable)."""
        self._unwatch(t)
        os.close(t.pidfd)
        t.pidfd = None
        self._guard(b"-%d\n" % t.pid)
        _, status = os.waitpid(t.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        t.pid = None
        err = self._close_err(t) if t.errfd is not None else ""
        if t.cancelled:
            self._release(t, now)
            return
        if self.stopping and code in _STOP_SIGNALS:
            log.info("job %d attempt %d: killed by signal %d as the agent stops: handing it "
                     "back", t.job, t.attempt, -code)
            t.step = "stopped"  # stays held: leave() hands it back
            return
        if code in _STOP_SIGNALS and t.step == "run" and not t.timed_out:
            # Killed from outside. A batch system ending the job signals the agent at the same
            # moment, maybe a little later: wait briefly before calling it a failure.
            t.step, t.exit, t.kill_at = "signalled", code, None
            t.deadline = now + SIGNAL_GRACE
            return
        step = t.step
        if step in ("stage_in", "stage_out"):
            t.deadline = t.kill_at = None
            name = "stage-in" if step == "stage_in" else "stage-out"
            failure = "STAGE_IN_FAILED" if step == "stage_in" else "STAGE_OUT_FAILED"
            if t.timed_out:
                t.timed_out = False
                timeout = self.staging.timeout if self.staging else 3600.0
                return self._fail(t, now, failure, f"{name} timed out after {timeout:g} s")
            if code != 0:
                return self._fail(t, now, failure, err or f"{name} failed: "
                                  + _why(code, "/nonexistent"))
            if step == "stage_in":
                return self._staged_in(t, now)
            if t.handoff:  # the site stager has them now: the attempt ends in POSTPROCESSED
                t.handed = True
                if not t.pending or t.pending[-1] != POSTPROCESSED:
                    self._report(t, now, POSTPROCESSED)
                return self._finish(t, now)
            self._report(t, now, STAGED_OUT, JOB_FINISHED)
            return self._finish(t, now)
        if step == "run":
            took = now - t.start
            self.avg_run = took if self.avg_run is None else 0.8 * self.avg_run + 0.2 * took
            t.exit = code
            t.deadline = t.kill_at = None
            if t.timed_out:
                return self._fail(t, now, "RUN_TIMEOUT",
                                  f"killed after the wall time of {t.spec['timeout']:.0f} s")
            if code != 0:
                return self._fail(t, now, "RUN_FAILED", _why(code, f"{t.workdir}/job.err"))
            self._report(t, now, EXECUTION_FINISHED)
            self._post(t, now)
        elif step == "pre":
            if code != 0:
                return self._fail(t, now, "PREPROCESS_FAILED",
                                  _why(code, f"{t.workdir}/preprocess.err"))
            self._report(t, now, PREPROCESSED)
            self._run(t, now)
        elif step == "post":
            if code != 0:
                return self._fail(t, now, "POSTPROCESS_FAILED",
                                  _why(code, f"{t.workdir}/postprocess.err"))
            self._report(t, now, POSTPROCESSED)
            self._stage_out(t, now)

    def _close_err(self, t: Task) -> str:
        """Close the stager's pipe; the last line it wrote."""
        if t.errfd is None:
            return ""
        try:
            data = os.read(t.errfd, 65536)
        except OSError:
            data = b""
        os.close(t.errfd)
        t.errfd = None
        lines = data.decode(errors="replace").strip().splitlines()
        return lines[-1][:500] if lines else ""

    def _fail(self, t: Task, now: float, state: str, msg: str) -> None:
        log.info("job %d attempt %d: %s: %s", t.job, t.attempt, state, msg)
        t.msg = msg
        self._report(t, now, state)
        self._finish(t, now)

    def _finish(self, t: Task, now: float) -> None:
        t.end = now
        t.done = True
        self._release(t, now)

    def _release(self, t: Task, now: float) -> None:
        if t.prepared is not None:  # it ended before its run step (a container refused...)
            t.prepared.close()
            t.prepared = None
        self.active.pop(t.job, None)
        chained, run_last = self.chained, self.run_last
        for c in t.cores:
            if run_last.get(c) is t:
                del run_last[c]
            if c in chained:
                # the task chained there starts (or started) on it; or the task released is
                # that chained one, which never started: the core is still its predecessor's
                del chained[c]
            else:
                self.free_cores.append(c)
        self.free_gpus.extend(t.gpus)
        t.cores, t.gpus = [], []

    def check_timeouts(self, now: float) -> None:
        for t in list(self.active.values()):
            if t.step == "signalled":
                if now >= t.deadline:  # the agent was not told to stop: a real failure
                    t.deadline = None
                    self._fail(t, now, "RUN_FAILED", _why(t.exit, f"{t.workdir}/job.err"))
                continue
            if t.pid is None:
                continue
            if t.kill_at is not None and now >= t.kill_at:
                _killpg(t.pid, signal.SIGKILL)
                t.kill_at = None
            elif t.deadline is not None and now >= t.deadline and not t.timed_out:
                log.info("job %d: %s, stopping it", t.job, "wall time over" if t.step == "run"
                         else f"{t.step.replace('_', '-')} timed out")
                t.timed_out = True
                _killpg(t.pid, signal.SIGTERM)
                t.kill_at = now + KILL_GRACE

    def take_updates(self, now: float, everything: bool = False,
                     ended: list | None = None) -> list[dict]:
        """Update items that are due: ended tasks at once, progress after REPORT_DELAY.
        ``ended``: gets the Tasks whose end is among them (their last output goes along)."""
        out, keep = [], []
        for t in self.reportable:
            if t.done or everything or now - t.pending_since >= REPORT_DELAY:
                out.append({"job": t.job, "attempt": t.attempt, "states": t.pending,
                            "exit": t.exit, "start": t.start, "end": t.end, "msg": t.msg})
                if t.handed and t.done:
                    out[-1]["handed"] = True
                t.pending = []
                if t.done and ended is not None:
                    ended.append(t)
            else:
                keep.append(t)
        self.reportable = keep
        return out

    def cancel(self, job: int, attempt: int) -> bool:
        """Forget a task the server took back; kill its processes if they run."""
        for t in list(self.queue):
            if t.job == job and t.attempt == attempt:
                self.queue.remove(t)
                if self.preparer is not None:
                    self.preparer.drop(t)
                return True
        t = self.active.get(job)
        if t is None or t.attempt != attempt:
            return False
        t.cancelled = True
        t.pending = []
        if t in self.reportable:
            self.reportable.remove(t)
        if t.pid is not None:
            _killpg(t.pid, signal.SIGKILL)
        elif t.req is not None and self._withdraw(t, time.time()):
            pass  # it waited behind a core's process and never started
        elif not t.spawning:  # (a starting one is killed when its pid comes, see _spawned)
            self._release(t, time.time())
        return True

    def stop_all(self, grace: float = KILL_GRACE) -> list[dict]:
        """Stop every task (SIGTERM, then SIGKILL after ``grace``); return what was held."""
        # tasks waiting behind a core's process never start (their threads would wait for
        # it); they are handed back with the rest
        back = [{"job": t.job, "attempt": t.attempt} for t in list(self.chained.values())
                if self._withdraw(t, time.time())]
        # processes being started: their pids first (a spawn returns within milliseconds; one
        # stuck in an exec on a hung file system is killed when it comes back: see _spawned)
        if not self.started(max(grace, 1.0)):
            log.error("%d task processes still starting after %.0f s", self.spawner.in_flight,
                      max(grace, 1.0))
        held = back + self.held()
        if self.preparer is not None:
            for t in self.queue:
                self.preparer.drop(t)
        self.queue.clear()
        if self.fence_at:
            self.set_fence(0, 0)  # we are stopping them ourselves, with our own grace
        procs = [t for t in self.active.values() if t.pid is not None]
        for t in self.active.values():
            t.cancelled = True  # (one still starting is killed when its pid comes: _spawned)
        for t in procs:
            _killpg(t.pid, signal.SIGTERM)
        deadline = time.time() + grace
        for t in procs:
            if not _wait_pidfd(t.pidfd, deadline - time.time()):
                _killpg(t.pid, signal.SIGKILL)
            self._guard(b"-%d\n" % t.pid)
            os.waitpid(t.pid, 0)
            self._unwatch(t)
            os.close(t.pidfd)
            self._close_err(t)
            t.pid = t.pidfd = None
        for t in list(self.active.values()):  # the agent may go on (fencing): free their cores
            self._release(t, time.time())
        self.reportable = [t for t in self.reportable if t.done]
        return held


# never through a symlink: a task of an earlier attempt may have planted one as job.out
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
_STOP_SIGNALS = frozenset(-s for s in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT,
                                       signal.SIGHUP))


def _wait_pidfd(fd: int, timeout: float) -> bool:
    """True once the process behind a pidfd has exited, False after ``timeout`` seconds."""
    return bool(select.select([fd], [], [], max(0.0, timeout))[0])


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _why(code: int, err_file: str) -> str:
    why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    try:
        with open(err_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 400))
            tail = f.read().decode(errors="replace").strip().splitlines()
        if tail:
            why += f"; stderr: {tail[-1][:200]}"
    except OSError:
        pass
    return why

