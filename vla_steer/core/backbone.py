"""The steerable backbone: the one interface discovery and steering see of a policy.

A backbone is a stack of gated MLPs (`down_proj(act(gate_proj(x)) * up_proj(x))`), the unembedding that
maps the residual stream to the vocabulary, the final norm gain, and the tokenizer. Discovery and the
Steerer know nothing about OpenVLA or pi0 beyond this.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vla_steer.core.tokens import TokenLabeler


class BackboneError(ValueError):
    """A model does not have the structure a steerable backbone needs."""


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def find_layer_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """Every ModuleList of decoder layers whose children all hold a gated `.mlp`, by module path."""
    stacks = {}
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and all(_is_gated_mlp(getattr(layer, "mlp", None) or nn.Module()) for layer in module)
        ):
            stacks[name] = module
    return stacks


def _unit_offset_norm(norm: nn.Module) -> bool:
    # Gemma-family RMSNorms scale by (1 + weight); Llama-family by weight.
    return "Gemma" in type(norm).__name__


@dataclass
class Backbone:
    """A language-model stack exposed for neuron discovery and steering.

    `layers_path` is the module path of the decoder layer list inside `root` (for example
    `model.layers` for Llama, `model.language_model.layers` for PaliGemma in transformers 5).
    `unembedding` is None for stacks whose neurons cannot be projected onto a vocabulary
    (pi0's action expert): those can still be steered.
    """

    root: nn.Module
    layers_path: str
    unembedding: torch.Tensor | None
    norm_gain: torch.Tensor | None
    tokenizer: Any = None
    labeler: TokenLabeler | None = None
    input_embedding: torch.Tensor | None = None
    name: str = "backbone"
    # A policy that says a plan before its actions (`plans`) sets `planning` during the forwards that decide
    # the plan words: steering with positions="plan" acts only then. One flag per backbone: the policy node
    # runs one inference at a time (its single inference thread), which is what keeps it unambiguous.
    plans: bool = False
    planning: bool = field(default=False, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        layers_path: str | None = None,
        lm_head: nn.Module | None = None,
        final_norm: nn.Module | None = None,
        labeler: TokenLabeler | None = None,
        name: str | None = None,
    ) -> Backbone:
        """Find the gated-MLP stack, unembedding and final norm of a transformers model.

        Works for Llama-family and Gemma/PaliGemma models as transformers 5 lays them out; pass
        `layers_path`, `lm_head` and `final_norm` explicitly for anything else.
        """
        stacks = find_layer_stacks(model)
        if layers_path is None:
            if not stacks:
                raise BackboneError(
                    f"{type(model).__name__} has no list of decoder layers with gated MLPs "
                    "(mlp.gate_proj / mlp.up_proj / mlp.down_proj)"
                )
            if len(stacks) > 1:
                raise BackboneError(
                    f"{type(model).__name__} has several gated-MLP stacks {sorted(stacks)}; "
                    "pass layers_path= to choose one"
                )
            layers_path = next(iter(stacks))
        elif layers_path not in stacks:
            raise BackboneError(
                f"no gated-MLP layer list at {layers_path!r}; found {sorted(stacks) or 'none'}"
            )

        parent = model.get_submodule(layers_path.rsplit(".", 1)[0]) if "." in layers_path else model
        if final_norm is None:
            final_norm = getattr(parent, "norm", None)
        if lm_head is None and hasattr(model, "get_output_embeddings"):
            lm_head = model.get_output_embeddings()
        unembedding = lm_head.weight if lm_head is not None else None
        norm_gain = None
        if final_norm is not None and getattr(final_norm, "weight", None) is not None:
            w = final_norm.weight.detach()
            norm_gain = 1.0 + w.float() if _unit_offset_norm(final_norm) else w.float()
        embed = getattr(parent, "embed_tokens", None)
        input_embedding = embed.weight if isinstance(embed, nn.Embedding) else None
        if labeler is None and tokenizer is not None:
            labeler = TokenLabeler.from_tokenizer(
                tokenizer, vocab_size=unembedding.shape[0] if unembedding is not None else None
            )
        return cls(
            root=model,
            layers_path=layers_path,
            unembedding=unembedding,
            norm_gain=norm_gain,
            tokenizer=tokenizer,
            labeler=labeler,
            input_embedding=input_embedding,
            name=name or type(model).__name__,
        )

    # -- structure ---------------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        return self.root.get_submodule(self.layers_path)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def down_proj(self, layer: int) -> nn.Linear:
        return self.layers[layer].mlp.down_proj

    @property
    def d_mlp(self) -> int:
        return self.down_proj(0).in_features

    @property
    def d_model(self) -> int:
        return self.down_proj(0).out_features

    @property
    def vocab_size(self) -> int:
        if self.unembedding is None:
            raise BackboneError(
                f"{self.name} has no unembedding: its neurons cannot be projected onto a vocabulary"
            )
        return self.unembedding.shape[0]

    def value_vectors(self, layer: int) -> torch.Tensor:
        """[d_model, d_mlp]: column i is neuron i's value vector."""
        return self.down_proj(layer).weight.detach()

    def effective_unembedding(
        self, rows: slice = slice(None), dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows of W_U with the final-norm gain folded in: logits = W_U_eff @ v (up to the 1/rms scale)."""
        if self.unembedding is None:
            raise BackboneError(
                f"{self.name} has no unembedding: its neurons cannot be projected onto a vocabulary"
            )
        w = self.unembedding.detach()[rows].to(dtype)
        if self.norm_gain is not None:
            w = w * self.norm_gain.to(device=w.device, dtype=dtype)
        return w

    # -- identity ----------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A stable hash of what the projection depends on: shapes, dtypes and sampled weights.

        Cheap on a 7B model (a few thousand values per tensor), and any retraining or fine-tune
        changes it with overwhelming probability.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            tensors = [self.value_vectors(i) for i in range(self.n_layers)]
            tensors += [t for t in (self.unembedding, self.norm_gain) if t is not None]
            h.update(f"{self.layers_path}|{self.n_layers}".encode())
            for t in tensors:
                t = t.detach()
                h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
                flat = t.reshape(-1)
                idx = torch.linspace(
                    0, flat.numel() - 1, steps=min(4096, flat.numel()), device=flat.device
                ).long()
                h.update(flat[idx].float().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint
