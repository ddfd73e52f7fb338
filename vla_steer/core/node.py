"""The policy node: a policy and its Steerer behind the wire `Server`'s request handlers.

`PolicyNode` answers hello (the policy's spec and its concepts), infer (one action chunk under one steering
setting: the request's own `steer` map if it carries one, else the live knobs; plus the activations asked
for), reset, and knobs (list / get / set / enable / disable / off,
from any client while inferences run). Every infer reply's telemetry carries the action, the steering
state in force and the time spent in the policy.

Activation names a client may ask for (see `vla_steer.core.activations.select`): a concept name or
`layer:N`; each comes back as float32 [forwards, neurons], the last token position of the prefill and of
each decoded token, recorded before steering is applied.

Episodes: a client's reset gives it its own episode state (pi0: its noise generator), kept by routing id
for the newest MAX_EPISODES clients. A client without one (it never reset, it reconnected and so has a
new routing id, or its episode was evicted) runs on the policy's shared state, which any client's reset
restarts: its replies say `info["shared_episode"] = True` and the node logs it once.

Setpoints (`vla_steer.core.setpoints`): a behaviour axis (speed: fast/slow; height: up/down) whose two poles
are among the node's concepts can be given a target, live (`knobs target`) or per request (`setpoints`).
Before each inference of a client episode with a target, the axis's controller sets the poles' strengths
from what the client measured (`measured`) or the node estimates from the end-effector position it sends
(`ee_pos`, measured at `ee_time`; `carrying`); the rest of the setting is the request's `steer` or the live
knobs. Replies and telemetry carry `<axis>_target`, `<axis>_measured` and `<axis>_strength` (signed: the raising pole above 0).
Controllers are per episode: a client must reset before it infers under a target.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vla_steer.core.activations import Selection, recording, select
from vla_steer.core.discovery.direction import Direction
from vla_steer.core.policy import ActionChunk, Policy
from vla_steer.core.setpoints import AXES, PIController, Tracker
from vla_steer.core.steering import Setting, Steerer
from vla_steer.wire import (
    Code,
    InferResult,
    KnobsRequest,
    Observation,
    ProtocolError,
    Reply,
    Request,
    ServerInfo,
)

MAX_RECORDED_NEURONS = 65536
MAX_EPISODES = 4096  # clients whose episode state the node keeps
MAX_BEHAVIOUR = 100.0  # m/s or m: no arm's speed or height; a setpoint or measurement beyond is a mistake
log = logging.getLogger(__name__)


class PolicyNode:
    """Request handlers for `vla_steer.wire.Server`: `Server(PolicyNode(policy, directions), address)`.

    `batch_max`: the most concurrent infer requests run as one forward (1: one at a time, also for a policy
    that cannot batch); the Server takes it from the node, so hello's `info["inference"]` is what happens.
    `controller`: the settings of every setpoint's `PIController` (kp, ki, limit, rate; default its own).
    """

    def __init__(
        self,
        policy: Policy,
        directions: Iterable[Direction] = (),
        *,
        mode: str = "clamp",
        positions: str = "all",
        max_recorded_neurons: int = MAX_RECORDED_NEURONS,
        batch_max: int = 1,
        controller: Mapping[str, float] | None = None,
    ):
        if not (isinstance(batch_max, int) and batch_max >= 1):
            raise ValueError(f"batch_max must be an int >= 1, got {batch_max!r}")
        self.policy = policy
        # (getattr: duck-typed policies that do not derive from Policy are served one request at a time)
        self.batching = bool(getattr(policy, "batching", False))
        self.batch_max = batch_max if self.batching else 1
        # One Steerer per steered stack: "language" (the vocabulary-projectable backbone) and any other a
        # direction names in provenance["backbone"] (pi0's "action_expert").
        self.steerer = Steerer(policy.backbone, positions=positions)
        self.steerers = {"language": self.steerer}
        backbones = policy.backbones
        for d in directions:
            if not d.neurons:
                continue
            key = d.provenance.get("backbone", "language")
            if key not in backbones:
                raise ValueError(
                    f"direction {d.name!r} steers backbone {key!r}; {policy.spec.name} has {sorted(backbones)}"
                )
            if d.name in self._owner:
                raise ValueError(f"two directions are named {d.name!r}")
            if key not in self.steerers:
                self.steerers[key] = Steerer(backbones[key], positions=positions)
            self.steerers[key].add_direction(d, mode=mode, strength=0.0, enabled=False)
        self.max_recorded_neurons = max_recorded_neurons
        self._episodes: dict[bytes, _Episode] = {}  # client routing id -> its episode, oldest reset first
        new_episode = getattr(policy, "new_episode", None)
        self._keeps_episodes = new_episode is not None and new_episode() is not None  # pi0: per-client noise
        self._warned_shared = False
        self.inferences = 0
        # Behaviour axes with both poles among the concepts; the live targets (replaced whole, never edited,
        # so the inference thread reads them without a lock); the time between a client's observations.
        self.axes = {n: a for n, a in AXES.items() if a.raises in self._owner and a.lowers in self._owner}
        self.targets: dict[str, float] = {}
        self.controller = dict(controller or {})  # the PIController settings of every setpoint
        PIController(**self.controller)  # checked now, not at the first target
        self._dt = policy.spec.chunk_length / policy.spec.control_hz

    @property
    def _owner(self) -> dict[str, Steerer]:
        """Concept name -> the Steerer holding it (concepts may also be added to a Steerer directly)."""
        return {name: st for st in self.steerers.values() for name in st.concepts}

    # -- handlers (called by the wire Server) -----------------------------------------------------

    def hello(self, req: Request) -> ServerInfo:
        spec = self.policy.spec
        return ServerInfo(
            policy=spec.name,
            action_dim=spec.action_dim,
            chunk_length=spec.chunk_length,
            control_hz=spec.control_hz,
            image_keys=spec.image_keys,
            concepts=tuple(self._owner),
            info={
                "state_dim": spec.state_dim,
                "action_space": spec.action_space,
                "positions": self.steerer.positions,
                # concurrent requests share one forward ("batched", up to batch_max) or run one at a time
                "inference": "batched" if self.batch_max > 1 else "sequential",
                "batch_max": self.batch_max,
                "axes": {
                    n: {"unit": a.unit, "raises": a.raises, "lowers": a.lowers} for n, a in self.axes.items()
                },
            },
            conventions=spec.conventions,
        )

    def infer(self, req: Request) -> Reply:
        return self._infer_one(self._prepare(req))

    def infer_batch(self, reqs: Sequence[Request]) -> list[Reply | Exception]:
        """Several clients' infer requests in batched forwards (one per `policy.batch_key`), each under its
        own steering setting and with its own episode; a reply or the error it caused per request, in
        order. Requests share a forward when the policy's `batch_key` (e.g. prompt length) and the
        activations they ask for are the same; every request to a policy that cannot batch runs alone. A
        batched forward that fails is rerun one sample at a time, so only a sample that fails alone gets an
        error (a pi0 sample rerun draws its episode's next noise: the failed forward took one)."""
        out: list[Reply | Exception | None] = [None] * len(reqs)
        batch: list[tuple[int, _Prepared]] = []
        for i, req in enumerate(reqs):
            try:
                prep = self._prepare(req)
                if not self.batching:
                    out[i] = self._infer_one(prep)
                else:
                    batch.append((i, prep))
            except Exception as e:  # noqa: BLE001 - the server turns it into this request's error reply
                out[i] = e
        groups: dict[Any, list[tuple[int, _Prepared]]] = {}
        for i, prep in batch:  # one forward per key
            try:
                asked = tuple((name, key, tuple(neurons)) for name, key, neurons in prep.selection)
                groups.setdefault((self.policy.batch_key(prep.obs), asked), []).append((i, prep))
            except Exception as e:  # noqa: BLE001
                out[i] = e
        for group in groups.values():
            preps = [p for _, p in group]
            replies: list[Reply | Exception] | None = None
            if len(preps) > 1:
                try:
                    replies = self._infer_many(preps)
                except Exception:  # noqa: BLE001 - which sample failed it is found below
                    log.warning(
                        "a batched forward of %d failed: rerunning each alone", len(preps), exc_info=True
                    )
            if replies is None:
                replies = [_attempt(self._infer_one, p) for p in preps]
            for (i, _), reply in zip(group, replies, strict=True):
                out[i] = reply
        return out

    def _prepare(self, req: Request) -> _Prepared:
        """Everything checked before the forward: observation, activations, steering, the episode."""
        spec = self.policy.spec
        try:
            obs = Observation.from_payload(req.payload["observation"], spec.image_keys, spec.state_dim)
        except ProtocolError:
            raise
        except ValueError as e:
            raise ProtocolError(Code.BAD_PAYLOAD, str(e), "observation") from None
        if obs.state is not None:
            _check_representable(obs.state, self.steerer.dtype)
        concepts = {
            name: (key, [(n.layer, n.index) for n in st.neurons(name)])
            for key, st in self.steerers.items()
            for name in st.concepts
        }
        selection = select(
            req.payload.get("activations") or [], self.policy.backbone, concepts, self.max_recorded_neurons
        )
        own = self._episodes.get(req.client)
        episode = own
        if episode is None and self._keeps_episodes:
            episode = _SHARED_EPISODE
            if not self._warned_shared:
                self._warned_shared = True
                log.warning(
                    "a client without an episode of its own (no reset since it connected, or evicted by "
                    "%d newer ones) runs on the policy's shared state; its replies say info['shared_episode']",
                    MAX_EPISODES,
                )
        steer, held = self._hold_setpoints(req, own)
        setting = self.resolve_steer(steer)
        return _Prepared(obs, selection, setting, episode or _NO_EPISODE, held)

    def _hold_setpoints(
        self, req: Request, episode: _Episode | None
    ) -> tuple[Mapping[str, float] | None, dict]:
        """The request's steering with every targeted axis's poles set by its controller, and what each
        controller saw and did (for the reply). No target: the request's `steer`, untouched."""
        payload = req.payload
        targets = payload.get("setpoints")
        targets = self.targets if targets is None else self._check_targets(targets, "setpoints")
        steer = payload.get("steer")
        if episode is not None:  # an axis let go starts afresh when targeted again
            for name in [n for n in episode.trackers if n not in targets]:
                del episode.trackers[name]
        if not targets:
            return steer, {}
        if episode is None:
            raise ProtocolError(
                Code.BAD_PAYLOAD,
                "setpoints are held per episode: reset before inferring under a target",
                "setpoints",
            )
        measured = self._check_targets(payload.get("measured") or {}, "measured", positive=False)
        strengths = dict(steer) if steer is not None else self._live_strengths()
        held = {}
        for name, target in targets.items():
            axis = self.axes[name]
            tracker = episode.trackers.get(name)
            if tracker is None:
                tracker = episode.trackers[name] = Tracker.new(
                    axis, self._dt, PIController(**self.controller)
                )
            try:
                signed = tracker.step(
                    target,
                    payload.get("ee_pos"),
                    payload.get("carrying"),
                    measured.get(name),
                    payload.get("ee_time"),
                )
            except ValueError as e:
                raise ProtocolError(Code.BAD_PAYLOAD, str(e), "ee_time") from None
            strengths.pop(axis.raises, None)
            strengths.pop(axis.lowers, None)
            # The pole at 0 is off, not on at 0 (a clamp to 0 is an intervention too).
            strengths |= {pole: v for pole, v in axis.strengths(signed).items() if v > 0}
            held |= {
                f"{name}_target": target,
                f"{name}_measured": tracker.measured,
                f"{name}_strength": signed,
            }
        return strengths, held

    def _live_strengths(self) -> dict[str, float]:
        return {
            n: float(c["strength"])
            for st in self.steerers.values()
            for n, c in st.state().items()
            if c["enabled"]
        }

    def _check_targets(
        self, targets: Mapping[str, float], where: str, positive: bool = True
    ) -> dict[str, float]:
        """Axis -> value, every axis one this node holds; targets > 0 (the controller works on relative error)."""
        for name, value in targets.items():
            if name not in self.axes:
                known = ", ".join(self.axes) or "none: the node has no concept pair fast/slow or up/down"
                raise ProtocolError(
                    Code.BAD_PAYLOAD, f"{where}: unknown axis {name!r} (known: {known})", where
                )
            unit = self.axes[name].unit
            if positive and not value > 0:
                raise ProtocolError(
                    Code.BAD_PAYLOAD, f"{where}: the {name} target must be > 0 {unit}, got {value!r}", where
                )
            if not 0 <= value <= MAX_BEHAVIOUR:  # (a measured speed or height below 0 is a client's bug)
                raise ProtocolError(
                    Code.BAD_PAYLOAD,
                    f"{where}: the {name} value must be within 0..{MAX_BEHAVIOUR:g} {unit}, got {value!r}",
                    where,
                )
        return dict(targets)

    def _infer_one(self, p: _Prepared) -> Reply:
        t0 = time.perf_counter()
        # One inference, one steering setting: the request's own, else the live knobs (a knob change made
        # meanwhile applies from the next inference).
        with contextlib.ExitStack() as stack:
            for key, st in self.steerers.items():
                stack.enter_context(st.consistent(None if p.setting is None else p.setting[key]))
            if p.setting is None:
                steering = {k: v for st in self.steerers.values() for k, v in st.applied_state().items()}
            else:
                steering = _state_of(p.setting)
            backbones = {key: st.backbone for key, st in self.steerers.items()}
            recorded = stack.enter_context(recording(p.selection, backbones, self.max_recorded_neurons))
            if self.batching:
                chunk = self.policy.infer_batch([p.obs], [p.episode.state])[0]
            else:
                chunk = self.policy.infer(p.obs)
            activations = recorded()
        return self._reply(
            chunk, activations, steering, (time.perf_counter() - t0) * 1e3, p.episode, held=p.held
        )

    def _infer_many(self, batch: list[_Prepared]) -> list[Reply | Exception]:
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            live = {key: st.live() for key, st in self.steerers.items()}
            settings = [live if p.setting is None else p.setting for p in batch]
            for key, st in self.steerers.items():
                stack.enter_context(st.consistent([s[key] for s in settings]))
            backbones = {key: st.backbone for key, st in self.steerers.items()}
            recorded = stack.enter_context(
                recording(batch[0].selection, backbones, self.max_recorded_neurons)
            )
            chunks = self.policy.infer_batch([p.obs for p in batch], [p.episode.state for p in batch])
        policy_ms = (time.perf_counter() - t0) * 1e3
        out: list[Reply | Exception] = []
        for row, (p, s, chunk) in enumerate(zip(batch, settings, chunks, strict=True)):
            try:
                activations = recorded(row) if p.selection else {}
                out.append(
                    self._reply(chunk, activations, _state_of(s), policy_ms, p.episode, len(batch), p.held)
                )
            except ProtocolError as e:
                out.append(e)
        return out

    def _reply(
        self,
        chunk: ActionChunk,
        activations: dict[str, np.ndarray],
        steering: dict[str, dict],
        policy_ms: float,
        episode: _Episode,
        batch: int = 1,
        held: Mapping[str, float | None] = {},  # noqa: B006 - read only
    ) -> Reply:
        actions = np.asarray(chunk.actions, dtype=np.float32)
        if actions.shape != (self.policy.spec.chunk_length, self.policy.spec.action_dim) or not np.all(
            np.isfinite(actions)
        ):
            raise ProtocolError(
                Code.HANDLER_ERROR,
                f"policy produced invalid actions (shape {actions.shape}, finite: {bool(np.all(np.isfinite(actions)))})",
            )
        self.inferences += 1
        shared = {"shared_episode": True} if episode is _SHARED_EPISODE else {}
        info = {
            "steering": steering,
            "policy_ms": policy_ms,
            "episode": episode.name,
            "batch": batch,
            **shared,
            **held,
            **chunk.info,
        }
        telemetry = {
            "actions": actions.tolist(),
            "steering": steering,
            "policy_ms": policy_ms,
            "episode": episode.name,
            "batch": batch,
            **shared,
            **held,
        }
        return Reply(InferResult(actions, activations, info), telemetry)

    def resolve_steer(self, steer: Mapping[str, float] | None) -> dict[str, Setting] | None:
        """A request's own steering setting, one `Setting` per steered stack (None: the live knobs apply).
        Checked like a knobs request: an unknown knob or a strength out of bounds is a BAD_PAYLOAD error
        naming the knob, and nothing changes."""
        if steer is None:
            return None
        owner = self._owner
        unknown = [name for name in steer if name not in owner]
        if unknown:
            known = ", ".join(owner) or "none"
            raise ProtocolError(
                Code.BAD_PAYLOAD, f"steer: unknown knob {unknown[0]!r} (known: {known})", "steer"
            )
        try:
            return {
                key: st.resolve({n: v for n, v in steer.items() if owner[n] is st})
                for key, st in self.steerers.items()
            }
        except (KeyError, ValueError) as e:
            raise ProtocolError(
                Code.BAD_PAYLOAD, f"steer: {str(e).strip(chr(39) + chr(34))}", "steer"
            ) from None

    def reset(self, req: Request) -> dict[str, Any]:
        """A new episode for the requesting client (its own policy state, e.g. pi0's noise sequence)."""
        self.policy.reset()
        self._episodes.pop(req.client, None)  # re-inserted: the newest reset last
        state = self.policy.new_episode() if self._keeps_episodes else None
        self._episodes[req.client] = _Episode(req.payload.get("episode"), state)
        while len(self._episodes) > MAX_EPISODES:  # any peer can reset: bounded, the oldest go
            self._episodes.pop(next(iter(self._episodes)))
        return {}

    def knobs(self, req: Request) -> dict[str, Any]:
        k: KnobsRequest = req.knobs
        names = list(k.concepts) if k.concepts is not None else None
        try:
            with contextlib.ExitStack() as stack:  # a multi-knob change lands whole, between two inferences
                for st in self.steerers.values():
                    stack.enter_context(st.batch())
                self._apply_knobs(k, names)
                for st in self.steerers.values():  # every stack's end state, before any batch commits
                    st.check_bounds()
        except KeyError as e:
            raise ProtocolError(Code.BAD_PAYLOAD, str(e).strip("'\""), "concepts") from None
        except ValueError as e:
            raise ProtocolError(Code.BAD_PAYLOAD, str(e), "strengths") from None
        if k.op == "target":
            self.targets = {**self.targets, **self._check_targets(k.targets, "targets")}
        elif k.op == "untarget":
            self._check_targets(dict.fromkeys(k.axes, 1.0), "axes")
            self.targets = {n: v for n, v in self.targets.items() if n not in k.axes}
        elif k.op == "off":  # every knob off and every setpoint dropped: the policy as trained
            self.targets = {}
        state = {k_: v for st in self.steerers.values() for k_, v in st.state().items()}
        if k.op == "get" and names is not None:
            unknown = [n for n in names if n not in state]
            if unknown:
                raise ProtocolError(
                    Code.BAD_PAYLOAD, f"unknown concepts {unknown} (known: {sorted(state)})", "concepts"
                )
            state = {n: state[n] for n in names}
        return {"knobs": state, "info": {"targets": dict(self.targets)}}

    def _apply_knobs(self, k: KnobsRequest, names: list[str] | None) -> None:
        """Apply one knobs op inside every Steerer's batch: a failure anywhere (an unknown name, a strength
        out of bounds) undoes the whole request on every stack. Never waits for a running inference."""
        for name in [*(names or []), *k.strengths]:
            if name not in self._owner:
                known = ", ".join(self._owner) or "none"
                raise KeyError(f"unknown concept {name!r} (known: {known})")
        if k.op == "set":
            for name, strength in k.strengths.items():
                self._owner[name].update({name: strength})
            # Setting a knob turns it on, unless the request names which concepts to enable.
            for n in names if names is not None else k.strengths:
                self._owner[n].enable(n)
        elif k.op in ("enable", "disable"):
            for n in names:
                st = self._owner[n]
                (st.enable if k.op == "enable" else st.disable)(n)
        elif k.op == "off":
            for st in self.steerers.values():
                st.off()


@dataclass(frozen=True)
class _Episode:
    name: str | None
    state: Any  # the policy's new_episode() state
    trackers: dict[str, Tracker] = field(default_factory=dict, compare=False, repr=False)  # axis -> its hold


_NO_EPISODE = _Episode(None, None)  # a client without an episode, of a policy that keeps none
_SHARED_EPISODE = _Episode(None, None)  # one without an episode of its own: the policy's shared state


@dataclass
class _Prepared:
    """One checked infer request, ready for a forward."""

    obs: Observation
    selection: Selection
    setting: dict[str, Setting] | None
    episode: _Episode
    held: dict[str, float | None]  # each targeted axis's target, measurement and strength


def _state_of(setting: Mapping[str, Setting]) -> dict[str, dict]:
    return {k: v for s in setting.values() for k, v in s.state().items()}


def _check_representable(state: np.ndarray, dtype: torch.dtype) -> None:
    """Refuse a state the model's dtype turns into inf (float16 holds at most 65504): after the cast, not before."""
    cast = torch.from_numpy(np.ascontiguousarray(state)).to(dtype)
    bad = (~torch.isfinite(cast)).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ProtocolError(
            Code.NOT_FINITE,
            f"observation.state[{i}] is {float(state[i])!r}, beyond what the model's {dtype} can hold "
            f"({len(bad)} such values)",
            "observation.state",
        )


def _attempt(fn: Callable[[_Prepared], Reply], p: _Prepared) -> Reply | Exception:
    try:
        return fn(p)
    except Exception as e:  # noqa: BLE001 - the server turns it into this request's error reply
        return e
