"""`make demo`: the whole method on the bundled demo VLA, from discovery to the analysis report.

1. load the demo VLA (the shipped policy config `demo_vla`: the weights in `policies/demo/weights`, trained
   by `vla-steer train-demo` on scripted robosuite demonstrations whose instructions vary speed and carrying
   height) through the policy loader;
2. discover its concept neurons by projecting every value vector onto the vocabulary and matching the
   shipped concept lexicons (`vla_steer/configs/concepts`) -> directions fast / slow / up / down, and random-neuron controls of the
   same size, layers and signs;
3. run the evaluation grid on robosuite Lift (`sim.session`): a policy node and a robosuite node per worker,
   talking over ZeroMQ; baseline episodes and every direction at several strengths plus the controls, on matched seeds,
   recorded into a rollout store with the concept neurons' activations;
4. analyse the store (`vla_steer.core.analysis`): dose-response with bootstrap CIs, trajectories, neurons and
   their top tokens -> `report.html` and `summary.json`.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch
import yaml

from policies import load_policy, read_policy_config
from vla_steer.app.demo.data import DEMO_SIM
from vla_steer.app.demo.language import BASELINE_INSTRUCTION
from vla_steer.core.config import resolve_config, shipped
from vla_steer.core.discovery import Direction, discover, format_direction, load_lexicons
from vla_steer.core.discovery.direction import DirectionNeuron, load_directions
from vla_steer.core.rollouts import open_store

POLES = ("fast", "slow", "up", "down")
STRENGTHS = (8.0, 12.0)
SIZE = 16  # neurons per direction
MAX_STEPS = 100
SETTLE = 3  # steps held still after success before an episode ends
# What "steered well" means on the demo (issue #5); the report states whether the run meets it.
TARGETS = {"fast": 0.25, "slow": -0.20, "control": 0.05}


def random_control(direction: Direction, d_mlp: int, seed: int) -> Direction:
    """Random neurons with the same count per layer and the same signs as the direction's."""
    g = torch.Generator().manual_seed(seed)
    taken = {(n.layer, n.index) for n in direction.neurons}
    neurons = []
    for n in direction.neurons:
        while (n.layer, idx := int(torch.randint(d_mlp, (1,), generator=g))) in taken:
            pass
        taken.add((n.layer, idx))
        neurons.append(DirectionNeuron(n.layer, idx, n.sign))
    return Direction(f"{direction.name}:random", direction.concept, neurons, {"control_of": direction.name})


def settings_grid(names, strengths=STRENGTHS) -> list[dict[str, float]]:
    grid: list[dict[str, float]] = [{}]
    grid += [{n: s} for n in names for s in strengths]
    grid += [{f"{n}:random": max(strengths)} for n in names]
    return grid


