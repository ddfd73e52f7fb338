"""Per-kind payload schemas and values (vla_steer.wire.messages), and the one Observation schema. No sockets."""

from __future__ import annotations

import numpy as np
import pytest
from wire_support import roundtrip

from vla_steer.wire.codec import Code, Message, ProtocolError
from vla_steer.wire.messages import (
    InferResult,
    KnobsRequest,
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
