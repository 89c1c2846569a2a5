"""Site agents run beside the server (``server start --site S``), for a single-site setup.

Each is the ordinary ``pilotfish site agent`` command, a client of this server like any other
(so the server room does not import the pilot room), started once the server serves, restarted
if it dies (at most once per ``RESTART_EVERY`` seconds, so a profile that fails at once does not
spin), and stopped with the server. Its output goes to ``HOME/logs/site-agent-<site>.log``.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from pilotfish import settings

log = logging.getLogger("pilotfish.server")

RESTART_EVERY = 30.0
STOP_GRACE = 10.0


def site_agent_argv(home: Path, address: str, site: str, poll: float) -> list[str]:
    return [sys.executable, "-m", "pilotfish", "--home", str(home), "--server", address,
            "site", "agent", "--site", site, "--poll", f"{poll:g}"]


def log_path(home: Path, site: str) -> Path:
    return settings.home(home) / "logs" / f"site-agent-{site}.log"


class SiteAgents:
    def __init__(self, home: Path, sites: list[str], poll: float) -> None:
        self.home, self.sites, self.poll = home, list(sites), poll
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}

    def start(self, address: str) -> None:
        self.address = address
        for site in self.sites:
            self._start(site)

    def _start(self, site: str) -> None:
        path = log_path(self.home, site)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        with open(path, "ab") as out:
            self.procs[site] = subprocess.Popen(
                site_agent_argv(self.home, self.address, site, self.poll),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        self.started[site] = time.monotonic()
        log.info("site agent for %s started: pid %d, log %s", site, self.procs[site].pid, path)

    def check(self) -> None:
        """Restart site agents that ended (their log says why)."""
        for site, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            if time.monotonic() - self.started[site] < RESTART_EVERY:
                continue
            log.warning("site agent for %s ended (exit %s; see %s): starting it again", site,
                        proc.returncode, log_path(self.home, site))
            self._start(site)

    def stop(self) -> None:
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for site, p in self.procs.items():
            log.info("site agent for %s stopped (exit %s)", site, p.returncode)
