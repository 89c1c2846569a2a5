"""Job messages as a production system sends them (the seed's format), before the server sees
them: size caps, JSON, one job or a list, and the idempotency key of each job. Pure: no AMQP.

A message's body is one job map or a list of them, or one workflow map (the seed's Argo job: a
map with ``subjobs``, each a job message; see server/workflows.py), with the seed's keys (name, description,
site, argo_job_id, queue, project, wall_time_minutes, num_nodes, processes_per_node,
scheduler_config, application, config_file, input_url, output_url) plus
``job_status_routing_key``; the keys and names are those of ``job add`` (the server checks every
value, the bridge passes them on as they came).
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pilotfish.validate import echo

#: Bytes of one message body the bridge reads: a list of 1,000 seed jobs is about 300 kB; a
#: larger body goes to the dead-letter queue before it is parsed.
MAX_BODY_BYTES = 16 * 2**20
#: Jobs of one message: the server adds at most this many in one request (all or none).
MAX_JOBS_PER_MESSAGE = 100_000
#: A message id used as it is in intake keys (else its digest is): printable, short.
_PLAIN_ID = re.compile(r"[\x21-\x7e]{1,200}")


class Poison(ValueError):
    """A message that can never become jobs: its one-line reason goes to the dead-letter queue."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number pilotfish takes")


def parse_body(body: bytes, max_bytes: int = MAX_BODY_BYTES,
               max_jobs: int = MAX_JOBS_PER_MESSAGE) -> list[dict]:
    """The job maps of a body, or Poison saying why not (size first: a 50 MB body is refused
    before a byte of it is parsed)."""
    if len(body) > max_bytes:
        raise Poison(f"message body of {len(body):,} bytes; the bridge takes at most "
                     f"{max_bytes:,} per message (send lists of fewer jobs)")
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise Poison("message body is JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Poison(f"message body is not JSON: {echo(str(exc), 160)}") from None
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise Poison(f"message body must be a job map or a list of them, got a JSON "
                     f"{type(data).__name__}")
    if not data:
        raise Poison("message body is an empty list: no jobs")
    if len(data) > max_jobs:
        raise Poison(f"a list of {len(data):,} jobs; at most {max_jobs:,} per message "
                     "(split it into several messages)")
    for i, job in enumerate(data):
        if not isinstance(job, dict):
            raise Poison(f"job #{i + 1} is a JSON {type(job).__name__}, not a job map")
        if "subjobs" in job:
            raise Poison(f"job #{i + 1} has subjobs: a workflow is sent alone, one per message, "
                         "not in a list")
    return data


def workflow_of(jobs: list[dict]) -> dict | None:
    """The workflow a parsed body holds (a single map with ``subjobs``), else None."""
    return jobs[0] if len(jobs) == 1 and "subjobs" in jobs[0] else None


def add_workflow_key(workflow: dict, key: str) -> dict:
    """A workflow's idempotency key: the producer's own ``intake_key``, else
    ``amqp:<message key>:workflow``; the server adds no second workflow with a stored key."""
    if workflow.get("intake_key") is None:
        workflow["intake_key"] = f"amqp:{key}:workflow"
    return workflow


def message_key(message_id: str | None, body: bytes) -> str:
    """What identifies a message across redeliveries: its AMQP message_id, else the digest of
    its body (a producer that sends the same body twice on purpose gives each a message_id)."""
    if message_id:
        if _PLAIN_ID.fullmatch(message_id):
            return f"id:{message_id}"
        return "idsha:" + hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()
    return "sha:" + hashlib.sha256(body).hexdigest()


def add_intake_keys(jobs: list[dict], key: str) -> list[dict]:
    """Each job with its idempotency key: the producer's own ``intake_key`` if it gave one,
    else ``amqp:<message key>:<index>``. The server adds no second job with a stored key."""
    for i, job in enumerate(jobs):
        if job.get("intake_key") is None:
            job["intake_key"] = f"amqp:{key}:{i}"
    return jobs
