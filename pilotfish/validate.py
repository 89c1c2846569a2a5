"""Checks for the names and paths users give us, shared by the server and the agents.

Names become directory names and argv items; none may carry a path separator, ``..``, a shell
metacharacter or a control character.
"""
from __future__ import annotations

import re

from .errors import ValidationError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
#: Relative path below a job's workdir: name components joined by "/".
_PART_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,254}")


def check_name(value: object, what: str) -> str:
    """A name: letters, digits and ``_ . + -``, starting with a letter or digit, <= 128 chars."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        raise ValidationError(f"{what} {value!r} is not a valid name (letters, digits and "
                              "'_.+-', starting with a letter or digit, at most 128 characters)")
    return value


def check_relpath(value: object, what: str) -> str:
    """A relative path that stays below its base: no ``..``, no leading ``/``, safe characters."""
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise ValidationError(f"{what} must be a non-empty relative path")
    if value.startswith("/"):
        raise ValidationError(f"{what} {value!r} must be relative to the job's workdir, "
                              "not absolute")
    parts = value.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValidationError(f"{what} {value!r} may not contain empty, '.' or '..' parts")
        if not _PART_RE.fullmatch(part):
            raise ValidationError(f"{what} {value!r} has a character outside letters, digits "
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
            raise ValidationError(f"env item {pair!r} is not a (name, value) pair of strings")
        name, value = pair
        if not ENV_NAME_RE.fullmatch(name):
            raise ValidationError(f"env name {name!r} is not an identifier (letters, digits "
                                  "and '_', not starting with a digit)")
        if name in seen:
            raise ValidationError(f"env name {name!r} is given twice")
        seen.add(name)
        if "\0" in value or "\n" in value or "\r" in value:
            raise ValidationError(f"env value of {name} may not contain NUL or a line break")
