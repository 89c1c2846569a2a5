"""The pilotfish wire protocol: one versioned format for agents, clients and site agents.

Every message is a single ZeroMQ frame holding a msgpack map ``{"v": VERSION, "k": KIND, ...}``.
:func:`decode` checks the version, the kind and every field's type before any handler sees the
message, so a handler can trust its input; anything else raises :class:`ProtocolError` with a
one-line reason that the server sends back in an ``error`` message.

Conversation, agent side (DEALER, routing id = agent id)::

    agent  -> hello   {who am I, my resources, tasks I am still running}
    server -> welcome {heartbeat period, lease, epoch, tasks of mine that are no longer mine}
    agent  -> update  {useq, state updates, my demand, last task batch seen, task output}
                                                                    (also the heartbeat)
    server -> tasks   {seq, tasks, refused updates, uack}   (answers every update; also pushed
                                                             whenever new work fits the demand)
    server -> cancel  {jobs to stop}                                          (killed by a user)
    agent  -> bye     {useq, updates, leases handed back}
    server -> stopping {epoch, grace}      (the server stops on purpose: leave after ``grace``
                                            seconds unless a server welcomes you again)
    server -> nowork  {seq, epoch}         (to an agent that asked for it in its hello: it holds
                                            nothing and no queued or pending job fits it; it
                                            may leave now if it saw task batch ``seq``)

An agent keeps its updates until a ``tasks`` message acknowledges their ``useq``, and resends
them after a reconnect; the server applies an update for (job, attempt, state) at most once.

Fencing: a lease's token is (epoch, job, attempt). The epoch counts server starts; an agent
takes tasks only from the epoch that welcomed it and the server answers an update of another
epoch with "say hello"; the attempt grows with every lease of a job and an update for an attempt
that is not the job's current lease is refused. The newest ``uack`` (of ``tasks`` or
``welcome``) tells the agent which of its messages the server received alive, so from when (its
own clock) its leases run; with no renewal for a lease minus a margin it stops its tasks.

Client side: ``request {rid, op, args}`` -> ``reply {rid, ok, result, error, code}``.
"""
from __future__ import annotations

import math
from typing import Any

import msgpack

from .errors import ProtocolError

VERSION = 1
#: The server's ZMQ_MAXMSGSIZE: a peer that sends more is disconnected by libzmq itself.
MAX_MESSAGE_BYTES = 64 * 2**20

# -- message kinds -------------------------------------------------------------------------
HELLO = "hello"
UPDATE = "update"
BYE = "bye"
REQUEST = "request"
WELCOME = "welcome"
TASKS = "tasks"
CANCEL = "cancel"
REPLY = "reply"
ERROR = "error"
#: Server -> agent, optional: an older agent logs one "bad message" line for it and carries on.
STOPPING = "stopping"
#: Server -> agent, only to agents whose hello set ``leave_idle`` (see server/drain.py).
NOWORK = "nowork"

_NONE = type(None)
_NUM = (int, float)
_ANY = object

