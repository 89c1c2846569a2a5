"""The job state machine: legal paths pass, illegal ones are refused by name."""
import pytest

from pilotfish.errors import IllegalTransition
from pilotfish.server import states
from pilotfish.server.states import State as S


def test_successful_pipeline_is_legal():
    """READY through every step to JOB_FINISHED is one legal path."""
    states.check_path(S.READY, list(states.PIPELINE))
    states.check_path(S.RESTART_READY, list(states.PIPELINE))


@pytest.mark.parametrize("frm, to", [
    (S.READY, S.RUNNING), (S.JOB_FINISHED, S.RUNNING), (S.JOB_FINISHED, S.USER_KILLED),
    (S.RUNNING, S.JOB_FINISHED), (S.CREATED, S.RUNNING), (S.FAILED, S.JOB_FINISHED)])
def test_illegal_changes_refused(frm, to):
    """Skipping steps or leaving a final state is refused with both names in the message."""
    with pytest.raises(IllegalTransition, match=f"{frm.value} -> {to.value}"):
        states.check_path(frm, [to])


def test_every_failure_goes_to_retry_or_failed():
    """Each failure state can go to RESTART_READY or FAILED and nowhere else but a kill; a
    stage-out that failed may also go back to POSTPROCESSED (a site stager tries the stage-out
    alone again, from the files still staged)."""
    for f in states.FAILURES:
        extra = {S.POSTPROCESSED} if f is S.STAGE_OUT_FAILED else set()
        assert states.TRANSITIONS[f] == {S.RESTART_READY, S.FAILED, S.USER_KILLED} | extra


def test_kill_from_any_non_final_state():
    """USER_KILLED is reachable from every state that is not final."""
    for s in states.ALL - states.FINAL:
        assert states.is_legal(s, S.USER_KILLED)
    assert not states.is_legal(S.JOB_FINISHED, S.USER_KILLED)


def test_retries_counted():
    """A failure is retried while retries < max_retries, then FAILED."""
    assert states.after_failure(0, 3) is S.RESTART_READY
    assert states.after_failure(2, 3) is S.RESTART_READY
    assert states.after_failure(3, 3) is S.FAILED
    assert states.after_failure(0, 0) is S.FAILED


def test_parse_names_states():
    """Unknown state names get an error listing the real ones."""
    assert states.parse("running") is S.RUNNING
    with pytest.raises(IllegalTransition, match="JOB_FINISHED"):
        states.parse("DONE")
