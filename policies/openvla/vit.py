"""The two ViT featurizers of Prismatic, with timm's module layout and parameter names.

OpenVLA builds its vision backbones with `timm.create_model(...)` (timm 0.9.x `VisionTransformer`), so a
checkpoint's vision weights are named after timm's modules (`patch_embed.proj`, `blocks.N.attn.qkv`,
`blocks.N.ls1.scale_factor`, `attn_pool.kv`, ...). This module rebuilds exactly the parts those
checkpoints use: same names, same shapes, same computation on the path Prismatic runs. We do not import
timm itself: it requires torchvision, whose PyPI wheels are CUDA builds that fail to import next to a
CPU-only torch, and Prismatic needs only one plain ViT forward.

What Prismatic reads (`get_intermediate_layers(n={depth - 2})` in the official code): the patch tokens
(prefix tokens dropped) after the second-to-last block, without the final norm. The last block, `norm`
and SigLIP's attention-pooling head (`attn_pool`) are never evaluated, but their weights are in every
checkpoint, so they are modules here too (`strict` loading and the layout check need them).

LayerScale: timm calls its parameter `gamma`; the checkpoints call it `scale_factor` (the official HF
port renames it because transformers used to rewrite parameters named `gamma`). We use `scale_factor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # timm's VisionTransformer default norm layer: LayerNorm(eps=1e-6)


@dataclass(frozen=True)
class ViTSpec:
    """One timm ViT architecture (the arguments timm's model entry point passes to VisionTransformer)."""

    timm_id: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    init_values: float | None = None  # LayerScale present iff set
    global_pool: str = "token"  # "map": an attention-pooling head (SigLIP)

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


class PatchEmbed(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.img_size = spec.img_size
        self.proj = nn.Conv2d(3, spec.embed_dim, spec.patch_size, stride=spec.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} pixels, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU: timm 0.9's default for both DINOv2 and SigLIP
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Block(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        d = spec.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.attn = Attention(d, spec.num_heads)
        self.ls1 = LayerScale(d, spec.init_values) if spec.init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = Mlp(d, spec.mlp_hidden)
        self.ls2 = LayerScale(d, spec.init_values) if spec.init_values is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """SigLIP's pooling head: its weights are in the checkpoints, but Prismatic never evaluates it."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        d = spec.embed_dim
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = Mlp(d, spec.mlp_hidden)


class VisionTransformer(nn.Module):
    """timm's VisionTransformer as Prismatic uses it: `forward` returns the second-to-last block's patches."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        d = spec.embed_dim
        self.embed_dim = d
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if spec.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.reg_tokens, d)) if spec.reg_tokens else None
        n_pos = spec.num_patches + (0 if spec.no_embed_class else spec.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, n_pos, d) * 0.02)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.attn_pool = AttentionPoolLatent(spec) if spec.global_pool == "map" else None

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.spec.no_embed_class:  # positions cover the patches only: add, then prepend the prefix
            return torch.cat([*prefix, x + self.pos_embed], dim=1)
        return torch.cat([*prefix, x], dim=1) + self.pos_embed

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, patches, embed_dim]: the output of block depth-2, prefix tokens dropped."""
        x = self._pos_embed(self.patch_embed(pixels))
        for block in self.blocks[: self.spec.depth - 1]:  # the last block's output is never read
            x = block(x)
        return x[:, self.spec.num_prefix_tokens :]
