"""One way to name a policy on the command line, for every command that takes one.

`resolve_target(arg)` accepts
- a policy config: a YAML file, or the name of a shipped one (`demo_vla`, `openvla_7b`, ...);
- a checkpoint directory, whose kind is read from its files: `policy_config.json` (the demo VLA),
  `config.json` with `model_type: openvla|prismatic` (OpenVLA, official layout), with `type: pi0` or `pi05`
  (LeRobot, current and original layouts) or `action_horizon` (openpi's PyTorch layout: pi0, or pi0.5
  where its weights have `time_mlp_in`), with `type: pi0_fast` (LeRobot's pi0-FAST), or any other transformers
  `model_type` (a plain language model: `discover` takes it, `serve` does not);
- a hub id (`owner/name`), whose kind is read from its config.json on the hub unless `--kind` says it.

Nothing here loads weights: `stack_dims` reads each steerable stack's size from the config files, so flags
such as `--layers` and `--size` are checked before a multi-GB model is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from policies import PolicyConfig, _looks_like_hub_id, _PolicyFile, read_policy_config
from vla_steer.core.config import resolve_config

POLICY_KINDS = ("tiny_vla", "openvla", "pi0", "pi05", "pi0_fast")
LANGUAGE_MODEL = "language_model"
KINDS = (*POLICY_KINDS, LANGUAGE_MODEL)
REFERENCE_KINDS = {"pi0fast": "pi0-FAST (LeRobot < 0.4)"}


@dataclass(frozen=True)
class LanguageModel:
    """A plain transformers language model checkpoint (Llama, Gemma, PaliGemma, ...): discoverable, not servable."""

    path: Path
    device: str = "cpu"
    dtype: str = "float32"
    kind: str = LANGUAGE_MODEL


Target = PolicyConfig | LanguageModel


def kind_of_config(data: Any, source: str) -> str:
    """The kind a checkpoint's config.json describes; errors name the file and what was found."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object")
    if data.get("model_type") in ("openvla", "prismatic"):
        return "openvla"
    kind = data.get("type")
    if kind in ("pi0", "pi05", "pi0_fast"):
        return kind
    if kind is None and "action_horizon" in data:  # openpi: `detect_kind` also reads the weights' names
        return "pi05" if data.get("pi05") else "pi0"
    if kind in REFERENCE_KINDS:
        raise ValueError(
            f"{source}: a {REFERENCE_KINDS[kind]} checkpoint (type {kind!r}); this build serves pi0, pi0.5 and type pi0_fast"
        )
    if kind is not None:
        raise ValueError(
            f"{source}: type {kind!r} is not a policy this build knows ({', '.join(POLICY_KINDS)})"
        )
    if "model_type" in data:
        return LANGUAGE_MODEL
    raise ValueError(
        f"{source}: neither model_type (OpenVLA, transformers models) nor type: pi0 (LeRobot) nor "
        "action_horizon (openpi): cannot tell what this checkpoint is; pass --kind"
    )


def detect_kind(directory: Path) -> str:
    """The kind of the checkpoint in a local directory (see the module doc)."""
    if (directory / "policy_config.json").is_file():
        return "tiny_vla"
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{directory}: neither policy_config.json (the demo VLA's layout) nor config.json (OpenVLA, pi0, "
            "transformers): not a checkpoint directory"
        )
    data = _read_json(config)
    kind = kind_of_config(data, str(config))
    if kind == "pi0" and "type" not in data:
        from policies.pi0.config import openpi_variant

        return openpi_variant(data, directory)
    return kind


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _hub_config(hub_id: str, flag: str) -> Any:
    """config.json of a hub checkpoint (from the local hub cache when offline)."""
    from huggingface_hub import hf_hub_download

    try:
        return _read_json(Path(hf_hub_download(hub_id, "config.json")))
    except Exception as e:  # offline, unknown repo, gated: all say the same thing to the user
        raise FileNotFoundError(
            f"{flag} {hub_id}: not a local path, and its config.json could not be fetched from the hub "
            f"({type(e).__name__}); download the checkpoint and pass its directory, or pass --kind "
            f"({'|'.join(POLICY_KINDS)}) to load it from the hub directly"
        ) from None


