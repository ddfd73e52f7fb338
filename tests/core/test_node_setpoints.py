"""Behaviour setpoints through the installed `vla-steer serve` and `vla-steer knobs`, over real sockets: a
target makes the node's controller set the speed axis's knobs (fast/slow) from the end-effector positions each
client sends, per client episode, and letting go hands the knobs back."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from support import VLA_STEER, free_address, serve_process

from vla_steer.wire import Client, RemoteError

RNG = np.random.default_rng(3)
LIMIT, RATE = 6.0, 2.0  # the controller `vla-steer serve --setpoint-controller` is given
OBS = {
    "instruction": "pick up the red block",
    "images": {"agentview": RNG.integers(0, 256, (32, 32, 3), np.uint8)},
}


def knobs(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VLA_STEER, "knobs", *args, "--server", address, "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def node_address(checkpoint):
    address = free_address()
    proc = serve_process(
        checkpoint, address, extra=("--setpoint-controller", f"kp=5,ki=5,limit={LIMIT},rate={RATE}")
    )
    try:
        yield address
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def moving(client: Client, speed: float, steps: int, **kwargs) -> list[dict]:
    """`steps` inferences while the end effector moves along x at `speed` m/s; each reply's info."""
    hello = client.hello()
    dt = hello.chunk_length / hello.control_hz
    return [client.infer(OBS, ee_pos=[speed * dt * k, 0.0, 0.2], **kwargs).info for k in range(steps)]


def enabled(info: dict) -> dict[str, float]:
    return {n: s["strength"] for n, s in info["steering"].items() if s["enabled"]}


def test_a_live_speed_target_steers_each_episode_toward_it_and_letting_go_hands_the_knobs_back(node_address):
    r = knobs(node_address, "target", "speed=0.10")
    assert r.returncode == 0 and "setpoints: speed=0.1" in r.stdout, r.stderr
    with Client(node_address, timeout=30) as slow_arm, Client(node_address, timeout=30) as fast_arm:
        assert slow_arm.hello().info["axes"]["speed"] == {"unit": "m/s", "raises": "fast", "lowers": "slow"}
        slow_arm.set_knobs({"up": 5.0})  # a live knob off the axis: kept under the setpoint
        slow_arm.reset()
        fast_arm.reset()
        too_slow = moving(slow_arm, 0.05, 6)
        too_fast = moving(fast_arm, 0.20, 6)

        # The first observation measures nothing (one position is no speed): the controller holds at 0.
        assert too_slow[0]["speed_measured"] is None and too_slow[0]["speed_strength"] == 0.0
        assert enabled(too_slow[0]) == {"up": 5.0}
        # Then each episode's own controller pushes its way, harder while the error lasts.
        strengths = [i["speed_strength"] for i in too_slow[1:]]
        assert all(i["speed_target"] == 0.10 for i in too_slow)
        assert np.allclose([i["speed_measured"] for i in too_slow[1:]], 0.05)
        assert all(s > 0 for s in strengths) and strengths == sorted(strengths)
        assert max(strengths) == LIMIT and max(np.diff([0.0, *strengths])) <= RATE  # the controller asked for
        assert enabled(too_slow[-1]) == {"up": 5.0, "fast": strengths[-1]}
        assert all(i["speed_strength"] < 0 for i in too_fast[1:])
        assert enabled(too_fast[-1]) == {"up": 5.0, "slow": -too_fast[-1]["speed_strength"]}

        # A reset starts the episode's controller afresh.
        slow_arm.reset()
        assert moving(slow_arm, 0.05, 1)[0]["speed_strength"] == 0.0

        r = knobs(node_address, "untarget", "speed")
        assert r.returncode == 0 and "setpoints: none" in r.stdout, r.stderr
        after = moving(slow_arm, 0.05, 2)
        assert all("speed_strength" not in i for i in after)
        assert enabled(after[-1]) == {"up": 5.0}  # the live knobs, never touched by the controller
        assert slow_arm.get_knobs()["fast"]["enabled"] is False


