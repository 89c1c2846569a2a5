"""Containers on the server side: an app's image, and which images a job may ask for instead.

An app names ``container: {image, runtime, images}``: the image its tasks run in, the runtime
(None: the node's, from its site profile), and fnmatch patterns of images a job may pick with its
own ``image`` key (none: a job may not change it). The node agent wraps the task's argv with
the runtime (:mod:`pilotfish.container`), inside the launcher for MPI jobs.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any

from pilotfish.errors import ValidationError
from pilotfish.validate import echo, echo_keys

#: Image references: registry/repo:tag, docker:repo:tag, or an absolute path (.sif, directory).
IMAGE_RE = re.compile(r"[A-Za-z0-9/][A-Za-z0-9_./:@+=-]{0,511}")
CONTAINER_KEYS = {"image", "runtime", "images"}


def _runtimes() -> tuple[str, ...]:
    from pilotfish.container import RUNTIMES
    return RUNTIMES


def check_image(image: Any, where: str) -> str:
    if not isinstance(image, str) or not IMAGE_RE.fullmatch(image) or ".." in image:
        raise ValidationError(f"{where}: image {echo(image)} is not an image reference (letters, "
                              "digits and '/_.:@+=-', no '..', at most 512 characters)")
    return image


def check_app_container(spec: Any, where: str) -> dict | None:
    """An app's ``container`` map, checked; None when the app runs on the host."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValidationError(f"{where}: container must be a map with image, runtime, images")
    unknown = set(spec) - CONTAINER_KEYS
    if unknown:
        raise ValidationError(f"{where}: unknown container key(s) {echo_keys(unknown)}; "
                              f"expected {', '.join(sorted(CONTAINER_KEYS))}")
    image = check_image(spec.get("image"), f"{where} container")
    runtime = spec.get("runtime")
    if runtime is not None and runtime not in _runtimes():
        raise ValidationError(f"{where}: unknown container runtime {echo(runtime)}; known: "
                              f"{', '.join(_runtimes())}")
    images = spec.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) and p and "\0" not in p
                                               for p in images):
        raise ValidationError(f"{where}: container images must be a list of patterns (e.g. "
                              "'docker:myrepo/sim:*')")
    return {"image": image, "runtime": runtime, "images": list(images)}


def check_job_image(container: dict | None, image: Any, app: str, job: str) -> str | None:
    """A job's own ``image``: allowed only where its app's patterns admit it."""
    if image is None:
        return None
    image = check_image(image, f"job {job!r}")
    if container is None:
        raise ValidationError(f"job {job!r}: app {app!r} runs on the host; it takes no image")
    if not any(fnmatch.fnmatchcase(image, p) for p in container["images"]):
        allowed = ", ".join(container["images"]) or "none: its image is fixed"
        raise ValidationError(f"job {job!r}: app {app!r} does not allow image {image!r} "
                              f"(allowed: {allowed})")
    return image
