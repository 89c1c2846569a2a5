"""The web dashboard and REST API (``pilotfish web``): an edge process, a client of the job
server with keys of its own; it imports the core and the client, never the server room."""
