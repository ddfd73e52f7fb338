"""vla-steer: steer vision-language-action policies through their feed-forward neurons."""

__version__ = "0.1.0"
