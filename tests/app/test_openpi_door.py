"""`vla-steer serve --openpi-port`: openpi's clients drive a served, steered demo VLA, as users run it.

The fast test speaks openpi's protocol with the `websockets` client directly; the slow ones run the real
`openpi-client` package (which pins numpy<2, so it lives in a side environment: the transport benchmark's
helper finds or builds it) through an openpi LIBERO-style client loop (tests/app/openpi_libero_client.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import VLA_STEER, free_address, side_python

from vla_steer.app.cli import build_parser
from vla_steer.app.cli.openpi_door import openpi_settings
from vla_steer.wire.openpi import STEER_KEY, pack, unpack

HERE = Path(__file__).resolve().parent
CLIENT_LOOP = HERE / "openpi_libero_client.py"


@pytest.fixture(scope="module")
def demo_directions(tmp_path_factory, poles) -> Path:
    """Directions discovered on the bundled demo VLA (what `make demo` does first, here in a second)."""
    from policies import load_policy
    from vla_steer.core.discovery import discover

    out = tmp_path_factory.mktemp("demo_directions")
    policy = load_policy("demo_vla")
    for d in discover(policy.backbone, poles, size=16, progress=False, device="cpu").values():
        d.save(out)
    return out


@contextlib.contextmanager
def serve_openpi(directions: Path, *extra: str) -> Iterator[tuple[str, int]]:
    """`vla-steer serve --policy demo_vla --openpi-port 0`: (ZeroMQ address, openpi port) once both serve.
    Steered at every position (`--positions all`): knobs at 12 then change the actions of any observation,
    where the demo VLA's default (its plan) needs a strength that flips a plan word on these random frames."""
    address = free_address()
    cmd = [VLA_STEER, "serve", "--policy", "demo_vla", "--directions", str(directions), "--bind", address]
    cmd += ["--positions", "all"]
    proc = subprocess.Popen(
        [*cmd, "--openpi-port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = next((ln.split()[3] for ln in lines if ln.startswith("openpi websocket on")), None)
        assert url and any(f"serving demo-vla on {address}" in ln for ln in lines), (
            proc.stderr.read() if proc.poll() is not None else lines
        )
        yield address, int(url.rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read()


def knobs(address: str, *args: str) -> None:
    r = subprocess.run([VLA_STEER, "knobs", *args, "--server", address, "--timeout", "30"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr


def libero_observation(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": np.array([-0.02, 0.0, 0.91 + 0.01 * step, 3.13, 0.0, 0.2, 0.033, -0.033]),
        "prompt": "lift the red cube",
    }


def test_openpi_protocol_drives_the_served_demo_vla_and_follows_its_knobs(demo_directions):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with serve_openpi(demo_directions) as (address, port):
        url = f"ws://127.0.0.1:{port}"
        with connect(url, compression=None, max_size=None, open_timeout=30) as ws:
            meta = unpack(ws.recv(timeout=30), 1 << 20)
            assert meta["policy"] == "demo-vla" and meta["action_dim"] == 7 and "fast" in meta["concepts"]
            assert meta["keys"] == {"prompt": "prompt", "images": {"observation/wrist_image": "wrist"},
                                    "state": ["observation/state"]}  # fmt: skip

            def actions(**extra) -> np.ndarray:
                out = []
                for step in range(4):
                    ws.send(pack({**libero_observation(step), **extra}))
                    reply = unpack(ws.recv(timeout=60), 1 << 20)
                    assert reply["actions"].shape == (1, 7) and reply["actions"].dtype == np.float32
                    out.append(reply["actions"][0])
                return np.stack(out), reply["steering"]

            base, steering = actions()
            assert not any(s["enabled"] for s in steering.values())
            knobs(address, "set", "fast=12", "up=12")
            steered, steering = actions()
            assert steering["fast"]["enabled"] and steering["fast"]["strength"] == 12.0
            assert not np.array_equal(base, steered), "steering did not change the actions"
            knobs(address, "off")
            np.testing.assert_array_equal(actions()[0], base)  # knobs off: the unsteered policy again
            # the observation's own setting: that inference alone, the live knobs (off) untouched
            own, steering = actions(**{STEER_KEY: {"fast": 12.0, "up": 12}})
            np.testing.assert_array_equal(own, steered)
            assert steering["fast"] == {**steering["fast"], "enabled": True, "strength": 12.0}
            np.testing.assert_array_equal(actions()[0], base)
            ws.send(pack({**libero_observation(0), STEER_KEY: {"fastest": 1.0}}))
            assert "unknown knob 'fastest'" in (err := ws.recv(timeout=30)) and STEER_KEY in err, err
            ws.send(pack({**libero_observation(0), "observation/state": np.zeros(2)}))
            assert "the policy takes 8" in ws.recv(timeout=30)
        with pytest.raises(InvalidStatus) as e:
            connect(url, additional_headers={"Origin": "https://example.com"}, open_timeout=30)
        assert e.value.response.status_code == 403


def test_bad_openpi_options_fail_before_loading_weights(tmp_path):
    r = subprocess.run([VLA_STEER, "serve", "--policy", "demo_vla", "--bind", free_address(), "--openpi-port", "0",
                        "--openpi-host", "0.0.0.0"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "--openpi-allow-remote AND --openpi-token-file" in r.stderr
    assert "Loading weights" not in r.stderr

    def settings(*args: str):
        return openpi_settings(build_parser().parse_args(["serve", "--policy", "demo_vla", *args]))

    (tmp_path / "token").write_text("short\n")
    with pytest.raises(ValueError, match=">= 16 characters"):
        settings("--openpi-port", "0", "--openpi-token-file", str(tmp_path / "token"))
    with pytest.raises(FileNotFoundError, match="no_such_token"):
        settings("--openpi-port", "0", "--openpi-token-file", str(tmp_path / "no_such_token"))
    with pytest.raises(ValueError, match="--openpi-token-file needs --openpi-port"):
        settings("--openpi-token-file", str(tmp_path / "token"))
    with pytest.raises(FileNotFoundError, match=r"neither a preset \['droid', 'libero'\] nor a file"):
        settings("--openpi-port", "0", "--openpi-keys", "aloha")
    (tmp_path / "keys.yaml").write_text("images: {agentview: observation/image}\ncamera: 1\n")
    with pytest.raises(ValueError, match="unknown keys \\['camera'\\]"):
        settings("--openpi-port", "0", "--openpi-keys", str(tmp_path / "keys.yaml"))
    with pytest.raises(ValueError, match="0..65535"):
        settings("--openpi-port", "70000")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match=f"--openpi-port {busy.getsockname()[1]} on 127.0.0.1"):
            settings("--openpi-port", str(busy.getsockname()[1]))
    (tmp_path / "token").write_text("a-token-of-sufficient-length\n")
    remote = settings("--openpi-port", "0", "--openpi-host", "0.0.0.0", "--openpi-allow-remote",
                      "--openpi-token-file", str(tmp_path / "token"))  # fmt: skip
    assert remote.token == "a-token-of-sufficient-length" and remote.allow_remote
    assert settings() is None  # no --openpi-port: no door


# ------------------------------------------------------------------------- the real openpi-client package


@pytest.fixture(scope="module")
def openpi_python() -> str:
    """openpi-client pins numpy<2: $VLA_STEER_OPENPI_PYTHON, or the side venv the transport benchmark uses."""
    return side_python("openpi-client", "VLA_STEER_OPENPI_PYTHON")


def run_client(python: str, port: int, *args: str) -> dict:
    r = subprocess.run([python, str(CLIENT_LOOP), str(port), *args], capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_openpi_libero_client_loop_drives_the_steered_node(demo_directions, openpi_python):
    with serve_openpi(demo_directions) as (address, port):
        base = run_client(openpi_python, port, "loop", "6")
        assert base["metadata"]["policy"] == "demo-vla" and len(base["actions"]) == 6
        knobs(address, "set", "fast=12", "up=12")
        steered = run_client(openpi_python, port, "loop", "6")
        assert steered["actions"] != base["actions"], "steering did not change the openpi client's actions"
        knobs(address, "off")
        assert run_client(openpi_python, port, "loop", "6")["actions"] == base["actions"]
        # the same setting carried by openpi-client's own observations, the live knobs left off
        own = run_client(openpi_python, port, "loop", "6", json.dumps({"fast": 12, "up": 12}))
        assert own["actions"] == steered["actions"] and own["steering"]["fast"]["enabled"]
        assert run_client(openpi_python, port, "loop", "6")["actions"] == base["actions"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_openpi_client_gets_errors_for_bad_and_oversize_requests_and_serving_goes_on(
    demo_directions, openpi_python
):
    with serve_openpi(demo_directions) as (_, port):
        out = run_client(openpi_python, port, "errors")
    assert "Error in inference server" in out["wrong_state"] and "the policy takes 8" in out["wrong_state"]
    assert out["after_wrong_state"] == [1, 7] and out["new_connection"] == [1, 7]
    assert "1009" in out["oversize"], out["oversize"]