def _worker(job: dict) -> None:
    """One policy node + one robosuite node, running every setting for a slice of the seeds."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    torch.set_num_threads(1)
    from sim import session
    from sim.robosuite_env import RobosuiteConfig
    from vla_steer.core.node import PolicyNode
    from vla_steer.wire import Server

    directions = list(load_directions(job["directions"]).values())
    directions += list(load_directions(job["controls"]).values())
    node = PolicyNode(load_policy(job["policy"]), directions)
    config = RobosuiteConfig(**DEMO_SIM, instruction=BASELINE_INSTRUCTION)
    with Server(node, "tcp://127.0.0.1:0").start() as server:
        session.run(
            server.address, {"Lift": config}, job["settings"], out=Path(job["store"]), episodes=job["episodes"],
            max_steps=MAX_STEPS, seed=job["seed"], settle=SETTLE, activations=list(POLES),
            progress=lambda _: None,
        )  # fmt: skip


def run_grid(out: Path, settings, episodes: int, workers: int, seed: int) -> None:
    """Split the seeds over `workers` processes (each its own policy node and sim), show progress."""
    from tqdm import tqdm

    store = out / "rollouts"
    per = [episodes // workers + (1 if w < episodes % workers else 0) for w in range(workers)]
    starts = [seed + sum(per[:w]) for w in range(workers)]
    jobs = [
        dict(policy=str(out / "policy.yaml"), directions=str(out / "directions"), controls=str(out / "controls"),
             settings=settings, episodes=n, seed=s, store=str(store))
        for n, s in zip(per, starts, strict=True) if n
    ]  # fmt: skip
    ctx = mp.get_context("spawn")  # no fork after torch and EGL are initialised
    procs = [ctx.Process(target=_worker, args=(job,), daemon=True) for job in jobs]
    for p in procs:
        p.start()
    total = episodes * len(settings)
    with tqdm(total=total, desc="   episodes", unit="ep") as bar:
        while any(p.is_alive() for p in procs):
            time.sleep(2.0)
            done = sum(1 for e in open_store(store).episodes() if e.complete) if store.exists() else 0
            bar.update(done - bar.n)
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} evaluation worker(s) failed (exit codes {failed}); see above")


def run_demo(
    out: Path,
    *,
    episodes: int = 20,
    workers: int = 2,
    strengths=STRENGTHS,
    weights: Path | None = None,
    seed: int = 0,
) -> dict:
    """Run the demo into `out`; `weights`: a demo VLA checkpoint instead of the shipped one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # The shipped config, found through the package (a wheel has it too), written out with absolute paths:
    # the run directory says which policy ran, and the worker processes load it from there.
    cfg = read_policy_config(resolve_config("demo_vla", "policies"))
    if weights is not None:
        cfg.path = Path(weights).resolve()
    weights = cfg.path
    (out / "policy.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    policy = load_policy(out / "policy.yaml")
    bb = policy.backbone
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"1. the demo VLA ({weights}): {n_params / 1e6:.1f}M parameters; image -> projector -> Llama with "
          f"{bb.n_layers} layers x {bb.d_mlp} neurons, vocabulary {bb.vocab_size} (words + 256 action bins)")  # fmt: skip

    print("\n2. discovery: every value vector projected onto the vocabulary, neurons matched to lexicons")
    poles = {k: v for k, v in load_lexicons(shipped("concepts")).items() if k in POLES}
    directions = discover(bb, poles, index_dir=out / "index", size=SIZE, layers=(1, bb.n_layers - 1))
    for d in (out / "directions", out / "controls"):
        d.mkdir(exist_ok=True)
        for old in d.glob("*.json"):
            old.unlink()
    for i, name in enumerate(POLES):
        d = directions[name]
        if not d.neurons:
            raise RuntimeError(f"discovery found no neurons for {name!r}: is {weights} the demo VLA?")
        print("\n" + format_direction(d, max_tokens=6))
        d.save(out / "directions")
        random_control(d, bb.d_mlp, seed + i).save(out / "controls")

    settings = settings_grid(POLES, strengths)
    print(f"\n3. {len(settings)} settings x {episodes} episodes of robosuite Lift ('{BASELINE_INSTRUCTION}'), "
          f"{workers} workers (policy node + robosuite node each)")  # fmt: skip
    run_grid(out, settings, episodes, workers, seed)

    print("\n4. analysis")
    from vla_steer.core.analysis import analyze

    analysis = analyze(out, control_hz=DEMO_SIM["control_freq"], progress=lambda m: print(f"   {m}"))
    verdict = acceptance(analysis)
    for line in verdict["lines"]:
        print(f"   {line}")
    print(f"\ndone in {(time.perf_counter() - t0) / 60:.1f} min. Report: {(out / 'report.html').resolve()}")
    return verdict


def acceptance(analysis) -> dict:
    """The demo's claims, measured: best fast/slow speed change, up's height change, the controls' effects."""
    lines, ok = [], {}
    metric = "moving_speed"
    for name, sign in (("fast", 1.0), ("slow", -1.0)):
        best = analysis.best(name, metric, sign)
        if best is None:
            continue
        c = best.change[metric]
        target = TARGETS[name]
        ok[name] = bool(c.mean * sign >= abs(target) and c.low * sign > 0)
        lines.append(f"{name}={best.setting.strength:g}: speed while moving {c.mean:+.1%} "
                     f"(95% CI {c.low:+.1%} .. {c.high:+.1%}; target {target:+.0%}) -> "
                     f"{'met' if ok[name] else 'NOT met'}")  # fmt: skip
    up = analysis.best("up", "carry_height", 1.0)
    if up is not None:
        c = up.change["carry_height"]
        ok["up"] = bool(c.low > 0)
        lines.append(f"up={up.setting.strength:g}: carrying height {c.mean:+.1%} (95% CI {c.low:+.1%} .. "
                     f"{c.high:+.1%}) -> {'raised' if ok['up'] else 'NOT clearly raised'}")  # fmt: skip
    worst = 0.0
    for s in analysis.settings:
        if s.setting.control:
            for m in (metric, "carry_height"):
                if m in s.change and math.isfinite(s.change[m].mean):
                    worst = max(worst, abs(s.change[m].mean))
    ok["controls"] = worst <= TARGETS["control"]
    lines.append(f"random-neuron controls: largest |change| of speed or height {worst:.1%} "
                 f"(target <= {TARGETS['control']:.0%}) -> {'met' if ok['controls'] else 'NOT met'}")  # fmt: skip
    return {"ok": ok, "lines": lines}
