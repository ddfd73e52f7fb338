"""Per-episode behaviour metrics from a rollout store, for any node that wrote it (sim, LIBERO, robot).

Speeds come from the logged end-effector velocity, heights from the end-effector position (world frame,
metres). Two speed measures are length-controlled, so an episode is not "slower" only because it lasts
longer or idles at the end: `moving_speed` averages over the steps in which the arm moves at all, and
`window_speed` over the first `window` steps, which every episode of a comparison has in common.
"Carrying" steps are those from the policy's first gripper-close command on, when the episode's metadata
names the gripper convention (`gripper`, or `sim.gripper`: "open_positive", "close_positive", "open_unit",
as the sim nodes record it); otherwise the steps where the task's success signal holds (reward > 0).
`carry_height` averages the end-effector height over them (NaN if there are none): how high the arm
carries, whether or not the object came along (`success` says whether it did).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from vla_steer.core.rollouts import Episode, Store
from vla_steer.core.setpoints import AXES

MOVING = 0.01  # m/s: slower than this is holding still
WINDOW = 20  # steps


@dataclass(frozen=True)
class Setting:
    """What the knobs were during an episode: one direction (or its random control) at one strength."""

    direction: str  # "baseline" when every knob was off
    strength: float
    control: bool = False  # random neurons of the same size instead of the direction's
    mode: str = "clamp"
    draw: int = 0  # which random control of the direction (`fast:random2`: 2; `fast:random`: 0)

    @property
    def label(self) -> str:
        if self.direction == "baseline":
            return "baseline"
        if self.direction.endswith("@"):  # a setpoint: the axis held at a target ('speed@0.1')
            return f"{self.direction}{self.strength:g}"
        if not self.control:
            return f"{self.direction}={self.strength:g}"
        return f"{self.direction} (random{f' {self.draw}' if self.draw else ''})={self.strength:g}"

    @classmethod
    def from_meta(cls, meta: dict) -> Setting:
        """From an episode's `setting` metadata ({"fast": 8.0}, {"fast:random2": 8.0} or {})."""
        setting = meta.get("setting") or {}
        mode = str(meta.get("steer_mode", "clamp"))
        if not setting:
            return cls("baseline", 0.0, mode=mode)
        if len(setting) > 1:
            name = ",".join(sorted(setting))
            return cls(name, float(np.mean(list(setting.values()))), mode=mode)
        ((name, strength),) = setting.items()
        base, _, draw = name.partition(":random")
        if ":random" in name and (draw == "" or draw.isdigit()):
            return cls(base, float(strength), True, mode, int(draw or 0))
        return cls(name, float(strength), False, mode)


@dataclass(frozen=True)
class Tracking:
    """How an episode held a setpoint (`vla_steer.core.setpoints`): its (first) target; the median of |measured -
    target| / target over the steps after the first WINDOW (NaN: nothing measured then); and the overshoot, the
    furthest the measurement went past the target, relative to it, on the far side from where it started."""

    target: float
    error: float
    overshoot: float


@dataclass
class EpisodeMetrics:
    episode: str
    seed: int | None
    setting: Setting
    length: int
    success: bool | None
    mean_speed: float  # m/s over every step
    moving_speed: float  # m/s over steps where the arm moves
    window_speed: float  # m/s over the first WINDOW steps
    displacement: float  # m per step (the paper's step-wise displacement)
    mean_height: float  # m
    max_height: float  # m
    carry_height: float  # m, mean over carrying steps (NaN: never carried)
    plans: dict[str, int] = field(default_factory=dict)  # plan words -> steps (a policy that says a plan)
    tracking: dict[str, Tracking] = field(default_factory=dict)  # axis -> how its setpoint was held

    def row(self) -> dict:
        d = asdict(self)
        s = d.pop("setting")
        d.pop("plans")  # (a table row holds scalars)
        d.pop("tracking")
        return d | {"direction": s["direction"], "strength": s["strength"], "control": s["control"],
                    "mode": s["mode"], "label": self.setting.label}  # fmt: skip


