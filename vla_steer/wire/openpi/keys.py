"""From an openpi observation dict to our `Observation`: which key is the prompt, which keys are which
camera, which keys make up the state.

openpi's example clients name their inputs per robot. LIBERO: `observation/image` (third-person camera),
`observation/wrist_image`, `observation/state` (8 floats) and `prompt`. DROID:
`observation/exterior_image_1_left`, `observation/wrist_image_left`, `observation/joint_position` (7),
`observation/gripper_position` (1) and `prompt`. A preset (`KeyMap.preset("libero", image_keys)`) assigns
the policy's own image keys to those cameras: a key with "wrist" in its name takes the wrist camera, the
other the third-person one. A policy whose cameras do not fit that (pi0's three) takes an explicit map,
`KeyMap.from_dict({"prompt": ..., "images": {our_key: openpi_key}, "state": [openpi_key, ...]})`. Keys a
map does not name are ignored, as openpi's own input transforms ignore what a model does not take.

Images: uint8 [H, W, 3], or [3, H, W] (transposed), or float in [0, 1] (scaled to uint8), as openpi's
input transforms accept. An image of another size than the policy's is resized to it the way openpi's
clients and transforms do (`resize_with_pad`: aspect ratio kept, black bars, bilinear); anything else (a
wrong number of channels, a missing key, NaN) is refused with an error naming the key. State: the listed
keys' values, flattened and concatenated in order; their total length must equal the policy's state size
(no padding or truncation: a silent mismatch would steer a robot from the wrong numbers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vla_steer.wire.messages import Observation

# (third-person camera, wrist camera, state keys) of openpi's example clients
PRESETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "libero": ("observation/image", "observation/wrist_image", ("observation/state",)),
    "droid": (
        "observation/exterior_image_1_left",
        "observation/wrist_image_left",
        ("observation/joint_position", "observation/gripper_position"),
    ),
}
MAX_IMAGE_PIXELS = 4096 * 4096  # per input image, before resizing


class KeyMapError(ValueError):
    """An observation dict that does not fit the key map (the message names the key)."""


@dataclass(frozen=True)
class KeyMap:
    """Where each part of our `Observation` is in an openpi observation dict."""

    images: Mapping[str, str]  # our image key -> openpi key
    state: tuple[str, ...] = ()  # openpi keys, concatenated in this order
    prompt: str = "prompt"
    name: str = "custom"

    @classmethod
    def preset(cls, name: str, image_keys: Sequence[str]) -> KeyMap:
        """openpi's LIBERO or DROID key names, assigned to the policy's cameras by name (see above)."""
        if name not in PRESETS:
            raise ValueError(f"unknown openpi key map {name!r}; presets are {sorted(PRESETS)} (or a file)")
        main, wrist, state = PRESETS[name]
        images: dict[str, str] = {}
        for key in image_keys:
            images[key] = wrist if "wrist" in key.lower() else main
        taken = list(images.values())
        if len(set(taken)) != len(taken):
            raise ValueError(
                f"the {name} key map has one third-person and one wrist camera; this policy's cameras "
                f"{list(image_keys)} do not fit it: give a key map file (images: {{our_key: openpi_key}})"
            )
        return cls(images, state, "prompt", name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "key map") -> KeyMap:
        """`{"prompt": str, "images": {our_key: openpi_key}, "state": [openpi_key, ...]}`; errors name the key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a map with keys prompt, images, state")
        unknown = sorted(set(data) - {"prompt", "images", "state"})
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} (allowed: prompt, images, state)")
        images = data.get("images")
        if (
            not isinstance(images, Mapping)
            or not images
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in images.items())
        ):
            raise ValueError(f"{source}: 'images' must map our image keys to openpi keys (strings)")
        state = data.get("state", [])
        if isinstance(state, str):
            state = [state]
        if not isinstance(state, list) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"{source}: 'state' must be a list of openpi keys")
        prompt = data.get("prompt", "prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{source}: 'prompt' must be the openpi key of the instruction")
        return cls(dict(images), tuple(state), prompt, source)

    def check(self, image_keys: Sequence[str]) -> None:
        """Refuse a map that does not name exactly the policy's cameras (at startup, not per request)."""
        if set(self.images) != set(image_keys):
            raise ValueError(
                f"the {self.name} key map names cameras {sorted(self.images)}; the policy takes {sorted(image_keys)}"
            )

    def describe(self) -> dict[str, Any]:
        """What a client must send, for the metadata sent on connect."""
        return {
            "prompt": self.prompt,
            "images": {v: k for k, v in self.images.items()},
            "state": list(self.state),
        }

    def observation(
        self, obs: Any, image_shapes: Mapping[str, tuple[int, int, int]], state_dim: int | None
    ) -> Observation:
        """Map and validate one openpi observation dict; raises `KeyMapError` naming the key."""
        if not isinstance(obs, Mapping):
            raise KeyMapError(f"an observation must be a map, got {type(obs).__name__}")
        prompt = obs.get(self.prompt)
        if not isinstance(prompt, str):
            raise KeyMapError(f"{self.prompt!r} must be the task instruction (a string), got {_what(prompt)}")
        images = {ours: _image(obs, key, image_shapes[ours]) for ours, key in self.images.items()}
        state = None
        if state_dim is not None:
            state = self._state(obs, state_dim)
        try:
            payload = Observation(prompt, images, state).to_payload()
            return Observation.from_payload(payload, image_shapes, state_dim)
        except ValueError as e:
            raise KeyMapError(str(e)) from None

    def _state(self, obs: Mapping[str, Any], state_dim: int) -> np.ndarray:
        if not self.state:
            raise KeyMapError(
                f"the policy takes a state of {state_dim} floats; the key map names no state keys"
            )
        parts = []
        for key in self.state:
            value = obs.get(key)
            if value is None:
                raise KeyMapError(f"{key!r} is missing (the state is {list(self.state)})")
            a = np.asarray(value)
            if a.dtype.kind not in "biuf" or a.ndim > 1:
                raise KeyMapError(f"{key!r} must be a number or a 1-D numeric array, got {_what(value)}")
            parts.append(a.reshape(-1).astype(np.float64))
        state = np.concatenate(parts)
        if state.shape != (state_dim,):
            sizes = {k: p.size for k, p in zip(self.state, parts, strict=True)}
            raise KeyMapError(f"the state {sizes} has {state.size} values; the policy takes {state_dim}")
        return state


