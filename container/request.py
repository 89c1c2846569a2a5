"""The one request shape every container wrapper reads: which runtime, which image, what to run.

A :class:`ContainerRequest` says: run ``argv`` inside ``image`` with ``runtime``, with these host
paths bound in (``binds``: ``(host_path, container_path)`` pairs), these variables set inside
(``env``), optionally the node's GPUs (``gpus``), a working directory inside the container
(``workdir``) and MPI support (``mpi``: the ranks need the launcher's PMI variables and the
site's MPI inside).

Everything here ends up as argv items of a runtime's command line, never in a shell string, but
the runtimes themselves parse some items further: bind specs are ``src:dst`` joined by ``,``
(Apptainer ``--bind a:b,c:d``, Shifter ``--volume`` lists), so paths may not contain ``:`` or
``,``; paths are also refused with ``..`` components, white space, control characters and
shell metacharacters, because sites paste them into batch directives and profiles. An image
may not start with ``-``: every runtime would read it as an option.
"""
from __future__ import annotations

from dataclasses import dataclass

from pilotfish.errors import ValidationError
from pilotfish.validate import check_command, check_env_pairs

RUNTIMES = ("none", "shifter", "singularity", "apptainer", "charliecloud", "podman-hpc")
GPU_KINDS = ("nvidia", "amd")

#: Characters a shell (or a batch directive pasted into one) would interpret.
SHELL_META = frozenset(";&|$`<>(){}*?!'\"\\\n")
_MAX_PATH = 4096
_MAX_IMAGE = 1024


@dataclass(frozen=True)
class ContainerRequest:
    """Run ``argv`` inside ``image`` with ``runtime``; see the module docstring."""

    runtime: str
    #: "docker:repo:tag" / "repo:tag" (Shifter, podman-hpc), a .sif path or docker://... URI
    #: (Apptainer/Singularity), an image directory or SquashFS file (Charliecloud); "" for none.
    image: str
    argv: tuple[str, ...]
    #: (host path, container path) pairs, both absolute.
    binds: tuple[tuple[str, str], ...] = ()
    #: Variables set inside the container, always as NAME=value (never copied by name).
    env: tuple[tuple[str, str], ...] = ()
    #: None, "nvidia" or "amd": expose the node's GPUs of that kind.
    gpus: str | None = None
    #: The current directory inside the container (absolute); None: the runtime's default.
    workdir: str | None = None
    #: The argv is one rank of an MPI job started by a launcher outside the container.
    mpi: bool = False

    def validate(self) -> ContainerRequest:
        """Refuse a request no runtime could honour safely; returns self so calls can chain."""
        if not isinstance(self.runtime, str) or self.runtime not in RUNTIMES:
            raise ValidationError(f"unknown container runtime {self.runtime!r}; known: "
                                  f"{', '.join(RUNTIMES)}")
        self._validate_image()
        self._validate_argv()
        self._validate_binds()
        self._validate_env()
        if self.gpus is not None and self.gpus not in GPU_KINDS:
            raise ValidationError(f"gpus {self.gpus!r} is not one of None, "
                                  f"{', '.join(repr(g) for g in GPU_KINDS)}")
        if self.workdir is not None:
            check_path(self.workdir, "workdir")
        if not isinstance(self.mpi, bool):
            raise ValidationError("mpi must be True or False")
        return self

    def _validate_image(self) -> None:
        if self.runtime == "none":
            if self.image != "":
                raise ValidationError(f"runtime 'none' runs no image; give image='' "
                                      f"(got {self.image!r}) or choose a container runtime")
            return
        check_image(self.image)

    def _validate_argv(self) -> None:
        check_command(self.argv)

    def _validate_binds(self) -> None:
        validate_binds(self.binds)

    def _validate_env(self) -> None:
        check_env_pairs(self.env)



def check_image(image: object) -> str:
    """An image reference or path that no runtime reads as an option or a list."""
    if not isinstance(image, str) or not image:
        raise ValidationError("image must be a non-empty string (a name like 'repo:tag', a "
                              "URI or a path)")
    if len(image) > _MAX_IMAGE:
        raise ValidationError(f"image name is longer than {_MAX_IMAGE} characters")
    if image.startswith("-"):
        raise ValidationError(f"image {image[:60]!r} starts with '-': the runtime would read it "
                              "as an option")
    bad = _bad_chars(image) | (set(image) & {","})
    if bad:
        raise ValidationError(f"image {image[:60]!r} contains {_show(bad)}; image names and "
                              "paths are one word without white space, commas or shell "
                              "metacharacters")
    return image


def check_path(path: object, what: str, *, separators: bool = False) -> str:
    """An absolute path without ``..``, white space, control or shell metacharacters; with
    ``separators`` also without ``:`` and ``,`` (they separate bind specs)."""
    if not isinstance(path, str) or not path:
        raise ValidationError(f"{what} must be a non-empty absolute path")
    if len(path) > _MAX_PATH:
        raise ValidationError(f"{what} is longer than {_MAX_PATH} characters")
    if not path.startswith("/"):
        raise ValidationError(f"{what} {path[:80]!r} must be an absolute path (starting "
                              "with '/')")
    bad = _bad_chars(path)
    if separators:
        bad |= set(path) & {":", ","}
    if bad:
        extra = ", ':' or ','" if separators else ""
        raise ValidationError(f"{what} {path[:80]!r} contains {_show(bad)}; paths may not "
                              f"contain white space, control characters, shell "
                              f"metacharacters{extra}")
    if ".." in path.split("/"):
        raise ValidationError(f"{what} {path[:80]!r} has a '..' component; give the path "
                              "without it")
    return path


def validate_binds(binds: object) -> tuple[tuple[str, str], ...]:
    """``(host, container)`` pairs of absolute paths; each container path at most once."""
    if not isinstance(binds, tuple):
        raise ValidationError("binds must be a tuple of (host path, container path) pairs")
    seen: set[str] = set()
    for pair in binds:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValidationError(f"bind {pair!r} is not a (host path, container path) pair")
        src, dst = pair
        check_path(src, "bind source", separators=True)
        check_path(dst, "bind destination", separators=True)
        if dst.rstrip("/") == "":
            raise ValidationError("a bind destination of '/' would hide the whole image")
        key = dst.rstrip("/")
        if key in seen:
            raise ValidationError(f"bind destination {dst!r} is given twice")
        seen.add(key)
    return binds  # type: ignore[return-value]


def _bad_chars(text: str) -> set[str]:
    return {c for c in text if c in SHELL_META or c.isspace() or ord(c) < 32 or ord(c) == 127}


def _show(chars: set[str]) -> str:
    return " ".join(repr(c) for c in sorted(chars))
