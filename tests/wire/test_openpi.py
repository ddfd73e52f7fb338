"""openpi's websocket protocol in front of a `Server`: the strict codec, the key maps, and the server over
real loopback websockets driven by the `websockets` client directly (openpi-client itself, which pins
numpy<2, drives a served demo VLA in tests/app/test_openpi_door.py). The node behind the server is a
stand-in handler whose actions are computed from what it received, so each reply shows the mapping."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from vla_steer.wire import Code, InferResult, InsecureBindError, ProtocolError, Reply, Server, ServerInfo
from vla_steer.wire.openpi import STEER_KEY, KeyMap, KeyMapError, OpenpiServer, pack, resize_with_pad, unpack

SHAPES = {"agentview": (32, 32, 3), "wrist_cam": (16, 16, 3)}
TOKEN = "0123456789abcdef-token"


class StandIn:
    """A node's handlers; actions[0] = the state's first 7 values, actions[1, :2] = each camera's mean
    pixel, actions[1, 2] = the instruction's length, actions[1, 3] = the "gain" knob (the request's `steer`
    setting's, else the live one)."""

    def __init__(self) -> None:
        self.gain = 0.0
        self.resets: list[str | None] = []

    def hello(self, req):
        return ServerInfo(
            "stand-in", 7, 2, 10.0, SHAPES, ("gain",), {"state_dim": 8, "action_space": "ee_delta"}
        )

    def infer(self, req):
        obs = req.payload["observation"]
        actions = np.zeros((2, 7), np.float32)
        actions[0] = obs["state"][:7]
        actions[1, 0] = obs["images"]["agentview"].mean()
        actions[1, 1] = obs["images"]["wrist_cam"].mean()
        actions[1, 2] = len(obs["instruction"])
        gain = self.gain if "steer" not in req.payload else req.payload["steer"].get("gain", 0.0)
        actions[1, 3] = gain  # the request's own setting when it carries one, as a PolicyNode's
        return Reply(InferResult(actions, info={"steering": {"gain": {"strength": gain}}}))

    def reset(self, req):
        self.resets.append(req.payload.get("episode"))
        return {}


def libero_obs(**over) -> dict:
    obs = {
        "observation/image": np.full((224, 224, 3), 100, np.uint8),
        "observation/wrist_image": np.full((224, 224, 3), 200, np.uint8),
        "observation/state": np.arange(8, dtype=np.float64),
        "prompt": "put the bowl on the plate",
    }
    return {**obs, **over}


@contextlib.contextmanager
def door(**kw) -> Iterator[tuple[OpenpiServer, StandIn]]:
    node = StandIn()
    with Server(node, "tcp://127.0.0.1:*") as server, OpenpiServer(server, port=0, **kw) as d:
        yield d, node


def client(d: OpenpiServer, **kw):
    return connect(d.url, compression=None, max_size=None, open_timeout=10, close_timeout=2, **kw)


def ask(ws, obs) -> dict | str:
    ws.send(pack(obs))
    reply = ws.recv(timeout=30)
    return reply if isinstance(reply, str) else unpack(reply, 1 << 24)


# -------------------------------------------------------------------------------------------------- codec


def test_codec_round_trips_what_openpi_sends() -> None:
    obs = libero_obs(scalar=np.float32(1.5), flag=np.bool_(True), nested={"a": [np.arange(3, dtype=">i4")]})
    back = unpack(pack(obs), 1 << 24)
    for k in ("observation/image", "observation/wrist_image", "observation/state"):
        np.testing.assert_array_equal(back[k], obs[k])
        assert back[k].dtype == obs[k].dtype and not back[k].flags.writeable
    assert back["prompt"] == obs["prompt"] and back["scalar"] == 1.5 and back["flag"] is True
    np.testing.assert_array_equal(back["nested"]["a"][0], [0, 1, 2])


def _nested(depth: int) -> list:
    return [] if depth == 0 else [_nested(depth - 1)]


def _ndarray(dtype: str, shape: list, data: bytes) -> bytes:
    return msgpack.packb({"x": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}})


