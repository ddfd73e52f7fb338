"""`make demo`: the whole method on the bundled demo VLA, from discovery to the analysis report.

1. load the demo VLA (the shipped policy config `demo_vla`: the weights in `policies/demo/weights`, trained
   by `vla-steer train-demo` on scripted robosuite demonstrations whose instructions vary speed and carrying
   height) through the policy loader;
2. discover its concept neurons by projecting every value vector onto the vocabulary and matching the
   shipped concept lexicons (`vla_steer/configs/concepts`) -> directions fast / slow / up / down; draw
   random-neuron controls matched to them (`vla_steer.core.discovery.controls`: layer, sign, coefficient
   statistics over calibration episodes, value-vector norm), several draws per direction;
3. run the evaluation grid on robosuite Lift (`sim.session`): robosuite worker processes that share one
   policy node over ZeroMQ (their concurrent requests batched, each under its own setting); baseline
   episodes, every direction at each strength of the dose ladder and the control draws, on matched seeds,
   recorded into a rollout store with the concept neurons' activations. Steering acts on the forwards that
   decide the plan words (`POSITIONS`; `--positions all` is the paper's setting);
4. analyse the store (`vla_steer.core.analysis`): dose-response with CIs per direction beside its controls,
   trajectories, a motion strip, neurons and their top tokens -> `report.html` and `summary.json`;
5. check the demo's claims (`acceptance`, issue #19's targets) into `summary.json` and the report.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch
import yaml

from policies import load_policy, read_policy_config
from vla_steer.app.demo.data import DEMO_SIM
from vla_steer.app.demo.defaults import CONTROLS, EPISODES, STRENGTHS, WORKERS
from vla_steer.app.demo.language import BASELINE_INSTRUCTION
from vla_steer.core.config import resolve_config, shipped
from vla_steer.core.discovery import discover, format_direction, load_lexicons
from vla_steer.core.discovery.controls import NeuronStats, control_name, describe_match, matched_controls
from vla_steer.core.discovery.direction import load_directions
from vla_steer.core.rollouts import open_store

POLES = ("fast", "slow", "up", "down")
# Where the concept neurons are steered: only the forwards that decide the demo VLA's plan words. Its action
# tokens then follow the steered plan from unsteered forwards, so a concept changes how the arm moves without
# the perturbation of every position that, at the strength a plan word needs, also breaks the grasp.
POSITIONS = "plan"
SIZE = 16  # neurons per direction
MAX_STEPS = 100
SETTLE = 3  # steps held still after success before an episode ends
CALIBRATION_SEEDS = (90_000, 90_001)  # baseline episodes the controls' neuron statistics are measured on
# The demo's claims (issue #19). Each is checked on every run and reported; `--strict` fails on a miss.
TARGETS = dict(
    baseline_success=0.80,  # at least
    success_drop=0.10,  # at most, for every reported setting
    fast=0.40,  # speed while moving, at least +40%
    slow=-0.30,  # at most -30%
    control=0.05,  # every control draw's |change| of speed and height at most 5%
    wall_s=600.0,  # the default demo, after install
)


def settings_grid(names, strengths=STRENGTHS, controls: int = CONTROLS, control_strengths=None) -> list[dict]:
    """Baseline, each direction at each strength, and each direction's control draws (at the reported
    strength, or at each of `control_strengths`)."""
    grid: list[dict[str, float]] = [{}]
    grid += [{n: s} for n in names for s in strengths]
    for s in control_strengths or (max(strengths),):
        grid += [{control_name(n, k): s} for n in names for k in range(1, controls + 1)]
    return grid


def _worker(job: dict) -> None:
    """One robosuite node running every setting for a slice of the seeds, against the shared policy node."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from sim import session
    from sim.robosuite_env import RobosuiteConfig

    config = RobosuiteConfig(**DEMO_SIM, instruction=BASELINE_INSTRUCTION)
    session.run(
        job["server"], {"Lift": config}, job["settings"], out=Path(job["store"]), episodes=job["episodes"],
        max_steps=MAX_STEPS, seed=job["seed"], settle=SETTLE, activations=list(POLES), progress=lambda _: None,
        request_timeout=30.0,  # the shared node answers a batch of every worker's requests at once
    )  # fmt: skip


