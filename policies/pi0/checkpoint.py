"""Reading and writing pi0 and pi0.5 checkpoints with their original parameter names and normalisation stats.

Layouts (all `config.json` + `model.safetensors` in one local directory):

- LeRobot, current (transformers >= 4.52 naming, processor pipelines, from late 2025):
  `model.paligemma_with_expert.paligemma.model.language_model.layers.{i}...`; stats in
  `policy_preprocessor_step_{k}_normalizer_processor.safetensors` (`observation.state.mean`, ...) and
  `policy_postprocessor_step_{k}_unnormalizer_processor.safetensors` (`action.mean`, ...).
- LeRobot, original (the first lerobot/pi0 upload and fine-tunes of early 2025, transformers 4.48 naming):
  `model.paligemma_with_expert.paligemma.language_model.model.layers.{i}...`, `...paligemma.vision_tower`,
  `...paligemma.multi_modal_projector`, `...paligemma.language_model.lm_head`; stats as buffers in
  model.safetensors: `normalize_inputs.buffer_observation_state.mean`, `unnormalize_outputs.buffer_action.std`.
- openpi's converted PyTorch checkpoints: the current names without the `model.` prefix; stats in
  `assets/<asset id>/norm_stats.json` (`{"norm_stats": {"state": {...}, "actions": {...}}}`).

Never used at inference and dropped on load: `gemma_expert.lm_head.weight` and
`gemma_expert.model.embed_tokens.weight` (the expert has no token vocabulary).

pi0.5 checkpoints differ only in their parameters (same names where the models share them): no
`state_proj`, `time_mlp_in/out` for `action_time_mlp_in/out`, and the expert's norms are adaptive
(`...layernorm.dense.weight/bias`, `model.norm.dense.*`, no `weight`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from policies.pi0.config import ARCH_KEY, PI0Config
from policies.weights import CheckpointError, check_state_dict

WEIGHTS = "model.safetensors"
LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
EMBED = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
UNUSED = (
    "paligemma_with_expert.gemma_expert.lm_head.weight",
    "paligemma_with_expert.gemma_expert.model.embed_tokens.weight",
)
# transformers 4.48 PaliGemma naming (original LeRobot pi0) -> transformers >= 4.52 / 5 naming.
OLD_TO_NEW = (
    ("paligemma_with_expert.paligemma.language_model.lm_head.", "paligemma_with_expert.paligemma.lm_head."),
    (
        "paligemma_with_expert.paligemma.language_model.model.",
        "paligemma_with_expert.paligemma.model.language_model.",
    ),
    ("paligemma_with_expert.paligemma.vision_tower.", "paligemma_with_expert.paligemma.model.vision_tower."),
    (
        "paligemma_with_expert.paligemma.multi_modal_projector.",
        "paligemma_with_expert.paligemma.model.multi_modal_projector.",
    ),
)
# transformers 5 builds PaliGemma's vision tower without the SiglipVisionModel wrapper level; the
# reference checkpoints (transformers 4.x) keep it.
VISION_REF = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
VISION_OURS = "paligemma_with_expert.paligemma.model.vision_tower."
OLD_STATS_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")


# -- parameter names ---------------------------------------------------------------------------------


def to_module_keys(
    state: dict[str, torch.Tensor], source: str = WEIGHTS, variant: str = "pi0"
) -> dict[str, torch.Tensor]:
    """A checkpoint state dict (any supported layout) -> our module's parameter names.

    Strips LeRobot's `model.` prefix, renames the transformers-4.48 PaliGemma paths, drops the unused
    expert vocabulary, leaves stats buffers out, and fills the tied lm_head / embed_tokens pair from
    whichever of the two the file holds.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(OLD_STATS_PREFIXES):
            continue
        name = key[len("model.") :] if key.startswith("model.") else key
        for old, new in OLD_TO_NEW:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if name.startswith(VISION_REF):
            name = VISION_OURS + name[len(VISION_REF) :]
        if name in UNUSED:
            continue
        if name in out:
            raise CheckpointError(f"{source}: two keys map to {name!r} (one is {key!r})")
        out[name] = value
    found = {"pi05": "time_mlp_in.weight", "pi0": "action_time_mlp_in.weight"}
    for other, key in found.items():
        if other != variant and key in out and found[variant] not in out:
            raise CheckpointError(
                f"{source}: holds {key.removesuffix('.weight')} (a {other} checkpoint); this loader reads "
                f"{variant}: load it as kind {other}"
            )
    if LM_HEAD in out and EMBED not in out:
        out[EMBED] = out[LM_HEAD]
    elif EMBED in out and LM_HEAD not in out:
        out[LM_HEAD] = out[EMBED]
    # Both present and different: a LeRobot fine-tune (it loads lm_head into a separate copy and trains
    # only embed_tokens). As LeRobot does, the file's embed_tokens embeds the prompt and its lm_head stays
    # the unembedding (which pi0 never runs; discovery projects onto it). Our loaded model keeps them apart.
    return out


