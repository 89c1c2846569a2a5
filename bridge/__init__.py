"""The edge: processes that bring work in from production systems and send news out, each a
client of the server (never part of its loop)."""
