"""MPI relay: one node agent per MPI rank, and only rank 0 talks to the server.

For machines whose compute nodes cannot reach the server. Start one rank per node (``srun
--ntasks-per-node=1 --mpi=pmi2 pilotfish pilot relay ...`` or ``mpiexec``). Every rank runs its
node agent as a child process, unchanged:

* rank 0's agent connects to the server itself;
* rank r >= 1's agent connects to ``ipc://<private dir>/relay.sock``, a DEALER this relay binds.
  The relay carries each message from its agent to rank 0 over MPI, and rank 0 sends it to the
  server from a DEALER of its own for rank r (a fresh routing id per rank), and back the same way.

Messages are opaque: the relay never decodes them (a multi-frame message stays one message).
Each rank runs a single-threaded loop (zmq poll with a timeout, then an MPI probe) and sends over
MPI only without blocking, so two ranks sending big messages to each other can never deadlock.
The timeout is 1 ms while traffic is recent (each MPI hop then adds about 1 ms) and grows to
20 ms when idle, so an idle relay costs about 1 % of a core.

End of a rank: when its agent exits (idle timeout, max tasks, SIGTERM, which the relay forwards),
rank r >= 1 forwards its agent's last messages (the goodbye), tells rank 0 ``done`` and keeps
serving until rank 0's ``finish``; rank 0 sends those last messages on (its DEALERs linger) and
closes that rank's DEALER. Everyone leaves together once every agent has exited; each relay exits
with its own agent's exit code.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import msgpack
import zmq

from pilotfish import keys
from pilotfish.envpolicy import LAUNCHER_ENV

log = logging.getLogger("pilotfish.relay")

# MPI tags. Between one pair of ranks, messages arrive in the order they were sent (the receiver
# probes any tag), so "done" follows rank r's last message and "finish" follows rank 0's.
TAG_UP = 1       # r -> 0: one message from r's agent, for the server (msgpack list of frames)
TAG_DOWN = 2     # 0 -> r: one message from the server, for r's agent (msgpack list of frames)
TAG_DONE = 3     # r -> 0: r's agent has exited (msgpack exit code); nothing more comes from r
TAG_FINISH = 4   # 0 -> r: everything for r is forwarded; nothing more comes from 0

#: zmq poll timeout in ms. Nothing wakes a zmq poll when an MPI message arrives, so the loop
#: polls MPI after each timeout: the shortest one while traffic is recent (a reply follows a
#: request within milliseconds), then doubling up to the maximum while idle (~50 turns/s).
POLL_MIN_MS = 1
POLL_MAX_MS = 20
#: Seconds after the last message during which the loop keeps the shortest timeout.
HOT_SECONDS = 0.25
#: How long rank 0's DEALERs keep trying to deliver a departed agent's last messages (ms).
LINGER_MS = 5000
#: After its agent exits, a rank waits this long without a message from it before "done" (s).
DRAIN_QUIET = 0.1
#: Exit code of a rank whose agent could not be started at all.
NO_AGENT = 127
#: LAUNCHER_ENV (pilotfish.envpolicy): variables of the MPI launcher that must not reach the
#: agent and its tasks: an MPI program run as a task would otherwise take itself for a rank of
#: the relay's own MPI job.


def agent_command(endpoint: str, agent_args: list[str], home: str | None) -> list[str]:
    return [sys.executable, "-m", "pilotfish", *(["--home", home] if home else []), "pilot",
            "agent", "--server", endpoint, *agent_args]


def agent_env(rank: int, size: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_ENV)}
    env["PILOTFISH_RELAY_RANK"] = str(rank)
    env["PILOTFISH_RELAY_SIZE"] = str(size)
    return env


def _names_server(args: list[str]) -> bool:
    return any(a == "--server" or a.startswith("--server=") for a in args)


def run(server: str, agent_args: list[str], home: str | None = None) -> int:
    """Run this rank's node agent and relay for it; return the agent's exit code.

    Call it on every rank of MPI_COMM_WORLD, one rank per node. ``server`` is used by rank 0
    only; ``agent_args`` are options for ``pilotfish pilot agent`` (without ``--server``).
    """
    from mpi4py import MPI  # here, not at the top: the package must import without MPI

    if not logging.getLogger().handlers:  # the command line: nobody configured logging yet
        from pilotfish import console
        console.setup_logging()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    log.info("relay rank %d of %d on %s (pid %d)", rank, size, os.uname().nodename, os.getpid())
    if _names_server(agent_args):  # every rank sees the same arguments: all return here
        log.error("relay rank %d: give the server to the relay (--server before --), not to "
                  "the agents", rank)
        return 2
    if size == 1:
        log.warning("relay: MPI_COMM_WORLD has 1 rank, so there is nothing to relay and the "
                    "agent talks to the server itself (started without an MPI launcher, or "
                    "with the wrong PMI, e.g. srun without --mpi=pmi2?)")
    relay = _Relay(MPI, comm, server, list(agent_args), home)
    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, relay.on_signal)
        except ValueError:  # not the main thread: the launcher's signals reach the agent anyway
            pass
    try:
        return relay.run()
    except BaseException:
        log.exception("relay rank %d of %d failed: stopping its agent and aborting the MPI "
                      "job", rank, size)
        relay.stop_child()
        comm.Abort(1)
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        relay.cleanup()


class _Relay:
    def __init__(self, MPI, comm, server: str, agent_args: list[str], home: str | None) -> None:
        self.MPI = MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.server = server
        self.agent_args = agent_args
        self.home = home
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.sending: list = []           # (MPI request, buffer) not yet complete
        self.status = MPI.Status()
        self.child: subprocess.Popen | None = None
        self.code: int | None = None      # the agent's exit code, once it has exited
        self.exited_at = 0.0
        self.signals: list[int] = []      # received, not yet forwarded to the agent
        self.tmpdir: str | None = None
        self.up = self.down = 0           # messages relayed to the server, and from it
        self.up_bytes = self.down_bytes = 0
        self.dropped = 0
        self.hot_until = 0.0

    def next_timeout(self, busy: bool, timeout: int) -> int:
        now = time.monotonic()
        if busy:
            self.hot_until = now + HOT_SECONDS
        if now < self.hot_until:
            return POLL_MIN_MS
        return min(timeout * 2, POLL_MAX_MS)

    # -- the agent ---------------------------------------------------------------------------
    def start_child(self, endpoint: str) -> None:
        cmd = agent_command(endpoint, self.agent_args, self.home)
        try:
            self.child = subprocess.Popen(cmd, env=agent_env(self.rank, self.size),
                                          stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.error("relay rank %d: cannot start the node agent (%s): %s", self.rank,
                      cmd[0], exc)
            self.code = NO_AGENT
            self.exited_at = time.monotonic()
            return
        log.info("relay rank %d: agent pid %d, server %s", self.rank, self.child.pid, endpoint)

    def child_exited(self) -> bool:
        if self.code is not None:
            return True
        rc = self.child.poll()
        if rc is None:
            return False
        self.code = rc if rc >= 0 else 128 - rc
        self.exited_at = time.monotonic()
        (log.info if rc == 0 else log.error)("relay rank %d: agent exited with code %d",
                                             self.rank, self.code)
        return True

    def on_signal(self, signum, _frame) -> None:
        self.signals.append(signum)

    def forward_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if self.child is not None and self.code is None and self.child.poll() is None:
                log.info("relay rank %d: passing signal %d to the agent", self.rank, signum)
                self.child.send_signal(signum)

    def stop_child(self) -> None:
        if self.child is None or self.child.poll() is not None:
            return
        self.child.terminate()
        try:
            self.child.wait(15)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()

    # -- MPI ---------------------------------------------------------------------------------
    def isend(self, data: bytes, dest: int, tag: int) -> None:
        req = self.comm.Isend([data, self.MPI.BYTE], dest, tag)
        self.sending.append((req, data))  # the buffer must live until the send completes

    def test_sends(self) -> None:
        if self.sending:
            self.sending = [(r, b) for r, b in self.sending if not r.Test()]

    def receive(self, limit: int = 1000) -> list[tuple[int, int, bytes]]:
        """Messages that have arrived over MPI, as (source, tag, payload)."""
        MPI, st = self.MPI, self.status
        out = []
        while len(out) < limit:
            msg = self.comm.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, st)
            if msg is None:
                break
            buf = bytearray(st.Get_count(MPI.BYTE))
            msg.Recv([buf, MPI.BYTE])
            out.append((st.Get_source(), st.Get_tag(), bytes(buf)))
        return out

    def _send_zmq(self, sock: zmq.Socket, payload: bytes) -> None:
        try:
            sock.send_multipart(msgpack.unpackb(payload), zmq.NOBLOCK)
        except zmq.Again:  # no peer or a full queue: the agent protocol resends what matters
            self.dropped += 1

    # -- the loops ---------------------------------------------------------------------------
    def run(self) -> int:
        if self.rank == 0:
            self.run_root()
        else:
            self.run_remote()
        self.finish()
        return self.code

    def run_remote(self) -> None:
        """Rank r >= 1: agent <-> this DEALER <-> MPI <-> rank 0."""
        self.tmpdir = tempfile.mkdtemp(prefix="pilotfish-relay-")
        if len(self.tmpdir) > 90:  # sun_path holds ~107 bytes
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = tempfile.mkdtemp(prefix="pilotfish-relay-", dir="/tmp")
        endpoint = f"ipc://{self.tmpdir}/relay.sock"
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        self.poller.register(sock, zmq.POLLIN)
        self.start_child(endpoint)
        timeout = POLL_MIN_MS
        last_up = 0.0
        done_sent = finished = False
        while not (finished and not self.sending):
            busy = False
            if self.poller.poll(timeout):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    if done_sent:  # cannot happen: the agent has exited
                        continue
                    payload = msgpack.packb(frames, use_bin_type=True)
                    self.isend(payload, 0, TAG_UP)
                    self.up += 1
                    self.up_bytes += len(payload)
                    busy = True
                last_up = time.monotonic()
            for _src, tag, payload in self.receive():
                busy = True
                if tag == TAG_DOWN:
                    self.down += 1
                    self.down_bytes += len(payload)
                    if self.code is None:
                        self._send_zmq(sock, payload)
                elif tag == TAG_FINISH:
                    finished = True
            self.test_sends()
            self.forward_signals()
            if not done_sent and self.child_exited() and \
                    time.monotonic() - max(self.exited_at, last_up) >= DRAIN_QUIET:
                self.isend(msgpack.packb(self.code), 0, TAG_DONE)
                done_sent = True
            timeout = self.next_timeout(busy, timeout)
        sock.close()

    def curve(self):
        """The keys rank 0's DEALERs use, as its own agent finds them: $PILOTFISH_SERVER_KEY and
        $PILOTFISH_CLIENT_KEY (`pilot relay --server-key/--client-key` set them), else the
        home's. Without keys, the other ranks' agents are relayed in plain text (a CURVE
        server refuses them; rank 0's own agent fails with the reason)."""
        from pilotfish import settings
        from pilotfish.errors import PilotfishError
        try:
            return keys.client_curve(settings.home(self.home), self.server)
        except PilotfishError as exc:
            log.error("relay rank 0: %s", exc)
            return None

    def run_root(self) -> None:
        """Rank 0: its own agent talks to the server; one DEALER per other rank relays."""
        dealers: dict[int, zmq.Socket] = {}
        rank_of: dict[zmq.Socket, int] = {}
        tag = uuid.uuid4().hex[:12]
        curve = self.curve() if self.size > 1 else None
        for r in range(1, self.size):
            d = self.ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.ROUTING_ID, f"relay-{tag}-{r}".encode())
            d.setsockopt(zmq.LINGER, LINGER_MS)
            d.setsockopt(zmq.RECONNECT_IVL, 100)
            d.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            keys.apply_client(d, curve)
            d.connect(self.server)
            dealers[r] = d
            rank_of[d] = r
            self.poller.register(d, zmq.POLLIN)
        self.start_child(self.server)
        live = set(dealers)
        counts = {r: [0, 0] for r in dealers}  # rank -> [up, down] messages
        timeout = POLL_MIN_MS
        while live or not self.child_exited() or self.sending:
            busy = False
            if dealers:
                events = self.poller.poll(timeout)
            else:
                events = []
                time.sleep(timeout / 1000)
            for d, _ in events:
                r = rank_of[d]
                while True:
                    try:
                        frames = d.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    payload = msgpack.packb(frames, use_bin_type=True)
                    self.isend(payload, r, TAG_DOWN)
                    self.down += 1
                    self.down_bytes += len(payload)
                    counts[r][1] += 1
                    busy = True
            for src, tag_, payload in self.receive():
                busy = True
                if tag_ == TAG_UP:
                    d = dealers.get(src)
                    if d is not None:
                        self._send_zmq(d, payload)
                        self.up += 1
                        self.up_bytes += len(payload)
                        counts[src][0] += 1
                elif tag_ == TAG_DONE:
                    code = msgpack.unpackb(payload)
                    d = dealers.pop(src, None)
                    if d is not None:
                        self.poller.unregister(d)
                        del rank_of[d]
                        d.close()  # keeps its LINGER: the goodbye still goes out
                    live.discard(src)
                    self.isend(b"", src, TAG_FINISH)
                    log.info("relay rank 0: rank %d's agent exited with code %s after %d "
                             "messages to the server and %d from it; %d ranks to go", src,
                             code, *counts[src], len(live) + (self.code is None))
            self.test_sends()
            self.forward_signals()
            self.child_exited()
            timeout = self.next_timeout(busy, timeout)

    def finish(self) -> None:
        """Wait for every rank without spinning a core (an early rank may wait for hours)."""
        req = self.comm.Ibarrier()
        while not req.Test():
            self.forward_signals()
            time.sleep(0.02)
        log.info("relay rank %d of %d: done, agent exit %d; relayed %d messages (%d bytes) "
                 "to the server and %d (%d bytes) from it%s", self.rank, self.size, self.code,
                 self.up, self.up_bytes, self.down, self.down_bytes,
                 f"; dropped {self.dropped}" if self.dropped else "")

    def cleanup(self) -> None:
        if not self.ctx.closed:
            self.ctx.destroy(linger=LINGER_MS)  # open sockets are idle; closed ones linger
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
