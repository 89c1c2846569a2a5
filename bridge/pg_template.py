"""The job template of a NOTIFY source: which payload fields it takes, what each may fill, and
the job it makes of a checked payload. Pure: no database, no server.

A template (YAML)::

    source: diiid-efit            # names this source: its state file, the tag on its jobs
    id: shot                      # the payload field that identifies a pulse (a growing integer)
    fields:                       # every field a payload may carry, and what it fills
      shot: shot                  #   the app parameter of that name
      tmax: {parameter: t_max}    #   an app parameter of another name
      run: {job: input_url}       #   a job key, only when the template says so
      note: null                  #   nothing: usable as {note} in the name and description
    example: {shot: 190001, tmax: 5.0, run: /data/diiid/190001, note: test}
    catch_up_table: pulses        # optional: rows with id > the cursor are submitted on start
    job:                          # the job: fixed keys, never taken from a payload
      application: efit
      name: "efit-{shot}"         # {field} placeholders in name and description only
      parameters: {tree: EFIT01}

Payload values fill only what ``fields`` names; the application, the parameters map itself,
parents and the image can never be filled. ``example`` must give every field: at start the
source makes its job and asks the server to check it (``job_check``), so a template error is
found before the first pulse, named by its key.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from pilotfish.errors import ValidationError
from pilotfish.validate import echo, echo_keys
from pilotfish.textfile import read_text

TEMPLATE_KEYS = ("source", "id", "fields", "example", "catch_up_table", "max_payload_bytes",
                 "job")
#: Job keys a payload may never fill, whatever the template says: what runs (application and
#: its image), the parameters map as a whole (fields fill single parameters) and links to
#: other jobs.
UNFILLABLE = frozenset({"application", "parameters", "config_file", "parents", "image",
                        "name"})
#: Field names are SQL column names of the catch-up table and {placeholders}: identifiers.
FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
SOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TABLE_RE = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,62}\.)?[A-Za-z_][A-Za-z0-9_]{0,62}")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,62})\}")
#: NOTIFY payloads are at most 8,000 bytes in PostgreSQL; a pulse needs far less. Rows read
#: when catching up meet the same cap.
DEFAULT_MAX_PAYLOAD = 4096
MAX_PAYLOAD_LIMIT = 1 << 20
TAG_PREFIX = "pg."


class Template:
    """A checked template. ``fields``: payload field -> ("parameter", name), ("job", key) or
    None (placeholder only)."""

    def __init__(self, doc: Any, where: str = "template") -> None:
        def bad(key: str, why: str) -> ValidationError:
            return ValidationError(f"{where}: {key}: {why}")

        if not isinstance(doc, dict):
            raise ValidationError(f"{where}: a template is a map with the keys "
                                  f"{', '.join(TEMPLATE_KEYS)}")
        unknown = doc.keys() - set(TEMPLATE_KEYS)
        if unknown:
            raise ValidationError(f"{where}: unknown key(s) {echo_keys(unknown, True)}; "
                                  f"expected {', '.join(TEMPLATE_KEYS)}")
        for key in ("source", "id", "fields", "example", "job"):
            if key not in doc:
                raise bad(key, "missing (see `pilotfish source pg -h` for a template)")
        self.source = doc["source"]
        if not isinstance(self.source, str) or not SOURCE_RE.fullmatch(self.source):
            raise bad("source", f"{echo(self.source)} is not a name (letters, digits, '_' and "
                      "'-', at most 64)")
        fields = doc["fields"]
        if not isinstance(fields, dict) or not fields:
            raise bad("fields", "must map each payload field to what it fills")
        self.fields: dict[str, tuple[str, str] | None] = {}
        for name, target in fields.items():
            self.fields[name] = self._target(name, target, bad)
        self.id_field = doc["id"]
        if self.id_field not in self.fields:
            raise bad("id", f"{echo(self.id_field)} is not one of the fields "
                      f"({', '.join(self.fields)})")
        filled_keys = [t[1] for t in self.fields.values() if t and t[0] == "job"]
        filled_params = [t[1] for t in self.fields.values() if t and t[0] == "parameter"]
        for kind, names in (("job key", filled_keys), ("parameter", filled_params)):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise bad("fields", f"{kind} {twice[0]!r} is filled by two fields")

        job = doc["job"]
        if not isinstance(job, dict):
            raise bad("job", "must be a map of job keys (as `pilotfish job add` takes)")
        if not isinstance(job.get("application"), str):
            raise bad("job.application", "must name the registered app the jobs run")
        if not isinstance(job.get("name"), str):
            raise bad("job.name", "must be a job name; {field} placeholders make it unique")
        params = job.get("parameters", {})
        if "config_file" in job:
            raise bad("job.config_file", "write 'parameters' in a template")
        if not isinstance(params, dict):
            raise bad("job.parameters", "must be a map of the app's parameters")
        for key in filled_keys:
            if key in job:
                raise bad(f"job.{key}", "is fixed here and filled by a field; choose one")
        for p in filled_params:
            if p in params:
                raise bad(f"job.parameters.{p}", "is fixed here and filled by a field; "
                          "choose one")
        for key in ("name", "description"):
            v = job.get(key)
            used = set(PLACEHOLDER.findall(v)) if isinstance(v, str) else set()
            unknown = used - self.fields.keys()
            if unknown:
                raise bad(f"job.{key}", "unknown placeholder(s) "
                          f"{', '.join('{' + n + '}' for n in sorted(unknown))}; the fields "
                          f"are {', '.join(self.fields)}")
        self.job = job

        self.catch_up_table = doc.get("catch_up_table")
        if self.catch_up_table is not None:
            self.catch_up_table = check_table(self.catch_up_table, f"{where}: catch_up_table")
        mp = doc.get("max_payload_bytes", DEFAULT_MAX_PAYLOAD)
        if isinstance(mp, bool) or not isinstance(mp, int) or not 64 <= mp <= MAX_PAYLOAD_LIMIT:
            raise bad("max_payload_bytes", f"must be an integer 64..{MAX_PAYLOAD_LIMIT}, "
                      f"got {echo(mp)}")
        self.max_payload_bytes = mp
        example = doc["example"]
        if not isinstance(example, dict):
            raise bad("example", "must be a payload (a map of fields) for the start check")
        missing = self.fields.keys() - example.keys()
        if missing:
            raise bad("example", f"gives no value for {echo_keys(missing, True)}: the example "
                      "must give every field, so the start check covers them all")
        self.example = example

    @staticmethod
    def _target(name: Any, target: Any, bad) -> tuple[str, str] | None:
        if not isinstance(name, str) or not FIELD_RE.fullmatch(name):
            raise bad("fields", f"field {echo(name)} is not an identifier (letters, digits, "
                      "'_'; it is also a column of the catch-up table)")
        if target is None:
            return None
        if isinstance(target, str):
            target = {"parameter": target}
        if not isinstance(target, dict) or len(target) != 1 or \
                next(iter(target)) not in ("parameter", "job"):
            raise bad(f"fields.{name}", "must be a parameter name, {parameter: NAME}, "
                      "{job: KEY} or null")
        (kind, what), = target.items()
        if not isinstance(what, str) or not FIELD_RE.fullmatch(what):
            raise bad(f"fields.{name}.{kind}", f"{echo(what)} is not a {kind} name")
        if kind == "job" and what in UNFILLABLE:
            raise bad(f"fields.{name}.job", f"a payload may never fill {what!r} "
                      f"(never: {', '.join(sorted(UNFILLABLE))})")
        return kind, what

    # -- use --------------------------------------------------------------------------------
    def parameters_filled(self) -> list[str]:
        return [t[1] for t in self.fields.values() if t and t[0] == "parameter"]

    def tag(self, pulse_id: int) -> str:
        """The job's idempotency key, as a tag: ``pg.<source>.<id>`` (a valid tag name)."""
        return f"{TAG_PREFIX}{self.source}.{pulse_id}"

    def job_for(self, payload: dict) -> dict:
        """The job message for a checked payload (see :mod:`.pg_payload`)."""
        job = copy.deepcopy(self.job)
        params = dict(job.get("parameters") or {})
        for field, value in payload.items():
            target = self.fields[field]
            if target is None:
                continue
            kind, what = target
            if kind == "parameter":
                params[what] = value
            else:
                job[what] = value
        if params or "parameters" in job:
            job["parameters"] = params
        text = {k: "" if v is None else v if isinstance(v, str) else
                repr(v) if isinstance(v, float) else str(v) for k, v in payload.items()}
        for key in ("name", "description"):
            if isinstance(job.get(key), str):
                # one pass: a value that looks like {a placeholder} stays text
                job[key] = PLACEHOLDER.sub(lambda m: text.get(m.group(1), ""), job[key])
        tags = job.get("tags") or []
        if isinstance(tags, str):
            tags = [t for t in tags.split(",") if t]
        job["tags"] = [*tags, self.tag(payload[self.id_field])] if isinstance(tags, list) \
            else tags  # not a list: the server's check names it
        return job


def check_table(value: Any, what: str) -> str:
    if not isinstance(value, str) or not TABLE_RE.fullmatch(value):
        raise ValidationError(f"{what}: {echo(value)} is not a table name (TABLE or "
                              "SCHEMA.TABLE, identifiers of letters, digits and '_')")
    return value


def load(path: str | Path) -> Template:
    """Read and check a template file; errors name the file and the key."""
    import yaml
    p = Path(path)
    try:
        text = read_text(p, 1 << 20)
    except OSError as exc:
        raise ValidationError(f"template {p}: cannot read it: {exc.strerror or exc}") from None
    if len(text) > 1 << 20:
        raise ValidationError(f"template {p}: {len(text):,} characters; at most 1 MiB")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValidationError(f"template {p}: not valid YAML: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    return Template(doc, f"template {p}")
