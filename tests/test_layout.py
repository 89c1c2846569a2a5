"""The rooms of DESIGN.md keep their arrows: who may import whom, read from the installed code."""
import ast
from pathlib import Path

import pilotfish

PKG = Path(pilotfish.__file__).resolve().parent
ROOMS = {"server": "pilotfish.server", "pilot": "pilotfish.pilot",
         "launcher": "pilotfish.launcher", "container": "pilotfish.container",
         "bridge": "pilotfish.bridge", "web": "pilotfish.web",
         "transfer": "pilotfish.transfer"}
CORE = ["protocol.py", "settings.py", "errors.py", "validate.py", "console.py", "client.py",
        "pilotstate.py", "arrays.py", "usage.py", "timespec.py"]


def in_package(module: str, package: str) -> bool:
    """``pilotfish.pilot.agent`` is in ``pilotfish.pilot``; ``pilotfish.pilotstate`` is not."""
    return module == package or module.startswith(package + ".")


def room_dir(room: str) -> Path:
    mod = __import__(ROOMS[room], fromlist=["_"])
    return Path(mod.__file__).resolve().parent


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved inside pilotfish)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.add("." * node.level + (node.module or ""))
            else:
                out.add(node.module)
    return out


def test_server_and_pilot_never_import_each_other():
    """server and pilot meet only through the protocol."""
    for room, other in (("server", "pilotfish.pilot"), ("pilot", "pilotfish.server")):
        for f in room_dir(room).glob("*.py"):
            bad = [m for m in imports(f) if in_package(m, other) or m.startswith("..")]
            assert not bad, f"{room}/{f.name} imports {bad}"


def test_the_bridge_imports_neither_server_nor_pilot():
    """Edge processes are clients of the server: core and client only (DESIGN: the edge)."""
    for f in room_dir("bridge").glob("*.py"):
        bad = [m for m in imports(f) if in_package(m, "pilotfish.server")
               or in_package(m, "pilotfish.pilot") or m.startswith("..")]
        assert not bad, f"bridge/{f.name} imports {bad}"


def test_web_imports_neither_server_nor_pilot():
    """The web room (pages, REST, plots, `pilotfish plot`/`report`) is a client of the server,
    like the bridge: core and client only."""
    files = list(room_dir("web").glob("*.py"))
    assert len(files) >= 5
    for f in files:
        bad = [m for m in imports(f) if in_package(m, "pilotfish.server")
               or in_package(m, "pilotfish.pilot") or in_package(m, "pilotfish.bridge")
               or m.startswith("..")]
        assert not bad, f"web/{f.name} imports {bad}"


def test_matplotlib_is_imported_only_inside_the_plot_functions():
    """No module imports matplotlib at its top: web/plots.py does, in the functions that draw."""
    files = list(PKG.glob("*.py")) + [f for r in ROOMS for f in room_dir(r).glob("*.py")]
    for f in files:
        top = [n for n in ast.parse(f.read_text()).body
               if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top for a in n.names} | {
            n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert "matplotlib" not in names, f.name
    assert "import matplotlib" in (room_dir("web") / "plots.py").read_text()
def test_transfer_imports_the_core_only():
    """transfer/ is used by the server (URL checks at the door), the node agent's stager and the
    site stager: it imports the core (and dataroots) only, never a room."""
    others = [p for r, p in ROOMS.items() if r != "transfer"] + ["pilotfish.site_configs"]
    for f in room_dir("transfer").glob("*.py"):
        bad = [m for m in imports(f) if any(in_package(m, o) for o in others)
               or m.startswith("..")]
        assert not bad, f"transfer/{f.name} imports {bad}"


def test_core_imports_no_room():
    """The core modules (protocol, settings, errors, validate, console, client, pilot states)
    import no room."""
    for name in CORE:
        mods = imports(PKG / name)
        bad = [m for m in mods if any(in_package(m, r) for r in ROOMS.values())]
        assert not bad, f"pilotfish/{name} imports {bad}"


def test_mpi4py_is_not_imported_by_the_package():
    """The package installs and runs without an MPI library: nothing imports mpi4py at the top."""
    files = list(PKG.glob("*.py")) + [f for r in ROOMS for f in room_dir(r).glob("*.py")]
    assert len(files) > 10
    for f in files:
        top = [n for n in ast.parse(f.read_text()).body
               if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top for a in n.names} | {
            n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert "mpi4py" not in names, f.name


def test_the_command_line_starts_without_heavy_imports():
    """Every `pilotfish ...` (a node agent's start included, 4 at once on a node at ramp-up)
    imports the umbrella CLI: the database, schema, template and MPI libraries must wait until
    a command needs them."""
    import subprocess
    import sys
    code = ("import pilotfish.cli, sys; print(sorted({m.split('.')[0] for m in sys.modules}"
            " & {'pydantic', 'sqlalchemy', 'jinja2', 'mpi4py', 'pika', 'matplotlib', 'fastapi',"
            " 'starlette', 'uvicorn', 'selenium'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out
