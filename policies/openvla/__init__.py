"""OpenVLA (Prismatic) natively: the official checkpoints load without `trust_remote_code`.

`OpenVLAPolicy.load(path, device=..., dtype=..., unnorm_key=..., center_crop=...)` reads config.json,
safetensors (sharded too) with the original parameter names, the tokenizer and dataset_statistics.json.
Modules: `config` (config.json), `vit` (the timm-layout ViTs), `modeling` (vision backbone, projector,
Llama), `processing` (prompt, image, actions), `policy` (the `Policy`), `tiny` (test checkpoints).
"""

from policies.openvla.config import ConfigError, PrismaticConfig
from policies.openvla.modeling import PrismaticModel
from policies.openvla.policy import OpenVLAPolicy

__all__ = ["ConfigError", "OpenVLAPolicy", "PrismaticConfig", "PrismaticModel"]
