"""The grid on Ray (`vla-steer eval --ray [ADDRESS]`): policy nodes and simulator workers as Ray actors.

A `PolicyNodeActor` runs `vla-steer serve` (the node code a user runs by hand) on a GPU where the cluster
has one (else a CPU), bound to loopback: the workers that use it are placed on the same Ray node (node
affinity), so observations never cross the network and nothing listens beyond the machine. A
`SimWorkerActor` is a local slot (`sim.scheduler.LocalSlot`) on that node: it spawns the same worker
subprocess, in the LIBERO venv for LIBERO cells, and streams its episode events back, so the driver's
scheduler, progress and resume work as locally. Every worker writes into the one store at the absolute
path `--out` (on a cluster of several machines, a filesystem they share). Needs the `ray` extra.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sim.grid import Cell
from sim.scheduler import LocalSlot
from sim.worker import WorkerFailed

# Passed to the actors' processes, where set: how they find this code, the LIBERO venv, a headless GL.
ENV_VARS = ("PYTHONPATH", "VLA_STEER_LIBERO_PYTHON", "MUJOCO_GL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
SERVING = "serving "


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'vla-steer[ray]'") from None
    return ray


class PolicyNode:
    """`vla-steer serve ARGS --bind tcp://127.0.0.1:0` in a Ray actor; `address()` once it is serving."""

    def __init__(self, serve_args: Sequence[str]):
        command = Path(sys.executable).with_name("vla-steer")
        self.proc = subprocess.Popen(
            [str(command), "serve", *serve_args, "--bind", "tcp://127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()
        if SERVING not in line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise RuntimeError(f"vla-steer serve did not start on this Ray node: {line}{err[-3000:]}")
        self._address = line.split(" on ", 1)[1].split()[0]

    def address(self) -> str:
        return self._address

    def node_id(self) -> str:
        return _ray().get_runtime_context().get_node_id()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class SimWorker:
    """A local slot on a Ray node; `run` streams a cell's episode events."""

    def __init__(self, run: Mapping[str, Any]):
        self.slot = LocalSlot(run)

    def run(self, cell: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self.slot.run(Cell.from_dict(cell))

    def close(self) -> None:
        self.slot.close()


class RaySlot:
    """The driver's side of a `SimWorker` actor (the scheduler's `Slot`)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def run(self, cell: Cell) -> Iterator[dict[str, Any]]:
        ray = _ray()
        try:
            for ref in self.actor.run.options(num_returns="streaming").remote(cell.as_dict()):
                yield ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, WorkerFailed) else None
            raise cause or WorkerFailed(f"a Ray worker failed: {e}", 4) from None
        except ray.exceptions.RayActorError as e:
            raise WorkerFailed(f"a Ray worker died: {e}", 4) from None

    def close(self) -> None:
        ray = _ray()
        with contextlib.suppress(Exception):  # dead already, or stuck: it goes either way
            ray.get(self.actor.close.remote(), timeout=30)
        ray.kill(self.actor)


class RayCluster:
    """Connect (or start a local cluster: `address` "local"), start `nodes` policy nodes, make worker slots."""

    def __init__(self, address: str, serve_args: Sequence[str], nodes: int = 1):
        ray = self.ray = _ray()
        env = {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}
        ray.init(
            address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
            runtime_env={"env_vars": env}, configure_logging=False,
        )  # fmt: skip
        gpu = ray.cluster_resources().get("GPU", 0) >= 1
        if gpu and "--device" not in serve_args:
            serve_args = [*serve_args, "--device", "cuda"]
        actor = ray.remote(num_gpus=1, num_cpus=0)(PolicyNode) if gpu else ray.remote(num_cpus=1)(PolicyNode)
        self.nodes = [actor.remote(list(serve_args)) for _ in range(nodes)]
        try:
            self.addresses = ray.get([n.address.remote() for n in self.nodes])
            self.node_ids = ray.get([n.node_id.remote() for n in self.nodes])
        except ray.exceptions.RayActorError as e:
            self.shutdown()
            raise RuntimeError(f"the policy node did not start on Ray: {e}") from None

    def slots(self, workers: int, run: Mapping[str, Any]) -> list[RaySlot]:
        """`workers` SimWorker actors, spread over the policy nodes, each on its node's machine."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        out = []
        for i in range(workers):
            k = i % len(self.nodes)
            strategy = NodeAffinitySchedulingStrategy(self.node_ids[k], soft=False)
            actor = self.ray.remote(num_cpus=1)(SimWorker).options(scheduling_strategy=strategy)
            out.append(RaySlot(actor.remote({**run, "server": self.addresses[k]})))
        return out

    def shutdown(self) -> None:
        ray = self.ray
        for n in self.nodes:
            with contextlib.suppress(Exception):  # a dead actor's node process went with it
                ray.get(n.stop.remote(), timeout=30)
        ray.shutdown()
