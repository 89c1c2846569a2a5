"""The job server: database, state machine, apps, the ZeroMQ service, client API and admin CLI."""
