"""Find, merge and validate site profiles; every problem becomes one line naming file and key.

Profiles come from two places, later ones winning by name:

1. bundled: ``profiles/*.yaml`` next to this module (package data);
2. the user's: ``$PILOTFISH_HOME/sites/*.yaml``.

A profile's name is its file name without ``.yaml``. ``extends: BASE`` starts from BASE's resolved
profile and deep-merges this file over it (mappings merge key by key, lists and scalars are
replaced; ``name`` and ``extends`` are never inherited). A user profile may extend the bundled
profile of its own name (``sites/theta.yaml`` with ``extends: theta``) to change a few keys.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError as PydanticError

from pilotfish import settings

from .schema import MODELS_AT, Site, SiteError, model_at
from pilotfish.textfile import read_text

BUNDLED_DIR = Path(__file__).resolve().parent / "profiles"
SUFFIX = ".yaml"
#: Keys a profile never takes from its base.
NOT_INHERITED = ("name", "extends")


def user_dir(home: Path | None = None) -> Path:
    """Where a user's own profiles live: ``$PILOTFISH_HOME/sites``."""
    return settings.home(home) / "sites"


def sources(home: Path | None = None) -> dict[str, list[Path]]:
    """Every profile file by name, lowest priority first (bundled, then the user's)."""
    out: dict[str, list[Path]] = {}
    for d in (BUNDLED_DIR, user_dir(home)):
        if d.is_dir():
            for p in sorted(d.glob("*" + SUFFIX)):
                out.setdefault(p.stem, []).append(p.resolve())
    return out


def is_bundled(path: Path) -> bool:
    return Path(path).resolve().parent == BUNDLED_DIR


# -- reading YAML -----------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (the second would win silently)."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

# YAML 1.1 reads an unquoted 01:30:00 as the base-60 integer 5400 (and 1:30 as 90): a walltime
# would silently become 5400 minutes. Here such scalars stay strings (parsed as walltimes); the
# int and float resolvers are PyYAML's without their sexagesimal forms.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
    [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def read_yaml(path: Path) -> dict:
    """The top-level mapping of a profile file; SiteError naming file (and line) otherwise."""
    try:
        text = read_text(path, 1 << 20)
    except OSError as exc:
        raise SiteError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        raise SiteError(f"{path}: YAML syntax error at {where}: {what}") from None
    except yaml.YAMLError as exc:
        raise SiteError(f"{path}: YAML error: {str(exc).splitlines()[0]}") from None
    if data is None:
        raise SiteError(f"{path}: the file is empty; expected a mapping of site keys "
                        "(scheduler, launcher, ...)")
    if not isinstance(data, dict):
        raise SiteError(f"{path}: expected a mapping of site keys at the top level, got "
                        f"{type(data).__name__}")
    return data


# -- merging ----------------------------------------------------------------------------------
def deep_merge(base: dict, over: dict, prov: dict[tuple, Path] | None = None,
               source: Path | None = None, prefix: tuple = ()) -> dict:
    """``over`` merged onto a copy of ``base``: mappings merge, anything else replaces.

    With ``prov``, records which file set each key path (for error messages).
    """
    out = dict(base)
    for k, v in over.items():
        path = prefix + (k,)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if prov is not None:
                prov[path] = source
            out[k] = deep_merge(out[k], v, prov, source, path)
        else:
            if prov is not None:
                for stale in [p for p in prov if p[:len(path)] == path]:
                    del prov[stale]
                _record(prov, v, source, path)
            out[k] = v
    return out


def _record(prov: dict | None, value: Any, source: Path | None, path: tuple) -> None:
    if prov is None:
        return
    prov[path] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record(prov, v, source, path + (k,))


class _Resolver:
    def __init__(self, known: dict[str, list[Path]]) -> None:
        self.known = known

    def below(self, name: str, path: Path) -> list[Path]:
        """The profiles named ``name`` that ``path`` overrides (all of them for a loose file)."""
        paths = self.known.get(name, [])
        path = Path(path).resolve()
        return paths[:paths.index(path)] if path in paths else list(paths)

    def resolve(self, name: str, path: Path, chain: tuple = ()) -> tuple[dict, dict]:
        """The merged raw mapping of profile ``name`` read from ``path``, and its provenance."""
        path = Path(path).resolve()
        if (name, path) in chain:
            cycle = " -> ".join(n for n, _ in chain + ((name, path),))
            raise SiteError(f"{chain[-1][1]}: extends: cycle {cycle}")
        chain = chain + ((name, path),)
        raw = read_yaml(path)
        if "name" in raw and raw["name"] != name:
            raise SiteError(f"{path}: name: expected {name!r} (the file's name without "
                            f"{SUFFIX}), got {raw['name']!r}")
        base = raw.get("extends")
        prov: dict[tuple, Path] = {}
        if base is None:
            merged: dict = {}
        else:
            if not isinstance(base, str):
                raise SiteError(f"{path}: extends: expected the name of a site profile, got "
                                f"{base!r}")
            candidates = self.below(name, path) if base == name else self.known.get(base, [])
            if not candidates and base == name:
                raise SiteError(f"{path}: extends: a profile cannot extend itself; expected the "
                                f"name of another profile (or, in {SUFFIX} files of your home's "
                                f"sites/, a bundled profile of the same name)")
            if not candidates:
                known = sorted(self.known)
                close = difflib.get_close_matches(base, known, 1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise SiteError(f"{path}: extends: no site profile named {base!r} to extend; "
                                f"{hint}expected one of: {', '.join(known)}")
            merged, prov = self.resolve(base, candidates[-1], chain)
            for k in NOT_INHERITED:
                merged.pop(k, None)
                prov.pop((k,), None)
        own = {k: v for k, v in raw.items()}
        merged = deep_merge(merged, own, prov, path)
        merged["name"] = name
        prov.setdefault(("name",), path)
        return merged, prov


# -- pydantic errors as one line each ---------------------------------------------------------
_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "a whole number",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "none_required": "null",
}


def key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's mark for a bad mapping key: the key itself is named
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def expectation(err: dict) -> str:
    """What a pydantic error says the key should be, in our words."""
    t, loc, value, ctx = err["type"], tuple(err["loc"]), err.get("input"), err.get("ctx") or {}
    if t == "extra_forbidden":
        model = model_at(loc[:-1])
        allowed = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, 1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key; {hint}expected one of: {', '.join(allowed)}"
    if t == "missing":
        return "required key is missing"
    if t == "literal_error":
        expected = ctx.get("expected", "")
        if loc[-1] == "relay":
            return f"expected null or 'mpi', got {_got(value)}"
        return f"expected one of {expected}, got {_got(value)}"
    if t == "value_error":
        return str(ctx.get("error", err["msg"]))
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sign = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
                "less_than_equal": "<="}[t]
        bound = next(iter(ctx.values()))
        what = "an integer" if _int_field(loc) else "a number"
        return f"expected {what} {sign} {bound}, got {_got(value)}"
    if t in _TYPE_WORDS:
        what = _TYPE_WORDS[t]
        if t in ("model_type", "dict_type"):
            model = model_at(loc)
            if model is not None:
                what += f" with keys {', '.join(model.model_fields)}"
        return f"expected {what}, got {_got(value)}"
    return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {_got(value)}"


