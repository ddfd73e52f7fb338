"""pi0.5: pi0's model (`policies.pi0.modeling`) with the time conditioning of openpi's `pi05` variant.

What differs from pi0, and only that is here:
- no state token: the state reaches the model as text in the prefix (see `policies.pi05.policy`), so the
  suffix is the chunk's action tokens alone, one block (ar marks 1, 0, 0, ...);
- the time enters the expert through its norms, not the action tokens: a sine-cosine embedding of t
  through `time_mlp_in` -> swish -> `time_mlp_out` -> swish is the condition of every expert RMSNorm,
  which becomes adaptive (`AdaRMSNorm`: scale, shift and a residual gate from one Linear, `dense`);
  action tokens are `action_in_proj(x_t)` alone.
The prefix pass (PaliGemma, plain norms), the cache, masks and the Euler loop are pi0's. Parameter names
are the reference checkpoints' (`time_mlp_in`, `...input_layernorm.dense.weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from policies.pi0.modeling import PI0Model, time_embedding


class AdaRMSNorm(nn.Module):
    """Gemma's RMSNorm made adaptive: `dense(cond)` gives (scale, shift, gate); the output is
    rms-normalised x * (1 + scale) + shift, and `gate` scales the residual branch this norm feeds.
    The statistics are taken in float32 as in openpi's and LeRobot's `PiGemmaRMSNorm`."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        var = x.float().square().mean(dim=-1, keepdim=True)
        normed = x * torch.rsqrt(var + self.eps)
        modulation = self.dense(cond.to(self.dense.weight.dtype))  # dense stays float32 under bfloat16
        if x.ndim == 3:
            modulation = modulation[:, None]
        scale, shift, gate = modulation.chunk(3, dim=-1)
        out = normed * (1 + scale.float()) + shift.float()
        return out.to(x.dtype), gate.to(x.dtype)


class PI05Model(PI0Model):
    def build_conditioning(self, width: int) -> None:
        """pi0.5: the time MLP, and adaptive norms in the expert (pi0's plain ones are replaced)."""
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)
        expert = self.paligemma_with_expert.expert
        eps = expert.config.rms_norm_eps
        for layer in expert.layers:
            layer.input_layernorm = AdaRMSNorm(width, width, eps)
            layer.post_attention_layernorm = AdaRMSNorm(width, width, eps)
        expert.norm = AdaRMSNorm(width, width, eps)

    def embed_suffix(
        self, state: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy actions [B,H,A] and time [B] -> action tokens, pad mask, ar marks, and the expert's norm
        condition [B, width]; `state` is unused (it is in the prompt)."""
        embs = self.action_in_proj(x_t.to(self.dtype))
        t_emb = time_embedding(t, embs.shape[-1], self.min_period, self.max_period).to(self.dtype)
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(t_emb))))
        pad = torch.ones(embs.shape[:2], dtype=torch.bool, device=embs.device)
        ar = torch.zeros_like(pad)
        ar[:, 0] = True  # the actions are one block, after the prefix
        return embs, pad, ar, cond

    def forward(
        self,
        images: list[torch.Tensor],
        image_masks: list[torch.Tensor],
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        noise: torch.Tensor,
        num_steps: int = 10,
    ) -> torch.Tensor:
        """One inference: noise [B, H, A] -> normalised action chunk [B, H, A] (float32); the state is in
        `tokens`."""
        return super().forward(images, image_masks, tokens, token_mask, None, noise, num_steps)
