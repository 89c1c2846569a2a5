"""Image specs and builds: a small YAML spec -> Dockerfile and Apptainer definition -> image.

A spec (all keys but ``base`` optional)::

    name: myapp                    # image name; default: the spec file's name
    base: ubuntu:22.04             # the FROM / Bootstrap image
    package_manager: apt           # apt or dnf; default: guessed from the base name
    packages: [python3, python3-pip]
    pip: ["numpy>=1.26,<2"]        # the base must have pip (list python3-pip, or a python image)
    env: {OMP_NUM_THREADS: "1"}    # set in the image at run time
    files:                         # src relative to the spec file, dst absolute
      - {src: app.py, dst: /opt/app/app.py}
    entrypoint: [python3, /opt/app/app.py]
    labels: {maintainer: you@example.org}

:func:`load_spec` validates it (errors name the file, the key and what was expected);
:func:`render_dockerfile` and :func:`render_definition` render it with the templates in
``templates/`` (jinja2, imported on first render: the CLI's start stays light); :func:`plan`
picks a builder that exists and lists the commands that build and publish the image for a
runtime. Every list item is shell-quoted where it lands in a ``RUN``/``%post`` line, and values
that Dockerfile ``ENV``/``LABEL`` or ``%environment`` would re-interpret (quotes, backslashes,
``$``, backticks) are refused.
"""
from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pilotfish.errors import PilotfishError, ValidationError
from pilotfish.validate import ENV_NAME_RE, check_relpath

from .request import RUNTIMES, check_path
from pilotfish.textfile import read_text

TEMPLATES = Path(__file__).parent / "templates"
KEYS = ("name", "base", "package_manager", "packages", "pip", "env", "files", "entrypoint",
        "labels")
PACKAGE_MANAGERS = ("apt", "dnf")
#: Base-image words that tell the package manager (matched against the whole base reference,
#: so nvidia/cuda:12.2.0-base-ubuntu22.04 is apt).
_APT_WORDS = ("debian", "ubuntu")
_DNF_WORDS = ("fedora", "rockylinux", "rocky", "almalinux", "alma", "centos", "rhel", "ubi",
              "oraclelinux", "amazonlinux")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")
BASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")
PACKAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_:=~-]{0,254}")
PIP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\[\],<>=!~;:@/+ -]{0,254}")
#: host[:port] then optional path components, lower case as registries want them.
REGISTRY_RE = re.compile(r"[a-z0-9][a-z0-9.-]*(:[0-9]{1,5})?(/[a-z0-9][a-z0-9._-]*){0,8}")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Characters Dockerfile ENV/LABEL and a %environment "export K=..." would re-interpret.
_VALUE_BAD = set('"\\$`\n\r\0')


class SpecError(ValidationError):
    """An image spec was refused; the message names the file, the key and what was expected."""


class BuildError(PilotfishError):
    """No builder, or a build command failed."""


@dataclass(frozen=True)
class FileCopy:
    src: str  # relative to the spec file's directory (the build context)
    dst: str  # absolute, inside the image


@dataclass(frozen=True)
class ImageSpec:
    path: Path
    name: str
    base: str
    package_manager: str | None = None
    packages: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    files: tuple[FileCopy, ...] = ()
    entrypoint: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def context(self) -> Path:
        """The build context: the spec file's directory (``files`` sources are relative to it)."""
        return self.path.resolve().parent


# ------------------------------------------------------------------------------ the spec

def load_spec(path: str | Path) -> ImageSpec:
    """Read and validate a YAML image spec (SpecError with file, key and expectation)."""
    import yaml
    p = Path(path)
    try:
        text = read_text(p, 1 << 20)
    except OSError as exc:
        raise SpecError(f"{p}: cannot read the image spec: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SpecError(f"{p}: not valid YAML{where}: "
                        f"{getattr(exc, 'problem', None) or exc}") from None
    return parse_spec(data, p)


