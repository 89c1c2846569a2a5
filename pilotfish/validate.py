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
