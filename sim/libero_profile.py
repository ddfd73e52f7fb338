"""Evaluation profiles: what a checkpoint family's published LIBERO numbers were measured with, and the env-side
image chain each reference applies. (A policy whose announced conventions contradict the profile it is run
under is refused by `sim.conventions.check_policy`.)

A profile (`vla_steer/configs/profiles/*.yaml`) is a partial LIBERO sim config (`sim.libero_env.LiberoConfig`):
every key but the suite and task, each set as the reference evaluation sets it, and `reference` citing the
file it follows. A sim config names one with `profile: NAME`; `python -m sim.libero_node --env NAME --suite S`
runs one directly. A key set by the profile may not be set again by the sim config (an error, not an override).

The image chain (env side, torch-free; each step as its reference computes it):
    render `render_size` x `render_size` -> rotate 180 degrees (`rotate_images_180`) -> optional JPEG round
    trip (`jpeg_quality`) -> `resize` to the policy's announced size:
    - "tf_lanczos3": OpenVLA's `resize_image` (libero_utils.py): `tf.image.resize(method="lanczos3",
      antialias=True)` on the decoded JPEG, rounded and clipped to uint8. Computed here with PIL's LANCZOS
      (the same a=3 kernel, stretched by the scale when shrinking, half-pixel centres) on float32 planes, so
      no uint8 rounding happens between the two passes. Matches TF to within 1 grey level (float rounding at
      x.5); the JPEG round trip (PIL's libjpeg-turbo at quality 95, 4:2:0, like TF's encode_jpeg defaults)
      matches TF's to within a few levels at a handful of pixels (libjpeg builds differ in rounding). The
      tolerances the tests hold us to: tests/sim/test_libero_profiles.py.
    - "pil_bilinear_pad": openpi_client's `image_tools.resize_with_pad` (PIL BILINEAR on uint8, aspect kept,
      centred black padding). The same library call: exact.
    - "torch_bilinear_pad": LeRobot's `resize_with_pad_torch` (F.interpolate bilinear, align_corners=False,
      no antialiasing, on [0, 1] floats, centred padding), quantised to uint8 because the wire carries uint8
      images: within 0.5 grey levels of LeRobot's float image.
    - "none": rendered at the policy's size (`render_size` must then be null or equal).
    OpenVLA's 0.9-area centre crop is the policy's (`center_crop` in its hello reply), as in the reference,
    where it follows the resize inside `get_vla_action`; a profile says it `expect`s it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

RESIZES = ("none", "tf_lanczos3", "pil_bilinear_pad", "torch_bilinear_pad")

# -- images -------------------------------------------------------------------------------------------


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode to JPEG and decode, as `tf.image.encode_jpeg` (quality, 4:2:0) + `decode_image` do."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(buf, "JPEG", quality=quality, subsampling=2)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)


def resize_lanczos3(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`tf.image.resize(img, (height, width), "lanczos3", antialias=True)`, rounded and clipped to uint8."""
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
            (width, height), Image.Resampling.LANCZOS
        ))
        for c in range(image.shape[2])
    ]  # fmt: skip
    return np.clip(np.round(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)


def _pad_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The size an image is resized to before padding, aspect kept (both references truncate)."""
    ratio = max(w / width, h / height)
    return int(h / ratio), int(w / ratio)


def resize_with_pad_pil(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """openpi_client's `resize_with_pad`: PIL BILINEAR on uint8, centred black padding."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    rh, rw = _pad_size(h, w, height, width)
    resized = Image.fromarray(image).resize((rw, rh), Image.Resampling.BILINEAR)
    out = np.zeros((height, width, image.shape[2]), np.uint8)
    top, left = max(0, (height - rh) // 2), max(0, (width - rw) // 2)
    out[top : top + rh, left : left + rw] = np.asarray(resized)
    return out


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel bilinear sampling without antialiasing (PyTorch's align_corners=False)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), (src - i0)


def resize_with_pad_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """LeRobot's `resize_with_pad_torch` on the [0, 1] image it makes of the uint8 one, quantised back."""
    h, w = image.shape[:2]
    x = image.astype(np.float64) / 255.0
    rh, rw = _pad_size(h, w, height, width)
    y0, y1, dy = _linear_taps(h, rh)
    x0, x1, dx = _linear_taps(w, rw)
    dy, dx = dy[:, None, None], dx[None, :, None]
    top = x[y0][:, x0] * (1 - dx) + x[y0][:, x1] * dx
    bottom = x[y1][:, x0] * (1 - dx) + x[y1][:, x1] * dx
    resized = np.clip(top * (1 - dy) + bottom * dy, 0.0, 1.0)
    out = np.zeros((height, width, image.shape[2]), np.uint8)
    ph, pw = (height - rh) // 2, (width - rw) // 2
    out[ph : ph + rh, pw : pw + rw] = np.round(resized * 255.0).astype(np.uint8)
    return out


def process_image(
    frame: np.ndarray, size: tuple[int, int], *, rotate: bool, jpeg_quality: int | None, resize: str
) -> np.ndarray:
    """A right-side-up render (row 0 at the top) -> what the policy gets, [size[0], size[1], 3] uint8."""
    img = frame[:, ::-1] if rotate else frame  # 180 degrees of the renderer's frame = upright, mirrored
    if jpeg_quality is not None:
        img = jpeg_round_trip(img, jpeg_quality)
    h, w = size
    if resize == "tf_lanczos3":
        img = resize_lanczos3(img, h, w)
    elif resize == "pil_bilinear_pad":
        img = resize_with_pad_pil(np.ascontiguousarray(img), h, w)
    elif resize == "torch_bilinear_pad":
        img = resize_with_pad_bilinear(img, h, w)
    elif img.shape[:2] != (h, w):
        raise ValueError(f"rendered {list(img.shape[:2])} but the policy wants {[h, w]} and resize is 'none'")
    return np.ascontiguousarray(img, dtype=np.uint8)


__all__ = [
    "RESIZES",
    "jpeg_round_trip",
    "process_image",
    "resize_lanczos3",
    "resize_with_pad_bilinear",
    "resize_with_pad_pil",
]