def _int_field(loc: tuple) -> bool:
    model = model_at(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model else None
    return field is not None and "int" in repr(field.annotation)


def _file_of(loc: tuple, prov: dict[tuple, Path], leaf: Path) -> Path:
    for n in range(len(loc), 0, -1):
        if tuple(loc[:n]) in prov:
            return prov[tuple(loc[:n])]
    return leaf


def validate_data(data: dict, prov: dict[tuple, Path], leaf: Path) -> Site:
    """A Site from merged data; SiteError whose lines name the file that set each bad key."""
    try:
        return Site.model_validate(data)
    except PydanticError as exc:
        lines = [f"{_file_of(tuple(e['loc']), prov, leaf)}: {key_path(tuple(e['loc']))}: "
                 f"{expectation(e)}" for e in exc.errors(include_url=False)]
    except SiteError as exc:
        if not exc.where:
            raise
        lines = [f"{_file_of(loc, prov, leaf)}: {key_path(loc)}: {msg}" for loc, msg in exc.where]
    raise SiteError.from_lines(lines, hint=f"pilotfish site validate {leaf} lists them all")


# -- the public API ---------------------------------------------------------------------------
def load_site(name: str, home: Path | None = None) -> Site:
    """The fully resolved and validated profile ``name`` (user profiles win over bundled ones)."""
    known = sources(home)
    if not isinstance(name, str) or name not in known:
        names = sorted(known)
        close = difflib.get_close_matches(str(name), names, 1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SiteError(f"no site profile named {name!r}{hint} (known: {', '.join(names)}; "
                        f"add yours as {user_dir(home) / (str(name) + SUFFIX)})")
    return _load(name, known[name][-1], known)


def validate_file(path: Path | str, home: Path | None = None) -> Site:
    """Validate one profile file anywhere (its name is the file name); bases come from ``home``."""
    path = Path(path)
    if not path.is_file():
        raise SiteError(f"{path}: no such file")
    return _load(path.stem, path, sources(home))


def resolve_raw(name: str, path: Path, home: Path | None = None) -> tuple[dict, dict]:
    """The merged (unvalidated) mapping of a profile and which file set each key."""
    return _Resolver(sources(home)).resolve(name, path)


def _load(name: str, path: Path, known: dict[str, list[Path]]) -> Site:
    data, prov = _Resolver(known).resolve(name, path)
    return validate_data(data, prov, Path(path).resolve())


def list_sites(home: Path | None = None) -> list[tuple[str, Path, str]]:
    """``(name, source path, description)`` of every profile, the user's where they override.

    The description is read without validating the profile (a broken file is still listed; its
    description then says why it cannot be read).
    """
    out = []
    for name, paths in sorted(sources(home).items()):
        path = paths[-1]
        try:
            raw = read_yaml(path)
            desc = raw.get("description")
            if desc is None and raw.get("extends"):
                desc = f"extends {raw['extends']}"
            desc = str(desc or "")
        except SiteError as exc:
            desc = f"(unreadable: {exc})"
        out.append((name, path, desc))
    return out


__all__ = ["BUNDLED_DIR", "MODELS_AT", "deep_merge", "is_bundled", "list_sites", "load_site",
           "read_yaml", "resolve_raw", "sources", "user_dir", "validate_data", "validate_file"]
