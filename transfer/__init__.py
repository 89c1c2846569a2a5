"""Transfers by URL scheme: one small interface (:mod:`.base`), one module per scheme.

``scheme_for(url)`` gives the scheme object; ``check_url(url)`` is the pure door check; see
:mod:`pilotfish.transfer.base` for the promises every scheme keeps. Light on purpose: only the
core and the standard library are imported here (the server checks URLs with it); a scheme's
module (and its client library) is imported when the scheme is first used.
"""
from .base import (LOCAL_SCHEMES, REGISTRY, REMOTE_SCHEMES, SCHEMES, Limits, Partial, Scheme,
                   Stat, TransferError, Url, as_url, check_job_url, check_url, is_remote,
                   scheme_for)

__all__ = ["LOCAL_SCHEMES", "Limits", "Partial", "REGISTRY", "REMOTE_SCHEMES", "SCHEMES", "Scheme",
           "Stat", "TransferError", "Url", "as_url", "check_job_url", "check_url", "is_remote",
           "scheme_for"]
