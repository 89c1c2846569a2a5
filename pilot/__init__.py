"""Pilots: node agents that run tasks on allocated nodes (later: pilot head, batch adapters)."""
