"""The policy node: a policy and its Steerer behind the wire `Server`'s request handlers.

`PolicyNode` answers hello (the policy's spec and its concepts), infer (one action chunk under one steering
setting: the request's own `steer` map if it carries one, else the live knobs; plus the activations asked
for), reset, and knobs (list / get / set / enable / disable / off,
from any client while inferences run). Every infer reply's telemetry carries the action, the steering
state in force and the time spent in the policy.

Activation names a client may ask for: a concept name (the coefficients of that concept's neurons) or
`layer:N` (every coefficient of layer N); each comes back as float32 [forwards, neurons], the last
token position of the prefill and of each decoded token, recorded before steering is applied.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vla_steer.core.activations import ActivationRecorder, layer_of
from vla_steer.core.discovery.direction import Direction
from vla_steer.core.policy import ActionChunk, Policy
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


class PolicyNode:
    """Request handlers for `vla_steer.wire.Server`: `Server(PolicyNode(policy, directions), address)`."""

    def __init__(
        self,
        policy: Policy,
        directions: Iterable[Direction] = (),
        *,
        mode: str = "clamp",
        positions: str = "all",
        max_recorded_neurons: int = MAX_RECORDED_NEURONS,
    ):
        self.policy = policy
        # (getattr: duck-typed policies that do not derive from Policy are served one request at a time)
        self.batching = bool(getattr(policy, "batching", False))
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
        self.episode: str | None = None  # the latest reset's, whichever client sent it
        self._episodes: dict[bytes, _Episode] = {}  # client routing id -> its episode, oldest reset first
        self.inferences = 0

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
                # concurrent requests share one forward ("batched") or run one at a time ("sequential")
                "inference": "batched" if self.batching else "sequential",
            },
            conventions=spec.conventions,
        )

    def infer(self, req: Request) -> Reply:
        return self._infer_one(self._prepare(req))

    def infer_batch(self, reqs: Sequence[Request]) -> list[Reply | Exception]:
        """Several clients' infer requests in batched forwards (one per `policy.batch_key`), each under its
        own steering setting and with its own episode; a reply or the error it caused per request, in
        order. Requests asking for activations, and every request to a policy that cannot batch, run one
        at a time."""
        out: list[Reply | Exception | None] = [None] * len(reqs)
        batch: list[tuple[int, _Prepared]] = []
        for i, req in enumerate(reqs):
            try:
                prep = self._prepare(req)
                if prep.selection or not self.batching:
                    out[i] = self._infer_one(prep)
                else:
                    batch.append((i, prep))
            except Exception as e:  # noqa: BLE001 - the server turns it into this request's error reply
                out[i] = e
        groups: dict[Any, list[tuple[int, _Prepared]]] = {}
        for i, prep in batch:  # one forward per key (e.g. prompt length)
            try:
                groups.setdefault(self.policy.batch_key(prep.obs), []).append((i, prep))
            except Exception as e:  # noqa: BLE001
                out[i] = e
        for group in groups.values():
            try:
                if len(group) == 1:
                    replies = [self._infer_one(group[0][1])]
                else:
                    replies = self._infer_many([p for _, p in group])
            except Exception as e:  # noqa: BLE001 - the forward failed for every sample in it
                replies = [e] * len(group)
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
        selection = self._selection(req.payload.get("activations") or [])
        setting = self.resolve_steer(req.payload.get("steer"))
        return _Prepared(obs, selection, setting, self._episodes.get(req.client, _NO_EPISODE))

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
            recorders = []
            for key, group in _by_backbone(p.selection).items():
                neurons = [n for _, ns in group for n in ns]
                rec = ActivationRecorder(
                    self.steerers[key].backbone, neurons, max_neurons=self.max_recorded_neurons
                )
                recorders.append((stack.enter_context(rec), group))
            if self.batching:
                chunk = self.policy.infer_batch([p.obs], [p.episode.state])[0]
            else:
                chunk = self.policy.infer(p.obs)
            activations = {k: v for rec, group in recorders for k, v in _split(rec.result(), group).items()}
        return self._reply(chunk, activations, steering, (time.perf_counter() - t0) * 1e3, p.episode.name)

    def _infer_many(self, batch: list[_Prepared]) -> list[Reply | Exception]:
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            live = {key: st.live() for key, st in self.steerers.items()}
            settings = [live if p.setting is None else p.setting for p in batch]
            for key, st in self.steerers.items():
                stack.enter_context(st.consistent([s[key] for s in settings]))
            chunks = self.policy.infer_batch([p.obs for p in batch], [p.episode.state for p in batch])
        policy_ms = (time.perf_counter() - t0) * 1e3
        out: list[Reply | Exception] = []
        for p, s, chunk in zip(batch, settings, chunks, strict=True):
            try:
                out.append(self._reply(chunk, {}, _state_of(s), policy_ms, p.episode.name, len(batch)))
            except ProtocolError as e:
                out.append(e)
        return out

    def _reply(
        self,
        chunk: ActionChunk,
        activations: dict[str, np.ndarray],
        steering: dict[str, dict],
        policy_ms: float,
        episode: str | None,
        batch: int = 1,
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
        info = {
            "steering": steering,
            "policy_ms": policy_ms,
            "episode": episode,
            "batch": batch,
            **chunk.info,
        }
        telemetry = {
            "actions": actions.tolist(),
            "steering": steering,
            "policy_ms": policy_ms,
            "episode": episode,
            "batch": batch,
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
        self.episode = req.payload.get("episode")
        self._episodes.pop(req.client, None)
        new_episode = getattr(self.policy, "new_episode", None)
        self._episodes[req.client] = _Episode(self.episode, new_episode() if new_episode else None)
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
        state = {k_: v for st in self.steerers.values() for k_, v in st.state().items()}
        if k.op == "get" and names is not None:
            unknown = [n for n in names if n not in state]
            if unknown:
                raise ProtocolError(
                    Code.BAD_PAYLOAD, f"unknown concepts {unknown} (known: {sorted(state)})", "concepts"
                )
            state = {n: state[n] for n in names}
        return {"knobs": state}

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

    # -- activations -------------------------------------------------------------------------------

    def _selection(self, names: list[str]) -> list[tuple[str, str, list[tuple[int, int]]]]:
        """(name, backbone key, neurons) per requested activation; `layer:N` is the language backbone's."""
        bb = self.policy.backbone
        out = []
        concepts = set(self._owner)
        keys = {id(st): key for key, st in self.steerers.items()}
        for name in dict.fromkeys(names):  # each name once, in order
            try:
                layer = layer_of(name)
            except ValueError as e:
                raise ProtocolError(Code.BAD_PAYLOAD, str(e), "activations") from None
            if layer is not None:
                if layer >= bb.n_layers:
                    raise ProtocolError(
                        Code.BAD_PAYLOAD,
                        f"activation {name!r}: the model has {bb.n_layers} layers",
                        "activations",
                    )
                out.append((name, "language", [(layer, i) for i in range(bb.d_mlp)]))
            elif name in concepts:
                st = self._owner[name]
                out.append((name, keys[id(st)], [(n.layer, n.index) for n in st.neurons(name)]))
            else:
                raise ProtocolError(
                    Code.BAD_PAYLOAD,
                    f"unknown activation {name!r}: ask for a concept ({sorted(concepts)}) or 'layer:N'",
                    "activations",
                )
        total = sum(len(ns) for _, _, ns in out)
        if total > self.max_recorded_neurons:
            raise ProtocolError(
                Code.TOO_LARGE,
                f"{total} neurons requested; this node records at most {self.max_recorded_neurons}",
                "activations",
            )
        return out


@dataclass(frozen=True)
class _Episode:
    name: str | None
    state: Any  # the policy's new_episode() state


_NO_EPISODE = _Episode(None, None)  # a client that never reset: the policy's shared state


@dataclass
class _Prepared:
    """One checked infer request, ready for a forward."""

    obs: Observation
    selection: list[tuple[str, str, list[tuple[int, int]]]]
    setting: dict[str, Setting] | None
    episode: _Episode


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


def _by_backbone(selection: list[tuple[str, str, list]]) -> dict[str, list[tuple[str, list]]]:
    out: dict[str, list[tuple[str, list]]] = {}
    for name, key, neurons in selection:
        out.setdefault(key, []).append((name, neurons))
    return out


def _split(values: np.ndarray, selection: list[tuple[str, list]]) -> dict[str, np.ndarray]:
    out, col = {}, 0
    for name, neurons in selection:
        out[name] = np.ascontiguousarray(values[:, col : col + len(neurons)])
        col += len(neurons)
    return out
