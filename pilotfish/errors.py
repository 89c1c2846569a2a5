"""The errors pilotfish raises on purpose; each carries a one-line message for the user."""


class PilotfishError(Exception):
    """Base class: ``str(err)`` is a complete one-line message."""

    code = "error"


class ValidationError(PilotfishError):
    """User input (a job, an app, a parameter, a name) was refused."""

    code = "invalid"


class ProtocolError(PilotfishError):
    """A message on the wire was malformed, truncated, too large or of an unknown kind."""

    code = "protocol"


class NotFound(PilotfishError):
    """A named app or job does not exist."""

    code = "not_found"


class IllegalTransition(PilotfishError):
    """A state change the job state machine forbids."""

    code = "illegal_transition"


class Forbidden(PilotfishError):
    """The caller's key (its role, or who owns the job or agent) does not allow this."""

    code = "forbidden"


class ServerUnavailable(PilotfishError):
    """No server answered at the address we know."""

    code = "unavailable"


class Pruned(PilotfishError):
    """An event cursor older than what was pruned: the events in between are gone."""

    code = "pruned"


ERRORS_BY_CODE = {cls.code: cls for cls in (PilotfishError, ValidationError, ProtocolError,
                                             NotFound, IllegalTransition, ServerUnavailable,
                                             Forbidden, Pruned)}
