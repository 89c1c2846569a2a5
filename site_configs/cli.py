"""``pilotfish site ls|show|validate|init``: the site profiles, bundled and the user's own.

``site_group`` is exported for the umbrella CLI; a ``site agent`` command joins the same group
later. The loader (and pydantic behind it) is imported inside each command, so other
``pilotfish`` commands do not pay for it at start-up.
"""
from __future__ import annotations

from pathlib import Path

import click
import yaml

from pilotfish import console, settings


CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
LS_COLUMNS = [("name", "NAME"), ("scheduler", "SCHEDULER"), ("launcher", "LAUNCHER"),
              ("container", "CONTAINER"), ("node", "NODE (CORESxTHREADS)"),
              ("default_queue", "QUEUE"), ("source", "SOURCE"), ("description", "DESCRIPTION")]


def home_of(ctx: click.Context) -> Path:
    return settings.home(ctx.obj.get("home") if ctx.obj else None)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def _is_file_arg(arg: str) -> bool:
    """A FILE_OR_NAME argument names a file when it looks like a path and one exists there."""
    return ("/" in arg or arg.endswith((".yaml", ".yml"))) and Path(arg).exists()


def _load(arg: str, home: Path):
    from .loader import load_site, validate_file
    return validate_file(arg, home) if _is_file_arg(arg) else load_site(arg, home)


@click.group("site", context_settings=CTX)
def site_group() -> None:
    """Site profiles: each machine described once, in YAML.

    A profile names the scheduler, launcher and container runtime, the node shape, queues and
    their limits, the account, batch-script extras, the server address seen from compute nodes
    and the pilot policy.

    Bundled profiles ship with pilotfish; yours live in $PILOTFISH_HOME/sites/NAME.yaml and win
    over a bundled profile of the same name (extend it with `extends: NAME` to change a few
    keys). Start one with `pilotfish site init`.
    """


@site_group.command("ls", context_settings=CTX)
@json_option
@click.pass_context
def site_ls(ctx, as_json) -> None:
    """List the site profiles, bundled and yours.

    Yours are those in $PILOTFISH_HOME/sites; a profile that does not validate is listed with
    its first problem.
    """
    from .loader import is_bundled, list_sites, validate_file
    from .schema import SiteError
    home = home_of(ctx)
    rows = []
    for name, path, description in list_sites(home):
        row = {"name": name, "source": "bundled" if is_bundled(path) else str(path),
               "path": str(path), "description": description, "error": None}
        try:
            site = validate_file(path, home)
        except SiteError as exc:
            row.update(scheduler=None, launcher=None, container=None, node=None, queues=[],
                       default_queue=None, error=str(exc))
            row["description"] = f"INVALID: {exc}"
        else:
            row.update(site.summary(), description=description)
        rows.append(row)
    if as_json:
        return console.print_json(rows)
    console.table(rows, LS_COLUMNS)


@site_group.command("show", context_settings=CTX)
@click.argument("name", metavar="NAME_OR_FILE")
@json_option
@click.pass_context
def site_show(ctx, name, as_json) -> None:
    """Show a profile fully resolved.

    Its bases are merged in, defaults filled and walltimes given in minutes. NAME_OR_FILE is a
    profile's name or the path of a profile file.
    """
    site = _load(name, home_of(ctx))
    data = site.model_dump(mode="json")
    if as_json:
        return console.print_json(data)
    console.out.print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip(),
                      markup=False, highlight=False)


@site_group.command("validate", context_settings=CTX)
@click.argument("targets", nargs=-1, metavar="[FILE_OR_NAME]...")
@json_option
@click.pass_context
def site_validate(ctx, targets, as_json) -> None:
    """Check profiles; exit 1 if any is invalid.

    FILE_OR_NAME is a profile file or a profile's name; with none, every known profile.
    Prints `ok NAME (FILE)` for each valid one and one line per problem otherwise, each naming
    the file, the key and what it expects.
    """
    from .loader import sources
    from .schema import SiteError
    home = home_of(ctx)
    if not targets:
        targets = tuple(str(paths[-1]) for _, paths in sorted(sources(home).items()))
    results = []
    for arg in targets:
        try:
            site = _load(arg, home)
        except SiteError as exc:
            results.append({"target": arg, "ok": False, "errors": exc.problems})
        else:
            results.append({"target": arg, "ok": True, "name": site.name, "errors": []})
    if as_json:
        console.print_json(results)
    else:
        for r in results:
            if r["ok"]:
                console.out.print(f"ok {r['name']} ({r['target']})", markup=False)
            for line in r["errors"]:
                console.err.print(f"pilotfish: error: {line}", markup=False)
    if not all(r["ok"] for r in results):
        ctx.exit(1)


