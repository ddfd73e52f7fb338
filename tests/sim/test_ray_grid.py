"""`sim.ray_grid` without a Ray cluster: the resource check that keeps `eval --ray` from waiting forever for
an actor Ray cannot place, and the policy node's process (its output read to the end, its exit with its
actor). The grid on a real local Ray cluster is in test_grid.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from sim.ray_grid import Machine, PolicyNode, fit
from tests.support import exited, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_the_resource_check_on_described_clusters():
    """Clusters of several machines and GPUs cannot exist here: described as `ray.nodes()` would list them."""
    laptop = [Machine("a", 2, 0)]
    assert fit(laptop, 1, 1) is None and fit(laptop, 1, 1, ["a"]) is None
    why = fit(laptop, 1, 2)  # a CPU policy node and two workers: 3 CPUs
    assert why.startswith(
        "--workers 2: each worker takes a CPU, as each policy node does, and the cluster has 2"
    )
    gpus = [Machine("g1", 8, 1), Machine("g2", 8, 1), Machine("c", 64, 0)]
    assert fit(gpus, 3, 1).startswith("--policy-nodes 3: each policy node takes a GPU, and the cluster has 2")
    assert fit(gpus, 2, 16) is None  # 80 CPUs in all; the GPU nodes take none
    # Placed: the workers go where their policy nodes are, 8 each on 8-CPU machines: fits; 9 does not.
    assert fit(gpus, 2, 16, ["g1", "g2"]) is None
    why = fit(gpus, 2, 17, ["g1", "g2"])
    assert (
        why.startswith("--workers 17: the 1 policy node(s) on Ray node g1 get 9 workers") and "8 CPUs" in why
    )


CHATTY = textwrap.dedent(
    """
    import sys
    print("serving fake on tcp://127.0.0.1:1 (knobs: none)", flush=True)
    for _ in range(4096):  # 256 KiB on each stream: several pipes' worth
        print("x" * 63, flush=True)
        print("y" * 63, file=sys.stderr, flush=True)
    open(sys.argv[1], "w").close()
    """
)


def test_the_policy_node_reads_its_output_to_the_end(tmp_path):
    """A node that logs more than a pipe holds goes on (it would block inside its logging otherwise)."""
    done = tmp_path / "done"
    node = PolicyNode(
        [], str(tmp_path / "logs" / "node.log"), command=[sys.executable, "-c", CHATTY, str(done)]
    )
    try:
        assert node.address() == "tcp://127.0.0.1:1"
        wait_for(done.exists, timeout=60, interval=0.05, what="the node to write all it says")
    finally:
        node.stop()
    text = (tmp_path / "logs" / "node.log").read_text()
    assert text.count("x" * 63) == 4096 and text.count("y" * 63) == 4096 and "serving fake" in text


def test_the_policy_node_exits_when_its_actor_process_dies(checkpoint, tmp_path):
    """`vla-steer serve` under a PolicyNode whose process is killed (as Ray kills an actor) exits too."""
    holder = textwrap.dedent(
        f"""
        import sys, time
        from sim.ray_grid import PolicyNode
        node = PolicyNode(["--policy", {str(checkpoint / "policy.yaml")!r}], {str(tmp_path / "node.log")!r})
        node.address()
        print(node.proc.pid, flush=True)
        time.sleep(600)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, env=env)
    try:
        serve = int(proc.stdout.readline() or 0)
        assert serve, (tmp_path / "node.log").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        wait_for(lambda: exited(serve), timeout=30, what="serve to exit")
    finally:
        proc.kill()
        proc.wait()
