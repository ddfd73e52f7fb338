"""Helpers shared by the tests that run `vla-steer serve` as a real process, or several clients at once."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The installed command, as a user runs it (the venv's console script beside this interpreter).
VLA_STEER = str(Path(sys.executable).with_name("vla-steer"))
ROOT = Path(__file__).resolve().parents[1]
# The LIBERO node's own venv (robosuite 1.4): scripts/make_libero_venv.sh, or $VLA_STEER_LIBERO_PYTHON.
LIBERO_PYTHON = Path(os.environ.get("VLA_STEER_LIBERO_PYTHON", ROOT / ".venv-libero" / "bin" / "python"))


def free_address() -> str:
    """A loopback TCP address nobody listens on (for a process that binds it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def serve_process(
    checkpoint: Path, address: str, *, directions: bool = True, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """`vla-steer serve` for the test checkpoint (plus `extra` options), returned once it says it is serving."""
    cmd = [
        VLA_STEER,
        "serve",
        "--policy",
        str(checkpoint / "policy.yaml"),
        "--bind",
        address,
    ]
    if directions:
        cmd += ["--directions", str(checkpoint / "directions")]
    cmd += extra
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    line = proc.stdout.readline()
    if "serving tiny-vla on" not in line:  # no process left behind by a failed start
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"vla-steer serve did not start: {line}{err}")
    return proc


@contextlib.contextmanager
def serving(policy: Path | str, *options: str) -> Iterator[str]:
    """`vla-steer serve --policy POLICY OPTIONS...` on a free loopback address, yielded once it says it is
    serving; killed on the way out, whatever happened."""
    address = free_address()
    proc = subprocess.Popen(
        [VLA_STEER, "serve", "--policy", str(policy), "--bind", address, *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    started = False
    try:
        line = proc.stdout.readline()
        started = f"on {address}" in line
        if started:
            yield address
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    if not started:
        raise AssertionError(f"vla-steer serve did not start: {line}{err}")


def run_libero(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`LIBERO_PYTHON ARGS` from the checkout, as a user runs the LIBERO node: its own venv, this tree's code."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(LIBERO_PYTHON), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=env | {"MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")},
    )  # fmt: skip


def wait_for(condition, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll `condition()` until it returns a truthy value, which is returned; fail the test after `timeout`.

    The one way tests wait for something to happen (instead of sleeping and then asserting): generous
    timeouts, because a loaded CI machine is slow, and an event rather than a duration is what is tested.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def in_threads(target: Callable[[int], Any], n: int, timeout: float = 120.0) -> list[Any]:
    """`target(i)` for i in 0..n-1, each in its own thread, at once; their results in order. Fails the test if
    any raised, or is still running after `timeout` (a stuck client is an error, never a missing result)."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not errors, errors
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not stuck, f"threads {stuck} still running after {timeout} s"
    return results


def side_python(name: str, env_var: str) -> str:
    """An interpreter for packages that cannot join the project's environment: $`env_var`, or the side
    venv `name` (openpi-client, rerun) that benchmarks/side_venv.py finds or builds once; the test fails
    if none can be had."""
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        from side_venv import side_python as find
    finally:
        sys.path.remove(benchmarks)
    python, notes = find(name, explicit=os.environ.get(env_var))
    assert python is not None, f"no interpreter has {name}, and building one failed: {notes}"
    return python


def exited(pid: int) -> bool:
    """The process is gone (or a zombie its parent has yet to reap): it runs no more."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
