"""The grid on Ray (`vla-steer eval --ray [ADDRESS]`): policy nodes and simulator workers as Ray actors.

A `PolicyNode` actor runs `vla-steer serve` (the node code a user runs by hand, exiting with its actor) on a
GPU where the cluster has one (else a CPU), bound to loopback, its output in a log under `--out/logs/`: the
workers that use it are placed on the same Ray node (node affinity), so observations never cross the
network and nothing listens beyond the machine. A `SimWorker` actor is a local slot
(`sim.scheduler.LocalSlot`) on that node: it spawns the same worker subprocess, in the LIBERO venv for
LIBERO cells, and streams its episode events back, so the driver's scheduler, progress and resume work as
locally. Every worker writes into the one store at the absolute path `--out` (on a cluster of several
machines, a filesystem they share). Needs the `ray` extra.

Before any actor starts, the requested policy nodes and workers are checked against the cluster's
resources (`fit`): an actor Ray cannot place would wait forever. Each actor is then waited for with a
timeout. A local cluster (`--ray` without an address) listens on loopback only, is sized to what was asked
(`--workers` beside its policy nodes, as local worker processes share the cores), and has Ray's token
authentication (on by default for local clusters from Ray 2.59).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sim.grid import Cell
from sim.scheduler import LocalSlot
from sim.worker import WorkerFailed

# Passed to the actors' processes, where set: how they find this code, the LIBERO venv, a headless GL.
ENV_VARS = ("PYTHONPATH", "VLA_STEER_LIBERO_PYTHON", "MUJOCO_GL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
SERVING = "serving "
# `vla-steer serve`, exiting when its actor's process dies (`sim.worker.exit_with_parent`).
SERVE = [
    "-c",
    "import sys; from sim.worker import exit_with_parent; exit_with_parent(); "
    "from vla_steer.app.cli import main; sys.exit(main())",
    "serve",
]
PLACE_TIMEOUT = 180.0  # seconds for Ray to place and start an actor (a free CPU/GPU is there: `fit` said so)
LOAD_TIMEOUT = 1800.0  # seconds for a policy node to load its weights and serve (a 7B model from a slow disk)


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'vla-steer[ray]'") from None
    return ray


class PolicyNode:
    """`vla-steer serve ARGS --bind tcp://127.0.0.1:0` in a Ray actor, its stderr and later stdout in `log`;
    `address()` once it is serving, `check(settings)` the node's hello as the workers will see it."""

    def __init__(self, serve_args: Sequence[str], log: str, command: Sequence[str] | None = None):
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        self.log: IO[str] = open(log, "a", buffering=1)  # noqa: SIM115 (open for the node's life)
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, *SERVE]), *serve_args, "--bind", "tcp://127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )  # fmt: skip
        self._address: str | None = None

    def address(self) -> str:
        if self._address is None:
            line = self.proc.stdout.readline()
            if SERVING not in line:
                self.proc.kill()
                self.proc.wait()
                tail = Path(self.log.name).read_text()[-3000:]
                raise RuntimeError(f"vla-steer serve did not start on this Ray node: {line}{tail}")
            self._address = line.split(" on ", 1)[1].split()[0]
            self.log.write(line)
            # Read on, or the node blocks once a pipe's worth of output is unread.
            threading.Thread(target=self._drain, name="serve-stdout", daemon=True).start()
        return self._address

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)

    def node_id(self) -> str:
        return _ray().get_runtime_context().get_node_id()

    def check(self, settings: Sequence[Mapping[str, float]]) -> dict[str, Any]:
        """The node's hello (`ServerInfo` payload) from here, where the workers connect; or what is wrong."""
        from sim import session
        from vla_steer.wire import Client

        try:
            with Client(self.address(), timeout=30.0) as c:
                return {"info": session.check_node(c, settings, 60.0).to_payload()}
        except session.NoPolicyNode as e:
            return {"error": str(e), "code": session.NO_POLICY_NODE}
        except ValueError as e:
            return {"error": str(e), "code": 2}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


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


@dataclass(frozen=True)
class Machine:
    """A Ray node's resources, as `ray.nodes()` lists them."""

    node_id: str
    cpus: float
    gpus: float


