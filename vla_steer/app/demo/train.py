"""Training the demo VLA: behaviour cloning of the scripted expert, co-trained on language.

Each step draws a batch of demonstration frames, phrases every frame's (speed, height) labels as a fresh
instruction, and trains next-token prediction, after the OpenVLA prompt, of a two-word plan (a speed word
and a height word, drawn from their synonyms: "quick raised") and then the expert's 7 action tokens
(cross-entropy over the whole vocabulary, as OpenVLA does). Every `language_every`-th step is a language
batch instead: "describe" examples (instruction -> speed and height words) and sentences relating the
manner words, with next-token loss on every token. Seeded; CPU-only by design.

In a share of the action samples (`PLAN_ONLY`) the instruction is the bare task ("lift the cube") while the
plan words, given rather than predicted (no loss on them), still say the demonstration's speed and height:
there the plan alone tells the action tokens how to move, so the policy's actions follow its plan. That is
what makes its plan the lever its concept neurons pull: a policy that read the manner straight from the
instruction would ignore a steered plan.

Action batches also train a head, used only in training, to read the cube's offset from the end effector
off the image tokens the language model receives (`CUBE_WEIGHT`). Behaviour cloning alone let the policy
ignore its image: from the state it learnt the average path to the average cube and missed every cube
placed off-centre. The wrist image is the only place the cube's position is, so the image tokens must
carry it. For the same reason the images are not randomly shifted: in a wrist camera the cube's pixel
position is its offset from the gripper.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from policies.tiny_vla import PROMPT, TinyVLA, TinyVLAConfig
from vla_steer.app.demo import language
from vla_steer.app.demo.data import CONTROL_HZ, IMAGE_KEY, IMAGE_SIZE, STATE_DIM
from vla_steer.app.demo.expert import HEIGHTS, SPEEDS

MODEL = dict(hidden=128, layers=6, intermediate=512, vocab_size=1024, tie_embeddings=True)


def build_model(data: dict[str, np.ndarray], seed: int) -> TinyVLA:
    states = data["states"].astype(np.float64)
    cfg = TinyVLAConfig(
        name="demo-vla",
        image_key=IMAGE_KEY,
        image_size=IMAGE_SIZE,
        patch_size=8,
        vision_dim=64,
        vision_layers=2,
        vision_stem="conv",
        control_hz=CONTROL_HZ,
        state_dim=STATE_DIM,
        state_mean=states.mean(0).tolist(),
        state_std=(states.std(0) + 1e-3).tolist(),
        plan_words=2,
        plan_vocab=[
            sorted({w for ws in language.SPEED_WORDS.values() for w in ws}),
            sorted({w for ws in language.HEIGHT_WORDS.values() for w in ws}),
        ],  # fmt: skip
    )
    return TinyVLA.build(cfg, seed=seed, corpus=language.corpus(seed=seed), **MODEL)


PLAN_ONLY = 0.3  # share of action samples whose plan, not their instruction, carries the speed and height
CUBE_WEIGHT = 1.0  # weight of the cube-offset loss (mean squared error in units of the data's std)


class CubeHead(torch.nn.Module):
    """Training only: the cube's offset from the end effector, standardised, read linearly off the image
    tokens the language model receives, so those tokens must say where the cube is."""

    def __init__(self, model: TinyVLA, offsets: np.ndarray):
        super().__init__()
        self.tokens = (model.cfg.image_size // model.cfg.patch_size) ** 2
        self.linear = torch.nn.Linear(self.tokens * model.language_model.config.hidden_size, offsets.shape[1])
        self.register_buffer("mean", torch.as_tensor(offsets.mean(0), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(offsets.std(0) + 1e-4, dtype=torch.float32))

    def loss(self, image_tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.linear(image_tokens.flatten(1)), (offsets - self.mean) / self.std)


class Batches:
    """Tokenised training batches (right-padded) from the demonstrations and the language tasks."""

    def __init__(self, model: TinyVLA, data: dict[str, np.ndarray], seed: int):
        self.model, self.data = model, data
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.speeds, self.heights = list(SPEEDS), list(HEIGHTS)
        self.pad = model.tokenizer.pad_token_id

    def _ids(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False).input_ids

    def _word(self, word: str) -> int:
        ids = self._ids(word)
        if len(ids) != 1:
            raise ValueError(
                f"plan word {word!r} is {len(ids)} tokens; the demo tokenizer must keep it whole"
            )
        return ids[0]

    def actions(self, size: int) -> tuple[torch.Tensor, ...]:
        """(pixels, states, text ids [B, T], labels [B, T], cube offsets [B, 3]): the text is the prompt,
        the plan words and the 7 action tokens."""
        idx = self.np_rng.integers(0, len(self.data["actions"]), size)
        rows, labels = [], []
        for i in idx:
            speed, height = self.speeds[self.data["speed"][i]], self.heights[self.data["height"][i]]
            plan_only = self.rng.random() < PLAN_ONLY
            said = (
                self.rng.choice(language.TASKS)
                if plan_only
                else language.instruction(self.rng, speed, height)
            )
            prompt = self._ids(PROMPT.format(instruction=said))
            plan = [self._word(self.rng.choice(language.SPEED_WORDS[speed])),
                    self._word(self.rng.choice(language.HEIGHT_WORDS[height]))]  # fmt: skip
            action = [int(t) for t in self.model.bins.token(self.data["actions"][i])]
            rows.append(prompt + plan + action)
            labels.append([-100] * (len(prompt) + len(plan) * plan_only) + plan * (not plan_only) + action)
        ids, lab = self._pad(rows, labels)
        pixels = self.model.preprocess(self.data["images"][idx])
        states, cube = (torch.as_tensor(self.data[k][idx]) for k in ("states", "cube"))
        return pixels, states, ids, lab, cube

    def language(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(size):
            s, h = self.rng.choice(self.speeds), self.rng.choice(self.heights)
            text = (
                language.description(self.rng, s, h)
                if self.rng.random() < 0.6
                else language.sentence(self.rng)
            )
            rows.append([self.model.tokenizer.bos_token_id] + self._ids(text))
        ids, lab = self._pad(rows, rows)
        return ids, lab

    def _pad(self, rows: list[list[int]], labels: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.pad] * (n - len(r)) for r in rows])
        lab = torch.tensor([list(lb) + [-100] * (n - len(lb)) for lb in labels])
        return ids, lab


def action_loss(
    model: TinyVLA, head: CubeHead, pixels, states, ids, labels, cube
) -> tuple[torch.Tensor, ...]:
    """(next-token loss on the plan and action tokens, the cube-offset loss)."""
    lm = model.language_model
    prefix = model.prefix_embeddings(pixels, states)
    inputs = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat(
        [torch.ones(prefix.shape[:2], dtype=torch.long), (ids != model.tokenizer.pad_token_id).long()], 1
    )
    logits = lm(inputs_embeds=inputs, attention_mask=mask).logits[:, prefix.shape[1] - 1 : -1]
    tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    image = prefix[:, 1 : 1 + head.tokens]  # after BOS, before the state
    return tokens, head.loss(image, cube)


def language_loss(model: TinyVLA, ids, labels) -> torch.Tensor:
    mask = (ids != model.tokenizer.pad_token_id).long()
    logits = model.language_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def train(
    data_path: str | Path,
    out: str | Path,
    *,
    steps: int = 3500,
    batch: int = 48,
    lr: float = 2e-3,
    language_every: int = 4,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> TinyVLA:
    torch.manual_seed(seed)
    data = dict(np.load(data_path))
    model = build_model(data, seed)
    model.train()
    batches = Batches(model, data, seed)
    head = CubeHead(model, data["cube"])
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    t0, acc = time.perf_counter(), {"action": [], "language": [], "cube": []}
    for step in range(steps):
        if step % language_every == language_every - 1:
            loss = language_loss(model, *batches.language(batch))
            acc["language"].append(loss.item())
        else:
            tokens, cube = action_loss(model, head, *batches.actions(batch))
            loss = tokens + CUBE_WEIGHT * cube
            acc["action"].append(tokens.item())
            acc["cube"].append(cube.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            a, c, g = (
                np.mean(acc[k][-60:]) if acc[k] else float("nan") for k in ("action", "cube", "language")
            )
            log(f"step {step + 1}/{steps}  action loss {a:.3f}  cube loss {c:.3f}  language loss {g:.3f}  "
                f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
    model.eval()
    model.save(out)
    return model
