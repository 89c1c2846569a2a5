"""Click parameter types shared by the CLI commands of every room (imported only by CLIs).

``PLAIN_INT`` and ``PLAIN_FLOAT`` take plain decimal numerals: ``10``, ``-3``, ``2.5e3``; not
``1_0``, `` 5``, ``٥``, ``nan`` or ``inf``, which click's ``int``/``float`` (Python's int() and
float()) accept. Integers must fit 64 bits, floats be finite."""
from __future__ import annotations

import click

from pilotfish.errors import ValidationError


class _Numeral(click.ParamType):
    """An int or float option that takes plain numerals only: click's own types use Python's
    int()/float(), which take ``1_0``, `` 5``, ``nan`` and ``inf``."""

    def __init__(self, kind: str, lo: float | None = None, hi: float | None = None) -> None:
        self.kind, self.lo, self.hi = kind, lo, hi
        self.name = "integer" if kind == "int" else "number"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = value
        else:
            from pilotfish.validate import check_float, check_int, echo, parse_numeral
            try:
                v = parse_numeral(str(value), self.kind, "value")
                v = check_int(v, "value") if self.kind == "int" else check_float(v, "value")
            except ValidationError:
                self.fail(f"{echo(str(value))} is not a valid {self.name} (plain digits"
                          + (", 64 bits" if self.kind == "int" else ", finite") + ")", param,
                          ctx)
        if (self.lo is not None and not v >= self.lo) or (self.hi is not None
                                                          and not v <= self.hi):
            self.fail(f"{v:g} is not in {self.lo if self.lo is not None else ''}.."
                      f"{self.hi if self.hi is not None else ''}", param, ctx)
        return v


PLAIN_INT = _Numeral("int")
PLAIN_FLOAT = _Numeral("float")


def plain_float(lo: float | None = None, hi: float | None = None) -> _Numeral:
    """A plain, finite number option within [lo, hi] (click's FloatRange takes nan and inf)."""
    return _Numeral("float", lo, hi)
