"""Shared helpers for the benchmarks: machine description, interleaved timing, JSON results.

Each benchmark is a standalone script (`python benchmarks/<name>.py [--quick]`) that imports this
module from its own directory, so nothing here may depend on being installed as a package.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The installed command, as a user runs it (the venv's console script beside this interpreter).
VLA_STEER = str(Path(sys.executable).with_name("vla-steer"))
REQUIRED_KEYS = ("name", "value", "unit", "target", "better", "machine", "raw")


# -- machine -----------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine(device: str | torch.device = "cpu") -> dict:
    """What the figures were measured on: enough to tell two result files apart."""
    device = torch.device(device)
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# -- timing ------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One thing to time: `run` is timed; `setup` and `teardown` (hook installation etc.) are not."""

    run: Callable[[], object]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(case: Case, device: torch.device | None = None) -> float:
    if case.setup is not None:
        case.setup()
    try:
        _sync(device)
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            case.run()
            _sync(device)
            dt = time.perf_counter() - t0
        finally:
            if gc_was_enabled:
                gc.enable()
    finally:
        if case.teardown is not None:
            case.teardown()
    return dt


@dataclass
class Timings:
    """Seconds per run of each case, round by round, and which rounds were free of contention.

    On a shared machine another process occasionally takes the cores mid-run and a forward that
    normally takes 0.1 s takes 3 s (oversubscribed OpenMP threads wait on each other). Such a
    round says nothing about the code under test, so a round counts as *clean* only when every
    case ran within `tol` times its own fastest run; statistics use the clean rounds. With the
    tolerance well above the real differences between cases (a few percent to tens of percent),
    the filter cannot hide a slow case: it would make every round of that case equally slow.
    """

    rounds: list[dict[str, float]]
    tol: float

    @property
    def names(self) -> list[str]:
        return list(self.rounds[0]) if self.rounds else []

    def best(self) -> dict[str, float]:
        return {n: min(r[n] for r in self.rounds) for n in self.names}

    def clean_mask(self) -> list[bool]:
        best = self.best()
        return [all(r[n] <= self.tol * best[n] for n in self.names) for r in self.rounds]

    def all_times(self) -> dict[str, list[float]]:
        return {n: [r[n] for r in self.rounds] for n in self.names}

    def clean(self) -> dict[str, list[float]]:
        """Per case, the times of the clean rounds (all rounds if none is clean)."""
        mask = self.clean_mask()
        keep = [r for r, ok in zip(self.rounds, mask, strict=True) if ok] or self.rounds
        return {n: [r[n] for r in keep] for n in self.names}

    def n_clean(self) -> int:
        return sum(self.clean_mask())

    def raw(self) -> dict:
        """Everything measured, for the JSON: every round's times and whether it was clean."""
        return {**self.all_times(), "clean": self.clean_mask(), "tol": self.tol}