def to_old_lerobot_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference (openpi) names -> the original LeRobot (transformers 4.48) names with the `model.` prefix."""
    out = {}
    for name, value in state.items():
        for old, new in OLD_TO_NEW:
            if name.startswith(new):
                name = old + name[len(new) :]
                break
        out["model." + name] = value
    return out


def load_weights(model: torch.nn.Module, directory: Path, variant: str = "pi0") -> None:
    """Load model.safetensors into the model, strictly: every parameter present, nothing unknown."""
    path = directory / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{directory}: {WEIGHTS} is missing")
    state = to_module_keys(load_file(str(path)), str(path), variant)
    check_state_dict(state, model.state_dict(), str(path))
    model.load_state_dict(state, strict=True)


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the reference (openpi) names; a tied embedding is stored once (as embed_tokens),
    an untied lm_head (a fine-tune's) beside it."""
    state = model.state_dict()
    head, embed = state[LM_HEAD], state[EMBED]
    tied = head is embed or head.is_meta or torch.equal(head, embed)  # meta: a shapes-only model
    out = {}
    for name, value in state.items():
        if name == LM_HEAD and tied:
            continue
        if name.startswith(VISION_OURS):
            name = VISION_REF + name[len(VISION_OURS) :]
        out[name] = value.detach().contiguous()
    return out


# -- normalisation -----------------------------------------------------------------------------------


