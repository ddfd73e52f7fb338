"""What pi0, pi0.5 and pi0-FAST feed their models alike: the cameras (observation keys, empty cameras,
resizing), and the prompt with a discretised state (pi0.5, pi0-FAST).

Cameras follow LeRobot's `_preprocess_images`: every declared image feature absent from the observation
is an empty camera, -1 everywhere and masked out. Here a feature is absent by the user's choice:
`image_keys: {feature: null}` (a base checkpoint declares three cameras; LIBERO has two), or LeRobot's
`empty_cameras` features; any other missing camera is an error (a typo must not blind the model).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from policies.pi0.config import Feature
from vla_steer.wire import Observation

EMPTY_CAMERA = "observation.images.empty_camera_"  # LeRobot's `empty_cameras` features
STATE_BINS = np.linspace(-1.0, 1.0, 256 + 1)[:-1]  # left edges of the 256 state bins


def discretize_state(normed: np.ndarray) -> np.ndarray:
    """Normalised state -> bin numbers in -1..255 (openpi's PaligemmaTokenizer and LeRobot: -1 below, 255
    above; float64 edges)."""
    return np.digitize(normed, bins=STATE_BINS) - 1


def state_prompt(instruction: str, normed_state: np.ndarray) -> str:
    """`Task: <instruction>, State: <bins>;\n`: the prompt of pi0.5 (which adds `Action: `) and pi0-FAST."""
    clean = instruction.strip().replace("_", " ").replace("\n", " ")
    bins = " ".join(str(b) for b in discretize_state(normed_state))
    return f"Task: {clean}, State: {bins};\n"


def default_image_key(feature: str) -> str:
    """`observation.images.wrist_image` -> `wrist_image`; `observation.image` -> `image`."""
    for prefix in ("observation.images.", "observation."):
        if feature.startswith(prefix):
            return feature[len(prefix) :]
    return feature


def camera_keys(
    images: list[Feature], renames: Mapping[str, str | None] | None
) -> tuple[dict[str, str], int]:
    """The checkpoint's image features -> ({feature: observation key} of the real cameras, in the
    checkpoint's order; how many are empty). `renames`: feature -> observation key, or None: empty."""
    renames = dict(renames or {})
    names = [f.name for f in images]
    unknown = sorted(set(renames) - set(names))
    if unknown:
        raise ValueError(f"image_keys renames unknown image features {unknown}; known {names}")
    real = {n: renames.get(n, default_image_key(n)) for n in names
            if not n.startswith(EMPTY_CAMERA) and not (n in renames and renames[n] is None)}  # fmt: skip
    if not real:
        raise ValueError(f"image_keys leaves no camera: at least one of {names} needs an observation key")
    return real, len(names) - len(real)


def camera_images(
    obs: Observation, image_keys: Mapping[str, str], size: int, device: torch.device
) -> list[torch.Tensor]:
    """The real cameras as [1, 3, size, size] in [-1, 1]: LeRobot's steps, uint8 -> [0, 1], resized with
    padding to the model's size, then [-1, 1]."""
    out = []
    for feature, key in image_keys.items():
        img = obs.images.get(key)
        if img is None:
            raise ValueError(
                f"observation.images is missing {key!r} (feature {feature}); a camera this setup lacks is "
                f"left empty with the option image_keys: {{{feature}: null}}"
            )
        x = torch.tensor(img, dtype=torch.float32, device=device).permute(2, 0, 1)[None] / 255.0
        if tuple(x.shape[-2:]) != (size, size):
            x = resize_with_pad(x, size, size)
        out.append(x * 2.0 - 1.0)
    return out


def resize_with_pad(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, C, h, w] in [0, 1] -> [B, C, height, width]: scaled to fit keeping the aspect ratio (bilinear,
    no antialiasing), clamped to [0, 1], centred on black; openpi's and LeRobot's `resize_with_pad_torch` rule."""
    h, w = x.shape[-2:]
    ratio = max(w / width, h / height)
    rh, rw = int(h / ratio), int(w / ratio)
    x = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False).clamp(
        0.0, 1.0
    )
    top, left = (height - rh) // 2, (width - rw) // 2
    return torch.nn.functional.pad(x, (left, width - rw - left, top, height - rh - top), value=0.0)