# A schema maps field -> accepted types; a field whose types include NoneType may be omitted.
SCHEMAS: dict[str, dict[str, tuple]] = {
    HELLO: {"agent": (str,), "host": (str,), "pid": (int,), "site": (str, _NONE),
            "pilot": (str, _NONE), "cores": (list,), "gpus": (list,), "memory": (int,),
            "time_left": (*_NUM, _NONE), "running": (list,), "ack": (int,),
            # optional: the node as the launcher names it, its cores (affinity self-check),
            # and how this pilot launches multi-rank jobs
            "node": (str, _NONE), "node_cores": (int, _NONE), "launcher": (str, _NONE),
            "mpi": (str, _NONE),
            # optional: a number from the agent's update sequence, echoed in the welcome, so the
            # agent knows which of its hellos renewed its leases (fencing)
            "useq": (int, _NONE),
            # optional: tell me when no work is left for me (``nowork``): I leave then
            "leave_idle": (bool, _NONE)},
    # optional "epoch": the server start that welcomed the agent (the fencing token's first
    # part); a server of another epoch answers "say hello"
    UPDATE: {"agent": (str,), "useq": (int,), "updates": (list,), "demand": (dict,),
             "ack": (int,), "epoch": (int, _NONE),
             # optional: pieces of running or just ended tasks' job.out/job.err (OUTPUT_CHUNK
             # each; see pilotfish.pilot.output), acknowledged with the update's useq
             "output": (list, _NONE)},
    BYE: {"agent": (str,), "useq": (int,), "updates": (list,), "released": (list,),
          "epoch": (int, _NONE),
          # optional: the last task batch the agent saw; leases of later batches never reached
          # it (sent as it left) and go back to the queue without counting an attempt
          "ack": (int, _NONE)},
    REQUEST: {"rid": (int,), "op": (str,), "args": (dict,)},
    WELCOME: {"agent": (str,), "heartbeat": _NUM, "revoke": (list,),
              # optional: seconds of silence after which the server requeues the agent's jobs
              # (the agent's guard fences its tasks before that)
              "lease": (*_NUM, _NONE),
              # optional: this start of the server, and the useq of the hello answered
              "epoch": (int, _NONE), "uack": (int, _NONE),
              # optional: ship task output: at most this many bytes of each of a task's
              # job.out and job.err per attempt, at most output_rate bytes a second in all
              # (absent: an older server; ship nothing)
              "output_cap": (int, _NONE), "output_rate": (int, _NONE)},
    # optional "epoch": the server start that leased these tasks (an agent takes tasks only
    # from the epoch that welcomed it)
    TASKS: {"seq": (int,), "tasks": (list,), "refused": (list,), "uack": (int,),
            "epoch": (int, _NONE)},
    CANCEL: {"jobs": (list,)},
    REPLY: {"rid": (int,), "ok": (bool,), "result": (_ANY,), "error": (str, _NONE),
            "code": (str, _NONE)},
    ERROR: {"error": (str,), "rid": (int, _NONE)},
    # the server is stopping on purpose (`server stop`, SIGTERM): its epoch, and the seconds
    # after which the agent leaves unless a server welcomes it again (a restart)
    STOPPING: {"epoch": (int, _NONE), "grace": (*_NUM, _NONE)},
    # no queued or pending job fits you and you hold nothing: the last task batch we sent you
    NOWORK: {"seq": (int,), "epoch": (int, _NONE)},
}

#: The agent's wish list: room for more work, in cores and GPUs, with the largest task shape it
#: can ever run and the seconds it has left (None: no limit).
DEMAND = {"cores": (int,), "gpus": (int,), "max_cores": (int,), "max_gpus": (int,),
          "time_left": (*_NUM, _NONE)}

#: One job's progress as an agent saw it: the states it passed through, in order, for one attempt.
TASK_UPDATE = {"job": (int,), "attempt": (int,), "states": (list,), "exit": (int, _NONE),
               "start": (*_NUM, _NONE), "end": (*_NUM, _NONE), "msg": (str, _NONE),
               # the outputs were handed to the site stager: the attempt ends in POSTPROCESSED
               "handed": (bool, _NONE)}

#: One unit of work handed to an agent. ``argv`` is executed directly, never by a shell.
TASK = {"job": (int,), "attempt": (int,), "name": (str,), "argv": (list,), "env": (dict,),
        "workdir": (str,), "cores": (int,), "gpus": (int,), "timeout": (*_NUM, _NONE),
        "pre": (list, _NONE), "post": (list, _NONE), "input_url": (str, _NONE),
        "output_url": (str, _NONE), "launch": (dict, _NONE), "container": (dict, _NONE),
        # the input a site stager put in the staging directory (file name): placed, not staged
        "staged": (str, _NONE),
        # a site stager puts the remote outputs: hand them to the staging directory instead
        "site_out": (bool, _NONE)}

#: A task's ``launch``: present when the task is several ranks (an MPI job); the agent starts it
#: with its pilot's launcher on ``hosts`` (node names, this node first), ``cores`` per node.
LAUNCH = {"nodes": (int,), "ranks_per_node": (int,), "cpus_per_rank": (int,),
          "gpus_per_rank": (int,), "hosts": (list,)}

#: A task's ``container``: the image to run it in, and the runtime (None: the agent's own).
CONTAINER = {"runtime": (str, _NONE), "image": (str,)}

#: A piece of a task's output (``stream``: "out" for job.out, "err" for job.err) read at byte
#: ``offset`` of the file, which had ``size`` bytes then, in ``path`` on the agent's node.
#: ``eof``: the task has ended and this is the last piece the agent will send (the file may be
#: longer: past the cap the rest stays in the workdir).
OUTPUT_CHUNK = {"job": (int,), "attempt": (int,), "stream": (str,), "offset": (int,),
                "data": (bytes,), "size": (int,), "eof": (bool,), "path": (str,)}
OUTPUT_STREAMS = ("out", "err")

