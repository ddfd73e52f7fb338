"""The app: the `vla-steer` command (one module per command group) and the demo. Nothing imports it."""
