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
@click.option("--tag", help="Image tag (default: NAME:latest, NAME from the spec's name:, "
              "else the spec file's name).")
@click.option("--registry", metavar="HOST[/PATH]",
              help="Registry the site can pull from, e.g. registry.example.org/group: the "
              "image is tagged REGISTRY/TAG and the push steps name it (without it they say "
              "REGISTRY for you to fill in).")
@click.option("--dry-run", is_flag=True,
              help="Print the Dockerfile, the Apptainer definition file and the commands; "
              "write and run nothing.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Where the Dockerfile/definition file and .sif/.sqfs images go "
              "(default: the spec file's directory).")
def build_cmd(spec, runtime, tag, registry, dry_run, out) -> None:
    """Build an image from SPEC (YAML keys: name, base, package_manager, packages, pip, env,
    files, entrypoint, labels; only base is required).

    Writes NAME.Dockerfile and NAME.def (Apptainer definition file) and builds with the
    builder found (it reads one of them). Example spec (myapp.yaml):

    \b
        name: myapp                  # default: the spec file's name
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
        p = plan_dry(image, runtime, tag, out, registry=registry)
        for (path, text), title in zip(p.files, _TITLES):
            used = f"; {p.builder} reads this one" if path == p.uses else ""
            click.echo(f"# ==== {title}: {path}{used}")
            click.echo(text, nl=False)
        missing = "" if p.found else f"; {p.builder} is not on PATH here"
        click.echo(f"# ==== build with {p.builder} (not run: --dry-run{missing})")
        for step in p.steps:
            click.echo(step.shell())
        _publish(p)
        return
    p = plan(image, runtime, tag, out, registry=registry)
    execute(p, echo=click.echo)
    click.echo(f"built {p.artifact}")
    _publish(p)


_TITLES = ("Dockerfile (docker, podman, podman-hpc, ch-image)",
           "Apptainer definition file (apptainer, singularity)")


def _publish(p) -> None:
    if p.publish:
        click.echo("# ==== next steps (printed, never run)")
        for line in p.publish:
            click.echo(line)