def resolve_target(
    arg: str | Path,
    *,
    kind: str | None = None,
    flag: str = "--policy",
    settings: dict[str, Any] | None = None,
    **options: Any,
) -> Target:
    """A policy config, checkpoint directory or hub id -> what to load (nothing is loaded).

    `options`: load options with their own flags (`device`, `dtype`; None values are left out) and
    `settings` (`--option KEY=VALUE`): both override a config's and are validated like a config's keys.
    `flag` names the argument in errors, as the user typed it.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    options = {k: v for k, v in options.items() if v is not None} | dict(settings or {})
    text = str(arg)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or (not path.exists() and not _looks_like_hub_id(path)):
        try:
            cfg = read_policy_config(resolve_config(text, "policies"))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{flag} {text}: {e}; a checkpoint directory or hub id also works"
            ) from None
        if kind is not None and kind != cfg.kind:
            raise ValueError(
                f"{flag} {text} is a policy config of kind {cfg.kind}, but --kind {kind} was given"
            )
        return _with_options(cfg.model_dump(), options, flag, text) if options else cfg
    if path.is_dir():
        detected = detect_kind(path)
        if kind is not None and kind != detected:
            raise ValueError(
                f"{flag} {text} holds a checkpoint of kind {detected}, but --kind {kind} was given"
            )
        return _make(detected, path.resolve(), options, flag, text)
    if path.exists():
        raise ValueError(
            f"{flag} {text} is a file: expected a policy config (.yaml), a checkpoint directory or a hub id"
        )
    kind = kind or kind_of_config(_hub_config(text, flag), f"{text}/config.json")
    return _make(kind, path, options, flag, text)


def resolve_policy(
    arg: str | Path, *, kind: str | None = None, flag: str = "--policy", **options: Any
) -> PolicyConfig:
    """`resolve_target`, for commands that need a policy (a plain language model is refused)."""
    target = resolve_target(arg, kind=kind, flag=flag, **options)
    if isinstance(target, LanguageModel):
        raise ValueError(
            f"{flag} {arg} is a plain language model, not a policy: `vla-steer discover` takes it; serving "
            "needs a demo VLA, OpenVLA, pi0 or pi0.5 checkpoint, or a policy config"
        )
    return target


def _make(kind: str, path: Path, options: dict, flag: str, text: str) -> Target:
    if kind == LANGUAGE_MODEL:
        unknown = sorted(set(options) - {"device", "dtype"})
        if unknown:
            raise ValueError(f"--option {unknown[0]}: a plain language model takes no policy options")
        return LanguageModel(path, **options)
    return _with_options({"kind": kind, "path": path}, options, flag, text)


FLAGS = {"device": "--device", "dtype": "--dtype"}


def _with_options(data: dict, options: dict, flag: str, text: str) -> PolicyConfig:
    try:
        return _PolicyFile.model_validate(data | options).root
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(k) for k in err["loc"][1:]) if err["loc"] else ""
            top = key.split(".")[0]
            where = FLAGS.get(top) or (f"--option {key}" if top in options else f"{flag} {text}: {key}")
            if err.get("type") == "extra_forbidden":
                problems.append(f"{where}: a {data['kind']} policy has no option {top!r}")
            else:
                problems.append(f"{where}: {err['msg']}")
        raise ValueError("; ".join(problems)) from None


# -- sizes, from config files only --------------------------------------------------------------------


def says_plan(target: Target) -> bool:
    """Whether the policy says plan words before its actions (the demo VLA), read from its config file:
    what `--positions plan` needs."""
    if target.kind != "tiny_vla":
        return False
    config = Path(target.path) / "policy_config.json"
    return config.is_file() and int(_read_json(config).get("plan_words", 0)) > 0


def stack_dims(target: Target) -> dict[str, tuple[int, int]] | None:
    """(layers, neurons per layer) of each steerable stack, read from config files; None for a hub id
    (its files are not here yet)."""
    path = Path(target.path)
    if not path.is_dir():
        return None
    if target.kind == "tiny_vla":
        text = _read_json(path / "language" / "config.json")
        return {"language": (int(text["num_hidden_layers"]), int(text["intermediate_size"]))}
    if target.kind == "openvla":
        from policies.openvla.config import PrismaticConfig

        llama = PrismaticConfig.from_file(path / "config.json").llama_config()
        return {"language": (llama.num_hidden_layers, llama.intermediate_size)}
    if target.kind in ("pi0", "pi05"):
        from policies.pi0.config import read_config

        arch = read_config(path / "config.json").architecture
        return {
            "language": (arch.paligemma.depth, arch.paligemma.mlp_dim),
            "action_expert": (arch.expert.depth, arch.expert.mlp_dim),
        }
    if target.kind == "pi0_fast":
        from policies.pi0_fast.config import read_config as read_fast_config

        p = read_fast_config(path / "config.json").architecture.paligemma
        return {"language": (p.depth, p.mlp_dim)}
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(path).get_text_config()
    return {"language": (int(text.num_hidden_layers), int(text.intermediate_size))}


def check_layers_and_size(
    dims: tuple[int, int], layers: tuple[int, int] | None, size: int, source: str
) -> None:
    """`--layers` inside the stack and `--size` neurons available in it; errors name the flags."""
    n_layers, d_mlp = dims
    if layers is not None and not (0 <= layers[0] <= layers[1] < n_layers):
        raise ValueError(
            f"--layers {layers[0]}-{layers[1]}: {source} has {n_layers} layers (0-{n_layers - 1})"
        )
    if size < 1:
        raise ValueError(f"--size {size}: a direction needs at least one neuron")
    lo, hi = layers or (0, n_layers - 1)
    available = (hi - lo + 1) * d_mlp
    if size > available:
        raise ValueError(
            f"--size {size}: layers {lo}-{hi} of {source} hold only {available} neurons ({d_mlp} per layer)"
        )
