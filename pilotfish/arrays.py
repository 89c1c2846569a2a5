"""Job arrays and parameter sweeps: index specs, the cartesian product, and placeholder filling.

Pure functions shared by the CLI (to count and split an array before sending it) and the server
(which expands each request itself, so a 100,000-job array travels as one small template). No
element list is ever built whole: element ``n`` of a spec or of a product is computed from ``n``,
so a hostile ``1-1000000000`` costs nothing before it is refused.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

from .errors import ValidationError

#: Elements in one array or sweep (all requests together).
MAX_ELEMENTS = 1_000_000
#: Elements the server expands in one request (its MAX_JOBS_PER_REQUEST); clients send larger
#: arrays in requests of this size, each added all or none.
CHUNK = 100_000
MAX_SPEC_CHARS = 10_000
MAX_PARTS = 1_000
MAX_INDEX = 10**15
#: The fields of a job template in which placeholders are filled.
TEMPLATE_FIELDS = ("name", "description", "parameters")
# [0-9], not \d: \d matches the digits of every script, which int() would then accept
# [0-9], not \\d: \\d matches the digits of every script, which int() would then accept
_PART = re.compile(r"([0-9]{1,16})(?:-([0-9]{1,16})(?::([0-9]{1,16}))?)?")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")


class Spec:
    """An index spec like ``1-100:5,7,200-210``: ranges (inclusive, optional step) and single
    numbers, in the order given (duplicates are kept: the user asked for them)."""

    def __init__(self, text: Any) -> None:
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)
        if not isinstance(text, str) or not text.strip():
            raise ValidationError("an array spec is a string like 1-100, 1-100:5, 1,5,9 or "
                                  "1-3,10")
        if len(text) > MAX_SPEC_CHARS:
            raise ValidationError(f"array spec is longer than {MAX_SPEC_CHARS:,} characters")
        items = text.replace(" ", "").split(",")
        if len(items) > MAX_PARTS:
            raise ValidationError(f"array spec has {len(items):,} parts; at most {MAX_PARTS:,}")
        #: (first, step, count) per part
        self.parts: list[tuple[int, int, int]] = []
        self.total = 0
        for item in items:
            m = _PART.fullmatch(item)
            if not m:
                raise ValidationError(f"array spec part {item[:40]!r} is not N, N-M or N-M:STEP "
                                      "(non-negative integers)")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            step = int(m.group(3)) if m.group(3) is not None else 1
            if max(lo, hi) > MAX_INDEX:
                raise ValidationError(f"array index in {item!r} is above {MAX_INDEX:,}")
            if hi < lo:
                raise ValidationError(f"array range {item!r} ends before it starts")
            if step < 1:
                raise ValidationError(f"array step in {item!r} must be at least 1")
            n = (hi - lo) // step + 1
            self.parts.append((lo, step, n))
            self.total += n
            if self.total > MAX_ELEMENTS:
                raise ValidationError(f"array {text[:60]!r} has more than {MAX_ELEMENTS:,} "
                                      f"elements; at most {MAX_ELEMENTS:,} per array")

    def __len__(self) -> int:
        return self.total

    def nth(self, k: int) -> int:
        for lo, step, n in self.parts:
            if k < n:
                return lo + k * step
            k -= n
        raise IndexError(k)

    def iter_from(self, start: int) -> Iterator[int]:
        """The indices from element ``start`` on (0-based)."""
        for lo, step, n in self.parts:
            if start >= n:
                start -= n
                continue
            for k in range(start, n):
                yield lo + k * step
            start = 0


def spec_of(value: Any) -> str:
    """A spec string from a spec, an int, a ``range`` or a list of ints (the Python API)."""
    if isinstance(value, range):
        if len(value) == 0 or value.step < 1:
            raise ValidationError("an array range must be non-empty and increasing")
        return f"{value.start}-{value[-1]}:{value.step}"
    if isinstance(value, (list, tuple)):
        if not value or not all(type(v) is int for v in value):
            raise ValidationError("an array list must be a non-empty list of integers")
        return ",".join(map(str, value))
    return value


def _axis(name: str, values: Any) -> list | Spec:
    if isinstance(values, dict):
        if set(values) != {"range"}:
            raise ValidationError(f"sweep {name!r}: give a list of values or {{range: SPEC}}")
        return Spec(values["range"])
    if not isinstance(values, list) or not values:
        raise ValidationError(f"sweep {name!r}: give a non-empty list of values or "
                              "{range: SPEC}")
    for v in values:
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ValidationError(f"sweep {name!r}: values must be strings or numbers, "
                                  f"got {type(v).__name__}")
    if len(values) > MAX_ELEMENTS:
        raise ValidationError(f"sweep {name!r} has more than {MAX_ELEMENTS:,} values")
    return values


class Elements:
    """The elements of an array (``spec``) or of a sweep (``sweep``: parameter -> values): each
    element is ``(index, swept values)``. An array's index is its spec's number; a sweep's is the
    element's position in the product (0-based, the first parameter varying slowest)."""

    def __init__(self, spec: Any = None, sweep: Any = None) -> None:
        if (spec is None) == (sweep is None):
            raise ValidationError("give an array spec or a sweep (one of them)")
        self.spec = Spec(spec) if spec is not None else None
        self.axes: list[tuple[str, list | Spec]] = []
        if sweep is not None:
            if not isinstance(sweep, dict) or not sweep:
                raise ValidationError("sweep must be a map of parameter -> list of values")
            if len(sweep) > 32:
                raise ValidationError("a sweep has at most 32 parameters")
            total = 1
            for name, values in sweep.items():
                if not isinstance(name, str) or not _PLACEHOLDER.fullmatch("{" + name + "}") \
                        or name == "index":
                    raise ValidationError(f"sweep key {name!r} must be a parameter name "
                                          "(letters, digits, '_'; not 'index')")
                axis = _axis(name, values)
                self.axes.append((name, axis))
                total *= len(axis)
                if total > MAX_ELEMENTS:
                    raise ValidationError(f"the sweep has more than {MAX_ELEMENTS:,} "
                                          f"combinations; at most {MAX_ELEMENTS:,} per sweep")
            self.total = total
        else:
            self.total = len(self.spec)

    def __len__(self) -> int:
        return self.total

    def names(self) -> set[str]:
        return {"index"} | {n for n, _ in self.axes}

    def slice(self, start: int, count: int) -> Iterator[tuple[int, dict]]:
        """Elements ``start`` .. ``start + count - 1``."""
        stop = min(self.total, start + count)
        if self.spec is not None:
            it = self.spec.iter_from(start)
            for _ in range(start, stop):
                yield next(it), {}
            return
        # last axis first (it varies fastest); each axis as a lookup of its k-th value
        axes = [(name, len(a), a.nth if isinstance(a, Spec) else a.__getitem__)
                for name, a in reversed(self.axes)]
        for n in range(start, stop):
            values, rest = {}, n
            for name, size, nth in axes:
                rest, k = divmod(rest, size)
                values[name] = nth(k)
            yield n, values


