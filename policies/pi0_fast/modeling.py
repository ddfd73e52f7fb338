"""pi0-FAST on stock transformers: PaliGemma decoding FAST action tokens greedily with the prefix KV cache.

Module names follow LeRobot's checkpoints (`model.` prefix stripped), so its state dict loads through
pi0's key mapping unchanged: `paligemma_with_expert.paligemma` is a PaliGemmaForConditionalGeneration
(the name is LeRobot's; pi0-FAST has no expert).

One `forward` is one whole inference: the prefix [image tokens, prompt tokens, BOS] runs through the
Gemma stack once with bidirectional attention (LeRobot's mask: images and language see each other),
then each greedy token is one cached forward (`policies.decoding.next_token`), attending to the prefix
and the tokens before it, until the end-of-action marker or `max_steps`. Positions count valid tokens
only, so a masked (empty) camera's tokens are left out of the prefix altogether: nothing attends to them
in the reference either. Text tokens are embedded by Gemma's scaled embedding (times sqrt(width)), image
tokens are not. Every layer's MLP runs as a module, so the Steerer's hooks fire at every prefill position
and every decoded token, and its forward lock spans the whole chunk.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PaliGemmaForConditionalGeneration

from policies.decoding import next_token
from policies.pi0.modeling import paligemma_config
from policies.pi0_fast.config import FastArchitecture

LANGUAGE_LAYERS = "paligemma_with_expert.paligemma.model.language_model.layers"


class PaliGemmaOnly(nn.Module):
    def __init__(self, arch: FastArchitecture):
        super().__init__()
        self.paligemma = PaliGemmaForConditionalGeneration(paligemma_config(arch))


class PI0FastModel(nn.Module):
    def __init__(self, arch: FastArchitecture):
        super().__init__()
        self.arch = arch
        self.paligemma_with_expert = PaliGemmaOnly(arch)

    @property
    def paligemma(self) -> PaliGemmaForConditionalGeneration:
        return self.paligemma_with_expert.paligemma

    @property
    def language_model(self) -> nn.Module:
        return self.paligemma.model.language_model

    @property
    def dtype(self) -> torch.dtype:
        return self.paligemma.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.paligemma.lm_head.weight.device

    def embed_prefix(self, images: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] [1,3,H,W] (valid cameras only) and prompt ids [1, L] (BOS last) -> [1, P, width]."""
        pg = self.paligemma
        vision_dtype = pg.model.multi_modal_projector.linear.weight.dtype
        embs = [
            pg.model.get_image_features(img.to(vision_dtype)).pooler_output.to(self.dtype) for img in images
        ]
        embs.append(self.language_model.embed_tokens(tokens))  # Gemma's scaled embedding
        return torch.cat(embs, dim=1)

    def prefill(self, prefix: torch.Tensor):
        """The prefix with bidirectional attention; its output holds the key/value cache."""
        n = prefix.shape[1]
        mask = torch.zeros(prefix.shape[0], 1, n, n, dtype=prefix.dtype, device=prefix.device)
        return self.language_model(inputs_embeds=prefix, attention_mask=mask, use_cache=True)

    def logits(self, out) -> torch.Tensor:
        return self.paligemma.lm_head(out.last_hidden_state[:, -1]).float()

    def forward(
        self, images: list[torch.Tensor], tokens: torch.Tensor, max_steps: int, stop_id: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy FAST decoding, batch of one: (token ids [n], logits [n, vocab]) of each decoded step;
        stops after `stop_id` (the end-of-action marker) or `max_steps` tokens."""
        out = self.prefill(self.embed_prefix(images, tokens))
        ids, logits = [], []
        for step in range(max_steps):
            step_logits = self.logits(out)
            token = step_logits.argmax(-1, keepdim=True)
            ids.append(token[0, 0])
            logits.append(step_logits[0])
            if token.item() == stop_id or step + 1 == max_steps:
                break
            out = next_token(self.language_model, token, out)
        return torch.stack(ids), torch.stack(logits)
