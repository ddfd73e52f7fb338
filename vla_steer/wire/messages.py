"""What each kind of message carries: the per-kind payload schemas and the values built from them.

`check_request` / `check_reply` validate a decoded `Message` (see `vla_steer.wire.codec`) against its kind's
schema; `ServerInfo` (the hello reply), `InferResult`, `KnobsRequest` and `TelemetryRecord` are the typed
views of those payloads. Torch-free, like the whole wire.

An `Observation` is what a policy is asked to act on: a language instruction, camera images keyed by the
policy's image keys (uint8 [H, W, 3], row 0 at the top) and, when the policy takes it, a proprioceptive
state vector. It travels as the payload's "observation" of an `infer` request (`to_payload` /
`from_payload`), and `from_payload` is where every rule about a valid observation lives: errors name the
key and what was wrong, values are checked (finite state, after the cast to float32: a non-finite one is a
`ProtocolError(NOT_FINITE)` naming "observation.state"), not only types.

A `Step` is one executed control step as the node that stepped the world records it: the observation the
action was chosen on, the chunk and the executed action, the end-effector pose and velocity (world frame:
`ee_pos` [3] m, `ee_quat` [4] x, y, z, w, `ee_vel` [3] m/s), reward, times, the steering state in force and
any activations the policy returned.

Longer than ~400 lines on purpose: each kind's schema sits next to the value type that builds and reads it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_steer.wire.codec import MAX_NAMES, PROTOCOL_VERSION, REQUEST_KINDS, Code, Message, ProtocolError

KNOB_OPS = ("list", "get", "set", "enable", "disable", "off", "target", "untarget")
MAX_OP_CHARS = 64  # a control op is a name, not data
MAX_INSTRUCTION_CHARS = 2000  # a task instruction, not a document: bounds tokenizer and attention cost


# ---------------------------------------------------------------------------------------------- schemas


def _t_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _t_str(v: Any) -> bool:
    return isinstance(v, str)


def _t_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _t_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _t_names(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_NAMES and all(isinstance(x, str) for x in v)


def _t_number_map(v: Any) -> bool:
    return isinstance(v, dict) and len(v) <= MAX_NAMES and all(_t_number(x) for x in v.values())


MAX_POSITION = 1e3  # m: no end effector is further than this from its frame's origin


def _t_point(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_t_number(x) and abs(x) <= MAX_POSITION for x in v)


def _t_array_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, np.ndarray) for x in v.values())


def _t_actions(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.ndim == 2 and v.dtype.kind == "f"


def _t_shape_map(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(s, list) and all(_t_int(d) and d >= 0 for d in s) for s in v.values()
    )


def _t_dict_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, dict) for x in v.values())


def _t_opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _t_op(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_OP_CHARS


def _t_plain_map(v: Any) -> bool:
    """A map holding plain values only, no arrays (decode has already bounded depth and key types)."""
    return isinstance(v, dict) and not _holds_array(v)


def _holds_array(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return True
    if isinstance(v, dict):
        return any(_holds_array(x) for x in v.values())
    if isinstance(v, list):
        return any(_holds_array(x) for x in v)
    return False


# (required, check, what the check wants); every kind also accepts a free-form "info" dict.
_Spec = dict[str, tuple[bool, Any, str]]
_INFO = {"info": (False, _t_dict, "a map")}
_REQUESTS: dict[str, _Spec] = {
    "hello": {"client": (False, _t_str, "a string"), **_INFO},
    "infer": {
        "observation": (True, _t_dict, "a map of arrays and scalars"),
        "activations": (False, _t_names, f"a list of <= {MAX_NAMES} names"),
        # This inference only: exactly these knobs at these strengths, every other one off ({}: unsteered).
        "steer": (False, _t_number_map, "a map of knob -> finite number"),
        # Behaviour setpoints (`vla_steer.core.setpoints`): this inference's targets (else the live ones), and
        # what the node measures them on: the end effector's position (m) and whether it carries something,
        # or the client's own measurement per axis.
        "setpoints": (False, _t_number_map, "a map of axis -> finite target"),
        "ee_pos": (False, _t_point, f"a list of 3 numbers (m), each within +-{MAX_POSITION:g}"),
        "ee_time": (False, _t_number, "a finite number (s)"),
        "carrying": (False, lambda v: isinstance(v, bool), "a bool"),
        "measured": (False, _t_number_map, "a map of axis -> finite number"),
        **_INFO,
    },
    "reset": {"episode": (False, _t_str, "a string"), "seed": (False, _t_int, "an int"), **_INFO},
    "knobs": {
        "op": (True, lambda v: v in KNOB_OPS, f"one of {KNOB_OPS}"),
        "concepts": (False, _t_names, f"a list of <= {MAX_NAMES} names"),
        "strengths": (False, _t_number_map, "a map of concept -> finite number"),
        "targets": (False, _t_number_map, "a map of axis -> finite target"),
        "axes": (False, _t_names, f"a list of <= {MAX_NAMES} names"),
        **_INFO,
    },
    "heartbeat": {"client": (False, _t_str, "a string"), **_INFO},
    "control": {
        "op": (True, _t_op, f"a non-empty string of <= {MAX_OP_CHARS} characters"),
        "args": (True, _t_plain_map, "a map of plain values (no arrays)"),
    },
}
_REPLIES: dict[str, _Spec] = {
    "hello": {
        "protocol": (True, _t_int, "an int"),
        "policy": (True, _t_str, "a string"),
        "action_dim": (True, _t_int, "an int"),
        "chunk_length": (True, _t_int, "an int"),
        "control_hz": (True, _t_number, "a number"),
        "image_keys": (True, _t_shape_map, "a map of image key -> shape"),
        "concepts": (True, _t_names, "a list of names"),
        "conventions": (False, _t_plain_map, "a map of plain values (see ServerInfo)"),
        **_INFO,
    },
    "infer": {
        "actions": (True, _t_actions, "a 2-D float array (chunk, action_dim)"),
        "activations": (False, _t_array_map, "a map of name -> array"),
        **_INFO,
    },
    "reset": {**_INFO},
    "knobs": {"knobs": (True, _t_dict_map, "a map of concept -> state map"), **_INFO},
    "heartbeat": {
        "time": (True, _t_number, "a number"),
        "busy": (False, lambda v: isinstance(v, bool), "a bool"),
        **_INFO,
    },
    "error": {
        "code": (True, _t_str, "a string"),
        "message": (True, _t_str, "a string"),
        "field": (False, _t_opt_str, "a string or None"),
        **_INFO,
    },
}


def _check_spec(payload: dict, spec: _Spec, what: str) -> None:
    for name, (required, check, wants) in spec.items():
        if name not in payload:
            if required:
                raise ProtocolError(Code.MISSING_FIELD, f"{what} payload has no {name!r}", name)
        elif not check(payload[name]):
            raise ProtocolError(Code.BAD_PAYLOAD, f"{what} field {name!r} must be {wants}", name)
    extra = sorted(set(payload) - set(spec))
    if extra:
        raise ProtocolError(Code.BAD_PAYLOAD, f"{what} payload has unknown fields {extra}", extra[0])


def check_request(msg: Message) -> None:
    """Validate a request's kind and payload schema (after `decode`)."""
    if msg.kind not in REQUEST_KINDS:
        raise ProtocolError(
            Code.BAD_KIND, f"{msg.kind!r} is not a request kind; expected one of {REQUEST_KINDS}", "kind"
        )
    for name in ("steer", "strengths", "setpoints", "measured", "targets"):  # name the bad entry, not the map
        _check_number_map(msg.payload.get(name), f"{msg.kind} request", name)
    _check_spec(msg.payload, _REQUESTS[msg.kind], f"{msg.kind} request")
    if msg.kind == "knobs":
        op = msg.payload["op"]
        if op == "set" and "strengths" not in msg.payload:
            raise ProtocolError(Code.MISSING_FIELD, "knobs 'set' needs 'strengths'", "strengths")
        if op == "target" and not msg.payload.get("targets"):
            raise ProtocolError(
                Code.MISSING_FIELD, "knobs 'target' needs a non-empty 'targets' map", "targets"
            )
        if op == "untarget" and not msg.payload.get("axes"):
            raise ProtocolError(Code.MISSING_FIELD, "knobs 'untarget' needs a non-empty 'axes' list", "axes")
        if op in ("enable", "disable") and not msg.payload.get("concepts"):
            raise ProtocolError(
                Code.MISSING_FIELD, f"knobs {op!r} needs a non-empty 'concepts' list", "concepts"
            )


