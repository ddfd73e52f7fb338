"""Throughput of one policy node serving 8 concurrent clients, each with its own steering setting: batched
inference (`vla-steer serve --batch-max 8 --batch-wait-ms 2`) against one request at a time (`--batch-max 1`).

Policy: the bundled demo VLA (`--policy demo_vla`, a TinyVLA: 64x64 wrist image, state, 7 greedy action
tokens) on the CPU, served by the installed `vla-steer serve` in its own process, with 8 knobs (directions of
16 random neurons in random layers, seeded). Clients: 8 threads of this process, each a `Client` sending
`infer(obs, steer={"k<i>": 6.0})` (8 different settings) back to back on one task's instruction (a grid's
clients mostly share a task; prompts of other lengths batch separately). The first round of each mode is
warm-up, and the batched actions are checked against the sequential ones (exact, greedy tokens).

Headline: inferences/s batched / inferences/s sequential, target >= 3.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import arg_parser, load_average, machine, start_node, write_result  # noqa: E402

from vla_steer.core.discovery.direction import Direction, DirectionNeuron  # noqa: E402
from vla_steer.wire import Client, Observation  # noqa: E402

NAME = "batched_infer"
TARGET = 3.0
CLIENTS = 8
INSTRUCTION = "lift the cube quickly and carry it high"


def write_directions(directory: Path, n_layers: int, d_mlp: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(CLIENTS):
        neurons = [
            DirectionNeuron(int(rng.integers(n_layers)), int(j), 1.0)
            for j in rng.choice(d_mlp, 16, replace=False)
        ]
        Direction(f"k{i}", f"k{i}", neurons, {"backbone": "language"}).save(directory)


def serve(directions: Path, batch_max: int) -> tuple[subprocess.Popen, str]:
    return start_node(["--policy", "demo_vla", "--directions", str(directions), "--batch-max", str(batch_max),
                       "--batch-wait-ms", "2"])  # fmt: skip


def run_mode(address: str, observations: list[Observation], rounds: int) -> dict:
    """Every client sends `rounds` inferences back to back; the first is warm-up (not timed)."""
    first: dict[int, np.ndarray] = {}
    batches: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS + 1)
    done = threading.Barrier(CLIENTS + 1)

    def client(i: int) -> None:
        try:
            with Client(address, timeout=120) as c:
                first[i] = c.infer(observations[i], steer={f"k{i}": 6.0}).actions.copy()
                start.wait(300)
                for _ in range(rounds):
                    batches.append(c.infer(observations[i], steer={f"k{i}": 6.0}).info["batch"])
                done.wait(300)
        except BaseException as e:
            errors.append(e)
            start.abort()
            done.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait(300)
    t0 = time.perf_counter()
    done.wait(600)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join(10)
    if errors:
        raise errors[0]
    return {
        "inferences": CLIENTS * rounds,
        "wall_s": wall,
        "per_s": CLIENTS * rounds / wall,
        "mean_batch": float(np.mean(batches)),
        "first_actions": first,
    }


def main() -> int:
    args = arg_parser(__doc__.split("\n")[0]).parse_args()
    rounds = 4 if args.quick else 40
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        from policies.resolve import resolve_policy, stack_dims

        n_layers, d_mlp = stack_dims(resolve_policy("demo_vla"))["language"]  # from config files, no weights
        write_directions(Path(tmp) / "directions", n_layers, d_mlp)
        modes, observations = {}, []
        for mode, batch_max in (("sequential", 1), ("batched", CLIENTS)):
            proc, address = serve(Path(tmp) / "directions", batch_max)
            try:
                if not observations:
                    with Client(address, timeout=60) as c:
                        info = c.hello()
                    (key, shape), state_dim = next(iter(info.image_keys.items())), info.info["state_dim"]
                    observations = [
                        Observation(
                            INSTRUCTION,
                            {key: rng.integers(0, 256, shape, dtype=np.uint8)},
                            rng.normal(size=state_dim).astype(np.float32) if state_dim else None,
                        )
                        for _ in range(CLIENTS)
                    ]
                modes[mode] = run_mode(address, observations, rounds)
            finally:
                proc.terminate()
                proc.wait(30)
    same = all(
        np.array_equal(modes["batched"]["first_actions"][i], modes["sequential"]["first_actions"][i])
        for i in range(CLIENTS)
    )
    distinct = len({modes["sequential"]["first_actions"][i].tobytes() for i in range(CLIENTS)})
    for m in modes.values():
        del m["first_actions"]
    ratio = modes["batched"]["per_s"] / modes["sequential"]["per_s"]
    result = {
        "name": NAME,
        "value": ratio,
        "unit": "x (inferences/s batched / sequential)",
        "target": TARGET,
        "better": "higher",
        "machine": machine("cpu"),
        "raw": {
            **modes,
            "clients": CLIENTS,
            "rounds": rounds,
            "actions_equal_to_sequential": same,
            "distinct_actions_across_settings": distinct,
            "load_average": load_average(),
            "quick": args.quick,
        },
    }
    path = write_result(result, args.out)
    print(
        f"{NAME}: {ratio:.2f}x ({modes['batched']['per_s']:.1f} vs {modes['sequential']['per_s']:.1f} inferences/s, "
        f"mean batch {modes['batched']['mean_batch']:.1f}; actions equal: {same}) -> {path}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
