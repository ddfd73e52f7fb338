"""Fixtures for the robot node tests: every process, node and control client a test starts is closed at
teardown, whatever failed, so no leaked ZeroMQ context or process can hang a later test."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from robot_support import gentle_config
from support import free_address, serve_process

from robot.config import RobotConfig
from robot.control import ControlClient
from robot.node import RobotNode

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts: killed and reaped at teardown."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)  # reaps it and closes its pipes


@pytest.fixture
def policy_node(checkpoint, processes) -> Callable[..., subprocess.Popen]:
    """`start(address, *options)`: a `vla-steer serve` process for the test checkpoint."""

    def start(address: str, *options: str) -> subprocess.Popen:
        proc = serve_process(checkpoint, address, extra=options)
        processes.append(proc)
        return proc

    return start


@pytest.fixture
def robot_node() -> Iterator[Callable[..., RobotNode]]:
    """`start(server, **options)`: a started MuJoCo robot node (gentle config, its own control address)."""
    nodes: list[RobotNode] = []

    def start(server: str, config: RobotConfig | None = None, **options: Any) -> RobotNode:
        options = {"control": free_address(), "infer_timeout": 10.0, **options}
        node = RobotNode(config or gentle_config(), "mujoco", server=server, **options)
        nodes.append(node)
        return node.start()

    yield start
    for node in nodes:
        node.close()


@pytest.fixture
def control() -> Iterator[Callable[[str], ControlClient]]:
    """`connect(address)`: a client of a robot node's control socket."""
    clients: list[ControlClient] = []

    def connect(address: str) -> ControlClient:
        clients.append(ControlClient(address, timeout=5.0))
        return clients[-1]

    yield connect
    for c in clients:
        c.close()