def parse_spec(data: object, path: Path) -> ImageSpec:
    """Validate already-parsed YAML ``data`` for the spec file at ``path``."""
    where = str(path)

    def fail(key: str, expected: str, got: object = ...) -> SpecError:
        shown = "" if got is ... else f", got {_short(got)}"
        return SpecError(f"{where}: {key}: expected {expected}{shown}")

    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of keys ({', '.join(KEYS)}), "
                        f"got {_short(data)}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(KEYS)}")

    name = data.get("name", path.stem.lower())
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise fail("name", "an image name of lower-case letters, digits and '._-' "
                   "(set name: when the file name is not one)", name)
    if "base" not in data:
        raise fail("base", "the base image (e.g. ubuntu:22.04); the key is missing")
    base = data["base"]
    if not isinstance(base, str) or not BASE_RE.fullmatch(base):
        raise fail("base", "an image reference like ubuntu:22.04 or "
                   "nvcr.io/nvidia/cuda:12.2.0-base-ubuntu22.04", base)

    packages = _string_list(data, "packages", PACKAGE_RE, fail,
                            "a list of package names (letters, digits, '.+_:=~-')")
    pip = _string_list(data, "pip", PIP_RE, fail,
                       "a list of pip requirements like 'numpy>=1.26,<2' (no quotes)")
    manager = data.get("package_manager")
    if manager is not None and manager not in PACKAGE_MANAGERS:
        raise fail("package_manager", f"one of {', '.join(PACKAGE_MANAGERS)}", manager)
    if packages and manager is None:
        manager = detect_package_manager(base)
        if manager is None:
            raise fail("package_manager", f"apt or dnf: it cannot be told from base {base!r}")

    env = _mapping(data, "env", ENV_NAME_RE, fail, "variable names (letters, digits, '_')")
    labels = _mapping(data, "labels", LABEL_RE, fail, "label keys (letters, digits, '._-')")
    files = _files(data, path, fail)

    entry = data.get("entrypoint", [])
    if not isinstance(entry, list) or any(
            not isinstance(a, str) or not a or set(a) & {"\n", "\r", "\0"} for a in entry):
        raise fail("entrypoint", "a list of non-empty one-line strings (exec form), like "
                   "[python3, /opt/app/app.py]", entry)
    return ImageSpec(path=path, name=name, base=base, package_manager=manager,
                     packages=packages, pip=pip, env=env, files=files, entrypoint=tuple(entry),
                     labels=labels)


def detect_package_manager(base: str) -> str | None:
    """apt or dnf from the words in a base image reference; None when it cannot tell."""
    words = set(re.split(r"[^a-z]+", base.lower()))
    apt = bool(words & set(_APT_WORDS))
    dnf = bool(words & set(_DNF_WORDS))
    if apt == dnf:
        return None
    return "apt" if apt else "dnf"


def _string_list(data: dict, key: str, rx: re.Pattern, fail, expected: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if value is None:
        return ()
    if not isinstance(value, list):
        raise fail(key, expected, value)
    for item in value:
        if not isinstance(item, str) or not rx.fullmatch(item):
            raise fail(key, expected, item)
    if len(set(value)) != len(value):
        raise fail(key, f"{expected}, each once", value)
    return tuple(value)


def _mapping(data: dict, key: str, rx: re.Pattern, fail, what: str) -> tuple[tuple[str, str], ...]:
    value = data.get(key, {})
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise fail(key, f"a mapping of {what} to strings", value)
    out = []
    for k, v in value.items():
        if not isinstance(k, str) or not rx.fullmatch(k):
            raise fail(key, f"{what} as keys", k)
        if not isinstance(v, str):
            raise fail(f"{key}.{k}", "a string (quote numbers and booleans: '1', 'true')", v)
        if set(v) & _VALUE_BAD:
            raise fail(f"{key}.{k}", "a one-line string without '\"', '\\', '$' or '`' (the "
                       "image would re-interpret them)", v)
        out.append((k, v))
    return tuple(out)


def _files(data: dict, path: Path, fail) -> tuple[FileCopy, ...]:
    value = data.get("files", [])
    if value is None:
        return ()
    expected = "a list of {src: path relative to the spec file, dst: absolute path}"
    if not isinstance(value, list):
        raise fail("files", expected, value)
    out = []
    for i, item in enumerate(value):
        key = f"files[{i}]"
        if not isinstance(item, dict) or set(item) != {"src", "dst"}:
            raise fail(key, "{src: ..., dst: ...} with exactly these two keys", item)
        try:
            src = check_relpath(item["src"], "src")
            dst = check_path(item["dst"], "dst")
        except ValidationError as exc:
            raise SpecError(f"{path}: {key}: {exc}") from None
        if not (path.parent / src).exists():
            raise fail(f"{key}.src", f"a file or directory next to the spec "
                       f"({path.parent / src} does not exist)", src)
        out.append(FileCopy(src, dst))
    return tuple(out)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------ rendering

def install_command(spec: ImageSpec) -> str:
    """The one shell line that installs the system packages (empty without packages)."""
    if not spec.packages:
        return ""
    names = " ".join(shlex.quote(p) for p in spec.packages)
    if spec.package_manager == "apt":
        return ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
                f"--no-install-recommends {names} && rm -rf /var/lib/apt/lists/*")
    return f"dnf install -y {names} && dnf clean all"


