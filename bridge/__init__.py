"""The edge: processes that connect production systems to the server, each a client of it
(never part of its loop).

``amqp``: the AMQP bridge (job receiver and status publisher) to a RabbitMQ broker; ``pg_*``:
the PostgreSQL NOTIFY job source. Modules here import the core and the client, never the
server room; pika and psycopg are imported only where a connection is made, so ``pilotfish -h``
stays fast.
"""
