"""pilotfish: a pilot-job framework for HPC.

``pilotfish.Client`` is the Python API (imported lazily, so the core stays light).
"""
__version__ = "0.1.0"
__all__ = ["Client", "__version__"]


def __getattr__(name: str):
    if name == "Client":
        from pilotfish.server.client import Client
        return Client
    raise AttributeError(f"module 'pilotfish' has no attribute {name!r}")