def _check_number_map(v: Any, what: str, name: str) -> None:
    if isinstance(v, dict):
        for key, x in v.items():
            if not _t_number(x):
                raise ProtocolError(
                    Code.BAD_PAYLOAD,
                    f"{what} field {name!r}: {key!r} must be a finite number, got {x!r}",
                    name,
                )


def check_reply(msg: Message, expected_kind: str) -> None:
    """Validate a reply: either an error or the same kind as the request, with that kind's schema."""
    if msg.kind != "error" and msg.kind != expected_kind:
        raise ProtocolError(Code.BAD_KIND, f"expected a {expected_kind!r} reply, got {msg.kind!r}", "kind")
    if msg.kind == "control":  # free-form: whatever map the node's control handler returned
        return
    _check_spec(msg.payload, _REPLIES[msg.kind], f"{msg.kind} reply")


def error_payload(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "field": field}


# ----------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ServerInfo:
    """The "hello" reply: what a client needs to know to drive the policy.

    `conventions`: what the policy's inputs and outputs mean, so that a simulator can refuse a setup that
    contradicts them (`sim.libero_profile`). Keys (all optional; an absent one is unknown):
    `family` (openvla | pi0 | pi05 | tiny_vla), `gripper` (how the last action dim reads: open_unit =
    [0, 1] with 1 open, OpenVLA's; close_positive = [-1, 1] with +1 close, LIBERO's; open_positive),
    `action_frame` ("absolute": execute as returned; a state-relative checkpoint's policy has added the
    state back), `relative_mask` (the action dims the policy made absolute by adding the state, or null),
    `center_crop` (the area fraction the policy crops from each image itself, or null), `resize` (how the
    policy resizes an image of another size than `image_keys`').
    """

    policy: str
    action_dim: int
    chunk_length: int
    control_hz: float
    image_keys: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # key -> (H, W, C)
    concepts: tuple[str, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)  # policy-specific extras (e.g. unnorm_key)
    conventions: Mapping[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "policy": self.policy,
            "action_dim": int(self.action_dim),
            "chunk_length": int(self.chunk_length),
            "control_hz": float(self.control_hz),
            "image_keys": {k: [int(d) for d in s] for k, s in self.image_keys.items()},
            "concepts": list(self.concepts),
            "info": dict(self.info),
            "conventions": dict(self.conventions),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ServerInfo:
        return cls(
            policy=payload["policy"],
            action_dim=payload["action_dim"],
            chunk_length=payload["chunk_length"],
            control_hz=float(payload["control_hz"]),
            image_keys={k: tuple(s) for k, s in payload["image_keys"].items()},
            concepts=tuple(payload["concepts"]),
            info=dict(payload.get("info", {})),
            conventions=dict(payload.get("conventions", {})),
        )


@dataclass
class InferResult:
    """The "infer" reply: an action chunk (chunk_length, action_dim) and the requested activations."""

    actions: np.ndarray
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"actions": self.actions}
        if self.activations:
            out["activations"] = self.activations
        if self.info:
            out["info"] = self.info
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> InferResult:
        return cls(payload["actions"], dict(payload.get("activations", {})), dict(payload.get("info", {})))


