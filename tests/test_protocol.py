"""The wire protocol module: round trips, and every kind of malformed frame refused clearly."""
import msgpack
import pytest

from pilotfish import protocol as P
from pilotfish.errors import ProtocolError


def test_round_trip_keeps_fields():
    """encode then decode gives back the kind and the fields."""
    frame = P.encode(P.REQUEST, rid=7, op="ping", args={"x": [1, 2]})
    kind, m = P.decode(frame)
    assert kind == P.REQUEST and m == {"rid": 7, "op": "ping", "args": {"x": [1, 2]}}


@pytest.mark.parametrize("frame, words", [
    (b"\xc1\xc1\xc1", "undecodable"),
    (P.encode(P.REQUEST, rid=1, op="ping", args={})[:-3], "undecodable"),
    (msgpack.packb([1, 2, 3]), "not a map"),
    (msgpack.packb({"v": 99, "k": "request"}), "version 99"),
    (msgpack.packb({"k": "request"}), "version None"),
    (msgpack.packb({"v": P.VERSION, "k": "launch_missiles"}), "unknown message kind"),
    (msgpack.packb({"v": P.VERSION, "k": "request", "rid": 1, "op": "ping"}),
     "missing field 'args'"),
    (msgpack.packb({"v": P.VERSION, "k": "request", "rid": "1", "op": "ping", "args": {}}),
     "'rid' must be int"),
    (msgpack.packb({"v": P.VERSION, "k": "request", "rid": True, "op": "ping", "args": {}}),
     "got bool"),
    (msgpack.packb({"v": P.VERSION, "k": "request", "rid": 1, "op": "ping", "args": {},
                    "evil": 1}), "unknown field 'evil'"),
    (msgpack.packb({1: 2}), "undecodable"),
])
def test_malformed_frames_are_refused_with_a_reason(frame, words):
    """Each malformed frame raises ProtocolError whose message says what is wrong."""
    with pytest.raises(ProtocolError, match=words):
        P.decode(frame)


def test_oversized_frame_refused():
    """A frame beyond MAX_MESSAGE_BYTES is refused before it is parsed."""
    with pytest.raises(ProtocolError, match="exceeds"):
        P.decode(b"\x00" * (P.MAX_MESSAGE_BYTES + 1))


def test_expected_kinds_enforced():
    """A server-to-agent kind sent to the server is refused."""
    frame = P.encode(P.CANCEL, jobs=[])
    with pytest.raises(ProtocolError, match="unexpected message kind"):
        P.decode(frame, (P.HELLO, P.UPDATE))


def test_nested_items_checked():
    """Task updates inside an update message are checked field by field."""
    good = {"job": 1, "attempt": 1, "states": ["RUNNING"]}
    assert P.check_items(P.TASK_UPDATE, [good], "updates") == [good]
    with pytest.raises(ProtocolError, match=r"updates\[1\]: field 'job' must be int"):
        P.check_items(P.TASK_UPDATE, [good, dict(good, job="x")], "updates")