def interleaved(
    cases: Mapping[str, Case | Callable[[], object]],
    reps: int,
    warmup: int = 2,
    *,
    rotate: bool = True,
    tol: float = 1.5,
    max_rounds: int | None = None,
    time_limit_s: float | None = None,
    min_rounds: int = 3,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Timings:
    """Time every case round-robin in one process: A B C, A B C, ...

    Interleaving spreads slow drifts of the machine (thermal state, a noisy neighbour, the page
    cache) evenly over the cases instead of letting them land on whichever ran last. With
    `rotate`, round r starts at case r mod n (A B C, B C A, C A B, ...) so no case always runs
    right after the same other one. `warmup` untimed rounds come first, then `reps` rounds; while
    fewer than `reps` rounds are clean (see `Timings`), more are run, up to `max_rounds` timed
    rounds in all (default 2 * reps). Past `time_limit_s` (warm-up included) no new round starts
    once `min_rounds` are done: on a badly contended machine the result is then noisier (and
    says so through `n_clean`), but the benchmark still ends in bounded time.
    """
    device = torch.device(device) if device is not None else None
    norm = {k: v if isinstance(v, Case) else Case(v) for k, v in cases.items()}
    names = list(norm)
    max_rounds = max(reps, max_rounds if max_rounds is not None else 2 * reps)
    timings = Timings([], tol)
    start = time.perf_counter()
    r = 0
    while True:
        timed = r >= warmup
        if timed:
            done = len(timings.rounds)
            over_time = time_limit_s is not None and time.perf_counter() - start > time_limit_s
            if done >= reps and (timings.n_clean() >= reps or done >= max_rounds):
                break
            if over_time and done >= min(reps, min_rounds):
                break
        order = names[r % len(names) :] + names[: r % len(names)] if rotate else names
        gc.collect()
        this = {name: time_once(norm[name], device) for name in order}
        if timed:
            timings.rounds.append({n: this[n] for n in names})
        if progress:
            label = f"round {len(timings.rounds)}" if timed else "warm-up"
            print(
                f"  {label}: " + "  ".join(f"{n}={this[n] * 1e3:.1f}ms" for n in order),
                file=sys.stderr,
                flush=True,
            )
        r += 1
    return timings


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def summary(samples: list[float]) -> dict:
    """Median, quartiles, min and max of a list of timings (seconds)."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"n": len(s), "median": statistics.median(s), "q1": q[0], "q3": q[2], "min": s[0], "max": s[-1]}


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def bootstrap_ratio_ci(
    num: list[float], den: list[float], *, n: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Confidence interval of median(num) / median(den), resampling whole rounds (pairs kept together)."""
    if len(num) != len(den) or not num:
        raise ValueError("need two equally long, non-empty lists of paired timings")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(num), (n, len(num)), generator=g).tolist()
    ratios = sorted(
        statistics.median([num[i] for i in row]) / statistics.median([den[i] for i in row]) for row in idx
    )
    lo = ratios[int((1 - level) / 2 * (n - 1))]
    hi = ratios[int((1 + level) / 2 * (n - 1))]
    return lo, hi


# -- results -----------------------------------------------------------------------------------------


def write_result(result: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """Write `results/<name>.json`; refuses a result missing any of the required keys."""
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(f"benchmark result lacks {missing}")
    if result["better"] not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {result['better']!r}")
    result = {**result, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:]}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def meets_target(result: dict) -> bool:
    if result["better"] == "lower":
        return result["value"] <= result["target"]
    return result["value"] >= result["target"]


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick", action="store_true", help="smaller, faster variant (a smoke check, not a figure to quote)"
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="directory for the JSON result (default: %(default)s)"
    )
    return p


# -- a policy node to measure against ------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(serve_args: Sequence[str]) -> tuple[subprocess.Popen, str]:
    """`vla-steer serve ARGS` on a free loopback port, as a user runs it, once it says it is serving:
    (process, address). Stop it with `stop_node` (or use `policy_node`)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [VLA_STEER, "serve", *serve_args, "--bind", address],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    line = proc.stdout.readline()
    if "serving" not in line:
        stop_node(proc)
        raise RuntimeError(f"vla-steer serve did not start (it said {line!r})")
    # Read on: a node whose stdout pipe fills blocks in its next print.
    threading.Thread(target=lambda: all(proc.stdout), name="serve-stdout", daemon=True).start()
    return proc, address


def stop_node(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def policy_node(serve_args: Sequence[str]) -> Iterator[tuple[subprocess.Popen, str]]:
    """`start_node`, stopped on exit."""
    proc, address = start_node(serve_args)
    try:
        yield proc, address
    finally:
        stop_node(proc)


@contextlib.contextmanager
def tiny_vla_node(tmp: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`vla-steer serve` for a fresh TinyVLA: (process, address), stopped on exit."""
    from policies.tiny_vla import TinyVLA

    TinyVLA.build(seed=0).save(tmp / "policy")
    (tmp / "policy.yaml").write_text("kind: tiny_vla\npath: policy\ndevice: cpu\n")
    with policy_node(["--policy", str(tmp / "policy.yaml")]) as node:
        yield node
