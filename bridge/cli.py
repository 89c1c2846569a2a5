"""``pilotfish bridge``: processes that connect production systems to the server."""
from __future__ import annotations

import os

import click

from pilotfish import console, settings
from pilotfish.clitypes import plain_float

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _clients(ctx, timeout: float):
    """This command's home, and how its process makes a client of the server (again after a
    restart): the --server/$PILOTFISH_SERVER address, else the home's, waiting ``timeout``."""
    home = settings.home(ctx.obj.get("home") if ctx.obj else None)
    server = (ctx.obj.get("server") if ctx.obj else None) or os.environ.get("PILOTFISH_SERVER")

    def new_client():
        from pilotfish.client import Client
        return Client(address=server, home=home, timeout=timeout)
    return home, new_client


@click.group("bridge", context_settings=CTX)
def bridge_group() -> None:
    """Bridges to production systems (each its own process, a client of the server)."""


@bridge_group.command("amqp", context_settings=CTX)
@click.option("--config", "config_file", metavar="YAML", help="Settings from a YAML map (url, "
              "jobs_queue, exchange, dead_letter_queue, routing_key, password_file, state_dir, "
              "prefetch, max_body_mb, batch_jobs, nice, server_timeout); flags given here win.")
@click.option("--url", help="The broker, WITHOUT a password: amqp://user@host:5672/vhost "
              "(default amqp://guest@127.0.0.1:5672/).")
@click.option("--password-file", metavar="FILE", help="The broker password (its first line). "
              "Else $PILOTFISH_AMQP_PASSWORD, else 'guest' for the user guest.")
@click.option("--jobs-queue", metavar="Q", help="Durable queue of job messages to consume "
              "(one seed-format job map, or a list of them, per message).")
@click.option("--dead-letter-queue", metavar="Q", help="Where messages that cannot become jobs "
              "go, with the reason in the x-pilotfish-error header (default: Q.dead).")
@click.option("--exchange", metavar="X", help="Topic exchange that gets every job state change "
              "(on the job's job_status_routing_key, else --routing-key).")
@click.option("--routing-key", metavar="KEY", help="Routing key of status messages for jobs "
              "without their own (default: pilotfish.status).")
@click.option("--state-dir", metavar="DIR", help="Where the publisher keeps its cursor "
              "(default: HOME/bridge/amqp-<exchange>).")
@click.option("--prefetch", type=click.IntRange(1, 10_000), help="Messages held "
              "unacknowledged at once (default 16).")
@click.option("--max-body-mb", type=click.IntRange(1, 128), help="Largest message body read; "
              "larger ones are dead-lettered unparsed (default 16).")
@click.option("--nice", type=click.IntRange(0, 19), help="Lower the bridge's CPU priority by "
              "this much, so it never takes a core from the server or a task beside it "
              "(default: 10; 0: keep it).")
@click.option("--server-timeout", type=plain_float(1, 3600), metavar="SECONDS",
              help="How long a request may wait for the server before intake pauses and the "
              "messages go back to the queue (default 30).")
@click.option("--check", is_flag=True, help="Check the settings and the password source, "
              "then exit (connects to nothing).")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
