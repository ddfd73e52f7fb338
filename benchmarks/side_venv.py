"""Side virtual environments for packages whose pins conflict with the project's environment (openpi-client
pins numpy<2) or that are too heavy for it (rerun-sdk ships its viewer binary): found, or built once, under
$XDG_CACHE_HOME/vla-steer/<name>-venv. Used by the transport benchmark and by the tests that drive those
packages; standard library only, so any script can import it from this directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# name -> (what to pip install, what must then import)
KNOWN: dict[str, tuple[list[str], str]] = {
    # openpi-client 0.1.2 pins numpy<2 and imports typing_extensions without declaring it
    "openpi-client": (
        ["openpi-client", "websockets>=13", "typing-extensions"],
        "import openpi_client, openpi_client.msgpack_numpy, openpi_client.websocket_client_policy, "
        "openpi_client.image_tools, websockets.asyncio.server, websockets.sync.client",
    ),
    # rerun-sdk is a 170 MB wheel; `vla-steer view` runs from it with the torch-free store's needs
    "rerun": (
        ["rerun-sdk>=0.23", "numpy", "msgpack", "pyzmq"],
        "import rerun, rerun.chunk, numpy, msgpack, zmq",
    ),
}


def venv_dir(name: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vla-steer" / f"{name}-venv"


def can_import(python: str, imports: str) -> tuple[bool, str]:
    """Whether `python -c imports` works, and the last line of its error if not."""
    try:
        r = subprocess.run([python, "-c", imports], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{python}: {e}"
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


def side_python(name: str, *, explicit: str | None = None, install: bool = True) -> tuple[str | None, dict]:
    """An interpreter with the packages of `KNOWN[name]`: `explicit` if given, else this one or the side
    venv `name`, which is created with pip when missing and `install` allows. (python, notes)."""
    packages, imports = KNOWN[name]
    notes: dict = {"tried": []}
    candidates = [explicit] if explicit else [sys.executable, str(venv_dir(name) / "bin" / "python")]
    for python in candidates:
        if not python or not Path(python).exists():
            notes["tried"].append({"python": python, "ok": False, "why": "does not exist"})
            continue
        ok, why = can_import(python, imports)
        notes["tried"].append({"python": python, "ok": ok, **({} if ok else {"why": why})})
        if ok:
            return python, notes
    if explicit or not install:
        return None, notes
    venv = venv_dir(name)
    base = getattr(sys, "_base_executable", None) or sys.executable
    print(f"creating the side environment {venv} (one-off: {' '.join(packages)})", file=sys.stderr)
    try:
        subprocess.run(
            [base, "-m", "venv", str(venv)], check=True, capture_output=True, text=True, timeout=300
        )
        python = str(venv / "bin" / "python")
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages],
            check=True,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", "") or ""
        notes["install_error"] = f"{e}; {err.strip()[-2000:]}"
        return None, notes
    ok, why = can_import(python, imports)
    notes["tried"].append({"python": python, "ok": ok, "created": True, **({} if ok else {"why": why})})
    return (python, notes) if ok else (None, notes)
