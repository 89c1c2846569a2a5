"""``pilotfish server db-status``: a database's schema version and the migrations the next
server start would apply, read without changing (or creating) anything."""
from __future__ import annotations

from pathlib import Path

from pilotfish.errors import PilotfishError

from .db import SCHEMA_VERSION, schema_version


def db_status(url: str) -> dict:
    """{db, version, head, up_to_date, pending: [{version, summary}], note}; version None for
    a database not made yet. Alembic is read only when there is something pending."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    try:
        parsed = make_url(url)
        shown = parsed.render_as_string(hide_password=True)
    except Exception as exc:
        raise PilotfishError(f"bad database URL {url!r}: {exc}") from None
    out = {"db": shown, "version": None, "head": SCHEMA_VERSION, "up_to_date": False,
           "pending": [], "note": ""}
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database or ""
        if path in ("", ":memory:") or not Path(path).is_file():
            # connecting would create the file: say so instead
            out["note"] = f"no database yet; `pilotfish server start` makes it at schema " \
                          f"{SCHEMA_VERSION}"
            return out
    try:
        engine = create_engine(parsed)
    except Exception as exc:
        raise PilotfishError(f"bad database URL {shown!r}: {exc}") from None
    try:
        try:
            with engine.connect() as conn:
                version = schema_version(conn)
        finally:
            engine.dispose()
    except Exception as exc:
        raise PilotfishError(f"cannot open database {shown}: "
                             f"{str(exc).strip().splitlines()[0]}") from None
    out["version"] = version
    if version is None:
        out["note"] = (f"no pilotfish schema in it yet; `pilotfish server start` makes it at "
                       f"schema {SCHEMA_VERSION}")
    elif version == SCHEMA_VERSION:
        out["up_to_date"] = True
    elif isinstance(version, int) and 1 <= version < SCHEMA_VERSION:
        from . import migrations
        out["pending"] = migrations.pending(version)
        out["note"] = "`pilotfish server start` applies the pending migrations"
    else:
        out["version"] = version if len(str(version)) <= 24 else f"{str(version)[:24]}..."
        out["note"] = (f"schema version {out['version']} is not one this pilotfish can use "
                       f"(newest: {SCHEMA_VERSION}); use a newer pilotfish")
    return out
