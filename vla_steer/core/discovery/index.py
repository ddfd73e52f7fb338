"""The saved neuron index: a projection on disk, reused while the model's fingerprint matches.

Layout of an index directory: `neuron_index.safetensors` (the [layers, d_mlp, k] tensors) and
`neuron_index.json` (format version, model fingerprint and name, k, rank_by, layers, vocab size).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vla_steer.core.backbone import Backbone
from vla_steer.core.discovery.projection import Projection, project

FORMAT_VERSION = 1
TENSORS = ("top_ids", "top_logit", "top_cos", "bottom_ids", "bottom_logit", "bottom_cos")
_log = logging.getLogger(__name__)


def save_index(projection: Projection, directory: str | Path, backbone: Backbone) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(projection, name).contiguous() for name in TENSORS}
    manifest = {
        "format": "vla-steer/neuron-index",
        "format_version": FORMAT_VERSION,
        "model": backbone.name,
        "model_fingerprint": backbone.fingerprint(),
        "layers_path": backbone.layers_path,
        "k": projection.k,
        "rank_by": projection.rank_by,
        "layers": projection.layers,
        "d_mlp": projection.d_mlp,
        "vocab_size": backbone.vocab_size,
    }
    # Tensors first, manifest last: a manifest on disk means the index beside it is complete.
    save_file(
        tensors, str(directory / "neuron_index.safetensors"), metadata={"format_version": str(FORMAT_VERSION)}
    )
    (directory / "neuron_index.json").write_text(json.dumps(manifest, indent=2))
    return directory


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / "neuron_index.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def load_index(directory: str | Path) -> Projection:
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"no neuron index in {directory} (neuron_index.json missing)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory}/neuron_index.json has format_version {manifest.get('format_version')!r}; "
            f"this vla-steer reads version {FORMAT_VERSION}: re-run discovery"
        )
    tensors = load_file(str(directory / "neuron_index.safetensors"))
    return Projection(
        **{n: tensors[n] for n in TENSORS},
        layers=manifest["layers"],
        rank_by=manifest["rank_by"],
        k=manifest["k"],
    )


def _reusable(
    manifest: dict | None, backbone: Backbone, k: int, rank_by: str, layers: list[int]
) -> str | None:
    """Why a saved index cannot serve this request, or None if it can."""
    if manifest is None:
        return "no saved index"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format version {manifest.get('format_version')} != {FORMAT_VERSION}"
    if manifest.get("model_fingerprint") != backbone.fingerprint():
        return "model fingerprint differs (different or modified weights)"
    if manifest.get("rank_by") != rank_by:
        return f"ranked by {manifest.get('rank_by')}, {rank_by} requested"
    if manifest.get("k", 0) < k:
        return f"k={manifest.get('k')} < {k}"
    if not set(layers) <= set(manifest.get("layers", [])):
        return "does not cover the requested layers"
    return None


def load_or_project(
    backbone: Backbone,
    directory: str | Path | None,
    k: int = 20,
    *,
    rank_by: str = "logit",
    layers: list[int] | None = None,
    **project_kwargs,
) -> Projection:
    """The projection for `backbone`, read from `directory` when its fingerprint matches, else computed and saved."""
    layers = list(range(backbone.n_layers)) if layers is None else sorted(layers)
    if directory is not None:
        why_not = _reusable(read_manifest(directory), backbone, k, rank_by, layers)
        if why_not is None:
            _log.info("reusing neuron index in %s", directory)
            return _restrict(load_index(directory), k, layers)
        _log.info("computing neuron index (%s)", why_not)
    projection = project(backbone, k, rank_by=rank_by, layers=layers, **project_kwargs)
    if directory is not None:
        save_index(projection, directory, backbone)
    return projection


def _restrict(p: Projection, k: int, layers: list[int]) -> Projection:
    rows = torch.tensor([p.row(i) for i in layers], dtype=torch.long)
    cut = {n: getattr(p, n)[rows][:, :, :k] for n in TENSORS}
    return Projection(**cut, layers=layers, rank_by=p.rank_by, k=k)