@dataclass
class Normalizer:
    """One feature's normalisation (LeRobot's modes); numpy in, numpy out, float32."""

    mode: str = "IDENTITY"
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    eps: float = 1e-8
    # openpi adds eps to std (quantiles: to the q01..q99 span) both ways; LeRobot to std only when
    # normalising, and to a span only where it is zero
    symmetric_eps: bool = False

    NEEDS = {
        "IDENTITY": (),
        "MEAN_STD": ("mean", "std"),
        "MIN_MAX": ("min", "max"),
        "QUANTILES": ("q01", "q99"),
        "QUANTILE10": ("q10", "q90"),
    }

    def check(self, feature: str, dim: int, source: str) -> None:
        for stat in self.NEEDS[self.mode]:
            if stat not in self.stats:
                raise CheckpointError(
                    f"{source}: {self.mode} normalisation of {feature} needs stat {stat!r}; "
                    f"found {sorted(self.stats) or 'none'}"
                )
            if self.stats[stat].shape[-1] < dim:
                raise CheckpointError(
                    f"{source}: {feature}.{stat} has {self.stats[stat].shape[-1]} values, expected {dim}"
                )
            self.stats[stat] = self.stats[stat].reshape(-1)[:dim].astype(np.float32)

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}[
            self.mode
        ]
        lo, hi = self.stats[lo], self.stats[hi]
        span = hi - lo
        return lo, span + self.eps if self.symmetric_eps else np.where(span == 0, self.eps, span)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "IDENTITY":
            return x.astype(np.float32)
        if self.mode == "MEAN_STD":
            return ((x - self.stats["mean"]) / (self.stats["std"] + self.eps)).astype(np.float32)
        lo, span = self._bounds()
        return (2.0 * (x - lo) / span - 1.0).astype(np.float32)

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "IDENTITY":
            return x.astype(np.float32)
        if self.mode == "MEAN_STD":
            std = self.stats["std"] + (self.eps if self.symmetric_eps else 0.0)
            return (x * std + self.stats["mean"]).astype(np.float32)
        lo, span = self._bounds()
        return ((x + 1.0) * span / 2.0 + lo).astype(np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def read_stats(directory: Path, cfg: PI0Config, norm_stats: str | Path | None = None) -> dict[str, dict]:
    """feature name -> {stat: array}, from wherever this checkpoint generation keeps them.

    `norm_stats`: an explicit JSON file (openpi's norm_stats.json or `{feature: {stat: [..]}}`), which
    wins over anything in the directory.
    """
    if norm_stats is not None:
        return _read_stats_json(Path(norm_stats), cfg)
    if cfg.layout == "openpi":
        found = sorted(directory.glob("assets/*/norm_stats.json"))
        if len(found) != 1:
            raise CheckpointError(
                f"{directory}: expected one assets/<id>/norm_stats.json, found {len(found)}; "
                "pass norm_stats= to choose"
            )
        return _read_stats_json(found[0], cfg)
    stats: dict[str, dict] = {}
    files = sorted(directory.glob("policy_preprocessor_step_*normalizer_processor.safetensors"))
    files += sorted(directory.glob("policy_postprocessor_step_*unnormalizer_processor.safetensors"))
    for path in files:  # current LeRobot: "{feature}.{stat}"
        for key, value in load_file(str(path)).items():
            feature, stat = key.rsplit(".", 1)
            stats.setdefault(feature, {})[stat] = _np(value)
    if not files and (directory / WEIGHTS).exists():  # original LeRobot: buffers in the weights file
        from safetensors import safe_open

        with safe_open(str(directory / WEIGHTS), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if not key.startswith(OLD_STATS_PREFIXES):
                    continue
                buffer, stat = key.split(".", 1)[1].rsplit(".", 1)
                feature = _feature_of_buffer(buffer, cfg)
                if feature is not None:
                    stats.setdefault(feature, {}).setdefault(stat, _np(f.get_tensor(key)))
    return stats


def openpi_dims(directory: Path, norm_stats: str | Path | None = None) -> tuple[int | None, int | None]:
    """(state dim, action dim) an openpi checkpoint's norm stats were computed on (openpi normalises the
    dataset's state and actions, then zero-pads them to the model's width); None where absent."""
    if norm_stats is None:
        found = sorted(directory.glob("assets/*/norm_stats.json"))
        if len(found) != 1:
            return None, None
        norm_stats = found[0]
    try:
        data = json.loads(Path(norm_stats).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{norm_stats}: cannot read normalisation stats ({e})") from None
    data = data.get("norm_stats", data)

    def dim(feature: str) -> int | None:
        stats = data.get(feature)
        mean = stats.get("mean") if isinstance(stats, dict) else None
        return len(mean) if isinstance(mean, list) else None

    return dim("state"), dim("actions")


def _feature_of_buffer(buffer: str, cfg: PI0Config) -> str | None:
    """`buffer_observation_state` -> `observation.state` (LeRobot replaced dots by underscores)."""
    names = [f.name for f in (*cfg.images, cfg.state, cfg.action) if f is not None]
    return next((n for n in names if "buffer_" + n.replace(".", "_") == buffer), None)


def _read_stats_json(path: Path, cfg: PI0Config) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read normalisation stats ({e})") from None
    data = data.get("norm_stats", data)
    aliases = {"state": cfg.state.name if cfg.state else "state", "actions": cfg.action.name}
    out = {}
    for feature, stats in data.items():
        if not isinstance(stats, dict):
            raise CheckpointError(f"{path}: {feature} must map stat names to lists")
        name = aliases.get(feature, feature)
        out[name] = {k: np.asarray(v, dtype=np.float32) for k, v in stats.items() if v is not None}
    return out


def normalizers(directory: Path, cfg: PI0Config, norm_stats=None) -> tuple[Normalizer | None, Normalizer]:
    """(state normaliser or None, action normaliser), checked against the config's modes and dims."""
    stats = read_stats(directory, cfg, norm_stats)
    openpi = cfg.layout == "openpi"
    eps = 1e-6 if openpi else 1e-8
    source = str(norm_stats or directory)

    def make(feature, kind) -> Normalizer:
        n = Normalizer(
            cfg.normalization.get(kind, "IDENTITY"), dict(stats.get(feature.name, {})), eps, openpi
        )
        try:
            n.check(feature.name, feature.shape[0], source)
        except CheckpointError as e:
            if norm_stats is not None:
                raise
            # e.g. lerobot/pi05_base ships no stats: they come from the dataset a fine-tune uses
            raise CheckpointError(f"{e}; pass the option norm_stats=<a stats JSON: openpi's norm_stats.json "
                                  "or {feature: {stat: [...]}}>") from None  # fmt: skip
        return n

    state = make(cfg.state, "STATE") if cfg.state is not None else None
    return state, make(cfg.action, "ACTION")


# -- writing (tests, benchmarks, conversions) --------------------------------------------------------


def save_lerobot(
    model: torch.nn.Module,
    cfg: PI0Config,
    stats: dict[str, dict[str, np.ndarray]],
    directory: str | Path,
    *,
    generation: str = "current",
) -> Path:
    """Write `config.json` + `model.safetensors` (+ stats) as LeRobot does; `generation`: current | original."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_lerobot_dict(), indent=2))
    weights = unique_state(model)
    if generation == "current":
        save_file({"model." + k: v for k, v in weights.items()}, str(directory / WEIGHTS))
        inputs = {f"{f}.{s}": torch.as_tensor(v) for f, st in stats.items() if f != cfg.action.name
                  for s, v in st.items()}  # fmt: skip
        outputs = {f"{cfg.action.name}.{s}": torch.as_tensor(v) for s, v in stats[cfg.action.name].items()}
        save_file(inputs, str(directory / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
        save_file(outputs, str(directory / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    elif generation == "original":
        weights = to_old_lerobot_keys(weights)
        for f, st in stats.items():
            prefixes = (
                ("normalize_targets", "unnormalize_outputs")
                if f == cfg.action.name
                else ("normalize_inputs",)
            )
            for prefix in prefixes:
                for s, v in st.items():
                    weights[f"{prefix}.buffer_{f.replace('.', '_')}.{s}"] = torch.tensor(np.asarray(v))
        save_file(weights, str(directory / WEIGHTS))
    else:
        raise ValueError(f"generation must be 'current' or 'original', got {generation!r}")
    return directory


def save_openpi(
    model: torch.nn.Module, cfg: PI0Config, stats: dict[str, dict[str, np.ndarray]], directory: str | Path,
    *, asset_id: str = "robot",
) -> Path:  # fmt: skip
    """Write openpi's converted-PyTorch layout: config.json, model.safetensors, assets/<id>/norm_stats.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = cfg.architecture
    config = {"action_dim": arch.max_action_dim, "action_horizon": cfg.chunk_size, "precision": "float32"}
    lerobot = cfg.to_lerobot_dict()
    for key in (ARCH_KEY, "paligemma_variant", "action_expert_variant"):
        if key in lerobot:
            config[key] = lerobot[key]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(unique_state(model), str(directory / WEIGHTS))
    names = {cfg.action.name: "actions"} | ({cfg.state.name: "state"} if cfg.state else {})
    doc = {"norm_stats": {names[f]: {s: np.asarray(v).tolist() for s, v in st.items()}
                          for f, st in stats.items() if f in names}}  # fmt: skip
    (directory / "assets" / asset_id).mkdir(parents=True, exist_ok=True)
    (directory / "assets" / asset_id / "norm_stats.json").write_text(json.dumps(doc))
    return directory
