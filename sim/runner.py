"""The episode runner: observation -> policy node -> action chunk -> environment, with a callback per step.

Per episode: `client.reset(episode=id, seed=...)`, `env.reset(seed)`, then infer, execute the first
`execute_steps` actions of the chunk (default: all of it), re-plan, until success or `max_steps`. With
`settle=k`, an episode goes on after success until the task is done *and* the end effector has been still
(slower than `STILL` m/s) for k consecutive steps, so what the arm does after the goal is reached (how
high it carries the object, how fast it gets there) is observed too.
Every executed step is a `vla_steer.wire.messages.Step`: the runner hands it to its `EpisodeRecorder`, if
given one, and to `on_step` (wrapped in a `RunStep` with the runner's bookkeeping).

Failures end the episode with a clear exception, never a hang:
- the policy node stops answering (no heartbeat for the client's liveness window, or a request timeout):
  `PolicyNodeDied`, typically within `liveness + dead_after` seconds (about 1.5 s with the defaults) even
  while an inference is in flight, since every request is watched from this thread;
- the policy returns a non-finite or mis-shaped action chunk: `BadActionError`, before `env.step` runs
  (the client rejects NaN/inf itself by default; the runner checks again so a client built with
  `require_finite_actions=False` cannot let one through);
- the node answers a request with an error: `EpisodeError` carrying the remote message.
Each carries `episode`, `step` and the `summaries` of episodes finished before (the failed one last, with
`error` set); the recorder's episode is aborted with the error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.base import SimEnv
from vla_steer.core.rollouts import EpisodeRecorder, Event
from vla_steer.wire import Client, Code, ProtocolError, RemoteError, RequestTimeout
from vla_steer.wire.messages import Step, split_setting

STILL = 0.01  # m/s: an end effector slower than this is holding still


@dataclass
class RunStep:
    """What `on_step` gets for every executed step: the `Step` and where the runner was."""

    episode: str  # the episode's name
    index: int  # 0-based, within the episode
    chunk_index: int  # the action's row in its chunk
    success: bool  # the task's state after the step
    step: Step  # observation (the one the action was executed from), chunk, action, pose, reward, ...
    policy_info: dict[str, Any]  # the reply's info, less "steering" (that is `step.steering`)


@dataclass
class EpisodeSummary:
    """What one episode did. Speeds and heights are taken after each executed step (world frame)."""

    episode: str
    seed: int
    success: bool
    length: int  # executed steps
    inferences: int
    mean_ee_speed: float  # m/s, mean |end-effector linear velocity|
    mean_ee_displacement: float  # m per step (the paper's step-wise displacement)
    mean_ee_height: float  # m, mean end-effector z
    return_: float  # sum of rewards
    wall_s: float
    error: str | None = None
    policy_s: float = 0.0  # of wall_s, waiting for the policy node (reset and infer requests)
    sim_s: float = 0.0  # of wall_s, in the environment (reset and steps)


class EpisodeError(RuntimeError):
    """An episode could not go on. `summaries` holds every episode so far, this one last."""

    def __init__(self, message: str, episode: str, step: int, summaries: list[EpisodeSummary] | None = None):
        super().__init__(message)
        self.episode = episode
        self.step = step
        self.summaries = summaries or []


class PolicyNodeDied(EpisodeError):
    """The policy node stopped answering (heartbeats or a request timed out)."""


class BadActionError(EpisodeError):
    """The policy returned an action chunk that must not reach the environment (NaN/inf or wrong shape)."""


@dataclass
class _Episode:
    """Running sums for the summary."""

    speeds: list[float] = field(default_factory=list)
    displacements: list[float] = field(default_factory=list)
    heights: list[float] = field(default_factory=list)
    ret: float = 0.0
    inferences: int = 0
    policy_s: float = 0.0
    sim_s: float = 0.0


def run_episodes(
    client: Client,
    env: SimEnv,
    n_episodes: int,
    max_steps: int,
    *,
    execute_steps: int | None = None,
    recorder: EpisodeRecorder | None = None,
    on_step: Callable[[RunStep], None] | None = None,
    steer: Mapping[str, float] | None = None,
    activations: Iterable[str] | None = None,
    seed: int = 0,
    episode_prefix: str = "episode",
    connect_timeout: float = 10.0,
    dead_after: float = 0.25,
    settle: int = 0,
) -> list[EpisodeSummary]:
    """Run `n_episodes` episodes of at most `max_steps` executed steps; returns one summary per episode.

    Episode i is named f"{episode_prefix}-{seed + i:04d}" and seeded `seed + i` (env and node). `steer`
    ({"fast": 4.0}; {} unsteered) goes with every inference: each runs under exactly that setting, whatever
    the node's live knobs are (untouched, so clients with other settings share the node); None leaves
    the inferences to the live knobs (`vla-steer knobs`). `activations` (concept
    names or "layer:N") are requested with every inference and recorded with each step.

    Every executed step goes to `recorder` (one episode of its store per episode run, with the episode's
    name and the env's `episode_meta()` in its metadata; ended with success, seed and its summary, length
    and inferences among it, or aborted on an error) and to `on_step`. In the `Step`: the observation the
    action was executed from, with ee_pos, ee_quat, ee_vel at the same moment; action_chunk [chunk,
    action_dim] and action (the executed row, as the policy sent it); reward; t_wall (time.time() after the
    step) and t_sim (sim seconds after the step); steering (the reply's info["steering"]) and activations
    (the reply's, name -> array). The runner never reuses or mutates these arrays, so a recorder may keep
    them without copying.
    """
    if n_episodes < 0 or max_steps <= 0:
        raise ValueError("n_episodes must be >= 0 and max_steps > 0")
    if execute_steps is not None and execute_steps <= 0:
        raise ValueError("execute_steps must be positive (or None for the whole chunk)")
    if settle < 0:
        raise ValueError("settle must be >= 0")
    watch = _Watch(client, dead_after)
    if not client.wait_alive(connect_timeout):
        raise PolicyNodeDied(f"no policy node answered at {client.address} within {connect_timeout}s", "", 0)
    # a setting's setpoints ('speed@0.1') go as the request's targets, its knobs as its steering
    setting, setpoints = split_setting(steer) if steer is not None else (None, None)
    wanted = list(activations) if activations is not None else None
    summaries: list[EpisodeSummary] = []
    for i in range(n_episodes):
        name, ep_seed = f"{episode_prefix}-{seed + i:04d}", seed + i
        state = _Episode()
        t0 = time.perf_counter()
        step = still = 0
        success = done = False
        try:
            t = time.perf_counter()
            watch.call("reset", lambda n=name, s=ep_seed: client.reset(episode=n, seed=s), name, 0, summaries)
            t_reset = time.perf_counter()
            obs = env.reset(ep_seed)
            state.policy_s += t_reset - t
            state.sim_s += time.perf_counter() - t_reset
            per_episode = getattr(env, "episode_meta", dict)()  # e.g. LIBERO's init state index
            success = env.success()
            done = success and not settle
            while step < max_steps and not done:
                t = time.perf_counter()
                reply = watch.call(
                    "infer",
                    lambda o=obs: client.infer(
                        o.observation,
                        steer=setting,
                        setpoints=setpoints or None,
                        activations=wanted,
                        ee_pos=o.ee_pos,
                        ee_time=o.t_sim,
                    ),  # (the end effector: what the node's setpoint controllers measure)
                    name,
                    step,
                    summaries,
                )
                state.policy_s += time.perf_counter() - t
                state.inferences += 1
                chunk = _check_chunk(reply.actions, env.action_dim, name, step, summaries)
                info = dict(reply.info)
                steering = info.pop("steering", {})
                acts = dict(reply.activations)
                n_exec = len(chunk) if execute_steps is None else min(execute_steps, len(chunk))
                for k in range(n_exec):
                    action = chunk[k]
                    t = time.perf_counter()
                    result = env.step(action)
                    state.sim_s += time.perf_counter() - t
                    new = result.observation
                    success = env.success()
                    state.ret += result.reward
                    state.speeds.append(float(np.linalg.norm(new.ee_vel)))
                    state.displacements.append(float(np.linalg.norm(new.ee_pos - obs.ee_pos)))
                    state.heights.append(float(new.ee_pos[2]))
                    executed = Step(
                        observation=obs.observation,
                        action=action,
                        action_chunk=chunk,
                        ee_pos=obs.ee_pos,
                        ee_quat=obs.ee_quat,
                        ee_vel=obs.ee_vel,
                        reward=result.reward,
                        t_sim=new.t_sim,
                        steering=steering,
                        activations=acts,
                        policy_info=info,
                    )
                    if recorder is not None:
                        recorder.step(executed, episode=name, **per_episode)
                    if on_step is not None:
                        on_step(RunStep(name, step, k, success, executed, info))
                    obs = new
                    step += 1
                    still = still + 1 if float(np.linalg.norm(new.ee_vel)) < STILL else 0
                    done = success and (not settle or still >= settle)
                    if done or step >= max_steps:
                        break
        except EpisodeError as e:
            summaries.append(_summary(name, ep_seed, success, step, state, t0, str(e)))
            e.summaries = summaries
            if recorder is not None:
                recorder.abort(str(e), event=Event("error", {"message": str(e)}))
            raise
        except BaseException as e:  # interrupted, or the env failed: the episode stays incomplete
            if recorder is not None:
                recorder.abort(f"{type(e).__name__}: {e}")
            raise
        summary = _summary(name, ep_seed, success, step, state, t0, None)
        summaries.append(summary)
        if recorder is not None:
            recorder.end(success, seed=ep_seed, summary=_recorded(summary))
    return summaries


def _summary(
    name: str, seed: int, success: bool, length: int, s: _Episode, t0: float, error: str | None
) -> EpisodeSummary:
    def mean(xs: list[float]) -> float:
        return float(np.mean(xs)) if xs else float("nan")

    return EpisodeSummary(
        episode=name,
        seed=seed,
        success=success,
        length=length,
        inferences=s.inferences,
        mean_ee_speed=mean(s.speeds),
        mean_ee_displacement=mean(s.displacements),
        mean_ee_height=mean(s.heights),
        return_=s.ret,
        wall_s=time.perf_counter() - t0,
        error=error,
        policy_s=s.policy_s,
        sim_s=s.sim_s,
    )


def _recorded(s: EpisodeSummary) -> dict[str, Any]:
    """What an episode's final metadata says of it (`sim.grid.results` reads it back; NaN stored as None)."""
    keys = (
        "length",
        "inferences",
        "mean_ee_speed",
        "mean_ee_displacement",
        "mean_ee_height",
        "return_",
        "wall_s",
        "policy_s",
        "sim_s",
    )
    values = {k: getattr(s, k) for k in keys}
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in values.items()}


def _check_chunk(
    actions: Any, action_dim: int, episode: str, step: int, summaries: list[EpisodeSummary]
) -> np.ndarray:
    a = np.array(actions, dtype=np.float64)  # a copy: reply arrays are read-only views
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != action_dim or a.shape[0] == 0:
        raise BadActionError(
            f"episode {episode} step {step}: the policy returned actions of shape {list(np.shape(actions))}; "
            f"expected [chunk, {action_dim}]",
            episode,
            step,
            summaries,
        )
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise BadActionError(
            f"episode {episode} step {step}: the policy returned a non-finite action "
            f"(first at chunk row {bad[0]}, dim {bad[1]}: {a[tuple(bad)]}); nothing was sent to the env",
            episode,
            step,
            summaries,
        )
    return a


class _Watch:
    """Runs a client request in a helper thread and gives up as soon as the node is seen dead.

    `Client` requests block for up to timeout * (retries + 1); its heartbeat thread notices a dead node
    within its liveness window. Watching `client.alive` here turns the latter into the deadline. A request
    abandoned this way finishes (times out) in its daemon thread; nothing waits for it.
    """

    def __init__(self, client: Client, dead_after: float):
        self.client = client
        self.dead_after = dead_after

    def call(self, what: str, fn: Callable[[], Any], episode: str, step: int, summaries: list) -> Any:
        done = threading.Event()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=target, name=f"sim-runner-{what}", daemon=True).start()
        dead_since: float | None = None
        where = f"episode {episode!r} step {step}" if episode else "before the first episode"
        while not done.wait(0.05):
            if self.client.alive:
                dead_since = None
                continue
            now = time.monotonic()
            dead_since = dead_since if dead_since is not None else now
            if now - dead_since >= self.dead_after:
                raise PolicyNodeDied(
                    f"the policy node at {self.client.address} stopped answering during {what} ({where}): "
                    f"no heartbeat for over {self.client.liveness:.1f}s",
                    episode,
                    step,
                    summaries,
                )
        err = box.get("error")
        if err is None:
            return box["result"]
        if isinstance(err, RequestTimeout):
            raise PolicyNodeDied(
                f"the policy node at {self.client.address} did not answer {what} ({where}): {err}",
                episode,
                step,
                summaries,
            ) from err
        if isinstance(err, ProtocolError) and what == "infer" and err.code == Code.NOT_FINITE:
            raise BadActionError(
                f"{where}: the policy returned non-finite actions ({err}); nothing was sent to the env",
                episode,
                step,
                summaries,
            ) from err
        if isinstance(err, (RemoteError, ProtocolError)):
            raise EpisodeError(f"{what} failed ({where}): {err}", episode, step, summaries) from err
        raise err


__all__ = [
    "BadActionError",
    "EpisodeError",
    "EpisodeSummary",
    "PolicyNodeDied",
    "RunStep",
    "run_episodes",
]