def pip_command(spec: ImageSpec) -> str:
    """The pip line; PIP_BREAK_SYSTEM_PACKAGES lets pip install into a distribution's Python
    (PEP 668) and is ignored by older pips, unlike the --break-system-packages option."""
    if not spec.pip:
        return ""
    reqs = " ".join(shlex.quote(r) for r in spec.pip)
    return f"PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir {reqs}"


@functools.lru_cache(maxsize=None)
def environment():
    """The jinja2 Environment for the image templates (made on first use)."""
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["shquote"] = shlex.quote
    env.filters["json"] = lambda v: json.dumps(v, ensure_ascii=False)
    return env


def _render(template: str, spec: ImageSpec) -> str:
    return environment().get_template(template).render(
        spec=spec, source=spec.path.name, install=install_command(spec), pip=pip_command(spec))


def render_dockerfile(spec: ImageSpec) -> str:
    """The Dockerfile (also read by podman, ch-image and podman-hpc)."""
    return _render("Dockerfile.j2", spec)


def render_definition(spec: ImageSpec) -> str:
    """The Apptainer/Singularity definition file (``%files`` sources relative to the spec's
    directory: build with that directory as the current one)."""
    return _render("apptainer.def.j2", spec)


# ------------------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]
    cwd: str | None = None

    def shell(self) -> str:
        line = shlex.join(self.argv)
        return f"(cd {shlex.quote(self.cwd)} && {line})" if self.cwd else line


@dataclass(frozen=True)
class BuildPlan:
    runtime: str
    builder: str                          # the program that builds
    found: bool                           # the builder is on PATH
    files: tuple[tuple[str, str], ...]    # (path, text) to write before building: the
                                          # Dockerfile, then the Apptainer definition file
    steps: tuple[Step, ...]               # run in order
    publish: tuple[str, ...]              # next steps for people (registry, site login node)
    artifact: str                         # the image tag or file the build makes
    uses: str = ""                        # the file of ``files`` the builder reads


#: Builders per target runtime, first found wins; None: any builder.
BUILDERS: dict[str | None, tuple[str, ...]] = {
    None: ("docker", "podman", "apptainer", "singularity", "ch-image"),
    "none": ("docker", "podman"),
    "shifter": ("docker", "podman"),
    "podman-hpc": ("podman-hpc", "docker", "podman"),
    "apptainer": ("apptainer",),
    "singularity": ("singularity", "apptainer"),
    "charliecloud": ("ch-image",),
}


def plan(spec: ImageSpec, runtime: str | None = None, tag: str | None = None,
         out: str | Path | None = None, *, registry: str | None = None,
         which: Callable[[str], str | None] = shutil.which) -> BuildPlan:
    """What to write and run to build ``spec`` for ``runtime`` (pure but for ``which``).

    Raises BuildError when no builder for ``runtime`` is on PATH; :func:`plan_dry` never does.
    """
    p = plan_dry(spec, runtime, tag, out, registry=registry, which=which)
    if not p.found:
        raise BuildError(f"no image builder for runtime {runtime or 'any'}: none of "
                         f"{', '.join(BUILDERS[runtime])} is on PATH")
    return p