def test_a_request_target_and_a_measured_value_need_no_live_target(node_address):
    with Client(node_address, timeout=30) as c:
        c.reset()
        infos = [c.infer(OBS, setpoints={"speed": 0.10}, measured={"speed": 0.05}).info for _ in range(3)]
        assert [i["speed_measured"] for i in infos] == [0.05] * 3
        assert 0 < infos[0]["speed_strength"] < infos[-1]["speed_strength"]
        # A request's own steer is the rest of its setting; the live knobs stay off.
        info = c.infer(OBS, steer={"down": 4.0}, setpoints={"speed": 0.10}, measured={"speed": 0.2}).info
        assert set(enabled(info)) == {"down", "fast"}  # the controller's integral still leans fast
        # Positions 1 cm apart, measured 0.2 s apart: 0.05 m/s, whatever the policy's own step.
        c.reset()
        timed = [
            c.infer(OBS, setpoints={"speed": 0.1}, ee_pos=[0.01 * k, 0, 0], ee_time=0.2 * k).info
            for k in range(3)
        ]
        assert timed[0]["speed_measured"] is None and np.allclose(
            [i["speed_measured"] for i in timed[1:]], 0.05
        )
        assert c.set_targets({"speed": 0.3}) == {"speed": 0.3}
        assert c.clear_targets(["speed"]) == {}
        assert not enabled(c.infer(OBS).info)


def test_bad_setpoints_are_refused_naming_what_was_wrong(node_address):
    with Client(node_address, timeout=30) as c:
        with pytest.raises(RemoteError, match="reset before inferring under a target"):
            c.infer(OBS, setpoints={"speed": 0.1})
        c.reset()
        for setpoints, wanted in (
            ({"wobble": 0.1}, r"unknown axis 'wobble' \(known: speed, height\)"),
            ({"speed": 0.0}, "speed target must be > 0 m/s"),
            ({"speed": float("nan")}, "'setpoints'"),
            ({"speed": 1e39}, r"the speed value must be within 0..100 m/s, got 1e\+39"),
        ):
            with pytest.raises(RemoteError, match=wanted):
                c.infer(OBS, setpoints=setpoints)
        for far in (float("inf"), 1e39):
            with pytest.raises(RemoteError, match=r"ee_pos.*each within \+-1000"):
                c.infer(OBS, setpoints={"speed": 0.1}, ee_pos=[0.0, far, 0.0])
        with pytest.raises(
            RemoteError, match="measured: the speed value must be within 0..100 m/s, got -0.1"
        ):
            c.infer(OBS, setpoints={"speed": 0.1}, measured={"speed": -0.1})
        c.infer(OBS, setpoints={"speed": 0.1}, ee_pos=[0, 0, 0], ee_time=5.0)
        with pytest.raises(RemoteError, match=r"ee_time must increase within an episode: 4.0 after 5.0"):
            c.infer(OBS, setpoints={"speed": 0.1}, ee_pos=[0, 0, 0], ee_time=4.0)
        with pytest.raises(RemoteError, match="unknown axis 'tilt'"):
            c.set_targets({"tilt": 1.0})
        assert c.set_targets({"height": 0.1}) == {"height": 0.1}
        c.knobs_off()  # every knob and setpoint
        assert c.clear_targets(["height"]) == {}
    for args, wanted in (
        (["target", "speed=fast"], "targets look like speed=0.10"),
        (["target", "speed=0.1", "speed=0.2"], "'speed' is given twice"),
        (["target"], "needs AXIS=VALUE"),
        (["target", "speed=-1"], "speed target must be > 0"),
    ):
        r = knobs(node_address, *args)
        assert r.returncode != 0 and wanted in r.stderr, (args, r.stderr)


@pytest.mark.parametrize(
    ("option", "wanted"),
    [
        ("kp=5,gain=2", "unknown setting 'gain' (known: kp, ki, limit, rate)"),
        ("limit=0", "limit and rate must be > 0"),
        ("ki=-1", "ki must be finite and >= 0"),
        ("kp=fast", "--setpoint-controller takes kp=5,ki=5,limit=24,rate=4"),
    ],
)
def test_serve_refuses_a_bad_setpoint_controller_before_loading_anything(option, wanted, tmp_path):
    r = subprocess.run(
        [
            VLA_STEER,
            "serve",
            "--policy",
            str(tmp_path / "no_checkpoint_here"),
            "--setpoint-controller",
            option,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and wanted in r.stderr, r.stderr
    assert "no_checkpoint_here" not in r.stderr  # refused before the policy was looked for
