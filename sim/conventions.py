"""The policy's announced conventions (its hello reply's `conventions`, `wire.ServerInfo`) against a sim
config: the one check every simulator node runs before it builds anything, so that nothing runs silently
mismatched. Torch-free (the LIBERO node runs it in its own venv).

Every simulator: the config's gripper mapping (`gripper`: how the policy's last action value reads) must be
the one the policy announces. A LIBERO evaluation profile adds what it `expect`s of the policy (family,
centre crop, state-relative action dims) and that each chunk holds the actions it executes from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# How to fix each announced convention a profile expects, for the refusal's message.
HINTS = {
    "family": "run this policy under the profile of its family (configs/profiles: {profiles})",
    "gripper": "the profile's gripper mapping assumes {want}; use the profile of the policy's family",
    "center_crop": "serve the policy with `center_crop: true` in its policy config "
    "(or --option center_crop=true); the LIBERO fine-tunes were trained with random crops",
    "relative_mask": "the checkpoint was trained with actions relative to the state on these dims; serve it with "
    "`relative_action_dims: {n}` in its policy config (openpi checkpoints do not record it)",
    "action_frame": "the simulator executes actions as returned; serve the policy so it returns {want} actions",
}


class ConventionMismatch(ValueError):
    """The policy's announced conventions contradict the sim config (or its profile)."""


def check_policy(
    conventions: Mapping[str, Any],
    *,
    gripper: str,
    expect: Mapping[str, Any] | None = None,
    profile: str | None = None,
    profiles: Sequence[str] = (),
    chunk_length: int | None = None,
    execute_steps: int | None = None,
) -> None:
    """Refuse (ConventionMismatch, naming the setting to change) a policy whose hello-reply `conventions`
    contradict the sim config: its `gripper` mapping against the policy's announced gripper (always), each
    `expect`ed convention (a profile's), and a chunk shorter than the `execute_steps` taken from it.
    `profiles`: the evaluation profiles there are, for the message."""
    where = f"profile {profile!r}" if profile else "the sim config"
    problems = []
    announced = conventions.get("gripper")
    if announced is not None and announced != gripper:
        if profile:
            fix = "run it under the profile of its family"
        else:
            fix = f"set `gripper: {announced}` in the sim config"
            if profiles:
                fix += ", or run it under the evaluation profile of its family"
        if profiles:
            fix += f" ({', '.join(profiles)})"
        problems.append(f"the policy's gripper is {announced!r} but {where} maps `gripper: {gripper}`: {fix}")
    for key, want in (expect or {}).items():
        got = conventions.get(key, "<not announced>")
        if got == want or (isinstance(want, list) and isinstance(got, list) and list(got) == want):
            continue
        n = sum(bool(m) for m in want) if key == "relative_mask" and isinstance(want, list) else 0
        hint = HINTS.get(key, "").format(want=want, n=n, profiles=", ".join(profiles))
        problems.append(f"{where} expects the policy's {key} = {want!r}, it announces {got!r}: {hint}")
    if execute_steps is not None and chunk_length is not None and chunk_length < execute_steps:
        problems.append(
            f"{where} executes {execute_steps} actions per chunk, but the policy returns chunks of "
            f"{chunk_length} (serve it with n_action_steps >= {execute_steps})"
        )
    if problems:
        raise ConventionMismatch("refused: " + "; ".join(problems))


__all__ = ["ConventionMismatch", "check_policy"]