def _image(obs: Mapping[str, Any], key: str, shape: tuple[int, int, int]) -> np.ndarray:
    img = obs.get(key)
    if not isinstance(img, np.ndarray):
        raise KeyMapError(
            f"{key!r} must be an image array, got {_what(img)}" if key in obs else f"{key!r} is missing"
        )
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)  # CHW, as openpi's ALOHA clients send
    if (
        img.ndim != 3
        or img.shape[-1] != 3
        or 0 in img.shape
        or img.shape[0] * img.shape[1] > MAX_IMAGE_PIXELS
    ):
        raise KeyMapError(f"{key!r} must be an RGB image [H, W, 3] or [3, H, W], got {_what(img)}")
    if img.dtype.kind == "f":
        if not np.all(np.isfinite(img)) or img.min() < 0 or img.max() > 1:
            raise KeyMapError(f"{key!r}: a float image must hold values in [0, 1]")
        img = (img * 255).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        raise KeyMapError(f"{key!r} must be uint8 (or float in [0, 1]), got {img.dtype}")
    if img.shape != tuple(shape):
        img = resize_with_pad(img, shape[0], shape[1])
    return np.ascontiguousarray(img)


def resize_with_pad(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 [H, W, 3] to [height, width, 3] keeping the aspect ratio: bilinear, then black bars."""
    from PIL import Image  # only here: the rest of the wire needs no imaging library

    h, w = img.shape[:2]
    scale = min(height / h, width / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR))
    out = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def _what(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype}{list(value.shape)}"
    return "nothing" if value is None else type(value).__name__
