"""The Prismatic architecture: fused ViT featurizers -> MLP projector -> Llama (transformers).

Module paths equal the official HF port's, so checkpoint parameter names load as they are:

    vision_backbone.featurizer.*        first ViT (DINOv2 for OpenVLA)
    vision_backbone.fused_featurizer.*  second ViT (SigLIP), fused models only
    projector.fc1 / fc2 / fc3           GELU MLP (fc3 only when fused)
    language_model.model.*              LlamaForCausalLM from transformers
    language_model.lm_head.weight

Weights load from `model.safetensors` or a sharded `model.safetensors.index.json`, tensor by tensor,
into a model built on the meta device, so a 7B checkpoint never exists twice in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaForCausalLM

from policies.openvla.config import PrismaticConfig
from policies.openvla.vit import VisionTransformer
from policies.weights import check_state_dict, preview

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class PrismaticVisionBackbone(nn.Module):
    def __init__(self, cfg: PrismaticConfig):
        super().__init__()
        specs = cfg.vit_specs()
        self.use_fused_vision_backbone = cfg.use_fused_vision_backbone
        self.featurizer = VisionTransformer(specs[0])
        self.fused_featurizer = VisionTransformer(specs[1]) if self.use_fused_vision_backbone else None
        self.embed_dim = sum(s.embed_dim for s in specs)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3 or 6, S, S] (fused: the two backbones' images stacked on channels) -> [B, patches, dim]."""
        if self.fused_featurizer is None:
            return self.featurizer(pixel_values)
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(img), self.fused_featurizer(img_fused)], dim=2)


class PrismaticProjector(nn.Module):
    def __init__(self, fused: bool, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fused = fused
        if fused:  # vision -> 4x vision -> llm -> llm
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act(self.fc1(x)))
        return self.fc3(self.act(x)) if self.fused else x


class PrismaticModel(nn.Module):
    """Vision backbone, projector and Llama; `embed` builds the multimodal prefill input."""

    def __init__(self, cfg: PrismaticConfig):
        super().__init__()
        self.config = cfg
        self.vision_backbone = PrismaticVisionBackbone(cfg)
        llama = cfg.llama_config()
        self.projector = PrismaticProjector(
            cfg.use_fused_vision_backbone, self.vision_backbone.embed_dim, llama.hidden_size
        )
        self.language_model = LlamaForCausalLM(llama)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Input embeddings `[BOS, image patches..., prompt tokens...]`: the image goes right after BOS."""
        patches = self.projector(self.vision_backbone(pixel_values))
        tokens = self.language_model.get_input_embeddings()(input_ids)
        return torch.cat([tokens[:, :1], patches.to(tokens.dtype), tokens[:, 1:]], dim=1)

    # -- persistence -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
    ) -> PrismaticModel:
        directory = Path(directory)
        cfg = PrismaticConfig.from_file(directory / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        state = {}
        for key, tensor in iter_checkpoint(directory, device=device):
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        check_state_dict(state, model.state_dict(), str(directory))
        model.load_state_dict(state, assign=True)
        model._rebuild_buffers(torch.device(device))
        return model.eval()

    def _rebuild_buffers(self, device: torch.device) -> None:
        """Non-persistent buffers (Llama's rotary frequencies) are not in checkpoints: compute them."""
        inner = self.language_model.model
        inner.rotary_emb = type(inner.rotary_emb)(self.language_model.config).to(device)
        leftover = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"tensors left uninitialised after loading: {preview(leftover)}")

    def save_pretrained(self, directory: str | Path, *, max_shard_bytes: int | None = None) -> Path:
        """config.json + safetensors (sharded with an index when `max_shard_bytes` is set), official names."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": "pt"}
        if max_shard_bytes is None:
            save_file(state, str(directory / SINGLE_FILE), metadata=meta)
            return directory
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata=meta)
            weight_map |= dict.fromkeys(shard, name)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return directory


def iter_checkpoint(directory: Path, *, device: str | torch.device = "cpu"):
    """(name, tensor) for every tensor of a single-file or sharded safetensors checkpoint."""
    if (directory / INDEX_FILE).exists():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    for name in files:
        with safe_open(str(directory / name), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield key, f.get_tensor(key)
