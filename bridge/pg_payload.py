"""One pulse's payload (a NOTIFY payload, or a catch-up row as JSON) checked before it becomes a
job: its size, JSON, only the template's fields, plain values, a 64-bit integer id.

The server checks the job again (parameter types, paths in the data roots): this module only
refuses what must never reach it or cannot be named otherwise: the whole of an oversized or
broken payload, nested data, unknown fields, and integers msgpack cannot carry.
"""
from __future__ import annotations

import json
import math
from typing import Any

from pilotfish.errors import ValidationError
from pilotfish.validate import INT64, echo, echo_keys

from .pg_template import Template


class Refused(ValidationError):
    """A payload that will never make a job; ``pulse_id`` when it could be read."""

    def __init__(self, message: str, pulse_id: int | None = None) -> None:
        super().__init__(message)
        self.pulse_id = pulse_id


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


class _Twice(ValueError):
    pass


def _unique(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = {k for k in keys if keys.count(k) > 1}
    if twice:  # json.loads would keep the last silently: which one did the producer mean?
        raise _Twice(f"field(s) {echo_keys(twice, True)} given twice")
    return dict(pairs)


def parse_id(text: str, tmpl: Template) -> tuple[int, dict]:
    """``(pulse id, the JSON object)``: the checks every payload passes, or :class:`Refused`.
    With a catch-up table this is all a NOTIFY needs: the row has the fields."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > tmpl.max_payload_bytes:
        raise Refused(f"payload is {size:,} bytes; this source takes at most "
                      f"{tmpl.max_payload_bytes:,} (max_payload_bytes)")
    try:
        doc = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique)
    except _Twice as exc:
        raise Refused(f"payload gives {exc}") from None
    except (ValueError, RecursionError) as exc:  # ValueError: also ints of > 4,300 digits
        raise Refused(f"payload is not JSON: {' '.join(str(exc).split())[:200]} "
                      f"(payload {echo(text, 60)})") from None
    if not isinstance(doc, dict):
        raise Refused(f"payload must be a JSON object of fields, got {type(doc).__name__} "
                      f"{echo(doc, 60)}")
    pulse_id = doc.get(tmpl.id_field)
    if isinstance(pulse_id, bool) or not isinstance(pulse_id, int) or \
            not 0 <= pulse_id <= INT64[1]:
        raise Refused(f"id field {tmpl.id_field!r} must be an integer 0..{INT64[1]}, got "
                      f"{echo(pulse_id, 60)}")
    return pulse_id, doc


def parse(text: str, tmpl: Template) -> tuple[int, dict]:
    """``(pulse id, fields)`` of a payload, or :class:`Refused` with a one-line reason."""
    pulse_id, doc = parse_id(text, tmpl)
    unknown = doc.keys() - tmpl.fields.keys()
    if unknown:
        raise Refused(f"unknown field(s) {echo_keys(unknown, True)}; this source takes "
                      f"{', '.join(tmpl.fields)}", pulse_id)
    fields = {}
    for k, v in doc.items():
        if v is None:
            continue  # null: not given (a nullable column of the catch-up table)
        if isinstance(v, bool) or isinstance(v, str):
            if isinstance(v, str) and "\x00" in v:
                raise Refused(f"field {k!r} contains a NUL character", pulse_id)
        elif isinstance(v, int):
            if not INT64[0] <= v <= INT64[1]:
                raise Refused(f"field {k!r} = {echo(v, 40)} is past 64 bits: integers are "
                              f"{INT64[0]}..{INT64[1]}", pulse_id)
        elif isinstance(v, float):
            if not math.isfinite(v):  # 1e999 reads as inf
                raise Refused(f"field {k!r} must be a finite number, got {v!r}", pulse_id)
        else:
            raise Refused(f"field {k!r} must be a number, a string or a boolean, got "
                          f"{'a list' if isinstance(v, list) else 'an object'}", pulse_id)
        fields[k] = v
    return pulse_id, fields
