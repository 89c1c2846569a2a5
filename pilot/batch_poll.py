"""Ask the batch systems about recorded pilots and tell the server what they said.

The site agent does it every round for its site; ``pilot ls`` and ``pilot cancel`` do it for
pilots no site agent polls (submitted by hand), so a pilot's batch state is the scheduler's
whenever anyone asks. Runs on the login node; a scheduler whose commands are not here (``pilot
ls`` from a laptop) is skipped quietly.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

from pilotfish.client import Client
from pilotfish.errors import PilotfishError
from pilotfish.pilotstate import PilotState

from .batch import BatchSystem, get

log = logging.getLogger("pilotfish.site")


def unsettled(pilots: list[dict]) -> list[dict]:
    """Pilots submitted by pilotfish whose batch system has not yet said how they ended."""
    return [p for p in pilots if p.get("batch_id") and p.get("scheduler")
            and not PilotState(p.get("batch_state") or "QUEUED").final]


def poll(client: Client, pilots: list[dict],
         batch_for: Callable[[str], BatchSystem] = get, warn: bool = False) -> list[dict]:
    """Poll each scheduler once for ``pilots`` (see :func:`unsettled`); record every change of
    batch state with the server. Returns the pilots whose batch state changed."""
    by_scheduler: dict[str, list[dict]] = defaultdict(list)
    for p in unsettled(pilots):
        by_scheduler[p["scheduler"]].append(p)
    changed = []
    for scheduler, ps in by_scheduler.items():
        try:
            statuses = batch_for(scheduler).status([p["batch_id"] for p in ps])
        except (PilotfishError, OSError) as exc:  # not on this host, or it failed
            log.log(logging.WARNING if warn else logging.DEBUG, "cannot poll %s for %d pilots: "
                    "%s", scheduler, len(ps), exc)
            continue
        for p in ps:
            st = statuses.get(p["batch_id"])
            if st is None or st.state.value == p.get("batch_state"):
                continue
            log.info("pilot %s (%s %s): %s -> %s%s", p["id"], scheduler, p["batch_id"],
                     p.get("batch_state"), st.state.value, f" ({st.reason})" if st.reason else "")
            client.update_pilot(p["id"], state=st.state.value,
                                reason=st.reason or st.state.meaning)
            changed.append(p)
    return changed
