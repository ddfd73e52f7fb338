"""`make demo`: discovery, steering and the policy node, end to end, on a small VLA built on the spot.

No VLA checkpoint can be downloaded here, so the demo builds a small OpenVLA-style policy (image patches
-> projector -> Llama whose trained BPE vocabulary ends in 256 action bins), saves it, loads it back
through the policy loader, discovers the concept neurons of every lexicon pole, and measures what steering
them does to the language model's next-token distribution (the probability mass on the pole's own words,
against the unsteered model and against random neurons of the same number and layers). Then it serves the
policy over ZeroMQ and turns its knobs from a client, as a simulator or robot node would.
The weights are random, so the neurons are whatever the projection finds; the numbers are real.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from policies import load_policy
from policies.tiny_vla import TinyVLA, TinyVLAConfig
from vla_steer.backbone import Backbone
from vla_steer.cli import default_concepts_dir
from vla_steer.discovery import Direction, discover, format_direction, load_lexicons
from vla_steer.discovery.lexicon import Pole, token_match_weights
from vla_steer.node import PolicyNode
from vla_steer.steering import Neuron, Steerer
from vla_steer.transport import Client, Server

PROMPT = "In: What action should the robot take to pick up the red block and move it?\nOut:"
STRENGTHS = (2.0, 5.0, 10.0)


def pole_mass(probs: torch.Tensor, backbone: Backbone, pole: Pole) -> float:
    """Probability the next token is one of the pole's words (whole words and inflections)."""
    words = (token_match_weights(backbone.labeler, pole.words) >= 0.75).float()
    return float((probs[: words.numel()] * words).sum())


def random_control(direction: Direction, d_mlp: int, seed: int) -> list[Neuron]:
    """Random neurons with the same count per layer and the same signs as the direction's."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in direction.neurons:
        taken = {(m.layer, m.index) for m in out} | {(m.layer, m.index) for m in direction.neurons}
        while True:
            idx = int(torch.randint(d_mlp, (1,), generator=g))
            if (n.layer, idx) not in taken:
                break
        out.append(Neuron(n.layer, idx, n.sign))
    return out


def run_demo(out: Path, seed: int = 0) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    poles = load_lexicons(default_concepts_dir())
    words = sorted({w for p in poles.values() for w in p.words})

    print("1. building a small OpenVLA-style policy: image patches -> projector -> Llama -> action bins ...")
    vla = TinyVLA.build(TinyVLAConfig(), hidden=128, layers=8, intermediate=512, seed=seed, words=words)
    vla.save(out / "tiny_vla")
    (out / "policy.yaml").write_text("kind: tiny_vla\npath: tiny_vla\ndevice: cpu\n")
    policy = load_policy(out / "policy.yaml")  # through the loader, as `vla-steer serve` does
    backbone = policy.backbone
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"   {n_params / 1e6:.1f}M parameters, {backbone.n_layers} layers x {backbone.d_mlp} neurons, "
          f"vocab {backbone.vocab_size} (fingerprint {backbone.fingerprint()})")  # fmt: skip

    print("\n2. projecting every value vector onto the vocabulary and choosing neurons per pole ...")
    directions = discover(
        backbone, poles, index_dir=out / "index", size=12, layers=(2, backbone.n_layers - 1)
    )
    for d in directions.values():
        print()
        print(format_direction(d, max_tokens=6))
        d.save(out / "directions")

    print("\n3. steering: probability that the next token is one of the pole's own words")
    ids = backbone.tokenizer(PROMPT, return_tensors="pt").input_ids
    model = backbone.root

    def next_probs() -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits[0, -1].softmax(-1)

    base = next_probs()
    results: dict[str, dict] = {}
    steerer = Steerer(backbone)
    header = f"   {'pole':<10} {'baseline':>9}" + "".join(f" {'a=' + format(s, 'g'):>8}" for s in STRENGTHS)
    print(header + f" {'random@' + format(STRENGTHS[-1], 'g'):>10}")
    for name, d in directions.items():
        if not d.neurons:
            print(f"   {name:<10} no neurons found")
            continue
        steerer.add(name, d.steer_neurons(), enabled=False)
        steerer.add(f"{name}:random", random_control(d, backbone.d_mlp, seed), enabled=False)
        row = {"baseline": pole_mass(base, backbone, poles[name])}
        for s in STRENGTHS:
            with steerer.apply({name: s}):
                row[s] = pole_mass(next_probs(), backbone, poles[name])
        with steerer.apply({f"{name}:random": STRENGTHS[-1]}):
            row["random"] = pole_mass(next_probs(), backbone, poles[name])
        results[name] = row
        print(
            f"   {name:<10} {row['baseline']:>9.2%}"
            + "".join(f" {row[s]:>8.2%}" for s in STRENGTHS)
            + f" {row['random']:>10.2%}"
        )

    steerer.off()
    unchanged = torch.equal(next_probs(), base)
    steerer.remove()
    print(f"\n   all knobs off -> output identical to the unsteered model: {unchanged}")
    top = max(results, key=lambda n: results[n][STRENGTHS[-1]] - results[n]["baseline"])
    print(f"   strongest effect: '{top}' raises its words' probability from {results[top]['baseline']:.2%} "
          f"to {results[top][STRENGTHS[-1]]:.2%} at alpha={STRENGTHS[-1]:g} "
          f"(random neurons: {results[top]['random']:.2%})")  # fmt: skip

    print("\n4. serving the policy over ZeroMQ and turning its knobs from a client")
    served = serve_and_steer(policy, directions)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; policy, neuron index and directions are in {out}/")
    print(f"serve it yourself: vla-steer serve --policy {out}/policy.yaml --directions {out}/directions")
    return {"results": results, "off_identical": unchanged, "served": served}


def serve_and_steer(policy, directions: dict[str, Direction], strength: float = 20.0) -> dict:
    """Actions for one observation with each knob on in turn, fetched over a real loopback socket."""
    node = PolicyNode(policy, directions.values())
    image = np.random.default_rng(0).integers(0, 256, (*policy.spec.image_keys["agentview"],), dtype=np.uint8)
    obs = {"instruction": "pick up the red block", "images": {"agentview": image}}
    rows = {}
    with Server(node, "tcp://127.0.0.1:0").start() as server, Client(server.address) as client:
        info = client.hello()
        print(
            f"   {info.policy} at {server.address}: action_dim {info.action_dim}, knobs {', '.join(info.concepts)}"
        )
        rows["baseline"] = client.infer(obs).actions[0]
        print(
            f"   {'knobs off':<14} actions {np.array2string(rows['baseline'], precision=2, suppress_small=True)}"
        )
        for name in info.concepts:
            client.set_knobs({name: strength})
            rows[name] = client.infer(obs).actions[0]
            client.knobs_off()
            print(
                f"   {name + '=' + format(strength, 'g'):<14} actions {np.array2string(rows[name], precision=2, suppress_small=True)}"
            )
        again = client.infer(obs).actions[0]
    identical = bool(np.array_equal(again, rows["baseline"]))
    print(f"   knobs off again -> identical actions: {identical}")
    return {"actions": {k: v.tolist() for k, v in rows.items()}, "off_identical": identical}