@dataclass(frozen=True)
class KnobsRequest:
    """A "knobs" request. `concepts=None` means all concepts (for list/get). `target` sets behaviour setpoints
    (`targets`: axis -> value, held by the node's controller); `untarget` drops the `axes` named."""

    op: str
    concepts: tuple[str, ...] | None = None
    strengths: Mapping[str, float] = field(default_factory=dict)
    targets: Mapping[str, float] = field(default_factory=dict)
    axes: tuple[str, ...] = ()

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op}
        if self.concepts is not None:
            out["concepts"] = list(self.concepts)
        if self.op == "set":
            out["strengths"] = {k: float(v) for k, v in self.strengths.items()}
        if self.op == "target":
            out["targets"] = {k: float(v) for k, v in self.targets.items()}
        if self.op == "untarget":
            out["axes"] = list(self.axes)
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> KnobsRequest:
        concepts = payload.get("concepts")
        return cls(
            payload["op"],
            None if concepts is None else tuple(concepts),
            dict(payload.get("strengths", {})),
            dict(payload.get("targets", {})),
            tuple(payload.get("axes", ())),
        )


@dataclass(frozen=True)
class TelemetryRecord:
    """One per-request record from the server's PUB socket. Latencies are in milliseconds."""

    kind: str
    request_id: int
    client: str  # hex routing id of the sender
    ok: bool
    error_code: str | None
    latency_ms: Mapping[str, float]  # decode, queue (worker kinds), handler, encode, total
    telemetry: Mapping[str, Any]  # whatever the handler returned as telemetry
    timestamp: float

    def to_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "request_id": self.request_id,
            "client": self.client,
            "ok": self.ok,
            "error_code": self.error_code,
            "latency_ms": dict(self.latency_ms),
            "telemetry": dict(self.telemetry),
        }

    @classmethod
    def from_message(cls, msg: Message) -> TelemetryRecord:
        p = msg.payload
        try:
            return cls(
                kind=str(p["kind"]),
                request_id=int(p["request_id"]),
                client=str(p["client"]),
                ok=bool(p["ok"]),
                error_code=p.get("error_code"),
                latency_ms={str(k): float(v) for k, v in p["latency_ms"].items()},
                telemetry=dict(p.get("telemetry") or {}),
                timestamp=msg.timestamp,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(Code.BAD_PAYLOAD, f"bad telemetry record: {e!r}", "payload") from e


def parse_strengths(
    items: list[str], what: str = "knob settings look like fast=4 or up=-2.5"
) -> dict[str, float]:
    """['fast=4', 'up=-2.5'] -> {'fast': 4.0, 'up': -2.5}; anything else, or a name given twice, names the
    bad item."""
    out = {}
    for item in items:
        name, sep, value = item.strip().partition("=")
        if name in out:
            raise ValueError(f"{name!r} is given twice ({item!r})")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"{what}, got {item!r}") from None
        if not math.isfinite(out[name]):
            raise ValueError(f"{name!r}: the value must be a finite number, got {value!r}")
    return out