def linear_speed(ee_vel: np.ndarray) -> np.ndarray:
    """|linear velocity| per step, m/s. Stores written before the one layout (the robot node then wrote
    [vx vy vz wx wy wz]) still give m/s: rad/s never enters the speed."""
    return np.linalg.norm(np.asarray(ee_vel)[:, :3], axis=1)


def episode_metrics(ep: Episode, window: int = WINDOW) -> EpisodeMetrics:
    a = ep.arrays
    n = ep.n_steps
    speed = linear_speed(a["ee_vel"]) if n else np.zeros(0)
    pos = a["ee_pos"] if n else np.zeros((0, 3))
    steps = np.linalg.norm(np.diff(pos, axis=0), axis=1) if n > 1 else np.zeros(0)
    carrying = _carrying(ep)

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else math.nan

    return EpisodeMetrics(
        episode=ep.id,
        seed=ep.meta.get("seed"),
        setting=Setting.from_meta(ep.meta),
        length=n,
        success=ep.meta.get("success"),
        mean_speed=mean(speed),
        moving_speed=mean(speed[speed > MOVING]),
        window_speed=mean(speed[:window]),
        displacement=mean(steps),
        mean_height=mean(pos[:, 2]) if n else math.nan,
        max_height=float(pos[:, 2].max()) if n else math.nan,
        carry_height=mean(pos[carrying, 2]) if n else math.nan,
        plans=dict(Counter(i["plan"] for i in ep.policy_info if i and isinstance(i.get("plan"), str))),
        tracking=_tracking(ep.policy_info, window),
    )


def _tracking(infos: list[dict | None], window: int) -> dict[str, Tracking]:
    """Each setpoint's hold, from what the node said with every step (`<axis>_target`, `<axis>_measured`)."""
    out = {}
    for axis in AXES:
        targets = [i[f"{axis}_target"] for i in infos if i and f"{axis}_target" in i]
        if not targets:
            continue
        target = float(targets[0])

        def per_step(key: str) -> np.ndarray:
            return np.array([float(i.get(key, math.nan)) if i else math.nan for i in infos])

        # each step against the target in force then (a live target may change within an episode)
        off = (per_step(f"{axis}_measured") - per_step(f"{axis}_target")) / per_step(f"{axis}_target")
        late = off[window:][np.isfinite(off[window:])]
        seen = off[np.isfinite(off)]
        beyond = seen * -np.sign(seen[0]) if seen.size else seen  # > 0: past the target, seen from the start
        out[axis] = Tracking(
            target,
            float(np.median(np.abs(late))) if late.size else math.nan,
            float(max(0.0, beyond.max())) if seen.size else math.nan,
        )
    return out


def _carrying(ep: Episode) -> np.ndarray:
    n = ep.n_steps
    # Where the gripper convention was recorded: the sim session's conventions, or older stores' sim dict.
    conventions, sim = ep.meta.get("conventions"), ep.meta.get("sim")
    convention = (
        ep.meta.get("gripper")
        or (conventions.get("gripper") if isinstance(conventions, dict) else None)
        or (sim.get("gripper") if isinstance(sim, dict) else None)
    )
    action = ep.arrays.get("action")
    if convention in CLOSED and action is not None and n:
        closed = CLOSED[convention](np.asarray(action)[:, -1])
        return np.cumsum(closed) > 0  # from the first close command on
    return np.asarray(ep.arrays.get("reward", np.zeros(n))) > 0


# Gripper conventions (sim.base.to_osc_action): which policy gripper values command "close".
CLOSED = {
    "open_positive": lambda g: g < 0,
    "close_positive": lambda g: g > 0,
    "open_unit": lambda g: g < 0.5,
}


def store_metrics(store: Store, *, complete_only: bool = True) -> list[EpisodeMetrics]:
    """Metrics of every (complete) episode in the store; images are not read."""
    out = []
    for info in store.episodes():
        if complete_only and not info.complete:
            continue
        out.append(episode_metrics(store.load(info.id, images=False, activations=False)))
    return out


def by_setting(rows: Iterable[EpisodeMetrics]) -> dict[Setting, list[EpisodeMetrics]]:
    groups: dict[Setting, list[EpisodeMetrics]] = {}
    for r in rows:
        groups.setdefault(r.setting, []).append(r)
    return groups