@pytest.mark.parametrize(
    "message, code",
    [
        (_ndarray("|O", [1], b"\0" * 8), Code.BAD_DTYPE),  # object arrays: what would need pickle
        (_ndarray("|V8", [1], b"\0" * 8), Code.BAD_DTYPE),
        (_ndarray("[('a', '<f4')]", [1], b"\0" * 4), Code.BAD_DTYPE),
        (_ndarray("<f4", [3], b"\0" * 8), Code.BUFFER_SIZE),
        (_ndarray("<f4", [-1], b""), Code.BAD_SHAPE),
        (_ndarray("<f4", "3", b"\0" * 12), Code.BAD_SHAPE),
        (msgpack.packb({"x": {b"__ndarray__": True, b"data": b""}}), Code.BAD_PAYLOAD),
        (msgpack.packb({"x": msgpack.ExtType(1, b"pickle?")}), Code.MALFORMED),
        (b"\x93\x01", Code.MALFORMED),  # a truncated list
        (msgpack.packb([[]] * 5000), Code.TOO_LARGE),
        (msgpack.packb({"nested": [_nested(20)] * 4000}), Code.TOO_LARGE),  # 80,000 lists in 80 kB
    ],
)
def test_codec_refuses_what_is_not_numeric_data(message: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as e:
        unpack(message, 1 << 20)
    assert e.value.code == code


def test_codec_refuses_an_oversize_message_before_parsing() -> None:
    with pytest.raises(ProtocolError) as e:
        unpack(b"\0" * 101, 100)
    assert e.value.code == Code.TOO_LARGE


# --------------------------------------------------------------------------------------------- key maps


def test_libero_preset_assigns_cameras_by_name_and_resizes_with_pad() -> None:
    keys = KeyMap.preset("libero", list(SHAPES))
    assert keys.images == {"agentview": "observation/image", "wrist_cam": "observation/wrist_image"}
    obs = keys.observation(libero_obs(), SHAPES, 8)
    assert obs.images["agentview"].shape == (32, 32, 3) and obs.images["agentview"].dtype == np.uint8
    assert (obs.images["agentview"] == 100).all() and (obs.images["wrist_cam"] == 200).all()
    assert obs.state.dtype == np.float32 and obs.instruction == "put the bowl on the plate"
    # a wide image keeps its aspect ratio: black bars above and below
    wide = resize_with_pad(np.full((10, 40, 3), 255, np.uint8), 16, 16)
    assert wide.shape == (16, 16, 3) and (wide[0] == 0).all() and (wide[8] == 255).all()


def test_droid_preset_concatenates_joint_and_gripper_positions() -> None:
    keys = KeyMap.preset("droid", list(SHAPES))
    obs = {
        "observation/exterior_image_1_left": np.zeros((180, 320, 3), np.uint8),
        "observation/wrist_image_left": np.zeros((3, 16, 16), np.uint8),  # CHW is accepted
        "observation/joint_position": np.arange(7, dtype=np.float64),
        "observation/gripper_position": np.array([0.5]),
        "prompt": "open the drawer",
    }
    o = keys.observation(obs, SHAPES, 8)
    np.testing.assert_array_equal(o.state, [0, 1, 2, 3, 4, 5, 6, 0.5])
    assert o.images["wrist_cam"].shape == (16, 16, 3)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"observation/image": None}, "'observation/image' is missing"),
        ({"observation/image": np.zeros((8, 8), np.uint8)}, "'observation/image' must be an RGB image"),
        ({"observation/image": np.zeros((8, 8, 3), np.int32)}, "must be uint8"),
        ({"observation/image": np.full((8, 8, 3), 2.0)}, "values in [0, 1]"),
        ({"observation/state": np.zeros(7)}, "has 7 values; the policy takes 8"),
        ({"observation/state": np.array([np.nan] * 8)}, "NaN"),
        ({"prompt": 3}, "'prompt' must be the task instruction"),
        ({"prompt": ""}, "instruction must be a non-empty string"),
    ],
)
def test_an_observation_that_does_not_fit_is_refused_naming_the_key(change, words) -> None:
    obs = {k: v for k, v in libero_obs(**change).items() if v is not None}
    with pytest.raises(KeyMapError, match=None) as e:
        KeyMap.preset("libero", list(SHAPES)).observation(obs, SHAPES, 8)
    assert words in str(e.value)