def _queue_hint(site) -> list[str]:
    from .schema import format_minutes
    lines = []
    for qname, q in site.queues.items():
        limits = [f"nodes {q.min_nodes}..{q.max_nodes if q.max_nodes else 'any'}"]
        if q.max_walltime:
            limits.append(f"up to {format_minutes(q.max_walltime)}")
        mark = ", the default" if q.default else ""
        lines.append(f"#   {qname}: {', '.join(limits)}{mark}")
    return lines


INIT_TEMPLATE = """\
# Site profile {name}: your changes to {base!r}. Keys set here override the base's (mappings
# merge key by key, lists are replaced). `pilotfish site show {name}` prints the result,
# `pilotfish site validate {name}` checks it.
name: {name}
extends: {base}
description: {description}

# The project (allocation) pilots are charged to (sbatch -A, qsub -A, bsub -P):
# account: MYPROJECT

# The queue pilots go to when it fits. {base}'s queues:
{queues}
# To make another one the default, unset the current default in the same edit:
# queues:
#   QUEUE:
#     default: true

# The server as compute nodes reach it (the login node's address on the high-speed network):
# server_address: tcp://login1.example.org:5555

# Pilot policy (nodes per pilot, walltimes as HH:MM:SS or minutes, pilots queued at once):
# pilot:
#   nodes: {nodes}
#   max_walltime: "{walltime}"
#   max_queued: {max_queued}
"""


@site_group.command("init", context_settings=CTX)
@click.argument("name")
@click.option("--from", "base", metavar="BASE", help="The profile to extend (default: NAME "
              "itself when a bundled profile has that name).")
@click.option("--force", is_flag=True, help="Overwrite an existing profile file.")
@click.pass_context
def site_init(ctx, name, base, force) -> None:
    """Start your own profile NAME from another one.

    Writes $PILOTFISH_HOME/sites/NAME.yaml (refusing to overwrite it without --force). The
    file sets `extends: BASE` and has commented placeholders for what you usually must set:
    account, queue and server_address.
    """
    from .loader import SUFFIX, load_site, sources, user_dir, validate_file
    from .schema import _NAME_RE, SiteError, format_minutes
    home = home_of(ctx)
    if not _NAME_RE.fullmatch(name):
        raise SiteError(f"site name {name!r}: expected letters, digits, '_', '.' and '-' "
                        "(it becomes the file name)")
    known = sources(home)
    path = user_dir(home) / f"{name}{SUFFIX}"
    if base is None:
        if name not in known or (path.resolve() in known[name] and len(known[name]) == 1):
            raise SiteError(f"no profile named {name!r} to start from: give --from BASE (one "
                            f"of: {', '.join(sorted(known))})")
        base = name
    if path.exists() and not force:
        raise SiteError(f"{path} exists; use --force to overwrite it")
    if base == name:
        below = [p for p in known.get(name, []) if p != path.resolve()]
        if not below:
            raise SiteError(f"no profile named {name!r} besides {path} to extend: give "
                            "--from BASE")
        base_site = validate_file(below[-1], home)
    else:
        base_site = load_site(base, home)
    text = INIT_TEMPLATE.format(
        name=name, base=base, description=yaml.safe_dump(f"{base_site.description or base} "
                                                         "(my settings)").strip().split("\n")[0],
        queues="\n".join(_queue_hint(base_site)) or "#   (none listed: the scheduler's default)",
        nodes=base_site.pilot.nodes, walltime=format_minutes(base_site.pilot.max_walltime),
        max_queued=base_site.pilot.max_queued)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else None
    path.write_text(text)
    try:
        validate_file(path, home)
    except SiteError:
        if old is None:
            path.unlink()
        else:
            path.write_text(old)
        raise
    console.out.print(f"wrote {path} (extends {base}); set account, the queue and "
                      f"server_address there, then: pilotfish site validate {name}", markup=False)
