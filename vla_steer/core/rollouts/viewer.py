"""Rollouts in the rerun viewer (`vla-steer view`): what each episode becomes, and the rerun calls.

`episode_entries` turns an episode into the entries a viewer shows, each on two timelines, "step" (the
control step) and "time" (wall clock); `log_store` sends them to rerun, one recording per episode (its id
is the episode's id), to a viewer it spawns or to an .rrd file. Entity paths:

    camera/<key>          the camera frames (Image)
    ee/trajectory         the end-effector path of the whole episode, world frame, metres (static line)
    ee/position           the end effector at this step (a point on that path)
    ee/speed              |ee_vel[:3]| in m/s
    action, state         the executed action and the proprioceptive state, one series per dimension
    reward
    steering/<concept>    the knob's strength while enabled, 0 while off
    events                knob changes, steering changes, stops... as text at the step they took effect
    activations/<name>    recorded activations, averaged over the forwards of the step: one series per
                          neuron up to MAX_SERIES neurons, else their mean and max |a| (a layer:N is wide)
    episode               the episode's metadata (static text)

Only `log_store` needs rerun-sdk (the `viewer` extra); torch-free like the rest of the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla_steer.core.rollouts.episode import Episode
from vla_steer.core.rollouts.reader import Store

MAX_SERIES = 32  # activations wider than this are summarised (a plot of 11,008 lines shows nothing)
APPLICATION_ID = "vla-steer"


@dataclass(frozen=True)
class Entry:
    """One thing to show: `kind` is image | point | line | scalars | text; `step` None means static."""

    path: str
    kind: str
    data: Any
    step: int | None = None
    t: float | None = None


def episode_entries(ep: Episode) -> Iterator[Entry]:
    """What the viewer shows for one episode, static entries first, then step by step."""
    a = ep.arrays
    yield Entry("episode", "text", json.dumps({"id": ep.id, "complete": ep.complete, **ep.meta}, default=str))
    if "ee_pos" in a:
        yield Entry("ee/trajectory", "line", np.asarray(a["ee_pos"][:, :3], np.float32))
    times = a.get("t_wall", np.full(ep.n_steps, np.nan))
    strengths = _steering_series(ep.steering)
    acts = {name: _activation_series(v) for name, v in ep.activations.items()}
    for i in range(ep.n_steps):
        t = float(times[i]) if np.isfinite(times[i]) else None

        def at(path: str, kind: str, data: Any, i: int = i, t: float | None = t) -> Entry:
            return Entry(path, kind, data, i, t)

        for key, frames in ep.images.items():
            yield at(f"camera/{key}", "image", frames[i])
        if "ee_pos" in a:
            yield at("ee/position", "point", np.asarray(a["ee_pos"][i, :3], np.float32))
        if "ee_vel" in a:
            yield at("ee/speed", "scalars", [float(np.linalg.norm(a["ee_vel"][i, :3]))])
        for name in ("action", "state", "reward"):
            if name in a:
                yield at(name, "scalars", np.atleast_1d(a[name][i]).astype(np.float64))
        for concept, series in strengths.items():
            yield at(f"steering/{concept}", "scalars", [series[i]])
        for name, series in acts.items():
            yield at(f"activations/{name}", "scalars", series[i])
    for ev in ep.events:
        step = ev.get("step")
        t = ev.get("t")
        text = f"{ev.get('kind')}: " + json.dumps(
            {k: v for k, v in ev.items() if k not in ("t", "kind", "step")}
        )
        yield Entry(
            "events", "text", text, step if isinstance(step, int) else 0, t if isinstance(t, float) else None
        )


def log_store(
    store: Store, episode_ids: Iterable[str], *, save: str | Path | None = None, spawn: bool = True
) -> list[str]:
    """Send episodes to rerun, each under its id (`<id>/camera/wrist`, ...) in one recording, so that the
    step timeline lines episodes up: into the .rrd file `save`, else to a viewer (spawned unless
    `spawn=False`: then to one already running). Returns the ids sent. ImportError names the extra."""
    try:
        import rerun as rr
    except ImportError:
        raise ImportError("viewing rollouts needs rerun-sdk: pip install 'vla-steer[viewer]'") from None
    rec = rr.RecordingStream(APPLICATION_ID)
    if save is not None:
        rec.save(str(save))
    elif spawn:
        rec.spawn()
    else:
        rec.connect_grpc()
    sent = []
    try:
        for episode_id in episode_ids:
            for e in episode_entries(store.load(episode_id)):
                _log(rr, rec, e, f"{episode_id}/")
            sent.append(episode_id)
        rec.flush()
    finally:
        rec.disconnect()
    return sent


def _log(rr: Any, rec: Any, e: Entry, prefix: str) -> None:
    static = e.step is None
    if not static:
        rec.reset_time()
        rec.set_time("step", sequence=e.step)
        if e.t is not None:
            rec.set_time("time", timestamp=e.t)
    if e.kind == "image":
        archetype = rr.Image(e.data)
    elif e.kind == "point":
        archetype = rr.Points3D([e.data], radii=0.01)
    elif e.kind == "line":
        archetype = rr.LineStrips3D([e.data])
    elif e.kind == "scalars":
        archetype = rr.Scalars(np.asarray(e.data, np.float64))
    else:
        archetype = rr.TextLog(e.data) if e.path == "events" else rr.TextDocument(e.data)
    rec.log(prefix + e.path, archetype, static=static)


def _steering_series(steering: list[dict | None]) -> dict[str, list[float]]:
    """concept -> its strength at each step while enabled, 0 while off or absent."""
    concepts = sorted({c for s in steering for c in (s or {})})
    out: dict[str, list[float]] = {c: [] for c in concepts}
    for s in steering:
        for c in concepts:
            st = (s or {}).get(c) or {}
            on = bool(st.get("enabled", True)) and isinstance(st.get("strength"), (int, float))
            out[c].append(float(st["strength"]) if on else 0.0)
    return out


def _activation_series(values: np.ndarray) -> np.ndarray:
    """[T, forwards, neurons] (or [T, neurons]) -> [T, series]: per-neuron means, or mean and max |a|."""
    v = np.asarray(values, np.float64).reshape(values.shape[0], -1, values.shape[-1]).mean(axis=1)
    if v.shape[1] <= MAX_SERIES:
        return v
    return np.stack([v.mean(axis=1), np.abs(v).max(axis=1)], axis=1)
