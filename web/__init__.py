"""The web room: pages, REST and the plots that `pilotfish plot` shares with them (clients of the server)."""
