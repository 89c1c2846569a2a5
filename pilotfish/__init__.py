"""pilotfish: a pilot-job framework for HPC.

``pilotfish.Client`` is the Python API (imported lazily, so the core stays light).
"""
from pathlib import Path as _Path

__version__ = "0.1.0"
__all__ = ["Client", "__version__"]

# setup.cfg maps the repository's room folders (server/, pilot/, ...) into this package. When
# pilotfish is imported from a source checkout instead of an installed copy (``python -m
# pilotfish`` in the repository), make the same mapping here so that pilotfish.server is found.
_root = _Path(__file__).resolve().parent.parent
if (_root / "setup.cfg").is_file() and (_root / "server" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 - __path__ is defined for packages
del _root


def __getattr__(name: str):
    if name == "Client":
        from pilotfish.client import Client
        return Client
    raise AttributeError(f"module 'pilotfish' has no attribute {name!r}")
