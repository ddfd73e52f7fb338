"""The demo VLA's language: how instructions phrase a speed and a height, and the text it co-trains on.

An instruction is a task phrase plus optional manner phrases ("lift the cube quickly and raise it high").
Training draws a fresh wording for each sample from its (speed, height) labels; the "normal" label is
usually left unsaid, so the plain task phrase means the ordinary motion the demo uses as its baseline.
The co-training text ties the manner words to one another and to descriptions of the motion, so that
the vocabulary carries meaning a neuron's projection can be read against, as a pretrained model's does.
"""

from __future__ import annotations

import random

TASKS = ["lift the cube", "pick the cube", "grab the red cube", "take the cube", "lift the red block"]
BASELINE_INSTRUCTION = "lift the cube"
SPEED_PHRASES = {
    "fast": [
        "quickly",
        "fast",
        "rapidly",
        "swiftly",
        "briskly",
        "in a hurry",
        "hastily",
        "speedily",
        "at speed",
    ],
    "slow": ["slowly", "gradually", "leisurely", "unhurriedly", "lazily", "sluggishly", "without hurry"],
    "normal": ["normally", "at a normal pace", "as usual"],
}
HEIGHT_PHRASES = {
    "high": ["and raise it high", "and hold it high up", "lifting it higher", "and carry it up high",
             "and raise it to the top", "and hold it overhead", "and elevate it"],
    "low": ["and keep it low", "keeping it low", "and hold it down low", "and keep it lower",
            "staying near the bottom", "and keep it down"],
    "normal": ["and hold it at a normal height", "at the usual height"],
}  # fmt: skip
# One-word descriptions of a motion (the "describe" co-training task answers with these).
SPEED_WORDS = {"fast": ["fast", "quick", "rapid", "swift"], "slow": ["slow", "gradual", "leisurely"],
               "normal": ["normal", "moderate"]}  # fmt: skip
HEIGHT_WORDS = {"high": ["high", "up", "upper", "raised"], "low": ["low", "down", "lower", "bottom"],
                "normal": ["middle", "midway"]}  # fmt: skip
DESCRIBE = "In: How should the robot move to {instruction}?\nOut:"


def instruction(rng: random.Random, speed: str, height: str) -> str:
    """A wording of the task for these labels ("normal" is left unsaid three times in four)."""
    parts = [rng.choice(TASKS)]
    manners = []
    if speed != "normal" or rng.random() < 0.25:
        manners.append(rng.choice(SPEED_PHRASES[speed]))
    if height != "normal" or rng.random() < 0.25:
        manners.append(rng.choice(HEIGHT_PHRASES[height]))
    rng.shuffle(manners)
    return " ".join(parts + manners)


def description(rng: random.Random, speed: str, height: str) -> str:
    """A describe-task example: the instruction in, the motion's speed and height words out."""
    prompt = DESCRIBE.format(instruction=instruction(rng, speed, height))
    return f"{prompt} {rng.choice(SPEED_WORDS[speed])} and {rng.choice(HEIGHT_WORDS[height])}"


def sentence(rng: random.Random) -> str:
    """A sentence relating manner words to each other and to the motion."""
    speed = rng.choice(["fast", "slow"])
    height = rng.choice(["high", "low"])
    s_words = SPEED_WORDS[speed] + [p for p in SPEED_PHRASES[speed] if " " not in p]
    h_words = HEIGHT_WORDS[height]
    templates = [
        lambda: f"moving {rng.choice(s_words)} means the arm is {rng.choice(SPEED_WORDS[speed])}",
        lambda: f"a {rng.choice(SPEED_WORDS[speed])} arm moves {rng.choice(s_words)} and {rng.choice(s_words)}",
        lambda: f"{rng.choice(s_words)} {rng.choice(s_words)} {rng.choice(s_words)}",
        lambda: f"the cube is carried {rng.choice(h_words)} , {rng.choice(h_words)} and {rng.choice(h_words)}",
        lambda: f"{rng.choice(h_words)} {rng.choice(h_words)} {rng.choice(h_words)}",
        lambda: f"{rng.choice(TASKS)} {rng.choice(SPEED_PHRASES[speed])} : the arm moves {rng.choice(SPEED_WORDS[speed])}",
        lambda: f"{rng.choice(TASKS)} {rng.choice(HEIGHT_PHRASES[height])} : the cube goes {rng.choice(h_words)}",
    ]  # fmt: skip
    return rng.choice(templates)()


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: every wording, description and sentence the model will see."""
    rng = random.Random(seed)
    labels = [(s, h) for s in SPEED_PHRASES for h in HEIGHT_PHRASES]
    lines = [instruction(rng, *rng.choice(labels)) for _ in range(n)]
    lines += [description(rng, *rng.choice(labels)) for _ in range(n // 2)]
    lines += [sentence(rng) for _ in range(n // 2)]
    words = {w for group in (SPEED_PHRASES, HEIGHT_PHRASES, SPEED_WORDS, HEIGHT_WORDS) for v in group.values()
             for p in v for w in p.split()}  # fmt: skip
    lines += [f"{w} {w}" for w in sorted(words) for _ in range(30)]  # every word becomes one token
    return lines
