"""pi0 on stock transformers: PaliGemma prefix, Gemma action expert, flow-matching sampler.

Module names follow the reference checkpoints exactly (openpi's PyTorch port, which LeRobot's prefixes
with `model.`), so a state dict loads without renaming:

    paligemma_with_expert.paligemma            PaliGemmaForConditionalGeneration (SigLIP + projector + Gemma)
    paligemma_with_expert.gemma_expert.model   GemmaModel without token embeddings (the action expert)
    state_proj, action_in_proj, action_out_proj, action_time_mlp_in, action_time_mlp_out

Inference (one `forward`): the prefix (image tokens, then BOS + prompt + "\\n" tokens scaled by
sqrt(width)) runs through the PaliGemma language stack once with bidirectional attention, leaving a
per-layer key/value cache. Then `num_steps` Euler steps integrate the flow from t=1 (noise) to t=0
(actions) with dt = -1/N: each step embeds [state token, chunk action tokens] for the expert (action
tokens fuse the noisy action with a sine-cosine embedding of t through an MLP) and runs the expert
stack, whose queries attend to the cached prefix keys and values plus the suffix's own. Masks follow
big_vision's `make_att_2d_masks` with pi0's autoregressive marks: prefix all 0 (one bidirectional
block), state 1 (its own block), first action 1 and the rest 0 (one block): the prefix never sees the
suffix, the state sees the prefix, the actions see the prefix, the state and each other.

Every layer's MLP is called as a module (`layer.mlp(x)`), so forward hooks on `mlp.down_proj` (the
Steerer's and the ActivationRecorder's) fire in both stacks. The whole inference is one call of this
module's `forward`, so a hook on the module holds for a whole action chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaModel,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
)

from policies.pi0.config import PI0Architecture

MASK_VALUE = -2.3819763e38  # openpi's additive mask value: finite in bf16, so a fully masked row stays finite


def text_config(arch: PI0Architecture) -> GemmaConfig:
    p = arch.paligemma
    return GemmaConfig(
        vocab_size=arch.vocab_size,
        hidden_size=p.width,
        intermediate_size=p.mlp_dim,
        num_hidden_layers=p.depth,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        head_dim=p.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
    )


def paligemma_config(arch: PI0Architecture) -> PaliGemmaConfig:
    v = arch.vision
    vision = SiglipVisionConfig(
        hidden_size=v.hidden,
        intermediate_size=v.intermediate,
        num_hidden_layers=v.depth,
        num_attention_heads=v.num_heads,
        patch_size=v.patch,
        image_size=v.image_size,
        vision_use_head=False,
    )
    return PaliGemmaConfig(
        vision_config=vision.to_dict(),
        text_config=text_config(arch).to_dict(),
        projection_dim=arch.paligemma.width,
        hidden_size=arch.paligemma.width,
        vocab_size=arch.vocab_size,
        image_token_index=arch.vocab_size - 1,  # unused: image tokens are placed by embedding, not by id
    )


def expert_config(arch: PI0Architecture) -> GemmaConfig:
    e = arch.expert
    return GemmaConfig(
        vocab_size=1,  # the expert has no token embeddings; this keeps a placeholder tiny before it is dropped
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        hidden_size=e.width,
        intermediate_size=e.mlp_dim,
        num_hidden_layers=e.depth,
        num_attention_heads=e.num_heads,
        num_key_value_heads=e.num_kv_heads,
        head_dim=e.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
    )


class ExpertLM(nn.Module):
    """Holds the expert's GemmaModel as `.model`, the name its parameters have in the checkpoints."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.model = GemmaModel(config)
        self.model.embed_tokens = None  # actions are embedded by action_in_proj, never by token id


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, arch: PI0Architecture):
        super().__init__()
        self.paligemma = PaliGemmaForConditionalGeneration(paligemma_config(arch))
        self.gemma_expert = ExpertLM(expert_config(arch))

    @property
    def language_model(self) -> nn.Module:
        return self.paligemma.model.language_model

    @property
    def expert(self) -> GemmaModel:
        return self.gemma_expert.model


# -- masks, positions, time ----------------------------------------------------------------------------


def make_att_2d_masks(pad_masks: torch.Tensor, ar_marks: torch.Tensor) -> torch.Tensor:
    """big_vision's rule: token i sees valid token j iff cumsum(ar)[j] <= cumsum(ar)[i]. [B,N],[B,N] -> [B,N,N]."""
    if pad_masks.ndim != 2 or ar_marks.ndim != 2:
        raise ValueError(
            f"masks must be [batch, tokens], got {tuple(pad_masks.shape)} and {tuple(ar_marks.shape)}"
        )
    cum = torch.cumsum(ar_marks.to(torch.int64), dim=1)
    att = cum[:, None, :] <= cum[:, :, None]
    return att & (pad_masks[:, None, :] & pad_masks[:, :, None])


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, Q, K] -> additive [B, 1, Q, K] (0 where allowed)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed[:, None], zero, torch.tensor(MASK_VALUE, dtype=dtype, device=allowed.device))


