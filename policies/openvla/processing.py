"""OpenVLA's inference contract outside the network: prompt, image preprocessing, action decoding.

Prompt: `In: What action should the robot take to {instruction}?\\nOut:` (the instruction lower-cased, as
the official LIBERO evaluation does), tokenized with BOS; then, like the official `predict_action`, the
empty SentencePiece piece "▁" (id 29871 in Llama-2's vocabulary) is appended unless the prompt already ends
with it, because training sequences had it before the first action token. We look its id up in the
tokenizer instead of hard-coding 29871, so a tokenizer with the same layout gives the same ids.

Image: optional centre crop (LIBERO fine-tunes were trained with random-crop augmentation; the official
evaluation crops 90% of the area and resizes back to 224 with TF's bilinear `crop_and_resize`, reproduced
here in NumPy), then, per vision backbone, the Prismatic processor's transform: resize (bicubic; the
checkpoints' `resize-naive` strategy squashes to S x S), to [0, 1], normalise with the backbone's
mean/std; the fused model's two images are stacked on the channel axis ([1, 6, S, S]).

Actions: token id -> bin (`vocab - id - 1`, clipped to [0, n_bins - 2]) -> bin centre on [-1, 1] ->
un-normalised with the `unnorm_key` statistics `0.5 (a + 1) (q99 - q01) + q01` where `mask` is true.
Gripper: OpenVLA's statistics mask the gripper out, so the last dimension stays a bin centre, which for
the RLDS training data lies in [0, 1] with 0 = close and 1 = open. `gripper_to_libero` turns it into
LIBERO/robosuite's convention (binarised, -1 = open, +1 = close) exactly as the official LIBERO script.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from policies.openvla.config import PrismaticConfig, normalization_for
from policies.weights import CheckpointError
from vla_steer.core.tokens import ActionBins

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
EMPTY_PIECE = "▁"  # Llama-2 id 29871
CROP_SCALE = 0.9  # area fraction of the official LIBERO centre crop
STATS_FILE = "dataset_statistics.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")


# -- prompt ----------------------------------------------------------------------------------------


def build_prompt(instruction: str) -> str:
    return PROMPT.format(instruction=instruction.strip().lower())


def empty_token_id(tokenizer: Any) -> int:
    token_id = tokenizer.convert_tokens_to_ids(EMPTY_PIECE)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer has no {EMPTY_PIECE!r} piece (Llama-2: id 29871); not an OpenVLA tokenizer"
        )
    return int(token_id)


def prompt_ids(tokenizer: Any, instruction: str) -> list[int]:
    """BOS + prompt tokens, with the empty piece appended as the official predict_action does."""
    ids = list(tokenizer(build_prompt(instruction), add_special_tokens=True).input_ids)
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)  # the image is inserted after position 0, which must be BOS
    empty = empty_token_id(tokenizer)
    if ids[-1] != empty:
        ids.append(empty)
    return ids


# -- images ----------------------------------------------------------------------------------------


def center_crop(image: np.ndarray, scale: float = CROP_SCALE, size: int = 224) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: the centre `scale` of the area, resized back.

    Reproduces the official evaluation: TF `convert_image_dtype` to [0, 1], `crop_and_resize` (bilinear,
    box corners sampled exactly), clip, `convert_image_dtype` back (x * 255.5, truncated, saturated).
    """
    h, w = image.shape[:2]
    side = float(np.clip(np.sqrt(scale), 0.0, 1.0))
    y1 = x1 = (1.0 - side) / 2.0
    y2 = x2 = y1 + side
    img = image.astype(np.float32) / 255.0
    ys = y1 * (h - 1) + np.arange(size) * (y2 - y1) * (h - 1) / (size - 1)
    xs = x1 * (w - 1) + np.arange(size) * (x2 - x1) * (w - 1) / (size - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1i, x1i = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    dy, dx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = img[y0][:, x0] * (1 - dx) + img[y0][:, x1i] * dx
    bottom = img[y1i][:, x0] * (1 - dx) + img[y1i][:, x1i] * dx
    out = np.clip(top * (1 - dy) + bottom * dy, 0.0, 1.0)
    return np.minimum(out * 255.5, 255).astype(np.uint8)


@dataclass(frozen=True)
class ImageTransform:
    """One backbone's transform: resize to `size` (bicubic), [0, 1], normalise."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    strategy: str = "resize-naive"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        s = self.size
        if self.strategy == "letterbox":  # pad to square with the mean colour, then as resize-crop
            w, h = image.size
            side = max(w, h)
            fill = tuple(int(m * 255) for m in self.mean)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
        if self.strategy == "resize-naive":
            image = image.resize((s, s), Image.BICUBIC)
        else:  # shorter side to s, then centre crop s x s
            w, h = image.size
            scale = s / min(w, h)
            nw, nh = max(s, int(w * scale)), max(s, int(h * scale))  # torchvision truncates
            image = image.resize((nw, nh), Image.BICUBIC)
            left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
            image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


@dataclass(frozen=True)
class ImageProcessor:
    transforms: tuple[ImageTransform, ...]
    center_crop: bool = False

    @classmethod
    def for_checkpoint(cls, directory: Path, cfg: PrismaticConfig, *, center_crop: bool) -> ImageProcessor:
        """From preprocessor_config.json when the checkpoint has one, else from the config's backbones."""
        path = directory / PREPROCESSOR_FILE
        if path.exists():
            data = json.loads(path.read_text())
            data = data.get("image_processor", data)
            sizes = [int(s[-1]) for s in data["input_sizes"]]
            means, stds = data["means"], data["stds"]
            strategy = data.get("image_resize_strategy", cfg.image_resize_strategy)
        else:
            sizes = cfg.image_sizes
            norms = [normalization_for(t) for t in cfg.timm_model_ids]
            means, stds = [m for m, _ in norms], [s for _, s in norms]
            strategy = cfg.image_resize_strategy
        if strategy not in RESIZE_STRATEGIES:
            raise ValueError(f"{path}: image_resize_strategy {strategy!r} not in {RESIZE_STRATEGIES}")
        transforms = tuple(
            ImageTransform(s, tuple(m), tuple(d), strategy)
            for s, m, d in zip(sizes, means, stds, strict=True)
        )
        return cls(transforms, center_crop)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """uint8 [H, W, 3] -> float32 [1, 3 * n_backbones, S, S]."""
        if self.center_crop:
            image = center_crop(image, size=self.transforms[0].size)
        pil = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
        return torch.cat([t(pil) for t in self.transforms], dim=0)[None]


# -- actions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionStats:
    """One dataset's action statistics (the `action` entry of dataset_statistics.json)."""

    key: str
    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray

    @property
    def dim(self) -> int:
        return len(self.q01)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        return np.where(self.mask, 0.5 * (normalized + 1.0) * (self.q99 - self.q01) + self.q01, normalized)


def load_norm_stats(directory: Path, cfg: PrismaticConfig) -> dict[str, Any]:
    """config.json's norm_stats updated with dataset_statistics.json (the file fine-tunes ship) if present."""
    stats = dict(cfg.norm_stats or {})
    path = directory / STATS_FILE
    if path.exists():
        stats.update(json.loads(path.read_text()))
    return stats


def select_stats(
    norm_stats: dict[str, Any], unnorm_key: str | None, source: str = "checkpoint"
) -> ActionStats:
    """The statistics to un-normalise with; errors list the keys there are."""
    keys = sorted(norm_stats)
    if not keys:
        raise CheckpointError(
            f"{source} has no action statistics (no {STATS_FILE} and no norm_stats in config.json): "
            "cannot un-normalise actions"
        )
    if unnorm_key is None:
        if len(keys) > 1:
            raise CheckpointError(
                f"{source} has statistics for several datasets; choose one with unnorm_key (a policy config "
                f"key, or --option unnorm_key=NAME on the command line), one of {keys}"
            )
        unnorm_key = keys[0]
    if unnorm_key not in norm_stats:
        raise CheckpointError(
            f"unnorm_key {unnorm_key!r} is not in the {source}'s statistics; available: {keys}"
        )
    action = norm_stats[unnorm_key].get("action")
    if not isinstance(action, dict) or "q01" not in action or "q99" not in action:
        raise CheckpointError(f"statistics {unnorm_key!r} lack action.q01 / action.q99")
    q01 = np.asarray(action["q01"], dtype=np.float64)
    q99 = np.asarray(action["q99"], dtype=np.float64)
    mask = np.asarray(action.get("mask", [True] * len(q01)), dtype=bool)
    if not (q01.shape == q99.shape == mask.shape and q01.ndim == 1):
        raise ValueError(f"statistics {unnorm_key!r}: q01, q99 and mask must be equally long vectors")
    return ActionStats(unnorm_key, q01, q99, mask)


def decode_actions(token_ids: np.ndarray, bins: ActionBins, stats: ActionStats) -> np.ndarray:
    """Action token ids -> un-normalised actions (float64, like the official predict_action)."""
    return stats.unnormalize(np.asarray(bins.value(np.asarray(token_ids)), dtype=np.float64))


def gripper_to_libero(actions: np.ndarray) -> np.ndarray:
    """Last dim from OpenVLA's [0, 1] (0 close, 1 open) to LIBERO's binarised -1 open / +1 close."""
    out = np.array(actions, dtype=np.float64, copy=True)
    out[..., -1] = -np.sign(2.0 * out[..., -1] - 1.0)
    return out
