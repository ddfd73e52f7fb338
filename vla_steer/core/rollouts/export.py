"""Export a store as a LeRobot v3.0 dataset (parquet data and episodes, one mp4 per camera, meta JSON).

Needs pyarrow, pandas and PyAV (`av`, which ships its own ffmpeg); they are imported when an export runs,
so the rest of the store stays importable with numpy and msgpack only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from vla_steer.core.rollouts.format import SchemaError
from vla_steer.core.rollouts.reader import Store, open_store
from vla_steer.core.rollouts.video import VideoWriter

_log = logging.getLogger(__name__)


def export_lerobot(
    store: Store | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fps: int,
    skip_damaged: bool = False,
) -> Path:
    """Write the store's complete episodes as a LeRobot v3.0 dataset at `out_dir` (must be empty).

    One data parquet, one episodes parquet and one mp4 per camera (`observation.images.<key>`), all
    episodes back to back. `timestamp` is `frame_index / fps`, which is what LeRobot's video lookup needs;
    the recorded wall and sim times stay in the store. `robot_type` is the first episode's "robot"
    metadata. Requires pyarrow, pandas and av.

    A damaged episode (unreadable bytes in its log, or recorded steps missing) is refused with an error
    naming it, unless `skip_damaged` (then it is left out, with a warning naming it).
    """
    store = store if isinstance(store, Store) else open_store(store)
    if not isinstance(fps, int) or isinstance(fps, bool) or fps <= 0:
        raise ValueError(f"fps must be a positive int (LeRobot stores it as one), got {fps!r}")
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {str(out)!r} is not empty")
    infos = store.episodes()
    damaged = [i for i in infos if i.damaged]
    if damaged:
        what = "; ".join(f"episode {i.id} ({i.describe()})" for i in damaged)
        if not skip_damaged:
            raise ValueError(
                f"{what}. Run `vla-steer store check/repair {store.root}`, or pass skip_damaged=True to "
                "export without them"
            )
        _log.warning("leaving out damaged episodes: %s", what)
    chosen = [i.id for i in infos if i.n_steps > 0 and i.complete and not i.damaged]
    if not chosen:
        raise ValueError("no complete episodes with steps to export")

    # Build next to the target and rename at the end: a failed export leaves nothing half-written behind.
    work = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    work.mkdir(parents=True)
    try:
        _write_lerobot(store, chosen, work, fps=fps)
        os.replace(work, out)  # out is absent or an empty directory
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _write_lerobot(store: Store, ids: list[str], work: Path, *, fps: int) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = store.load(ids[0])
    if "action" not in first.arrays:
        raise SchemaError("action", f"episode {first.id} has no 'action'; LeRobot needs it")
    # A policy without proprioception (OpenVLA) records no state: the dataset then has no observation.state.
    state_dim = first.arrays["state"].shape[1] if "state" in first.arrays else None
    action_dim = first.arrays["action"].shape[1]
    cams = {k: v.shape[1:] for k, v in first.images.items()}
    for k, shape in cams.items():
        if shape[2] != 3:
            raise SchemaError(f"images[{k!r}]", f"only RGB (H, W, 3) can be exported, got {shape}")
    conv = first.meta.get("conventions") or {}
    robot_type = first.meta.get("robot") if isinstance(first.meta.get("robot"), str) else None
    features: dict[str, dict] = {}
    if state_dim is not None:
        names = _names(conv.get("state_names"), "state", state_dim)
        features["observation.state"] = {"dtype": "float32", "shape": [state_dim], "names": names}
    features |= {
        "action": {
            "dtype": "float32",
            "shape": [action_dim],
            "names": _names(conv.get("action_names"), "action", action_dim),
        },
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "next.done": {"dtype": "bool", "shape": [1], "names": None},
        "next.success": {"dtype": "bool", "shape": [1], "names": None},
    }
    video_keys = {k: f"observation.images.{k}" for k in cams}
    for k, key in video_keys.items():
        h, w, c = (int(d) for d in cams[k])
        features[key] = {"dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"]}
    concepts = _concepts(store, ids)
    acts = {k: v.shape[1:] for k, v in store.load(ids[0], images=False).activations.items()}
    features.update(_steering_features(concepts) | _activation_features(acts))
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        features[name] = {"dtype": "float32" if name == "timestamp" else "int64", "shape": [1], "names": None}

    data_path = work / "data/chunk-000/file-000.parquet"
    data_path.parent.mkdir(parents=True)
    videos = {
        k: VideoWriter(work / f"videos/{key}/chunk-000/file-000.mp4", cams[k], fps, crf=18)
        for k, key in video_keys.items()
    }
    tasks: dict[str, int] = {}
    ep_rows: list[tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], str, Any]] = []
    writer = None
    total = 0
    try:
        for e, episode_id in enumerate(ids):
            ep, first = (first, None) if e == 0 else (store.load(episode_id), None)
            t = ep.n_steps
            for name, want in (("state", state_dim), ("action", action_dim)):
                got = ep.arrays.get(name)
                if (got is None) != (want is None) or (got is not None and got.shape[1] != want):
                    raise SchemaError(
                        name,
                        f"episode {ep.id} has {None if got is None else got.shape[1:]}, "
                        f"the first exported episode has ({want},)",
                    )
            if set(ep.images) != set(cams) or any(ep.images[k].shape[1:] != cams[k] for k in cams):
                raise SchemaError(
                    "images",
                    f"episode {ep.id} has cameras "
                    f"{ {k: v.shape[1:] for k, v in ep.images.items()} }, expected {cams}",
                )
            task = str(ep.meta.get("instruction") or ep.meta.get("task") or "")
            task_index = tasks.setdefault(task, len(tasks))
            success = bool(ep.meta.get("success"))
            done = np.zeros(t, bool)
            done[-1] = True
            cols = {
                **({"observation.state": ep.arrays["state"].astype(np.float32)} if state_dim else {}),
                "action": ep.arrays["action"].astype(np.float32),
                "next.reward": ep.arrays.get("reward", np.zeros(t)).astype(np.float32),
                "next.done": done,
                "next.success": done & success,
                "timestamp": (np.arange(t) / fps).astype(np.float32),
                "frame_index": np.arange(t, dtype=np.int64),
                "episode_index": np.full(t, e, np.int64),
                "index": np.arange(total, total + t, dtype=np.int64),
                "task_index": np.full(t, task_index, np.int64),
            }
            cols.update(_steering_columns(ep.steering, concepts) | _activation_columns(ep, acts))
            table = pa.table({k: _arrow(v, pa) for k, v in cols.items()})
            if writer is None:
                writer = pq.ParquetWriter(data_path, table.schema, compression="snappy")
            writer.write_table(table)
            row: dict[str, Any] = {
                "episode_index": e,
                "tasks": [task],
                "length": t,
                "data/chunk_index": 0,
                "data/file_index": 0,
                "dataset_from_index": total,
                "dataset_to_index": total + t,
            }
            for k, key in video_keys.items():
                start = videos[k].n_frames / fps
                videos[k].write(ep.images[k])
                row.update(
                    {
                        f"videos/{key}/chunk_index": 0,
                        f"videos/{key}/file_index": 0,
                        f"videos/{key}/from_timestamp": start,
                        f"videos/{key}/to_timestamp": videos[k].n_frames / fps,
                    }
                )
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            stats = {k: _stats(v) for k, v in cols.items()}
            stats.update({video_keys[k]: _image_stats(ep.images[k]) for k in cams})
            ep_rows.append((row, stats, ep.id, ep.meta.get("success")))
            total += t
    finally:
        if writer is not None:
            writer.close()
        for v in videos.values():
            v.close()

    for k, key in video_keys.items():
        features[key]["info"] = videos[k].info()
    all_stats = {name: _aggregate([s[name] for _, s, _, _ in ep_rows]) for name in ep_rows[0][1]}
    rows = []
    for row, stats, ep_id, success in ep_rows:
        row = dict(row)
        for name, st in stats.items():
            for s, v in st.items():
                row[f"stats/{name}/{s}"] = v.tolist()
        row["vla_steer/episode_id"] = ep_id
        row["vla_steer/success"] = success
        rows.append(row)
    ep_path = work / "meta/episodes/chunk-000/file-000.parquet"
    ep_path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), ep_path)
    task_df = pd.DataFrame({"task_index": list(tasks.values())}, index=pd.Index(list(tasks), name="task"))
    task_df.to_parquet(work / "meta/tasks.parquet")
    info = {
        "codebase_version": "v3.0",
        "robot_type": robot_type,
        "total_episodes": len(ids),
        "total_frames": total,
        "total_tasks": len(tasks),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{len(ids)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        if cams
        else None,
        "features": features,
    }
    (work / "meta/info.json").write_text(json.dumps(info, indent=4))
    stats_json = {name: {s: v.tolist() for s, v in st.items()} for name, st in all_stats.items()}
    (work / "meta/stats.json").write_text(json.dumps(stats_json, indent=4))


_QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


def _stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """LeRobot's per-feature statistics over the frame axis (each shaped like one frame's value)."""
    x = values.astype(np.float64).reshape(len(values), -1)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    out.update({k: np.quantile(x, q, axis=0) for k, q in _QUANTILES.items()})
    return out


def _image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel stats in [0, 1] shaped (3, 1, 1) like LeRobot's, on a subsample (quantiles sort): at most
    100 frames, each at most 64 pixels on a side."""
    max_frames, max_side = 100, 64
    idx = np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int)
    step = max(1, -(-max(frames.shape[1:3]) // max_side))
    px = frames[idx, ::step, ::step].reshape(-1, 3).astype(np.float64) / 255.0
    st = _stats(px)
    st = {k: v.reshape(3, 1, 1) if k != "count" else v for k, v in st.items()}
    st["count"] = np.array([len(idx)])
    return st


def _aggregate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pool per-episode stats: exact min/max/mean/std, count-weighted quantiles (as LeRobot does)."""
    n = np.array([p["count"][0] for p in parts], dtype=np.float64)
    w = (n / n.sum()).reshape(-1, *([1] * parts[0]["mean"].ndim))
    mean = sum(wi * p["mean"] for wi, p in zip(w, parts, strict=True))
    var = sum(wi * (p["std"] ** 2 + (p["mean"] - mean) ** 2) for wi, p in zip(w, parts, strict=True))
    out = {
        "min": np.min([p["min"] for p in parts], axis=0),
        "max": np.max([p["max"] for p in parts], axis=0),
        "mean": mean,
        "std": np.sqrt(var),
        "count": np.array([int(n.sum())]),
    }
    out.update({k: sum(wi * p[k] for wi, p in zip(w, parts, strict=True)) for k in _QUANTILES})
    return out


def _arrow(v: np.ndarray, pa: Any) -> Any:
    if v.ndim == 1:
        return pa.array(v)
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])


# -- this project's own data: the steering state and the recorded activations, per step ------------------


def _concepts(store: Store, ids: list[str]) -> list[str]:
    """Every concept a knob existed for in any exported step, sorted (one feature column each)."""
    found: set[str] = set()
    for episode_id in ids:
        for step in store.load(episode_id, images=False, activations=False).steering:
            found.update(c for c, v in (step or {}).items() if isinstance(v, dict))
    return sorted(found)


def _steering_features(concepts: list[str]) -> dict[str, dict]:
    if not concepts:
        return {}
    return {
        "steering.strength": {"dtype": "float32", "shape": [len(concepts)], "names": concepts},
        "steering.enabled": {"dtype": "bool", "shape": [len(concepts)], "names": concepts},
    }


def _steering_columns(steering: list[dict | None], concepts: list[str]) -> dict[str, np.ndarray]:
    """Per step and concept: the knob's strength and whether it was on (absent: 0, off)."""
    if not concepts:
        return {}
    strength = np.zeros((len(steering), len(concepts)), np.float32)
    enabled = np.zeros((len(steering), len(concepts)), bool)
    for i, step in enumerate(steering):
        for j, c in enumerate(concepts):
            knob = (step or {}).get(c)
            if isinstance(knob, dict):
                strength[i, j] = float(knob.get("strength") or 0.0)
                enabled[i, j] = bool(knob.get("enabled"))
    return {"steering.strength": strength, "steering.enabled": enabled}


def activation_feature(name: str) -> str:
    """'fast' -> 'activations.fast'; 'layer:12' -> 'activations.layer_12' (LeRobot keys are dotted words)."""
    return "activations." + "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)


def _activation_features(acts: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    """One float32 vector per recorded activation: [forwards x neurons] flattened, each entry named."""
    out = {}
    for name, shape in acts.items():
        if len(shape) == 2:  # what the node returns: [forwards, neurons]
            names = [f"forward{f}_neuron{n}" for f in range(shape[0]) for n in range(shape[1])]
        else:
            names = ["neuron" + "_".join(map(str, i)) for i in np.ndindex(*shape)]
        out[activation_feature(name)] = {"dtype": "float32", "shape": [len(names)], "names": names}
    return out


def _activation_columns(ep: Any, acts: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    if set(ep.activations) != set(acts) or any(ep.activations[k].shape[1:] != acts[k] for k in acts):
        got = {k: v.shape[1:] for k, v in ep.activations.items()}
        raise SchemaError("activations", f"episode {ep.id} recorded {got}, the first exported episode {acts}")
    return {activation_feature(k): ep.activations[k].reshape(ep.n_steps, -1).astype(np.float32) for k in acts}


def _names(given: Any, prefix: str, n: int) -> list[str]:
    if isinstance(given, (list, tuple)) and len(given) == n and all(isinstance(g, str) for g in given):
        return list(given)
    return [f"{prefix}_{i}" for i in range(n)]