def test_key_maps_that_cannot_work_are_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        KeyMap.preset("libero", ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"])
    with pytest.raises(ValueError, match="presets are"):
        KeyMap.preset("aloha", ["a"])
    with pytest.raises(ValueError, match="unknown keys"):
        KeyMap.from_dict({"images": {"a": "b"}, "camera": 1})
    with pytest.raises(ValueError, match="'images' must map"):
        KeyMap.from_dict({"images": ["a"]})
    custom = KeyMap.from_dict({"images": {"agentview": "cam/top"}, "state": "s", "prompt": "task"})
    with pytest.raises(ValueError, match="the policy takes"):
        custom.check(list(SHAPES))


# ------------------------------------------------------------------------------------------ the server


def test_metadata_on_connect_then_actions_computed_from_the_mapped_observation() -> None:
    with door() as (d, node), client(d) as ws:
        meta = unpack(ws.recv(timeout=10), 1 << 20)
        assert meta["policy"] == "stand-in" and meta["action_dim"] == 7 and meta["chunk_length"] == 2
        assert meta["keys"]["images"] == {
            "observation/image": "agentview",
            "observation/wrist_image": "wrist_cam",
        }
        reply = ask(ws, libero_obs())
        assert reply["actions"].shape == (2, 7) and reply["actions"].dtype == np.float32
        np.testing.assert_array_equal(reply["actions"][0], np.arange(7))
        assert reply["actions"][1, :3].tolist() == [100, 200, len("put the bowl on the plate")]
        assert reply["server_timing"]["infer_ms"] >= 0 and reply["steering"] == {"gain": {"strength": 0.0}}
        node.gain = 3.0  # a knob turned between two requests: the next reply follows it
        assert ask(ws, libero_obs())["actions"][1, 3] == 3.0
        ws.send(
            pack({"__ctrl__": "episode_start", "__experiment__": "e", "__task__": "t", "__episode_id__": 4})
        )
        assert unpack(ws.recv(timeout=10), 100) == {"__ack__": "episode_start"} and node.resets == ["e/t/4"]


def test_bad_requests_get_text_errors_and_the_connection_keeps_serving() -> None:
    with door() as (d, _), client(d) as ws:
        ws.recv(timeout=10)
        ws.send("not binary")
        assert "binary" in ws.recv(timeout=10)
        ws.send(b"\xc1garbage")
        assert ws.recv(timeout=10).startswith("vla-steer: [malformed]")
        ws.send(_ndarray("|O", [1], b"\0" * 8))
        assert "[bad_dtype]" in ws.recv(timeout=10)
        bad = ask(ws, libero_obs(**{"observation/state": np.zeros(3)}))
        assert isinstance(bad, str) and "[bad_payload]" in bad and "the policy takes 8" in bad
        assert "observation/state" in bad  # the keys expected are listed
        inf = ask(ws, libero_obs(**{"observation/state": np.array([np.inf] * 8)}))
        assert isinstance(inf, str) and "NaN or inf" in inf
        assert ask(ws, libero_obs())["actions"].shape == (2, 7)  # still serving, same connection


def test_an_observation_may_carry_its_own_steering_setting_checked_like_the_sockets() -> None:
    with door() as (d, node), client(d) as ws:
        ws.recv(timeout=10)
        node.gain = 3.0
        reply = ask(ws, libero_obs(**{STEER_KEY: {"gain": np.float32(5.0)}}))
        assert reply["actions"][1, 3] == 5.0 and reply["steering"] == {"gain": {"strength": 5.0}}
        assert ask(ws, libero_obs(**{STEER_KEY: {}}))["actions"][1, 3] == 0.0  # {}: unsteered
        assert ask(ws, libero_obs())["actions"][1, 3] == 3.0  # none: the live knobs, untouched
        for steer, words in (
            ([5.0], "must be a map of knob name -> strength"),
            ({b"gain": 5.0}, "must be a map of knob name -> strength"),
            ({"gain": float("nan")}, "'gain' must be a finite number, got nan"),
            ({"gain": "high"}, "'gain' must be a finite number, got 'high'"),
        ):
            bad = ask(ws, libero_obs(**{STEER_KEY: steer}))
            assert isinstance(bad, str) and "[bad_payload]" in bad and words in bad, bad
            assert STEER_KEY in bad
        assert ask(ws, libero_obs())["actions"][1, 3] == 3.0  # still serving, same connection


def test_an_oversize_message_closes_that_connection_with_1009_and_the_server_keeps_serving() -> None:
    with door(max_message_bytes=200_000) as (d, _):
        with client(d) as ws:
            ws.recv(timeout=10)
            ws.send(pack(libero_obs()))  # two 224x224 images: 300 kB
            with pytest.raises(ConnectionClosedError) as e:
                ws.recv(timeout=10)
            assert e.value.rcvd.code == 1009  # message too big
        with client(d) as ws:
            ws.recv(timeout=10)
            small = {"observation/image": np.zeros((32, 32, 3), np.uint8)}
            small["observation/wrist_image"] = np.zeros((16, 16, 3), np.uint8)
            assert ask(ws, libero_obs(**small))["actions"].shape == (2, 7)


def test_browsers_foreign_hosts_and_missing_tokens_are_refused_at_the_handshake() -> None:
    with door(token=TOKEN, allowed_origins=["http://localhost:8765"]) as (d, _):
        for headers, status in [
            ({"Origin": "http://evil.example"}, 403),
            ({"Origin": "null", "Authorization": f"Api-Key {TOKEN}"}, 403),
            ({"Host": "localhost", "Authorization": f"Api-Key {TOKEN}"}, 400),  # two Host headers
            ({}, 401),
            ({"Authorization": "Api-Key wrong-token-of-some-length"}, 401),
        ]:
            with pytest.raises(InvalidStatus) as e, client(d, additional_headers=headers):
                pass
            assert e.value.response.status_code == status, headers
        # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 (Host says so)
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
            headers = {"Authorization": f"Api-Key {TOKEN}"}
            with pytest.raises(InvalidStatus) as e:
                connect(f"ws://evil.example:{d.port}", sock=sock, additional_headers=headers, open_timeout=10)
            assert e.value.response.status_code == 403
        for headers in ({"Authorization": f"Api-Key {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}",
                                                                   "Origin": "http://localhost:8765"}):  # fmt: skip
            with client(d, additional_headers=headers) as ws:
                assert unpack(ws.recv(timeout=10), 1 << 20)["policy"] == "stand-in"


def test_a_non_loopback_bind_needs_both_the_flag_and_a_token() -> None:
    with Server(StandIn(), "tcp://127.0.0.1:*") as server:
        with pytest.raises(InsecureBindError, match="allow_remote"):
            OpenpiServer(server, "0.0.0.0", 0)
        with pytest.raises(InsecureBindError):
            OpenpiServer(server, "0.0.0.0", 0, allow_remote=True)
        with pytest.raises(InsecureBindError):
            OpenpiServer(server, "0.0.0.0", 0, token=TOKEN)
        with pytest.raises(ValueError, match="16 characters"):
            OpenpiServer(server, port=0, token="short")
        with OpenpiServer(server, "0.0.0.0", 0, allow_remote=True, token=TOKEN) as d:
            assert d.port > 0


def test_submit_answers_like_the_socket_and_after_close() -> None:
    server = Server(StandIn(), "tcp://127.0.0.1:*").start()
    try:
        bad = server.submit("infer", {"observation": {}, "extra": 1}).result(10)
        assert bad.kind == "error" and bad.payload["code"] == Code.BAD_PAYLOAD
        assert server.submit("knobs", {"op": "list"}).result(10).payload["code"] == Code.UNSUPPORTED
        assert server.submit("hello", {}).result(10).payload["policy"] == "stand-in"
    finally:
        server.close()
    assert server.submit("hello", {}).result(10).kind == "error"
