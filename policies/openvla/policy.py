"""OpenVLA as a `Policy`: native loading of the official checkpoints, no remote code.

    policy = OpenVLAPolicy.load("openvla-7b-finetuned-libero-10", device="cuda", dtype="bfloat16",
                                unnorm_key="libero_10_no_noops", center_crop=True)
    chunk = policy.infer(Observation(instruction, {"agentview": rgb_224x224}))

One inference: preprocess the image, embed `[BOS, image patches, prompt + "▁"]`, one prefill forward of
the Llama, then greedy decoding of `action_dim` tokens (7) with the KV cache, one forward per token; the
tokens become actions through the bins and the `unnorm_key` statistics (see `processing`). The result is
one action ([1, 7]): xyz delta, rotation delta, gripper in [0, 1] (0 close, 1 open; the statistics leave
it un-normalised). LIBERO's convention is the sim's business (its `gripper:` setting) or
`processing.gripper_to_libero`.

Steering: the backbone is the Llama (`language_model`: 32 gated MLPs at `model.layers`, `lm_head`, the
tokenizer with action-bin labels), and every forward of it (the prefill and each decoded token) goes through
its root module, so a `Steerer` on `policy.backbone` sees all of them. Which positions are steered is the
Steerer's `positions` (`vla-steer serve --positions`): "all" (default; the paper's setting) rewrites the
neurons at every prefill position (BOS, image patches, prompt) and at every decoded action token; "last"
only at the last prefill position and at every decoded token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.decoding import next_token, stack_prompts
from policies.openvla import processing
from policies.openvla.config import PrismaticConfig
from policies.openvla.modeling import DTYPES, PrismaticModel
from policies.weights import local_checkpoint
from vla_steer.core.backbone import Backbone
from vla_steer.core.policy import ActionChunk, Policy, PolicySpec
from vla_steer.core.tokens import ActionBins, TokenLabeler
from vla_steer.wire import Observation

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model"]  # never the checkpoint's *.py


def resolve_checkpoint(path: str | Path) -> Path:
    """A local checkpoint directory, or a hub id downloaded (weights, configs, tokenizer; no code)."""
    return local_checkpoint(path, HUB_PATTERNS, "an OpenVLA")


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class OpenVLAPolicy(Policy):
    batching = True

    def __init__(
        self,
        model: PrismaticModel,
        tokenizer,
        image_processor: processing.ImageProcessor,
        stats: processing.ActionStats,
        *,
        name: str = "openvla",
        image_key: str = "agentview",
        control_hz: float = 5.0,
        constrain_to_bins: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.stats = stats
        self.image_key = image_key
        self.constrain_to_bins = constrain_to_bins
        cfg = model.config
        self.bins = ActionBins(vocab_size=cfg.token_vocab_size, n_bins=cfg.n_action_bins)
        size = image_processor.transforms[0].size
        self.spec = PolicySpec(
            name=name,
            action_dim=stats.dim,
            chunk_length=1,
            control_hz=control_hz,
            image_keys={image_key: (size, size, 3)},
            state_dim=None,
            action_space="ee_delta",
            conventions={
                "family": "openvla",
                "gripper": "open_unit",  # [0, 1], 1 = open: the statistics leave the gripper un-normalised
                "action_frame": "absolute",
                "relative_mask": None,
                "center_crop": processing.CROP_SCALE if image_processor.center_crop else None,
                "resize": image_processor.transforms[0].strategy,
            },
        )
        lm = model.language_model
        labeler = TokenLabeler.from_tokenizer(
            tokenizer, vocab_size=lm.get_output_embeddings().weight.shape[0], action_bins=self.bins
        )
        self._backbone = Backbone.from_model(lm, tokenizer, labeler=labeler, name=name)
        self._empty_id = processing.empty_token_id(tokenizer)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "auto",
        unnorm_key: str | None = None,
        center_crop: bool | None = None,
        image_key: str = "agentview",
        control_hz: float = 5.0,
        constrain_to_bins: bool = False,
    ) -> OpenVLAPolicy:
        """Load a checkpoint directory (or hub id) in the official layout.

        `unnorm_key`: which dataset's statistics un-normalise the actions (needed when there are several;
        the error lists them). `center_crop`: the LIBERO fine-tunes' 90%-area centre crop (they were trained
        with random-crop augmentation); None: on exactly when the statistics are a LIBERO dataset's
        (`libero_*`), as the official LIBERO script defaults.
        `constrain_to_bins`: restrict decoding to the 256 action tokens (off: the official greedy argmax
        over the whole vocabulary, a non-action token then clips to the edge bin).
        """
        from transformers import AutoTokenizer

        directory = resolve_checkpoint(path)
        torch_dtype = resolve_dtype(dtype, device)
        # The statistics first: a wrong or missing unnorm_key is refused before the weights are read.
        config = PrismaticConfig.from_file(directory / "config.json")
        stats = processing.select_stats(
            processing.load_norm_stats(directory, config), unnorm_key, source=str(directory)
        )
        model = PrismaticModel.from_pretrained(directory, dtype=torch_dtype, device=device)
        # The Llama config keeps AutoTokenizer from reading config.json's unknown model_type "openvla".
        tokenizer = AutoTokenizer.from_pretrained(directory, config=model.config.llama_config())
        if center_crop is None:
            center_crop = stats.key.startswith("libero")
        image_processor = processing.ImageProcessor.for_checkpoint(
            directory, model.config, center_crop=center_crop
        )
        return cls(
            model,
            tokenizer,
            image_processor,
            stats,
            name=Path(str(path)).name or str(path),
            image_key=image_key,
            control_hz=control_hz,
            constrain_to_bins=constrain_to_bins,
        )

    # -- Policy ------------------------------------------------------------------------------------

    @property
    def backbone(self) -> Backbone:
        return self._backbone

    @property
    def device(self) -> torch.device:
        return self.model.projector.fc1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.projector.fc1.weight.dtype

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        return self.image_processor(image).to(device=self.device, dtype=self.dtype)

    def input_ids(self, instruction: str) -> torch.Tensor:
        return torch.tensor([processing.prompt_ids(self.tokenizer, instruction)], device=self.device)

    def action_token_ids(self, obs: Observation) -> torch.Tensor:
        ids = self.input_ids(obs.instruction)
        return self.generate(ids, self.pixel_values(obs.images[self.image_key]))

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Greedy action tokens for `[1, T]` prompt ids (BOS first, "▁" last): one prefill, then one
        cached forward per token."""
        return self.generate_batch(input_ids, pixel_values)[0]

    @torch.no_grad()
    def generate_batch(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """`generate` for `[B, T]` prompts of one length (unpadded, so each row computes what it computes
        alone) and `[B, ...]` pixels: `[B, action_dim]` tokens."""
        lm = self.model.language_model
        inputs = self.model.embed(input_ids, pixel_values)
        mask = None
        if self.constrain_to_bins:
            mask = torch.full((lm.config.vocab_size,), float("-inf"), device=self.device)
            mask[self.bins.first_id : self.bins.vocab_size] = 0.0
        out = lm(inputs_embeds=inputs, use_cache=True, logits_to_keep=1)  # only the last position decides
        tokens = []
        for step in range(self.spec.action_dim):
            logits = out.logits[:, -1].float()
            token = (logits if mask is None else logits + mask).argmax(-1, keepdim=True)
            tokens.append(token)
            if step + 1 < self.spec.action_dim:
                out = next_token(lm, token, out)
        return torch.cat(tokens, dim=1)

    def decode_actions(self, token_ids: np.ndarray) -> np.ndarray:
        return processing.decode_actions(token_ids, self.bins, self.stats)

    def infer(self, obs: Observation) -> ActionChunk:
        return self.infer_batch([obs], [None])[0]

    def batch_key(self, obs: Observation) -> int:
        return len(processing.prompt_ids(self.tokenizer, obs.instruction))

    def infer_batch(
        self, observations: Sequence[Observation], episodes: Sequence[Any] = ()
    ) -> list[ActionChunk]:
        """One forward for observations of one prompt length. Stateless: `episodes` is not used."""
        prompts = [processing.prompt_ids(self.tokenizer, o.instruction) for o in observations]
        pixels = torch.cat([self.pixel_values(o.images[self.image_key]) for o in observations])
        out = []
        for row in self.generate_batch(stack_prompts(prompts, self.device), pixels).cpu().numpy():
            actions = self.decode_actions(row).astype(np.float32)[None]
            out.append(
                ActionChunk(actions, info={"action_tokens": row.tolist(), "unnorm_key": self.stats.key})
            )
        return out
