"""Apps are the whitelist: an executable, an argument template and typed, declared parameters.

A job names an app and gives values for its parameters; each value is checked against its
declaration and substituted into the template, one template item giving exactly one argv item.
Nothing is ever split or interpreted by a shell, so a value can never become a second argument,
a redirection or a command.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from pilotfish.errors import ValidationError
from pilotfish.envpolicy import refused_env_name
from pilotfish.validate import (ENV_NAME_RE, cap, check_float, check_name, check_relpath,
                                INT64, echo, echo_keys, parse_numeral)

from .containers import check_app_container

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: A string parameter without its own pattern accepts only these: no whitespace, quotes,
#: ``$``, backticks, ``;|&<>()*?[]{}~!#`` or ``/`` — so nothing that means anything to a shell.
#: Nor a leading ``-``: as an argv item of its own it would be read as an option of the
#: app's executable (``-rf``, ``--output=/elsewhere``).
SAFE_STRING = r"(?!-)[A-Za-z0-9_.,:=+@%-]*"
SAFE_STRING_WORDS = ("a str parameter without a pattern of its own takes letters, digits and "
                     "_ . , : = + @ % -, and no leading '-'; declare a pattern to allow more")


def _unsafe(value: str) -> str:
    """What a value breaks of SAFE_STRING, in words."""
    if value.startswith("-"):
        return "it starts with '-', which the program would read as an option"
    bad = sorted({c for c in value if not re.fullmatch(r"[A-Za-z0-9_.,:=+@%-]", c)})
    shown = " ".join("space" if c == " " else "newline" if c == "\n" else "tab" if c == "\t"
                     else repr(c) if not c.isprintable() else c for c in bad[:8])
    return f"{shown} {'is' if len(bad) == 1 else 'are'} not allowed"
PARAM_TYPES = ("int", "float", "str", "choice", "path")
RESOURCE_KEYS = ("num_nodes", "processes_per_node", "cpus_per_process", "gpus_per_process",
                 "wall_time_minutes")
DEFAULT_RESOURCES = {"num_nodes": 1, "processes_per_node": 1, "cpus_per_process": 1,
                     "gpus_per_process": 0, "wall_time_minutes": None}
APP_KEYS = {"name", "description", "executable", "args", "parameters", "preprocess",
            "postprocess", "environment", "resources", "container"}
_PARAM_KEYS = {"type", "default", "min", "max", "pattern", "choices", "help"}


@dataclass
class Param:
    name: str
    type: str
    default: Any = None
    required: bool = True
    min: float | None = None
    max: float | None = None
    pattern: re.Pattern | None = None
    choices: tuple[str, ...] = ()
    help: str = ""

    def check(self, value: Any, app: str) -> Any:
        """The normalized value, or ValidationError naming the app and the parameter."""
        where = f"app {app!r} parameter {self.name!r}"
        t = self.type
        if t in ("int", "float"):
            if isinstance(value, bool):
                raise ValidationError(f"{where} must be {t}, got a boolean")
            if isinstance(value, str):  # from the CLI or a file: plain numerals only
                value = parse_numeral(value, t, where)
            elif t == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            if t == "int":
                # 64 bits even without a declared min/max: msgpack, JSON readers and the
                # database hold no more (a bigger one made every later `job show` fail)
                if not isinstance(value, int):
                    raise ValidationError(f"{where} must be int, got {echo(value)}")
                if not INT64[0] <= value <= INT64[1]:
                    raise ValidationError(f"{where} must be int in {INT64[0]}..{INT64[1]} "
                                          f"(64 bits), got {echo(value)}")
            else:
                if not isinstance(value, (int, float)) or isinstance(value, int) and not \
                        INT64[0] <= value <= INT64[1] or not math.isfinite(value):
                    raise ValidationError(f"{where} must be a finite float, got {echo(value)}")
                value = float(value)
            if self.min is not None and value < self.min:
                raise ValidationError(f"{where} must be >= {self.min}, got {value}")
            if self.max is not None and value > self.max:
                raise ValidationError(f"{where} must be <= {self.max}, got {value}")
            return value
        if not isinstance(value, str):
            raise ValidationError(f"{where} must be a string, got {type(value).__name__}")
        if "\x00" in value or len(value) > 4096:
            raise ValidationError(f"{where} must not contain NUL and be at most 4096 characters")
        if t == "choice":
            if value not in self.choices:
                raise ValidationError(f"{where} must be one of "
                                      f"{cap(', '.join(self.choices), 200)}; got {echo(value)}")
        elif t == "path":
            check_relpath(value, where)
            if value.startswith("-"):
                raise ValidationError(f"{where}: path {echo(value)} starts with '-', which the "
                                      "program would read as an option; write ./ before it")
        elif not self.pattern.fullmatch(value):
            if self.pattern.pattern == SAFE_STRING:  # ours: say what it means, not the regex
                raise ValidationError(f"{where} value {echo(value)} is refused: "
                                      f"{_unsafe(value)} ({SAFE_STRING_WORDS})")
            raise ValidationError(f"{where} value {echo(value)} does not match the pattern "
                                  f"{echo(self.pattern.pattern)}")
        return value

    def spec(self) -> dict:
        d: dict[str, Any] = {"type": self.type}
        if not self.required:
            d["default"] = self.default
        for k in ("min", "max"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.type == "str":
            d["pattern"] = self.pattern.pattern
        if self.choices:
            d["choices"] = list(self.choices)
        if self.help:
            d["help"] = self.help
        return d


@dataclass
class App:
    id: int
    name: str
    executable: str
    args: list[str]
    params: dict[str, Param]
    description: str = ""
    preprocess: list[str] | None = None
    postprocess: list[str] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    #: {image, runtime, images} (see .containers), or None: tasks run on the host
    container: dict | None = None
    _template: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        # Pre-split each template item once: rendering is on the dispatch hot path.
        self._template = []
        for item in self.args:
            parts = PLACEHOLDER.split(item)
            self._template.append(item if len(parts) == 1 else parts)

    def check_params(self, given: dict | None) -> dict:
        """Validated parameters with defaults filled in; unknown or missing ones are errors."""
        given = given or {}
        if not isinstance(given, dict):
            raise ValidationError(f"parameters for app {self.name!r} must be a map")
        unknown = set(given) - set(self.params)
        if unknown:
            raise ValidationError(f"app {self.name!r} has no parameter "
                                  f"{echo_keys(unknown, quote=True)}; it declares "
                                  f"{', '.join(self.params) or 'none'}")
        out = {}
        for name, p in self.params.items():
            if name in given:
                out[name] = p.check(given[name], self.name)
            elif p.required:
                raise ValidationError(f"app {self.name!r} needs parameter {name!r}")
            else:
                out[name] = p.default
        return out

    def argv(self, params: dict) -> list[str]:
        """The argv for already-checked parameters: executable first, one item per template item."""
        out = [self.executable]
        for item in self._template:
            if isinstance(item, str):
                out.append(item)
            else:
                # parts alternate literal, parameter name, literal, ...
                out.append("".join(part if i % 2 == 0 else _text(params[part])
                                   for i, part in enumerate(item)))
        return out

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "description": self.description,
                "executable": self.executable, "args": list(self.args),
                "parameters": {n: p.spec() for n, p in self.params.items()},
                "preprocess": self.preprocess, "postprocess": self.postprocess,
                "environment": dict(self.environment), "resources": dict(self.resources),
                "container": self.container}


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _check_argv(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(a, str) and "\x00" not in a for a in value)):
        raise ValidationError(f"{what} must be a non-empty list of strings (an argv)")
    if not value[0].startswith("/"):
        raise ValidationError(f"{what} must start with an absolute executable path, "
                              f"got {echo(value[0])}")
    return list(value)


def _param(name: str, spec: Any, app: str, stored: bool = False) -> Param:
    where = f"app {app!r} parameter {name!r}"
    if not isinstance(spec, dict):
        raise ValidationError(f"{where}: declaration must be a map with at least 'type'")
    unknown = set(spec) - _PARAM_KEYS
    if unknown:
        raise ValidationError(f"{where}: unknown key(s) {echo_keys(unknown)}; "
                              f"expected {', '.join(sorted(_PARAM_KEYS))}")
    t = spec.get("type")
    if t not in PARAM_TYPES:
        raise ValidationError(f"{where}: type must be one of {', '.join(PARAM_TYPES)}, "
                              f"got {echo(t)}")
    p = Param(name=name, type=t, help=str(spec.get("help", "")))
    for k in ("min", "max"):
        if spec.get(k) is not None:
            if t not in ("int", "float") or isinstance(spec[k], bool) \
                    or not isinstance(spec[k], (int, float)):
                raise ValidationError(f"{where}: {k} is for int and float parameters, "
                                      "and must be a number")
            if not stored:  # (an app stored by an older version keeps its bounds: values are
                # held to 64 bits and finite by check() whatever the bounds say)
                check_float(spec[k], f"{where}: {k}")
            setattr(p, k, spec[k])
    if not stored and p.min is not None and p.max is not None and p.min > p.max:
        raise ValidationError(f"{where}: min {p.min} is above max {p.max}")
    if t == "str":
        try:
            p.pattern = re.compile(spec.get("pattern") or SAFE_STRING)
        except re.error as exc:
            raise ValidationError(f"{where}: bad pattern: {exc}") from None
    elif "pattern" in spec:
        raise ValidationError(f"{where}: pattern is for str parameters")
    if t == "choice":
        ch = spec.get("choices")
        if not isinstance(ch, list) or not ch or not all(isinstance(c, str) for c in ch):
            raise ValidationError(f"{where}: a choice parameter needs its choices, a non-empty "
                                  "list of strings: `--param NAME:choice:a,b,c[=DEFAULT]` on "
                                  "the command line, `choices: [a, b, c]` in a file")
        p.choices = tuple(ch)
    if "default" in spec:
        p.required = False
        try:
            p.default = None if spec["default"] is None else p.check(spec["default"], app)
        except ValidationError:
            if not stored:
                raise
            p.default = spec["default"]  # as an older version stored it (shown wire-safe)
    return p


def app_from_spec(spec: Any, app_id: int = 0, stored: bool = False) -> App:
    """Validate an app definition (as given to ``app add``) and build the App.

    ``stored``: the definition comes from the database, where an older version may have put
    what is refused now (a dangerous environment name, bounds past 64 bits); it loads, so the
    server starts, and `app alter` then asks for it to be fixed."""
    if not isinstance(spec, dict):
        raise ValidationError("an app definition must be a map")
    unknown = set(spec) - APP_KEYS
    if unknown:
        raise ValidationError(f"unknown app key(s) {echo_keys(unknown)}; "
                              "expected "
                              f"{', '.join(sorted(APP_KEYS))}")
    name = check_name(spec.get("name"), "app name")
    exe = spec.get("executable")
    if not isinstance(exe, str) or not exe.startswith("/") or "\x00" in exe:
        raise ValidationError(f"app {name!r}: executable must be an absolute path, "
                              f"got {echo(exe)}")
    args = spec.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) and "\x00" not in a
                                             for a in args):
        raise ValidationError(f"app {name!r}: args must be a list of strings")
    pspecs = spec.get("parameters") or {}
    if not isinstance(pspecs, dict):
        raise ValidationError(f"app {name!r}: parameters must be a map of name -> declaration")
    params = {}
    for pname, pspec in pspecs.items():
        if not isinstance(pname, str) or (len(pname) > 128 and not stored) \
                or not PLACEHOLDER.fullmatch("{%s}" % pname):
            raise ValidationError(f"app {name!r}: parameter name {echo(pname)} must be an "
                                  "identifier")
        params[pname] = _param(pname, pspec, name, stored)
    for item in args:
        for used in PLACEHOLDER.findall(item):
            if used not in params:
                used = cap(used, 80)
                raise ValidationError(f"app {name!r}: args use {{{used}}} but no parameter "
                                      f"{used!r} is declared")
    env = spec.get("environment") or {}
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and ENV_NAME_RE.fullmatch(k) and isinstance(v, str) and "\x00" not in v
            for k, v in env.items()):
        raise ValidationError(f"app {name!r}: environment must map variable names to strings")
    for k in env if not stored else ():
        why = refused_env_name(k)
        if why is not None:
            raise ValidationError(f"app {name!r}: environment may not set {k}: {why} "
                                  "(see `pilotfish app add -h`)")
    res = dict(DEFAULT_RESOURCES)
    given = spec.get("resources") or {}
    if not isinstance(given, dict):
        raise ValidationError(f"app {name!r}: resources must be a map")
    for k, v in given.items():
        if k not in RESOURCE_KEYS:
            raise ValidationError(f"app {name!r}: unknown resource {echo(k)}; expected "
                                  f"{', '.join(RESOURCE_KEYS)}")
        res[k] = v
    check_resources(res, f"app {name!r}")
    desc = spec.get("description") or ""
    if not isinstance(desc, str) or "\x00" in desc or len(desc) > 10_000:
        raise ValidationError(f"app {name!r}: description must be a string without NUL, "
                              "at most 10,000 characters")
    return App(id=app_id, name=name, executable=exe, args=list(args), params=params,
               description=desc,
               preprocess=_check_argv(spec.get("preprocess"), f"app {name!r} preprocess"),
               postprocess=_check_argv(spec.get("postprocess"), f"app {name!r} postprocess"),
               environment=dict(env), resources=res,
               container=check_app_container(spec.get("container"), f"app {name!r}"))


def check_resources(res: dict, where: str) -> dict:
    """Check the resource fields of a job or an app's defaults in place."""
    for k in ("num_nodes", "processes_per_node", "cpus_per_process"):
        v = res.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1_000_000:
            raise ValidationError(f"{where}: {k} must be a positive integer (1..1000000), "
                                  f"got {echo(v)}")
    v = res.get("gpus_per_process")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 64:
        raise ValidationError(f"{where}: gpus_per_process must be an integer 0..64, "
                              f"got {echo(v)}")
    v = res.get("wall_time_minutes")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                          or not 0 < v <= 525_600):
        raise ValidationError(f"{where}: wall_time_minutes must be a number above 0 and at "
                              f"most 525600 (a year), got {echo(v)}")
    return res


def app_from_row(row) -> App:
    """Rebuild an App from its database row (already validated when it was added)."""
    spec = {"name": row.name, "description": row.description, "executable": row.executable,
            "args": row.args, "parameters": row.parameters, "preprocess": row.preprocess,
            "postprocess": row.postprocess, "environment": row.environment,
            "resources": row.resources, "container": row.container}
    return app_from_spec(spec, row.id, stored=True)
