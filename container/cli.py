"""``pilotfish container build``: image specs to images for a site's container runtime.

``container_group`` is exported for the umbrella CLI. Only click is imported at start-up; the
spec loader (yaml) and the templates (jinja2) wait until a command runs.
"""
from __future__ import annotations

import click

from .request import RUNTIMES

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group("container", context_settings=CTX)
def container_group() -> None:
    """Container images for pilots and tasks.

    Runtimes: Shifter, Apptainer/Singularity, Charliecloud, podman-hpc (set per site with
    `container:` in the site profile). `container build` turns a small YAML image spec into a
    Dockerfile and an Apptainer definition file and builds the image with the builder it finds.
    """


@container_group.command("build", context_settings=CTX)
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--runtime", type=click.Choice(RUNTIMES),
              help="Build for this runtime: shifter/none (docker or podman, then push and "
              "shifterimg pull), podman-hpc (podman-hpc build + migrate), apptainer/singularity "
              "(.sif), charliecloud (ch-image, then a SquashFS file). Default: the first "
              "builder found among docker, podman, apptainer, singularity, ch-image.")
@click.option("--tag", help="Image tag (default: NAME:latest, NAME from the spec).")
@click.option("--dry-run", is_flag=True,
              help="Print the generated files and the commands; write and run nothing.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Where the Dockerfile/definition file and .sif/.sqfs images go "
              "(default: the spec file's directory).")
def build_cmd(spec, runtime, tag, dry_run, out) -> None:
    """Build an image from SPEC (YAML: base, packages, pip, env, files, entrypoint, labels).

    Example spec:

    \b
        base: ubuntu:22.04
        packages: [python3, python3-pip]
        pip: ["numpy>=1.26,<2"]
        env: {OMP_NUM_THREADS: "1"}
        files: [{src: app.py, dst: /opt/app/app.py}]
        entrypoint: [python3, /opt/app/app.py]

    Publishing steps that need a registry or the site's login node (push, shifterimg pull)
    are printed, never run.
    """
    from .build import execute, load_spec, plan, plan_dry
    image = load_spec(spec)
    if dry_run:
        p = plan_dry(image, runtime, tag, out)
        for path, text in p.files:
            click.echo(f"# ---- {path}")
            click.echo(text, nl=False)
        missing = "" if p.found else "   (not found on PATH)"
        click.echo(f"# ---- build with {p.builder}{missing}")
        for step in p.steps:
            click.echo(step.shell())
        _publish(p)
        return
    p = plan(image, runtime, tag, out)
    execute(p, echo=click.echo)
    click.echo(f"built {p.artifact}")
    _publish(p)


def _publish(p) -> None:
    if p.publish:
        click.echo("# ---- next steps")
        for line in p.publish:
            click.echo(line)