def run_grid(
    out: Path, policy, settings, episodes: int, workers: int, seed: int, positions: str = POSITIONS
) -> None:
    """One policy node in this process serving `workers` robosuite processes, which split the seeds: their
    concurrent requests share batched forwards (each under its own setting), so the policy's time per step
    is shared while the simulators step in parallel. Shows progress."""
    from tqdm import tqdm

    from vla_steer.core.node import PolicyNode
    from vla_steer.wire import Server

    store = out / "rollouts"
    directions = list(load_directions(out / "directions").values()) + list(
        load_directions(out / "controls").values()
    )
    node = PolicyNode(policy, directions, positions=positions, batch_max=max(1, workers))
    per = [episodes // workers + (1 if w < episodes % workers else 0) for w in range(workers)]
    starts = [seed + sum(per[:w]) for w in range(workers)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cores are the simulators'; a batched forward of the tiny model needs one
    ctx = mp.get_context("spawn")  # no fork after torch and EGL are initialised
    procs = []
    try:
        with Server(node, "tcp://127.0.0.1:0").start() as server:
            jobs = [
                dict(server=server.address, settings=settings, episodes=n, seed=s, store=str(store))
                for n, s in zip(per, starts, strict=True) if n
            ]  # fmt: skip
            procs = [ctx.Process(target=_worker, args=(job,), daemon=True) for job in jobs]
            for p in procs:
                p.start()
            total = episodes * len(settings)
            with tqdm(total=total, desc="   episodes", unit="ep") as bar:
                while any(p.is_alive() for p in procs):
                    time.sleep(2.0)
                    done = open_store(store).n_closed() if store.exists() else 0
                    bar.update(done - bar.n)
    finally:
        for p in procs:  # an interrupted demo leaves no simulator running
            if p.is_alive():
                p.kill()
            p.join()
        for st in node.steerers.values():  # the policy's hooks go with the node
            st.remove()
        torch.set_num_threads(threads)
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} evaluation worker(s) failed (exit codes {failed}); see above")


def calibrate(policy) -> NeuronStats:
    """Every neuron's coefficient statistics over baseline episodes on seeds the demo does not evaluate."""
    from vla_steer.app.demo.data import make_env
    from vla_steer.wire import Observation

    env = make_env()

    def run() -> None:
        for seed in CALIBRATION_SEEDS:
            obs = env.reset(seed)
            for _ in range(MAX_STEPS // 2):
                chunk = policy.infer(Observation(BASELINE_INSTRUCTION, obs.images, obs.state))
                obs = env.step(chunk.actions[0]).observation
                if env.success():
                    break

    try:
        return NeuronStats.measure(policy.backbone, run)
    finally:
        env.close()


def run_demo(
    out: Path,
    *,
    episodes: int = EPISODES,
    workers: int = WORKERS,
    strengths=STRENGTHS,
    controls: int = CONTROLS,
    full: bool = False,
    weights: Path | None = None,
    seed: int = 0,
    positions: str = POSITIONS,
    command: str = "vla-steer demo",
) -> dict:
    """Run the demo into `out`; `weights`: a demo VLA checkpoint instead of the shipped one. Returns the
    verdicts (also in `out/summary.json` under "demo")."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    control_strengths = strengths if full else None
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
    for name in POLES:
        if not directions[name].neurons:
            raise RuntimeError(f"discovery found no neurons for {name!r}: is {weights} the demo VLA?")
        print("\n" + format_direction(directions[name], max_tokens=6))
        directions[name].save(out / "directions")
    print(f"\n   random controls: {controls} draws per direction, each neuron matched in layer, sign, coefficient "
          f"statistics (baseline episodes, seeds {CALIBRATION_SEEDS}) and value-vector norm")  # fmt: skip
    stats = calibrate(policy)
    concept_neurons = {(n.layer, n.index) for d in directions.values() for n in d.neurons}
    match = {}
    for i, name in enumerate(POLES):
        drawn = matched_controls(directions[name], stats, controls, seed=seed + i, exclude=concept_neurons)
        for c in drawn:
            c.save(out / "controls")
        match[name] = describe_match(directions[name], drawn, stats)

    settings = settings_grid(POLES, strengths, controls, control_strengths)
    print(f"\n3. {len(settings)} settings x {episodes} episodes of robosuite Lift ('{BASELINE_INSTRUCTION}', "
          f"seeds {seed}..{seed + episodes - 1}), {workers} robosuite workers sharing one policy node, "
          f"steering at positions '{positions}'")  # fmt: skip
    run_grid(out, policy, settings, episodes, workers, seed, positions)

    print("\n4. analysis")
    from vla_steer.core.analysis import analyze, render_html

    analysis = analyze(out, control_hz=DEMO_SIM["control_freq"], progress=lambda m: print(f"   {m}"))
    wall = time.perf_counter() - t0
    verdicts = acceptance(analysis, max(strengths), wall if not full else None)
    held = all(v["held"] for v in verdicts)
    print("\n5. the demo's claims")
    for v in verdicts:
        print(f"   {'held  ' if v['held'] else 'MISSED'}  {v['line']}")
    demo = {
        "command": command,
        "episodes": episodes,
        "strengths": list(strengths),
        "reported_strength": max(strengths),
        "controls": controls,
        "positions": positions,
        "full": full,
        "wall_s": round(wall, 1),
        "verdicts": verdicts,
        "all_held": held,
        "control_match": match,
    }
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary | {"demo": demo}, indent=2))
    (out / "report.html").write_text(
        render_html(analysis, title=f"vla-steer demo: {command}", preface=_verdict_html(verdicts, positions))
    )
    print(f"\ndone in {wall / 60:.1f} min; {'every claim held' if held else 'not every claim held'}. "
          f"Report: {(out / 'report.html').resolve()}")  # fmt: skip
    return demo


def acceptance(analysis, strength: float, wall_s: float | None) -> list[dict]:
    """Each target of the demo, measured: what it asks, what was measured (with its CI), whether it held."""
    out: list[dict] = []

    def verdict(target: str, held: bool, line: str, measured=None) -> None:
        out.append({"target": target, "held": bool(held), "line": line, "measured": measured})

    def est(e) -> dict:
        return e.as_dict()

    try:
        base = analysis.setting("baseline")
    except KeyError:
        return [{"target": "baseline", "held": False, "line": "no baseline episodes", "measured": None}]
    b = base.success
    verdict("baseline_success", b.mean >= TARGETS["baseline_success"],
            f"baseline success {b.mean:.0%} [{b.low:.0%}, {b.high:.0%}] over {b.n} episodes (target >= "
            f"{TARGETS['baseline_success']:.0%})", est(b))  # fmt: skip
    effects = {"fast": ("moving_speed", 1), "slow": ("moving_speed", -1), "up": ("carry_height", 1),
               "down": ("carry_height", -1)}  # fmt: skip
    for name, (metric, sign) in effects.items():
        try:
            s = analysis.setting(name, strength)
        except KeyError:
            verdict(name, False, f"{name}={strength:g} did not run")
            continue
        c = s.change[metric]
        if name in ("fast", "slow"):
            goal = TARGETS[name]
            ok = (
                c.mean * sign >= abs(goal) and c.low * sign > 0 if sign > 0 else c.mean <= goal and c.high < 0
            )
            want = f"target {goal:+.0%}"
        else:
            ok = (c.low > 0) if sign > 0 else (c.high < 0)
            want = f"target: CI {'above' if sign > 0 else 'below'} 0"
        verdict(name, ok, f"{name}={strength:g}: {metric.replace('_', ' ')} {c.mean:+.1%} [{c.low:+.1%}, "
                f"{c.high:+.1%}] ({want})", est(c))  # fmt: skip
        drop = b.mean - s.success.mean
        verdict(f"{name}_success", drop <= TARGETS["success_drop"] + 1e-9,
                f"{name}={strength:g}: success {s.success.mean:.0%} [{s.success.low:.0%}, {s.success.high:.0%}] "
                f"vs baseline {b.mean:.0%} (target: within {TARGETS['success_drop']:.0%} points)",
                est(s.success))  # fmt: skip
        draws = analysis.controls(name, strength)
        if not draws:
            verdict(f"{name}_controls", False, f"{name}: no random-control draws ran at {strength:g}")
            continue
        worst, rows = 0.0, []
        for d in draws:
            for m in ("moving_speed", "carry_height"):
                ch = d.change[m]
                worst = max(worst, abs(ch.mean))
                rows.append(f"{m.split('_')[1]} {ch.mean:+.1%} [{ch.low:+.1%}, {ch.high:+.1%}]")
        verdict(f"{name}_controls", worst <= TARGETS["control"],
                f"{name}: {len(draws)} random draws at {strength:g}, largest |change| {worst:.1%} (target <= "
                f"{TARGETS['control']:.0%}): " + "; ".join(rows),
                {d.setting.label: {m: est(d.change[m]) for m in ("moving_speed", "carry_height")}
                 for d in draws})  # fmt: skip
        effect = [d.change[metric].mean for d in draws]
        outside = c.mean > max(effect) if sign > 0 else c.mean < min(effect)
        wrong_way = c.mean < min(effect) if sign > 0 else c.mean > max(effect)
        where = "outside" if outside else "on the WRONG SIDE of" if wrong_way else "INSIDE"
        verdict(f"{name}_specific", outside,
                f"{name}: its {metric.replace('_', ' ')} change {c.mean:+.1%} lies "
                f"{where} its controls' range [{min(effect):+.1%}, {max(effect):+.1%}]")  # fmt: skip
    if wall_s is not None:
        verdict("wall_s", wall_s <= TARGETS["wall_s"],
                f"wall time {wall_s / 60:.1f} min (target <= {TARGETS['wall_s'] / 60:.0f} min)", wall_s)  # fmt: skip
    return out


def _verdict_html(verdicts: list[dict], positions: str) -> str:
    import html

    rows = "".join(
        f"<tr><td>{'held' if v['held'] else '<b>missed</b>'}</td><td class='l'>{html.escape(v['line'])}</td></tr>"
        for v in verdicts
    )
    where = {"plan": "the forwards that decide the plan words", "all": "every token position",
             "last": "the last position of each forward"}[positions]  # fmt: skip
    return ("<h2>The demo's claims</h2><p class='note'>Each target, measured on this run (95% CIs; success "
            f"rates with Wilson intervals). Concept neurons and controls steered at {where}.</p><table><tr><th>verdict</th><th>target and measurement</th></tr>"
            f"{rows}</table>")  # fmt: skip