#: A job and attempt pair, as in ``running``, ``released``, ``revoke`` and ``cancel``.
JOB_ATTEMPT = {"job": (int,), "attempt": (int,)}


#: Integer fields that may be 64-bit; every other integer must fit 32 bits (a database INTEGER).
INT64_FIELDS = frozenset({"job", "memory", "seq", "useq", "ack", "uack", "rid", "offset",
                          "size", "output_cap", "output_rate"})
_INT32 = 2**31
#: Free text that may hold anything a task printed (NUL included); the server stores it cleaned.
FREE_TEXT_FIELDS = frozenset({"msg", "error"})
_INT64 = 2**63


def check_fields(schema: dict[str, tuple], data: Any, where: str) -> dict:
    """Check a map against a schema; return it unchanged or raise ProtocolError.

    Integers are range-checked too, so no value off the wire can overflow a database column.
    """
    problem = _problem(schema, data)
    if problem is not None:
        raise ProtocolError(f"{where}: {problem}")
    return data


def check_items(schema: dict[str, tuple], items: list, where: str) -> list[dict]:
    """Check every map of a list field against a schema."""
    for i, item in enumerate(items):
        problem = _problem(schema, item)
        if problem is not None:
            raise ProtocolError(f"{where}[{i}]: {problem}")
    return items


#: schema -> (the schema, its keys, one tuple per field): see _compiled
_COMPILED: dict[int, tuple] = {}


def _compiled(schema: dict[str, tuple]) -> tuple:
    """A schema's checks worked out once (schemas are module constants; every task update of a
    busy server goes through here): per field its key, its types, whether it may be missing,
    whether anything goes, whether bool is allowed, its integer limit, whether NUL may occur."""
    c = _COMPILED.get(id(schema))
    if c is None or c[0] is not schema:
        c = (schema, frozenset(schema), tuple(
            (key, types, _NONE in types or _ANY in types, _ANY in types, bool in types,
             _INT64 if key in INT64_FIELDS else _INT32, key in FREE_TEXT_FIELDS)
            for key, types in schema.items()))
        _COMPILED[id(schema)] = c
    return c


def _problem(schema: dict[str, tuple], data: Any) -> str | None:
    """What is wrong with ``data`` against ``schema`` (plain words), or None."""
    if not isinstance(data, dict):
        return f"expected a map, got {type(data).__name__}"
    _, keys, fields = _compiled(schema)
    if not keys.issuperset(data):
        return f"unknown field {next(k for k in data if k not in keys)!r}"
    for key, types, optional, anything, bool_ok, limit, free in fields:
        if key not in data:
            if optional:
                continue
            return f"missing field {key!r}"
        if anything:
            continue
        value = data[key]
        t = type(value)
        # bool is an int in Python; a protocol int must not be a bool and vice versa
        if t is bool and not bool_ok:
            return f"field {key!r} must be {_names(types)}, got bool"
        if not isinstance(value, types):
            return f"field {key!r} must be {_names(types)}, got {t.__name__}"
        if t is int:
            if not -limit <= value < limit:
                return f"field {key!r} is out of range"
        # nan and inf: JSON has no such numbers, comparisons with them are always false
        elif t is float:
            if not math.isfinite(value):
                return f"field {key!r} must be a finite number"
        # PostgreSQL refuses NUL in text: one in an agent's host name made the server's next
        # write fail (and a failed write outside a handler ended the server)
        elif t is str and not free and "\x00" in value:
            return f"field {key!r} must not contain a NUL byte"
    return None


def _names(types: tuple) -> str:
    return " or ".join("null" if t is _NONE else t.__name__ for t in types)


def encode(kind: str, **fields: Any) -> bytes:
    """One frame for a message of ``kind``. Senders are trusted code; no validation here."""
    fields["v"] = VERSION
    fields["k"] = kind
    return msgpack.packb(fields, use_bin_type=True)


def decode(frame: bytes, expect: tuple[str, ...] | None = None) -> tuple[str, dict]:
    """Parse and validate one frame; return ``(kind, fields)`` without the envelope."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        data = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types for bad bytes
        raise ProtocolError(f"undecodable message ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ProtocolError("message is not a map")
    version = data.pop("v", None)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r} not supported (this server speaks "
                            f"{VERSION})")
    kind = data.pop("k", None)
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if expect is not None and kind not in expect:
        raise ProtocolError(f"unexpected message kind {kind!r}")
    return kind, check_fields(SCHEMAS[kind], data, kind)
