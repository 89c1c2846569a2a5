"""The orders a job list may be sorted in, shared by the server (SQL), the CLI and the web.

A sort is a name from :data:`SORTS`, ``-`` in front for descending (``-ended``: the latest
end first). Paging is by keyset: the next page starts after the last row's
``[value, id]`` (:func:`cursor_of`), so a page deep in a million jobs costs one index seek.
"""
from __future__ import annotations

from typing import Any

from .errors import ValidationError
from .validate import echo

#: sort name -> the job row's field that holds its value (what a job list returns).
SORTS = {"id": "id", "state": "state", "app": "application", "name": "name",
         "updated": "state_time", "ended": "ended"}


def parse(sort: Any) -> tuple[str, bool]:
    """(name, descending) of a sort; anything not on the list is a one-line error."""
    if not isinstance(sort, str) or sort.lstrip("-") not in SORTS or sort.startswith("--"):
        raise ValidationError(f"unknown sort {echo(sort)}; sorts are "
                              f"{', '.join(SORTS)} (a leading - for descending)")
    return sort.lstrip("-"), sort.startswith("-")


def cursor_of(row: dict, sort: str) -> Any:
    """What to pass as ``after`` to get the page after ``row``: its id when sorting by id,
    else [its value, its id]."""
    name, _ = parse(sort)
    return row["id"] if name == "id" else [row[SORTS[name]], row["id"]]