def _text(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def placeholders(template: dict) -> set[str]:
    """The placeholder names used in a job template's fillable fields."""
    found: set[str] = set()
    for key in TEMPLATE_FIELDS:
        v = template.get(key)
        items = v.values() if isinstance(v, dict) else [v]
        for item in items:
            if isinstance(item, str):
                found.update(_PLACEHOLDER.findall(item))
    return found


def check_template(template: Any, known: set[str]) -> None:
    """A template may use only the known placeholders (a typo is an error, not a literal)."""
    if not isinstance(template, dict):
        raise ValidationError("a job template must be a map of job keys")
    bad = placeholders(template) - known

    def braced(names):
        return ", ".join("{" + n + "}" for n in sorted(names))
    if bad:
        raise ValidationError(f"unknown placeholder(s) {braced(bad)}; known: {braced(known)}")


def _compile(s: str) -> list[str]:
    """A string with placeholders as [literal, name, literal, ...]."""
    return _PLACEHOLDER.split(s)


def run(filler: list[str], subst: dict) -> str:
    """The filled text. Always text, as if typed on the command line: an int or float parameter
    reads "7" as 7, and a str parameter takes "7" where a bare 7 would be refused."""
    return "".join(p if i % 2 == 0 else _text(subst[p]) for i, p in enumerate(filler))


class Template:
    """A job template compiled once, filled per element: ``{index}`` and ``{param}`` in the name,
    the description and parameter values become text (one pass, so a value that looks like a
    placeholder stays text), and the swept parameters are set with their own values. Filled
    values meet the app's checks like any."""

    def __init__(self, template: dict, known: set[str]) -> None:
        check_template(template, known)
        self.base = dict(template)
        self.text = [(k, _compile(v)) for k in ("name", "description")
                     if isinstance(v := template.get(k), str) and _PLACEHOLDER.search(v)]
        params = template.get("parameters")
        self.params = dict(params) if isinstance(params, dict) else None
        self.param_fill = [(k, _compile(v)) for k, v in (self.params or {}).items()
                           if isinstance(v, str) and _PLACEHOLDER.search(v)]

    def text_filler(self, key: str) -> list[str] | None:
        """The filler of ``name`` or ``description``, or None when it has no placeholder."""
        return next((f for k, f in self.text if k == key), None)

    def fill(self, index: int, values: dict) -> dict:
        subst = {"index": index, **values} if values else {"index": index}
        job = self.base.copy()
        for k, f in self.text:
            job[k] = run(f, subst)
        if self.params is not None or values:
            params = self.params.copy() if self.params is not None else {}
            for k, f in self.param_fill:
                params[k] = run(f, subst)
            if values:
                params.update(values)
            job["parameters"] = params
        return job


def fill(template: dict, index: int, values: dict) -> dict:
    """One job message from a template (see :class:`Template`)."""
    return Template(template, {"index", *values}).fill(index, values)
