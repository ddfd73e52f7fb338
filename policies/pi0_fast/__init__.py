"""pi0-FAST on stock transformers: PaliGemma decoding FAST action tokens, LeRobot pi0_fast checkpoints."""

from policies.pi0_fast.config import FastArchitecture, FastConfig, read_config
from policies.pi0_fast.fast import FastTokenizer
from policies.pi0_fast.policy import PI0FastPolicy

__all__ = ["FastArchitecture", "FastConfig", "FastTokenizer", "PI0FastPolicy", "read_config"]
