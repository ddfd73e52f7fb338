"""pi0 (flow matching) on stock transformers: PaliGemma prefix + Gemma action expert, LeRobot/openpi checkpoints."""

from policies.pi0.config import PI0Architecture, PI0Config, read_config
from policies.pi0.policy import PI0Policy

__all__ = ["PI0Architecture", "PI0Config", "PI0Policy", "read_config"]
