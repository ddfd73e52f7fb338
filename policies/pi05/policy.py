"""The pi0.5 policy: pi0's (`policies.pi0.policy`) with the state in the prompt.

    policy = PI05Policy.load("checkpoints/pi05_libero", device="cuda", dtype=torch.bfloat16, seed=0)
    chunk = policy.infer(obs)

Prompt (openpi's `PaligemmaTokenizer.tokenize` with a state, LeRobot's pi05 processor): the state is
normalised with the checkpoint's stats (quantiles by default: [-1, 1] between q01 and q99), cut into 256
bins over [-1, 1] (`np.digitize(...) - 1`: -1 below the range, 255 at and above its top), and written as
numbers: BOS + "Task: {instruction}, State: {bins};\\nAction: ", tokenised in one piece, truncated to
`tokenizer_max_length` (200). Everything else (images, noise, un-normalisation, relative actions, the
two steerable stacks "language" and "action_expert") is pi0's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from policies.pi0.inputs import state_prompt
from policies.pi0.policy import PI0Policy
from policies.pi05.modeling import PI05Model
from vla_steer.wire import Observation


def prompt_text(instruction: str, normed_state: np.ndarray) -> str:
    return state_prompt(instruction, normed_state) + "Action: "


class PI05Policy(PI0Policy):
    MODEL = PI05Model
    VARIANT = "pi05"

    def prompt_ids(self, instruction: str, normed_state: np.ndarray | None = None) -> list[int]:
        """BOS + the pi0.5 prompt's tokens, truncated to `tokenizer_max_length`."""
        if normed_state is None:
            raise ValueError("pi0.5's prompt holds the (normalised) state: pass it")
        text = prompt_text(instruction, np.asarray(normed_state, np.float32))
        ids = [self.tokenizer.bos_token_id, *self.tokenizer.encode(text, add_special_tokens=False)]
        return ids[: self.cfg.tokenizer_max_length]

    def observation_prompt_ids(self, obs: Observation) -> list[int]:
        return self.prompt_ids(obs.instruction, self.normalized_state(obs))

    def model_inputs(
        self, obs: Observation, noise: torch.Tensor | np.ndarray | None = None
    ) -> dict[str, Any]:
        """The tensors `PI05Model.forward` takes, batch of one: no state tensor (it is in the tokens)."""
        return self.shared_inputs(obs, self.observation_prompt_ids(obs), noise)