@click.pass_context
def amqp_cmd(ctx, config_file, url, password_file, jobs_queue, dead_letter_queue, exchange,
             routing_key, state_dir, prefetch, max_body_mb, nice, server_timeout, check,
             verbose, quiet) -> None:
    """Bridge a RabbitMQ broker and the server: job messages in, status messages out.

    Job messages on --jobs-queue become jobs (acknowledged once the server has committed them;
    a redelivered message adds nothing twice); every job state change goes to --exchange as a
    persistent JSON message (event_id, job_id, name, group_identifier, argo_job_id, from, to,
    time, message), confirmed by the broker before the saved cursor moves. Runs until SIGTERM.
    Its server key needs the role submitter (or admin).
    """
    from .amqp import run
    from .config import BridgeConfig, from_yaml
    cfg = from_yaml(config_file) if config_file else BridgeConfig()
    for k, v in (("url", url), ("password_file", password_file), ("jobs_queue", jobs_queue),
                 ("dead_letter_queue", dead_letter_queue), ("exchange", exchange),
                 ("routing_key", routing_key), ("state_dir", state_dir),
                 ("prefetch", prefetch), ("nice", nice), ("server_timeout", server_timeout)):
        if v is not None:
            setattr(cfg, k, v)
    if max_body_mb is not None:
        cfg.max_body_bytes = max_body_mb * 2**20
    if cfg.password_file:
        cfg.password_file = os.path.abspath(cfg.password_file)
    cfg.check()
    from .config import parse_url, password
    password(cfg, parse_url(cfg.url).user)  # a missing password stops here, not per reconnect
    if check:
        console.out.print(f"ok: {parse_url(cfg.url)}", markup=False)
        return
    console.setup_logging(verbose, quiet)
    home, new_client = _clients(ctx, cfg.server_timeout)
    ctx.exit(run(cfg, home, new_client))


@click.command("federate", context_settings=CTX)
@click.option("--config", "config_file", required=True, metavar="YAML",
              help="Settings: name, exchange, status_queue, status_routing_key, "
              "site_beat_routing_key, sites (NAME: {jobs_queue, user}), url, password_file, "
              "silent_after, resend_after, poll, data_url.")
@click.option("--check", is_flag=True, help="Check the settings and the password source, "
              "then exit (connects to nothing).")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
@click.pass_context
def federate_cmd(ctx, config_file, check, verbose, quiet) -> None:
    """Forward jobs of remote sites (other pilotfish servers) over RabbitMQ and mirror their
    status here.

    Takes the jobs the server routed to a remote site and publishes each to the site's jobs
    queue (the site server's `bridge amqp` receiver); reads the sites' status messages and
    heartbeats from its status queue, trusting only the broker-validated user_id of each site.
    Its server key needs the role admin. `server start --federate YAML` runs it beside the
    server. Example: pilotfish federate --config federation.yaml
    """
    from .config import parse_url, password
    from .federate import from_yaml, run
    cfg = from_yaml(config_file)
    password(cfg.bridge(), parse_url(cfg.url).user)  # a missing password stops here
    if check:
        console.out.print(f"ok: {parse_url(cfg.url)}; sites {', '.join(sorted(cfg.sites))}",
                          markup=False)
        return
    console.setup_logging(verbose, quiet)
    _home, new_client = _clients(ctx, 30)
    ctx.exit(run(cfg, new_client))


@click.command("mail", context_settings=CTX)
@click.option("--config", "config_file", required=True, metavar="YAML",
              help="Settings: sender (From, required), host, port, tls (none, starttls, ssl), "
              "username, password_file, notify (final or failure), state_dir, timeout, "
              "subject_prefix.")
@click.option("--check", is_flag=True, help="Check the settings and the password source, "
              "then exit (connects to nothing).")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
@click.pass_context
def mail_cmd(ctx, config_file, check, verbose, quiet) -> None:
    """E-mail a workflow's addresses when it ends (HISTORY or a failure state), or on
    failures only (notify: failure).

    Reads the server's event stream from its own saved cursor (HOME/mail/mail.cursor) and
    sends through the SMTP server of its config; the cursor moves past a workflow's event once
    its message was accepted. The SMTP password: password_file, else $PILOTFISH_SMTP_PASSWORD
    (never on a command line). Runs until SIGTERM; `server start --mail YAML` runs it beside
    the server. Example: pilotfish mail --config mail.yaml
    """
    from .mail import from_yaml, password, run
    cfg = from_yaml(config_file)
    password(cfg)  # a missing password stops here
    if check:
        console.out.print(f"ok: SMTP {cfg.host}:{cfg.port} from {cfg.sender}", markup=False)
        return
    console.setup_logging(verbose, quiet)
    home, new_client = _clients(ctx, 30)
    ctx.exit(run(cfg, home, new_client))
