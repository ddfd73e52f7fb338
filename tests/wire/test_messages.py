"""Per-kind payload schemas and values (vla_steer.wire.messages), and the one Observation schema. No sockets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from wire_support import roundtrip

from vla_steer.wire.codec import Code, Message, ProtocolError, encode
from vla_steer.wire.messages import (
    InferResult,
    KnobsRequest,
    Observation,
    ServerInfo,
    TelemetryRecord,
    check_reply,
    check_request,
)


def test_values_roundtrip() -> None:
    info = ServerInfo("pi0", 7, 50, 10.0, {"base": (224, 224, 3)}, ("up", "fast"), {"unnorm_key": "libero"})
    msg = roundtrip("hello", info.to_payload())
    check_reply(msg, "hello")
    assert ServerInfo.from_payload(msg.payload) == info

    res = InferResult(np.ones((2, 7), np.float32), {"l15": np.arange(4.0)}, {"step": 3})
    msg = roundtrip("infer", res.to_payload())
    check_reply(msg, "infer")
    back = InferResult.from_payload(msg.payload)
    assert back.actions.dtype == res.actions.dtype and back.actions.tobytes() == res.actions.tobytes()
    assert back.info == {"step": 3}

    kr = KnobsRequest("set", strengths={"up": 4.0})
    msg = roundtrip("knobs", kr.to_payload())
    check_request(msg)
    assert KnobsRequest.from_payload(msg.payload) == kr

    rec = TelemetryRecord("infer", 9, "ab", True, None, {"total": 1.5}, {"x": 1}, 0.0)
    back = TelemetryRecord.from_message(roundtrip("telemetry", rec.to_payload(), timestamp=0.0))
    assert back == rec


@pytest.mark.parametrize(
    ("kind", "payload", "code", "field"),
    [
        ("infer", {}, Code.MISSING_FIELD, "observation"),
        ("infer", {"observation": 3}, Code.BAD_PAYLOAD, "observation"),
        ("infer", {"observation": {}, "activations": "l15"}, Code.BAD_PAYLOAD, "activations"),
        ("infer", {"observation": {}, "extra": 1}, Code.BAD_PAYLOAD, "extra"),
        ("knobs", {}, Code.MISSING_FIELD, "op"),
        ("knobs", {"op": "explode"}, Code.BAD_PAYLOAD, "op"),
        ("knobs", {"op": "set"}, Code.MISSING_FIELD, "strengths"),
        ("knobs", {"op": "set", "strengths": {"up": "high"}}, Code.BAD_PAYLOAD, "strengths"),
        ("knobs", {"op": "set", "strengths": {"up": float("inf")}}, Code.BAD_PAYLOAD, "strengths"),
        ("knobs", {"op": "enable"}, Code.MISSING_FIELD, "concepts"),
        ("reset", {"seed": "x"}, Code.BAD_PAYLOAD, "seed"),
        ("control", {"args": {}}, Code.MISSING_FIELD, "op"),
        ("control", {"op": "stop"}, Code.MISSING_FIELD, "args"),
        ("control", {"op": "", "args": {}}, Code.BAD_PAYLOAD, "op"),
        ("control", {"op": "x" * 65, "args": {}}, Code.BAD_PAYLOAD, "op"),
        ("control", {"op": 3, "args": {}}, Code.BAD_PAYLOAD, "op"),
        ("control", {"op": "event", "args": [1]}, Code.BAD_PAYLOAD, "args"),
        ("control", {"op": "event", "args": {"data": {"x": np.zeros(2)}}}, Code.BAD_PAYLOAD, "args"),
        ("control", {"op": "stop", "args": {}, "why": "x"}, Code.BAD_PAYLOAD, "why"),
        ("error", {"code": "x", "message": "y"}, Code.BAD_KIND, "kind"),
        ("telemetry", {}, Code.BAD_KIND, "kind"),
    ],
)
def test_check_request_schemas(kind: str, payload: dict, code: str, field: str) -> None:
    with pytest.raises(ProtocolError) as e:
        check_request(Message(kind, payload))
    assert (e.value.code, e.value.field) == (code, field)


def test_check_request_accepts_every_knob_op() -> None:
    for op in ("list", "get", "off"):
        check_request(Message("knobs", {"op": op}))
    check_request(Message("knobs", {"op": "get", "concepts": ["up"]}))
    check_request(Message("knobs", {"op": "enable", "concepts": ["up"]}))
    check_request(Message("knobs", {"op": "set", "strengths": {"up": 3, "down": -2.5}}))
    check_request(Message("heartbeat", {}))
    check_request(Message("reset", {"episode": "e1", "seed": 3, "info": {"task": 2}}))
    check_request(Message("control", {"op": "event", "args": {"kind": "knobs", "data": {"up": [1, 2.5]}}}))


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "actions"),
        ({"actions": np.zeros(7, np.float32)}, "actions"),
        ({"actions": np.zeros((2, 7), np.int32)}, "actions"),
        ({"actions": np.zeros((2, 7)), "activations": {"l": 1}}, "activations"),
    ],
)
def test_check_reply_infer_schema(payload: dict, field: str) -> None:
    with pytest.raises(ProtocolError) as e:
        check_reply(Message("infer", payload), "infer")
    assert e.value.field == field


def test_check_reply_kind_and_error() -> None:
    check_reply(Message("error", {"code": "busy", "message": "later", "field": None}), "infer")
    with pytest.raises(ProtocolError) as e:
        check_reply(Message("knobs", {"knobs": {}}), "infer")
    assert e.value.code == Code.BAD_KIND
    with pytest.raises(ProtocolError) as e:
        check_reply(Message("error", {"code": "busy"}), "infer")
    assert e.value.field == "message"


# ------------------------------------------------------------------------------------------- observation

KEYS = {"agentview": (8, 8, 3), "wrist": (4, 4, 3)}
IMAGES = {k: np.full(s, i, np.uint8) for i, (k, s) in enumerate(KEYS.items())}


def observation_payload(**changes: Any) -> dict[str, Any]:
    return {"instruction": "pick up the bowl", "images": dict(IMAGES), "state": np.arange(3.0), **changes}


def test_an_observation_crosses_the_wire_and_validates_on_the_other_side() -> None:
    obs = Observation("pick up the bowl", IMAGES, np.arange(3, dtype=np.float32))
    msg = roundtrip("infer", {"observation": obs.to_payload()})
    check_request(msg)
    back = Observation.from_payload(msg.payload["observation"], KEYS, state_dim=3)
    assert back.instruction == obs.instruction and set(back.images) == set(KEYS)
    for k in KEYS:
        np.testing.assert_array_equal(back.images[k], IMAGES[k])
    assert back.state.dtype == np.float32
    np.testing.assert_array_equal(back.state, [0, 1, 2])


def test_an_observation_payload_carries_each_value_once() -> None:
    obs = Observation("go", IMAGES, np.zeros(3, np.float32))
    payload = obs.to_payload()
    assert set(payload) == {"instruction", "images", "state"}
    assert payload["images"] == IMAGES and all(payload["images"][k] is IMAGES[k] for k in KEYS)  # no copies
    frames = encode("infer", {"observation": payload})
    assert len(frames) == 1 + len(IMAGES) + 1  # the header, then one frame per array: nothing sent twice
    assert "state" not in Observation("go", IMAGES).to_payload()  # no state, no key (not a None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"instruction": None}, "instruction must be a non-empty string"),
        ({"instruction": "  "}, "instruction must be a non-empty string"),
        ({"instruction": "x" * 2001}, "2001 characters; at most 2000"),
        ({"images": [IMAGES["agentview"]]}, "images must be a map"),
        ({"images": {"agentview": IMAGES["agentview"]}}, r"missing \['wrist'\]"),
        (
            {"images": {**IMAGES, "wrist": IMAGES["wrist"].astype(np.float32)}},
            r"wrist must be uint8\[4, 4, 3\]",
        ),
        ({"images": {**IMAGES, "wrist": IMAGES["agentview"]}}, r"got uint8\[8, 8, 3\]"),
        ({"images": {**IMAGES, "wrist": "pixels"}}, "got str"),
        ({"state": None}, r"state must be a float array of shape \[3\], got NoneType"),
        ({"state": np.zeros(4)}, r"shape \[3\], got \[4\]"),
        ({"state": np.zeros((1, 3))}, r"got \[1, 3\]"),
        ({"state": np.array([True, False, True])}, "state must be numeric, got bool"),
        ({"state": np.array([0.0, np.nan, 1.0])}, r"state\[1\] is nan: NaN or inf"),
        ({"state": np.array([0.0, 1e39, 1.0])}, "beyond float32"),  # finite in float64, inf in float32
    ],
)
def test_observation_rules_name_the_key_and_what_was_wrong(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Observation.from_payload(observation_payload(**changes), KEYS, state_dim=3)


def test_observation_takes_only_what_the_policy_takes() -> None:
    payload = observation_payload(images={**IMAGES, "extra": np.zeros((2, 2, 3), np.uint8)})
    obs = Observation.from_payload(payload, KEYS, state_dim=None)
    assert obs.state is None and set(obs.images) == set(KEYS)
    near_max = Observation.from_payload(observation_payload(state=np.array([1e38, -1e38, 0])), KEYS, 3)
    assert near_max.state.dtype == np.float32 and np.all(np.isfinite(near_max.state))
