"""The policy node: a policy and its Steerer behind the transport's request handlers.

`PolicyNode` answers hello (the policy's spec and its concepts), infer (one action chunk under one steering
setting, plus the activations asked for), reset, and knobs (list / get / set / enable / disable / off,
from any client while inferences run). Every infer reply's telemetry carries the action, the steering
state in force and the time spent in the policy.

Activation names a client may ask for: a concept name (the coefficients of that concept's neurons) or
`layer:N` (every coefficient of layer N); each comes back as float32 [forwards, neurons], the last
token position of the prefill and of each decoded token, recorded before steering is applied.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from policies.base import Observation, Policy
from vla_steer.activations import ActivationRecorder
from vla_steer.discovery.direction import Direction
from vla_steer.protocol import Code, InferResult, KnobsRequest, ProtocolError, ServerInfo
from vla_steer.steering import Steerer
from vla_steer.transport import Reply, Request

_LAYER = re.compile(r"^layer:(\d+)$")
MAX_RECORDED_NEURONS = 65536


class PolicyNode:
    """Request handlers for `vla_steer.transport.Server`: `Server(PolicyNode(policy, directions), address)`."""

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
        self.steerer = Steerer(policy.backbone, positions=positions)
        for d in directions:
            if not d.neurons:
                continue
            self.steerer.add_direction(d, mode=mode, strength=0.0, enabled=False)
        self.max_recorded_neurons = max_recorded_neurons
        self.episode: str | None = None
        self.inferences = 0

    # -- handlers (called by the transport Server) -------------------------------------------------

    def hello(self, req: Request) -> ServerInfo:
        spec = self.policy.spec
        return ServerInfo(
            policy=spec.name,
            action_dim=spec.action_dim,
            chunk_length=spec.chunk_length,
            control_hz=spec.control_hz,
            image_keys=spec.image_keys,
            concepts=tuple(self.steerer.concepts),
            info={
                "state_dim": spec.state_dim,
                "action_space": spec.action_space,
                "positions": self.steerer.positions,
            },
        )

    def infer(self, req: Request) -> Reply:
        try:
            obs = Observation.from_payload(dict(req.payload["observation"]), self.policy.spec)
        except ValueError as e:
            raise ProtocolError(Code.BAD_PAYLOAD, str(e), "observation") from None
        selection = self._selection(req.payload.get("activations") or [])
        t0 = time.perf_counter()
        # One inference, one steering setting: a knob change made meanwhile applies from the next one.
        with self.steerer.consistent():
            steering = self.steerer.applied_state()
            if selection:
                neurons = [n for _, ns in selection for n in ns]
                with ActivationRecorder(
                    self.policy.backbone, neurons, max_neurons=self.max_recorded_neurons
                ) as rec:
                    chunk = self.policy.infer(obs)
                activations = _split(rec.result(), selection)
            else:
                chunk = self.policy.infer(obs)
                activations = {}
        policy_ms = (time.perf_counter() - t0) * 1e3
        actions = np.asarray(chunk.actions, dtype=np.float32)
        if actions.shape != (self.policy.spec.chunk_length, self.policy.spec.action_dim) or not np.all(
            np.isfinite(actions)
        ):
            raise ProtocolError(
                Code.HANDLER_ERROR,
                f"policy produced invalid actions (shape {actions.shape}, finite: {bool(np.all(np.isfinite(actions)))})",
            )
        self.inferences += 1
        info = {"steering": steering, "policy_ms": policy_ms, "episode": self.episode, **chunk.info}
        telemetry = {
            "actions": actions.tolist(),
            "steering": steering,
            "policy_ms": policy_ms,
            "episode": self.episode,
        }
        return Reply(InferResult(actions, activations, info), telemetry)

    def reset(self, req: Request) -> dict[str, Any]:
        self.policy.reset()
        self.episode = req.payload.get("episode")
        return {}

    def knobs(self, req: Request) -> dict[str, Any]:
        k: KnobsRequest = req.knobs
        names = list(k.concepts) if k.concepts is not None else None
        try:
            with self.steerer.batch():  # a multi-knob change lands whole, between two inferences
                self._apply_knobs(k, names)
        except KeyError as e:
            raise ProtocolError(Code.BAD_PAYLOAD, str(e).strip("'\""), "concepts") from None
        except ValueError as e:
            raise ProtocolError(Code.BAD_PAYLOAD, str(e), "strengths") from None
        state = self.steerer.state()
        if k.op == "get" and names is not None:
            unknown = [n for n in names if n not in state]
            if unknown:
                raise ProtocolError(
                    Code.BAD_PAYLOAD, f"unknown concepts {unknown} (known: {sorted(state)})", "concepts"
                )
            state = {n: state[n] for n in names}
        return {"knobs": state}

    def _apply_knobs(self, k: KnobsRequest, names: list[str] | None) -> None:
        """Apply one knobs op. Never waits for a running inference: it lands at the next one."""
        for name in [*(names or []), *k.strengths]:
            if name not in self.steerer.concepts:
                known = ", ".join(self.steerer.concepts) or "none"
                raise KeyError(f"unknown concept {name!r} (known: {known})")
        if k.op == "set":
            self.steerer.update(k.strengths)
            # Setting a knob turns it on, unless the request names which concepts to enable.
            for n in names if names is not None else k.strengths:
                self.steerer.enable(n)
        elif k.op in ("enable", "disable"):
            for n in names:
                (self.steerer.enable if k.op == "enable" else self.steerer.disable)(n)
        elif k.op == "off":
            self.steerer.off()

    # -- activations -------------------------------------------------------------------------------

    def _selection(self, names: list[str]) -> list[tuple[str, list[tuple[int, int]]]]:
        bb = self.policy.backbone
        out = []
        concepts = set(self.steerer.concepts)
        for name in dict.fromkeys(names):  # each name once, in order
            m = _LAYER.match(name)
            if m:
                layer = int(m.group(1))
                if layer >= bb.n_layers:
                    raise ProtocolError(
                        Code.BAD_PAYLOAD,
                        f"activation {name!r}: the model has {bb.n_layers} layers",
                        "activations",
                    )
                out.append((name, [(layer, i) for i in range(bb.d_mlp)]))
            elif name in concepts:
                out.append((name, [(n.layer, n.index) for n in self.steerer.neurons(name)]))
            else:
                raise ProtocolError(
                    Code.BAD_PAYLOAD,
                    f"unknown activation {name!r}: ask for a concept ({sorted(concepts)}) or 'layer:N'",
                    "activations",
                )
        total = sum(len(ns) for _, ns in out)
        if total > self.max_recorded_neurons:
            raise ProtocolError(
                Code.TOO_LARGE,
                f"{total} neurons requested; this node records at most {self.max_recorded_neurons}",
                "activations",
            )
        return out


def _split(values: np.ndarray, selection: list[tuple[str, list]]) -> dict[str, np.ndarray]:
    out, col = {}, 0
    for name, neurons in selection:
        out[name] = np.ascontiguousarray(values[:, col : col + len(neurons)])
        col += len(neurons)
    return out
