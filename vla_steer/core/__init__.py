"""The core: backbones, discovery, steering, activations, the policy node, rollouts and their analysis.

Imports the wire and nothing above it (policies, sim, robot, app), enforced by `make lint`. Torch is
imported only by the modules that need it: the rollout store and configs stay torch-free for the LIBERO node.
"""
