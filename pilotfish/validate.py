"""Checks for the names and paths users give us, shared by the server and the agents.

Names become directory names and argv items; none may carry a path separator, ``..``, a shell
metacharacter or a control character.
"""
from __future__ import annotations

import re

from .errors import ValidationError

#: How much of a refused value an error quotes: enough to recognize it, never the whole of a
#: 10 MB name (the error would be as big as the attack, in replies and in logs).
ECHO_CHARS = 80
#: The longest error text the server sends or logs; longer ones are cut (see :func:`cap`).
MAX_ERROR_CHARS = 2000
#: Integer ranges of what the database stores and the wire carries: msgpack and BIGINT columns
#: hold signed 64 bits, PostgreSQL INTEGER columns 32.
INT64 = (-2**63, 2**63 - 1)
INT32 = (-2**31, 2**31 - 1)
#: Plain numerals as the CLI and string parameter values may give them: no ``_`` (Python's
#: int()/float() take ``1_0``), no spaces, no other digits than 0-9, no nan/inf.
INT_NUMERAL = re.compile(r"[+-]?[0-9]+")
FLOAT_NUMERAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, shortened to about ``limit`` characters with the
    size of the whole: ``'aaaa…' (10485760 characters)``."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}… ({len(value)} {unit})"
    try:
        text = repr(value)
    except Exception:  # a repr of our own types never fails; be safe for anything else
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        return f"{text[:limit]}… ({len(text)} characters)"
    return text


def cap(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """A message cut to ``limit`` characters, saying how long it was: the last guard on every
    error the server sends and on log lines that quote input."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def echo_keys(keys, quote: bool = False) -> str:
    """Unknown keys for an error: ``a, b, c`` (or ``'a', 'b'``), shortened like :func:`echo`."""
    keys = sorted(map(str, keys))
    return cap(", ".join(map(repr, keys)) if quote else ", ".join(keys), ECHO_CHARS)


def check_int(value: object, what: str, lo: int = INT64[0], hi: int = INT64[1]) -> int:
    """An int (not a bool) in lo..hi, or a one-line ValidationError naming the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be an integer, got {echo(value)}")
    if not lo <= value <= hi:
        raise ValidationError(f"{what} must be an integer {lo}..{hi}, got {echo(value)}")
    return value


def check_float(value: object, what: str) -> float:
    """A finite number (no nan or inf: JSON, msgpack and PostgreSQL treat them badly)."""
    import math
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{what} must be a number, got {echo(value)}")
    if isinstance(value, int):
        check_int(value, what)
    elif not math.isfinite(value):
        raise ValidationError(f"{what} must be a finite number, got {value!r}")
    return value


def parse_numeral(text: str, kind: str, what: str) -> int | float:
    """A plain decimal numeral as an int or a float (``kind``); ``1_0``, `` 5``, ``٥``,
    ``nan`` and ``inf`` are refused."""
    rx = INT_NUMERAL if kind == "int" else FLOAT_NUMERAL
    if len(text) > 64 or not rx.fullmatch(text):
        if kind == "float" and text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise ValidationError(f"{what} must be a finite float, got {echo(text)}")
        raise ValidationError(f"{what} must be {kind} (plain digits), got {echo(text)}")
    return int(text) if kind == "int" else float(text)


def wire_safe(value: object) -> object:
    """``value`` with every integer past 64 bits turned into its decimal string, so a reply
    that holds one (stored by an older version that did not check) can still be sent: msgpack
    refuses such integers and the whole reply would fail."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if INT64[0] <= value <= 2**64 - 1 else str(value)
    if isinstance(value, dict):
        return {k: wire_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [wire_safe(v) for v in value]
    return value


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
#: Relative path below a job's workdir: name components joined by "/".
_PART_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,254}")


def check_name(value: object, what: str) -> str:
    """A name: letters, digits and ``_ . + -``, starting with a letter or digit, <= 128 chars."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        raise ValidationError(f"{what} {echo(value)} is not a valid name (letters, digits and "
                              "'_.+-', starting with a letter or digit, at most 128 characters)")
    return value


def check_relpath(value: object, what: str) -> str:
    """A relative path that stays below its base: no ``..``, no leading ``/``, safe characters."""
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise ValidationError(f"{what} must be a non-empty relative path")
    if value.startswith("/"):
        raise ValidationError(f"{what} {echo(value)} must be relative to the job's workdir, "
                              "not absolute")
    parts = value.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValidationError(f"{what} {echo(value)} may not contain empty, '.' or '..' parts")
        if not _PART_RE.fullmatch(part):
            raise ValidationError(f"{what} {echo(value)} has a character outside letters, digits "
                                  "and '_.+-'")
    return value


ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_command(argv: object) -> None:
    """A command for a launcher or runtime: a non-empty tuple of strings without NUL."""
    if not isinstance(argv, tuple) or not argv:
        raise ValidationError("argv must be a non-empty tuple of strings (the command)")
    if any(not isinstance(a, str) for a in argv):
        raise ValidationError("every argv item must be a string")
    if not argv[0]:
        raise ValidationError("argv[0] (the program) may not be empty")
    if any("\0" in a for a in argv):
        raise ValidationError("argv items may not contain a NUL byte")


def check_env_pairs(env: object) -> None:
    """(name, value) pairs a launcher or runtime passes on: identifiers, each once, values
    without NUL or line breaks (they end up inside options)."""
    if not isinstance(env, tuple):
        raise ValidationError("env must be a tuple of (name, value) pairs")
    seen: set[str] = set()
    for pair in env:
        if not (isinstance(pair, tuple) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise ValidationError(f"env item {echo(pair)} is not a (name, value) pair of strings")
        name, value = pair
        if not ENV_NAME_RE.fullmatch(name):
            raise ValidationError(f"env name {echo(name)} is not an identifier (letters, digits "
                                  "and '_', not starting with a digit)")
        if name in seen:
            raise ValidationError(f"env name {echo(name)} is given twice")
        seen.add(name)
        if "\0" in value or "\n" in value or "\r" in value:
            raise ValidationError(f"env value of {name} may not contain NUL or a line break")