def time_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sine-cosine embedding of scalar times [B] -> [B, dim] (periods geometric in [min, max]), float32."""
    if dim % 2:
        raise ValueError(f"time embedding dimension must be even, got {dim}")
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=dtype, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t.to(dtype)[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def norm(
    module: nn.Module, x: torch.Tensor, cond: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An RMSNorm applied to x -> (normed, residual gate): a plain one has no gate; pi0.5's adaptive one
    (`cond` given) returns the gate its modulation computed."""
    return (module(x), None) if cond is None else module(x, cond)


# Kept in float32 when the rest is cast to bfloat16, as LeRobot's `to_bfloat16_for_selected_params` (pi0,
# pi05, pi0_fast) and openpi's PyTorch port do: the vision path and every RMSNorm (pi0.5's adaptive norms'
# `dense` included, by name). Matched as substrings of the parameter names, which are the reference's.
FLOAT32_PARAMS = ("vision_tower", "multi_modal_projector", "input_layernorm", "post_attention_layernorm",
                  "model.norm")  # fmt: skip


def place(model: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Move `model` to device and dtype, the FLOAT32_PARAMS kept in float32 (the forward casts at their
    edges: images into the vision tower, the condition into an adaptive norm's dense; norms return x's dtype)."""
    model.to(device=device, dtype=dtype)
    if dtype != torch.float32:
        for name, param in model.named_parameters():
            if any(part in name for part in FLOAT32_PARAMS):
                param.data = param.data.float()
    return model


def _residual(h: torch.Tensor, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return h + out if gate is None else h + out * gate


@dataclass
class PrefixCache:
    """Per-layer keys and values of the prefix (after RoPE), its validity mask and valid length."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pad_mask: torch.Tensor  # [B, P] bool
    n_valid: torch.Tensor  # [B, 1]


# -- the model -----------------------------------------------------------------------------------------


class PI0Model(nn.Module):
    def __init__(self, arch: PI0Architecture, *, chunk_size: int = 50, min_period=4e-3, max_period=4.0):
        super().__init__()
        self.arch = arch
        self.chunk_size = chunk_size
        self.min_period, self.max_period = min_period, max_period
        w = arch.expert.width
        self.paligemma_with_expert = PaliGemmaWithExpert(arch)
        self.action_in_proj = nn.Linear(arch.max_action_dim, w)
        self.action_out_proj = nn.Linear(w, arch.max_action_dim)
        self.build_conditioning(w)

    def build_conditioning(self, width: int) -> None:
        """pi0: the state token's projection and the MLP that fuses each action token with the time."""
        self.state_proj = nn.Linear(self.arch.max_state_dim, width)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    # -- embeddings ----------------------------------------------------------------------------------

    def embed_prefix(
        self,
        images: list[torch.Tensor],
        image_masks: list[torch.Tensor],
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] [B,3,H,W] and token ids [B,L] -> (embeddings, pad mask, ar marks) of the prefix."""
        pg = self.paligemma_with_expert.paligemma
        embs, pads = [], []
        for img, mask in zip(images, image_masks, strict=True):
            vision_dtype = pg.model.multi_modal_projector.linear.weight.dtype
            feats = pg.model.get_image_features(img.to(vision_dtype)).pooler_output
            embs.append(feats.to(self.dtype))
            pads.append(mask[:, None].expand(feats.shape[0], feats.shape[1]))
        # Gemma's embedding normaliser sqrt(width), on text tokens only (explicit: transformers 5's
        # embedding module applies it inside its forward, older ones did it in the model's forward).
        table = self.paligemma_with_expert.language_model.embed_tokens.weight
        lang = F.embedding(tokens, table)
        embs.append(lang * torch.tensor(math.sqrt(table.shape[-1]), dtype=lang.dtype))
        pads.append(token_mask)
        pad = torch.cat(pads, dim=1)
        return torch.cat(embs, dim=1), pad, torch.zeros_like(pad)

    def embed_suffix(
        self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """State [B,S], noisy actions [B,H,A] and time [B] -> the expert's input tokens, pad mask, ar marks
        and the expert's norm conditioning (pi0: none; the time enters through the action tokens)."""
        bsize = state.shape[0]
        state_emb = self.state_proj(state.to(self.dtype))[:, None]
        action_emb = self.action_in_proj(x_t.to(self.dtype))
        t_emb = time_embedding(t, action_emb.shape[-1], self.min_period, self.max_period).to(self.dtype)
        fused = torch.cat([action_emb, t_emb[:, None].expand_as(action_emb)], dim=2)
        fused = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(fused)))
        embs = torch.cat([state_emb, fused], dim=1)
        pad = torch.ones(bsize, embs.shape[1], dtype=torch.bool, device=embs.device)
        ar = torch.zeros_like(pad)
        ar[:, :2] = True  # the state starts a block; the first action starts the action block
        return embs, pad, ar, None

    # -- transformer passes --------------------------------------------------------------------------

    def _qkv(self, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cond=None):
        """Queries, keys (both after RoPE), values, and the attention residual's gate (None: ungated)."""
        attn = layer.self_attn
        x, gate = norm(layer.input_layernorm, h, cond)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        return _rope(q, cos, sin), _rope(k, cos, sin), v, gate

    @staticmethod
    def _attend(layer, q, k, v, mask) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=layer.self_attn.scaling, enable_gqa=k.shape[1] != q.shape[1]
        )
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    @staticmethod
    def _finish(
        layer: nn.Module, h: torch.Tensor, attn_out: torch.Tensor, gate=None, cond=None
    ) -> torch.Tensor:
        h = _residual(h, layer.self_attn.o_proj(attn_out), gate)
        x, gate = norm(layer.post_attention_layernorm, h, cond)
        return _residual(h, layer.mlp(x), gate)  # a module call: down_proj hooks fire

    def fill_prefix_cache(self, embs: torch.Tensor, pad: torch.Tensor, ar: torch.Tensor) -> PrefixCache:
        lm = self.paligemma_with_expert.language_model
        positions = torch.cumsum(pad.to(torch.int64), dim=1) - 1
        cos, sin = lm.rotary_emb(embs, positions)
        mask = additive_mask(make_att_2d_masks(pad, ar), embs.dtype)
        keys, values, h = [], [], embs
        for layer in lm.layers:
            q, k, v, _ = self._qkv(layer, h, cos, sin)
            keys.append(k)
            values.append(v)
            h = self._finish(layer, h, self._attend(layer, q, k, v, mask))
        return PrefixCache(keys, values, pad, pad.sum(dim=1, keepdim=True))

    def denoise_step(
        self, cache: PrefixCache, state: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor
    ):
        """The velocity field v(x_t, t) [B, H, A] (float32), attending to the cached prefix."""
        expert = self.paligemma_with_expert.expert
        embs, pad, ar, cond = self.embed_suffix(state, x_t, t)
        bsize, n = pad.shape
        prefix_cols = cache.pad_mask[:, None, :].expand(bsize, n, cache.pad_mask.shape[1])
        allowed = torch.cat([prefix_cols, make_att_2d_masks(pad, ar)], dim=2)
        mask = additive_mask(allowed, embs.dtype)
        positions = cache.n_valid + torch.cumsum(pad.to(torch.int64), dim=1) - 1
        cos, sin = self.paligemma_with_expert.language_model.rotary_emb(embs, positions)
        h = embs
        for i, layer in enumerate(expert.layers):
            q, k, v, gate = self._qkv(layer, h, cos, sin, cond)
            k = torch.cat([cache.keys[i], k], dim=2)
            v = torch.cat([cache.values[i], v], dim=2)
            h = self._finish(layer, h, self._attend(layer, q, k, v, mask), gate, cond)
        h = norm(expert.norm, h, cond)[0][:, -self.chunk_size :]
        return self.action_out_proj(h).float()

    def forward(
        self,
        images: list[torch.Tensor],
        image_masks: list[torch.Tensor],
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        state: torch.Tensor,
        noise: torch.Tensor,
        num_steps: int = 10,
    ) -> torch.Tensor:
        """One inference: noise [B, H, A] -> normalised action chunk [B, H, A] (float32)."""
        cache = self.fill_prefix_cache(*self.embed_prefix(images, image_masks, tokens, token_mask))
        bsize = noise.shape[0]
        dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32, device=noise.device)
        t = torch.tensor(1.0, dtype=torch.float32, device=noise.device)
        x = noise.float()
        for _ in range(num_steps):  # openpi's loop: t = 1, 1 + dt, ... accumulated in float32
            x = x + dt * self.denoise_step(cache, state, x, t.expand(bsize))
            t = t + dt
        return x
