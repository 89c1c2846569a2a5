"""The bridge's batching pika connection (bridge/pika_batch.py) against the real RabbitMQ: a page
of messages published inside ``batch()`` arrives whole and in order, and leaves in a few writes
instead of three per message."""
from __future__ import annotations

import uuid

import pytest

from amqp_world import broker_connection
from conftest import require
from externals import RABBITMQ, rabbitmq_available


@pytest.fixture
def queue():
    require(rabbitmq_available(), "RabbitMQ at 127.0.0.1:5672 (guest/guest)")
    name = f"pftest.batch.{uuid.uuid4().hex[:10]}"
    conn = broker_connection()
    ch = conn.channel()
    ch.queue_declare(name, durable=False, auto_delete=False)
    yield ch, name
    ch.queue_delete(name)
    conn.close()


def _publish_page(queue_name: str, bodies: list[bytes]) -> int:
    """Publish ``bodies`` in one batch on a BatchingConnection with confirms; return how many
    writes reached the transport."""
    import pika
    from pilotfish.bridge import pika_batch
    writes = []
    state = {"confirmed": 0}

    def on_channel(ch) -> None:
        def on_confirm(frame) -> None:
            state["confirmed"] = max(state["confirmed"], frame.method.delivery_tag)
            if state["confirmed"] >= len(bodies):
                conn.close()
        ch.confirm_delivery(on_confirm)
        transport = conn._transport
        real_write = transport.write
        transport.write = lambda data: (writes.append(len(data)), real_write(data))[1]
        with conn.batch():
            for b in bodies:
                ch.basic_publish("", queue_name, b, pika.BasicProperties(delivery_mode=2))
        transport.write = real_write

    conn = pika_batch.BatchingConnection(
        pika.ConnectionParameters(*RABBITMQ, credentials=pika.PlainCredentials("guest", "guest")),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, reason: c.ioloop.stop())
    conn.ioloop.call_later(30, conn.ioloop.stop)
    conn.ioloop.start()
    assert state["confirmed"] == len(bodies)
    return len(writes)


def test_a_batch_arrives_whole_and_in_order_in_few_writes(queue):
    from pilotfish.bridge import pika_batch
    assert pika_batch.HOOKED, "pika lost BaseConnection._adapter_emit_data: batching is off"
    ch, name = queue
    bodies = [b"%06d:" % i + b"x" * 400 for i in range(1500)]  # ~0.6 MB: past MAX_HELD
    writes = _publish_page(name, bodies)
    assert 2 <= writes <= 4, writes  # (three per message without the batch: 4,500)
    got = []
    for _ in range(len(bodies)):
        _, _, body = ch.basic_get(name, auto_ack=True)
        got.append(body)
    assert got == bodies