SETPOINT = "@"  # 'speed@0.10' in a setting: hold the speed axis at 0.10 (a setpoint), not a knob's strength


def parse_setting(text: str) -> dict[str, float]:
    """'off' -> {} (every knob off); 'fast=4,up=2' -> {'fast': 4.0, 'up': 2.0}; a setpoint 'speed@0.10' ->
    {'speed@': 0.1} (see `split_setting`)."""
    if text.strip() in ("off", "baseline", ""):
        return {}
    items = []
    for item in text.split(","):
        axis, at, target = item.partition(SETPOINT)
        if at and "=" not in item:
            if not axis.strip():
                raise ValueError(f"a setpoint names its axis, as in speed@0.10; got {item!r}")
            item = f"{axis.strip()}{SETPOINT}={target}"
        items.append(item)
    try:
        return parse_strengths(items, "settings look like fast=4, up=-2.5 or speed@0.10")
    except ValueError as e:  # said as the user wrote it
        raise ValueError(str(e).replace(f"{SETPOINT}=", SETPOINT)) from None


def split_setting(setting: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """A setting's knob strengths and its setpoints (axis -> target): {'up': 2, 'speed@': 0.1} ->
    ({'up': 2.0}, {'speed': 0.1})."""
    knobs = {k: float(v) for k, v in setting.items() if not k.endswith(SETPOINT)}
    setpoints = {k[: -len(SETPOINT)]: float(v) for k, v in setting.items() if k.endswith(SETPOINT)}
    return knobs, setpoints


@dataclass
class Observation:
    instruction: str
    images: dict[str, np.ndarray]
    state: np.ndarray | None = None

    def to_payload(self) -> dict[str, Any]:
        """The observation as an infer request payload."""
        out: dict[str, Any] = {"instruction": self.instruction, "images": dict(self.images)}
        if self.state is not None:
            out["state"] = self.state
        return out

    @classmethod
    def from_payload(
        cls,
        payload: Mapping[str, Any],
        image_keys: Mapping[str, tuple[int, int, int]],
        state_dim: int | None = None,
    ) -> Observation:
        """Validate an infer payload against what the policy takes; errors name the key and what was wrong."""
        instruction = payload.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("observation.instruction must be a non-empty string")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise ValueError(
                f"observation.instruction is {len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}"
            )
        images = payload.get("images")
        if not isinstance(images, Mapping):
            raise ValueError(f"observation.images must be a map with keys {sorted(image_keys)}")
        missing = sorted(set(image_keys) - set(images))
        if missing:
            raise ValueError(f"observation.images is missing {missing} (expected {sorted(image_keys)})")
        checked = {}
        for key, shape in image_keys.items():
            img = images[key]
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != tuple(shape):
                got = f"{img.dtype}{list(img.shape)}" if isinstance(img, np.ndarray) else type(img).__name__
                raise ValueError(f"observation.images.{key} must be uint8{list(shape)}, got {got}")
            checked[key] = img
        state = payload.get("state")
        if state_dim is not None:
            if not isinstance(state, np.ndarray) or state.shape != (state_dim,):
                got = list(state.shape) if isinstance(state, np.ndarray) else type(state).__name__
                raise ValueError(f"observation.state must be a float array of shape [{state_dim}], got {got}")
            if state.dtype.kind not in "fiu":
                raise ValueError(f"observation.state must be numeric, got {state.dtype}")
        if isinstance(state, np.ndarray) and state.dtype.kind in "fiu":
            # Checked even when the policy takes no state (it is then dropped): a sender of NaN or 1e39
            # has a bug worth hearing about. Checked after the cast: 1e39 in float64 is inf in float32.
            with np.errstate(over="ignore", invalid="ignore"):
                cast = state.astype(np.float32)
            bad = np.flatnonzero(~np.isfinite(cast))
            if bad.size:
                first = np.unravel_index(bad[0], state.shape)
                where = "".join(f"[{i}]" for i in first)
                raise ProtocolError(
                    Code.NOT_FINITE,
                    f"observation.state{where} is {state[first].item()!r}: NaN or inf (or beyond float32) "
                    f"({bad.size} such values)",
                    "observation.state",
                )
            state = cast
        state = state if state_dim is not None else None
        return cls(instruction, checked, state)


@dataclass
class Step:
    """One executed control step, as recorded by the node that stepped the world."""

    observation: Observation
    action: np.ndarray  # executed [action_dim]
    action_chunk: np.ndarray | None = None  # the chunk `action` came from [chunk, action_dim]
    ee_pos: np.ndarray | None = None
    ee_quat: np.ndarray | None = None
    ee_vel: np.ndarray | None = None
    reward: float | None = None
    t_wall: float = field(default_factory=time.time)
    t_sim: float | None = None
    steering: dict[str, Any] | None = None
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    # What the policy's reply said beside its actions (its info without the steering): a planning policy's
    # plan words, the node's latency and batch. Scalar values are recorded; anything else is not.
    policy_info: dict[str, Any] | None = None
