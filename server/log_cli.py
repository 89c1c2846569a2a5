"""``pilotfish job log``: a job's output, while it runs and after, from the server.

Agents ship their tasks' job.out and job.err through the server (pilot/output.py,
server/output.py); this command asks for it (op ``job_log``) and, with ``-f``, asks again every
half second for what is new until the job is final. What the task wrote is shown as text with
control characters escaped (``\\x1b``: a terminal escape sequence in the output is shown, never
acted on; invalid UTF-8 as U+FFFD), or as the very bytes with ``--raw``. Notes (the rest of the
file stays on the node, the job never ran, ...) go to standard error, so standard output is the
output alone.
"""
from __future__ import annotations

import codecs
import sys
import time

import click

from pilotfish import console
from pilotfish.validate import INT64

from .cli import CTX, PLAIN_INT, client_of, json_option
from .job_cli import job_group

#: Seconds between two asks of ``-f``.
FOLLOW_EVERY = 0.5
#: Seconds ``-f`` waits, once the job is final, for the last of its output (an agent ships the
#: rest of a long output after the end, at its rate).
FOLLOW_GRACE = 30.0


class _Writer:
    """Writes output to standard output: escaped text, or the bytes (``raw``)."""

    def __init__(self, raw: bool) -> None:
        self.raw = raw
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.wrote = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.wrote += len(data)
        if self.raw:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        self._text(self.decoder.decode(data))

    def hole(self, n: int) -> None:
        note = f"[... {n} bytes of output were not stored ...]"
        if self.raw:
            _note(note)
        else:
            self.finish()
            self._text(f"\n{note}\n")

    def finish(self) -> None:
        if not self.raw:
            rest = self.decoder.decode(b"", final=True)
            self.decoder.reset()
            if rest:
                self._text(rest)

    @staticmethod
    def _text(text: str) -> None:
        """Escaped text in the terminal's encoding (U+FFFD and the like as \\ufffd where it
        has none), never an encoding error."""
        out = sys.stdout
        out.flush()
        out.buffer.write(console.plain(text).encode(out.encoding or "utf-8",
                                                    errors="backslashreplace"))
        out.buffer.flush()


def _note(text: str) -> None:
    console.err.print(text, markup=False, highlight=False)


def _where(r: dict) -> str:
    path = console.plain(r.get("path")) or "its workdir"
    node = console.plain(r.get("node") or r.get("host")) or "the node that ran it"
    return f"{path} on node {node}"


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


@job_group.command("log", context_settings=CTX)
@click.argument("job_id", type=PLAIN_INT)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the job is "
              "final (then print the rest and exit).")
@click.option("--err", is_flag=True, help="Its standard error (job.err), not its standard "
              "output (job.out).")
@click.option("--tail", type=click.IntRange(0), metavar="N", help="Only the last N lines.")
@click.option("--raw", is_flag=True, help="The bytes as the task wrote them, terminal escape "
              "sequences and all (default: control characters shown as \\x1b, never acted on).")
@json_option
@click.pass_context
def job_log(ctx, job_id, follow, err, tail, raw, as_json) -> None:
    """A job's output, wherever its agent runs: what the server stored of the task's job.out
    (or job.err), up to the server's cap per attempt (the rest stays in the workdir, and this
    says where). Example: pilotfish job log 42 -f --tail 20"""
    if as_json and follow:
        raise click.UsageError("--json prints what is stored now; it does not go with -f")
    stream = "err" if err else "out"
    fname = "job.err" if err else "job.out"
    if tail is not None:
        tail = min(tail, INT64[1])  # more lines than any output has: all of it
    c = client_of(ctx)
    r = c.job_log(job_id, stream, tail=tail)
    if as_json:
        text = b"".join(d for _, d in r.pop("pieces")).decode(errors="replace")
        return console.print_json({**r, "text": text})
    w = _Writer(raw)
    attempt = r["attempt"]
    told_waiting = False
    final_since = None
    cursor = r["pieces"][0][0] if tail is not None and r["pieces"] else 0
    while True:
        if r["attempt"] is not None and attempt is not None and r["attempt"] != attempt:
            # retried: a new attempt's output starts over
            w.finish()
            _note(f"--- attempt {r['attempt']} of job {job_id} ---")
            attempt, cursor = r["attempt"], 0
            r = c.job_log(job_id, stream, after=0)
            continue
        attempt = r["attempt"] if r["attempt"] is not None else attempt
        for pos, data in r["pieces"]:
            if pos > cursor:
                w.hole(pos - cursor)
            w.write(data)
            cursor = pos + len(data)
        if not follow:
            break
        if r["attempts"] == 0 and not r["final"] and not told_waiting:
            _note(f"job {job_id} has not run yet ({r['state']}): waiting for it to run")
            told_waiting = True
        if r["final"]:
            if r["complete"]:
                break
            if final_since is None:
                final_since = time.monotonic()
            elif time.monotonic() - final_since > FOLLOW_GRACE:
                break
        time.sleep(FOLLOW_EVERY)
        r = c.job_log(job_id, stream, after=max(cursor, r["next"]))
    w.finish()
    _end_notes(job_id, r, fname, w.wrote, follow)


def _end_notes(job_id: int, r: dict, fname: str, wrote: int, follow: bool) -> None:
    """What the output alone does not say: why there is none, where the rest is."""
    if r["attempts"] == 0:
        if r["final"]:
            _note(f"job {job_id} never ran ({r['state']}): it has no output")
        else:
            _note(f"job {job_id} has not run yet ({r['state']}): no output yet")
        return
    if r["attempt"] is not None and r["attempt"] != r["attempts"]:
        _note(f"(this is the output of attempt {r['attempt']}; attempt {r['attempts']} has "
              "stored none yet)")
    if r["capped"]:
        more = r["size"] - r["stored"] if r.get("size") is not None else None
        _note(f"[{fname} is longer than the {_size(r['cap'])} the server keeps of it: the rest"
              f"{f' ({_size(more)} more)' if more else ''} is in {_where(r)}]")
    elif r["final"] and r["attempt"] is not None and not r["eof"] and not r["complete"]:
        _note(f"[the rest of {fname} is still on its way from node "
              f"{console.plain(r.get('node')) or '?'}: ask again, or follow it with -f]")
    elif r["final"] and r["attempt"] is not None and not r["eof"]:
        _note(f"[the task ended before all of its {fname} reached the server: the rest may be "
              f"in {_where(r)}]")
    elif r["final"] and not r["stored"]:
        _note(f"job {job_id} wrote nothing to {fname}")
    elif not r["stored"] and not follow:
        _note(f"job {job_id} has stored no {fname} yet ({r['state']})")