def plan_dry(spec: ImageSpec, runtime: str | None = None, tag: str | None = None,
             out: str | Path | None = None, *, registry: str | None = None,
             which: Callable[[str], str | None] = shutil.which) -> BuildPlan:
    """Like :func:`plan`, but names the first candidate builder when none is on PATH.

    Both files are always rendered (the Dockerfile and the Apptainer definition file: a site
    with the other runtime needs the other file); the builder reads one of them (``uses``).
    ``registry`` (host[:port][/path]) is put in front of the tag, so the image can be pushed;
    without it, a tag with no ``/`` gets the push steps with a REGISTRY placeholder.
    """
    if runtime is not None and runtime not in RUNTIMES:
        raise ValidationError(f"unknown container runtime {runtime!r}; known: "
                              f"{', '.join(RUNTIMES)}")
    if registry is not None:
        registry = registry.rstrip("/")
        if not REGISTRY_RE.fullmatch(registry) or "//" in registry:
            raise ValidationError(f"registry {registry!r} is not a registry like "
                                  "registry.example.org/group or localhost:5000")
    tag = tag or f"{spec.name}:latest"
    if registry:
        tag = f"{registry}/{tag}"
    if not TAG_RE.fullmatch(tag) or tag.startswith("-"):
        raise ValidationError(f"tag {tag!r} is not an image tag like name:1.0 or "
                              "registry.example.org/group/name:1.0")
    outdir = Path(out).resolve() if out is not None else spec.context
    candidates = BUILDERS[runtime]
    found = [b for b in candidates if which(b)]
    builder = found[0] if found else candidates[0]
    context = str(spec.context)
    dockerfile = str(outdir / f"{spec.name}.Dockerfile")
    definition = str(outdir / f"{spec.name}.def")
    files = [(dockerfile, render_dockerfile(spec)), (definition, render_definition(spec))]
    steps: list[Step] = []
    publish: list[str] = []
    uses = dockerfile

    if builder in ("apptainer", "singularity"):
        sif = str(outdir / f"{spec.name}.sif")
        uses = definition
        steps.append(Step((builder, "build", "--force", sif, definition), cwd=context))
        artifact = sif
        publish.append(f"copy {sif} to the site and run tasks with "
                       f"`{runtime or builder} exec {sif} ...`")
    elif builder == "ch-image":
        sqfs = str(outdir / f"{spec.name}.sqfs")
        steps.append(Step(("ch-image", "build", "-t", tag, "-f", dockerfile, context)))
        steps.append(Step(("ch-convert", "-i", "ch-image", "-o", "squash", tag, sqfs)))
        artifact = sqfs
        publish.append(f"copy {sqfs} to the site and run tasks with `ch-run {sqfs} -- ...`")
    else:  # docker, podman, podman-hpc: an OCI image in the local store
        steps.append(Step((builder, "build", "-t", tag, "-f", dockerfile, context)))
        artifact = tag
        if builder == "podman-hpc":
            steps.append(Step(("podman-hpc", "migrate", tag)))
            publish.append(f"run tasks on compute nodes with `podman-hpc run --rm {tag} ...`")
        else:
            # A tag without '/' would be pushed to docker.io/library/, which nobody may write
            # to: name the registry, or tell the user to fill it in.
            remote = tag if "/" in tag else f"REGISTRY/{tag}"
            if remote != tag:
                publish.append("# REGISTRY: a registry the site can reach, e.g. "
                               "registry.example.org/group (or build with --registry)")
                publish.append(f"{builder} tag {tag} {remote}")
            if runtime == "shifter":
                publish.append(f"{builder} push {remote}   # to a registry the site can reach")
                publish.append(f"shifterimg pull docker:{remote}   # on the site's login node")
            elif runtime == "podman-hpc":
                publish.append(f"{builder} push {remote}   # to a registry the site can reach")
                publish.append(f"podman-hpc pull {remote} && podman-hpc migrate {remote}   "
                               "# on the site's login node")
            else:
                publish.append(f"{builder} push {remote}   # to share it through a registry")
    return BuildPlan(runtime=runtime or _runtime_of(builder), builder=builder,
                     found=bool(found), files=tuple(files), steps=tuple(steps),
                     publish=tuple(publish), artifact=artifact, uses=uses)


def _runtime_of(builder: str) -> str:
    return {"apptainer": "apptainer", "singularity": "singularity", "ch-image": "charliecloud",
            "podman-hpc": "podman-hpc"}.get(builder, "none")


def execute(p: BuildPlan, *, echo: Callable[[str], None] = print) -> None:
    """Write the plan's files and run its steps (their output goes to the terminal)."""
    import subprocess
    for path, text in p.files:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        echo(f"wrote {path}")
    for step in p.steps:
        echo(f"$ {step.shell()}")
        try:
            rc = subprocess.run(list(step.argv), cwd=step.cwd).returncode
        except OSError as exc:
            raise BuildError(f"cannot run {step.argv[0]}: {exc.strerror or exc}") from None
        if rc != 0:
            raise BuildError(f"`{shlex.join(step.argv)}` failed with exit status {rc}")
