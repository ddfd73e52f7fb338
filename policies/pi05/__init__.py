"""pi0.5 on stock transformers: pi0's PaliGemma prefix with the state written into the prompt, and an action
expert conditioned on the flow time through adaptive RMSNorm; LeRobot and openpi checkpoints."""

from policies.pi05.modeling import AdaRMSNorm, PI05Model
from policies.pi05.policy import PI05Policy

__all__ = ["AdaRMSNorm", "PI05Model", "PI05Policy"]
