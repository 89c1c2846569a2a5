"""The web room: the dashboard and REST API (``pilotfish web``) and the plots that
``pilotfish plot``/``report`` share with them. Clients of the job server with keys of their own:
they import the core and the client, never the server room."""
