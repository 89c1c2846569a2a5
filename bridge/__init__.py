"""The edge: processes that connect production systems to the server, each a client of it.

``amqp``: the AMQP bridge (job receiver and status publisher) to a RabbitMQ broker. Modules
here import the core and the client, never the server room; pika is imported only where a
connection is made, so ``pilotfish -h`` stays fast.
"""