def machines(ray: Any) -> list[Machine]:
    return [
        Machine(n["NodeID"], n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def fit(
    cluster: Sequence[Machine], nodes: int, workers: int, placed: Sequence[str] | None = None
) -> str | None:
    """Why `nodes` policy nodes (a GPU each where the cluster has GPUs, else a CPU) and `workers` workers (a
    CPU each, on their policy node's machine, worker i using node i % nodes) cannot run on `cluster`; None
    if they can. Before the nodes start (`placed` None) only the totals can be checked; after, `placed` (the
    machine of each node) says how many workers each machine gets."""
    gpu = sum(m.gpus for m in cluster) >= 1
    if gpu and sum(int(m.gpus) for m in cluster) < nodes:
        return (
            f"--policy-nodes {nodes}: each policy node takes a GPU, and the cluster has "
            f"{sum(int(m.gpus) for m in cluster)}"
        )
    node_cpus = 0 if gpu else 1
    if placed is None:
        cpus = sum(m.cpus for m in cluster)
        if workers + nodes * node_cpus > cpus:
            return (
                f"--workers {workers}: each worker takes a CPU" + ("" if gpu else ", as each policy node does,")
                + f" and the cluster has {cpus:g} CPUs; ask for fewer --workers"
                + ("" if gpu else " or --policy-nodes")
            )  # fmt: skip
        return None
    by_id = {m.node_id: m for m in cluster}
    for node_id in dict.fromkeys(placed):
        here = [k for k, p in enumerate(placed) if p == node_id]
        need = sum(1 for i in range(workers) if i % nodes in here) + len(here) * node_cpus
        if need > by_id[node_id].cpus:
            return (
                f"--workers {workers}: the {len(here)} policy node(s) on Ray node {node_id[:12]} get "
                f"{need - len(here) * node_cpus} workers, a CPU each on that machine, which has "
                f"{by_id[node_id].cpus:g} CPUs" + ("" if gpu else " (a policy node there takes one too)")
                + "; ask for fewer --workers"
            )  # fmt: skip
    return None


class RayCluster:
    """Connect (or start a local cluster: `address` "local"), start `nodes` policy nodes that can take
    `workers` workers, their logs in `log_dir`; `check` them and make worker slots."""

    def __init__(self, address: str, serve_args: Sequence[str], nodes: int, workers: int, log_dir: Path):
        self.nodes: list[Any] = []
        self.workers = workers
        local = address == "local"
        if local:  # Ray reads this at import: node address 127.0.0.1, so every Ray server binds loopback only
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray = self.ray = _ray()
        env = {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}
        sizing = {"num_cpus": max(os.cpu_count() or 1, workers + nodes), "_node_ip_address": "127.0.0.1"}
        ray.init(
            address=None if local else address, include_dashboard=False, log_to_driver=False,
            runtime_env={"env_vars": env}, configure_logging=False, **(sizing if local else {}),
        )  # fmt: skip
        try:
            if local and any(n["NodeManagerAddress"] != "127.0.0.1" for n in ray.nodes()):
                raise RuntimeError(
                    "the local Ray cluster would listen beyond loopback (Ray was imported before --ray set "
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); start a cluster yourself and pass its address"
                )
            self._start(serve_args, nodes, log_dir)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, serve_args: Sequence[str], nodes: int, log_dir: Path) -> None:
        ray = self.ray
        cluster = machines(ray)
        why = fit(cluster, nodes, self.workers)
        if why:
            raise ValueError(f"{why} (Ray lists {len(cluster)} node(s): `ray status` says more)")
        gpu = sum(m.gpus for m in cluster) >= 1
        if gpu and "--device" not in serve_args:
            serve_args = [*serve_args, "--device", "cuda"]
        actor = ray.remote(num_gpus=1, num_cpus=0)(PolicyNode) if gpu else ray.remote(num_cpus=1)(PolicyNode)
        self.nodes = [
            actor.remote(list(serve_args), str(log_dir / f"policy-node-{k + 1}.log")) for k in range(nodes)
        ]
        self._wait(
            [n.__ray_ready__.remote() for n in self.nodes], PLACE_TIMEOUT, "a policy node to be placed"
        )
        self.node_ids = self._wait(
            [n.node_id.remote() for n in self.nodes], 60.0, "the policy nodes' Ray nodes"
        )
        why = fit(cluster, nodes, self.workers, self.node_ids)
        if why:
            raise ValueError(why)
        self.addresses = self._wait(
            [n.address.remote() for n in self.nodes],
            LOAD_TIMEOUT,
            f"the policy nodes to serve (logs: {log_dir})",
        )

    def _wait(self, refs: list[Any], timeout: float, what: str) -> list[Any]:
        ray = self.ray
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"timed out after {timeout:g} s waiting for {what}: the cluster's resources are taken "
                "(`ray status` says by what)"
            ) from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            raise RuntimeError(f"waiting for {what}, an actor failed: {e}") from None

    def check(self, settings: Sequence[Mapping[str, float]]) -> list[Any]:
        """Each node's `ServerInfo`, checked on its own machine; NoPolicyNode or ValueError as locally."""
        from sim import session
        from vla_steer.wire import ServerInfo

        out = []
        for r in self._wait(
            [n.check.remote(list(settings)) for n in self.nodes], 120.0, "the policy nodes' hello"
        ):
            if "error" in r:
                raise (session.NoPolicyNode if r["code"] == session.NO_POLICY_NODE else ValueError)(
                    r["error"]
                )
            out.append(ServerInfo.from_payload(r["info"]))
        return out

    def slots(self, run: Mapping[str, Any]) -> list[RaySlot]:
        """The workers as SimWorker actors, spread over the policy nodes, each on its node's machine."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actors = []
        for i in range(self.workers):
            k = i % len(self.nodes)
            strategy = NodeAffinitySchedulingStrategy(self.node_ids[k], soft=False)
            actor = self.ray.remote(num_cpus=1)(SimWorker).options(scheduling_strategy=strategy)
            actors.append(actor.remote({**run, "server": self.addresses[k]}))
        slots = [RaySlot(a) for a in actors]
        try:
            self._wait([a.__ray_ready__.remote() for a in actors], PLACE_TIMEOUT, "the workers to be placed")
        except BaseException:
            for s in slots:
                s.close()
            raise
        return slots

    def shutdown(self) -> None:
        ray = self.ray
        for n in self.nodes:
            with contextlib.suppress(Exception):  # a dead actor's node process went with it
                ray.get(n.stop.remote(), timeout=30)
        ray.shutdown()
