"""The robot node: a client of the policy node that drives a UR arm through its servo process.

    main process (network side)                            servo process (real time)
    inference thread: observation -> Client.infer ->       reads chunk + commands without blocking,
        waypoints -> shared memory, episode recording      safety filter, servoL/servoJ at 500/125 Hz
    liveness thread: the Client's heartbeats -> policy_alive_t --> stops the arm when the stamp is too old
    control socket (wire Server): stop / resume / status / event --> command ring

One writer per episode: this node steps the world, so it records. An episode runs from the moment the
arm follows the policy (start or resume) until it stops (operator, lost policy, fault, shutdown); every
step carries the chunk, the executed action, the tool pose and velocity and the steering state the policy
applied, and knob changes arrive as timestamped events (the knobs UI reports them on the control socket;
changes seen in the replies are logged too).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robot.actions import chunk_to_waypoints
from robot.cameras import CameraStale, build_camera
from robot.config import RobotConfig
from robot.control import DEFAULT_CONTROL, REFUSED, check_operator_token, control_server, new_operator_token
from robot.geometry import mat_to_quat, quat_to_axisangle, rotvec_to_mat
from robot.servo_process import ServoProcess
from robot.shared import Mode, Status
from vla_steer.core.rollouts import EpisodeRecorder, Event, Recorder
from vla_steer.wire import Client, Code, Keypair, ProtocolError, RemoteError, RequestTimeout, ServerInfo
from vla_steer.wire.messages import Observation, Step

log = logging.getLogger(__name__)
CAMERA_BUILD_TIMEOUT = 120.0  # s: building the MuJoCo twin's lift scene for its cameras takes seconds


@dataclass
class NodeStats:
    inferences: int = 0
    errors: int = 0
    last_error: str | None = None


def policy_state(kind: str, st: Status) -> np.ndarray:
    """The state vector `observation.state` names (robot/config.py), from the servo loop's status."""
    if kind == "joints_gripper":
        return np.concatenate([st.q, [st.gripper]])
    if kind == "robosuite_eef_pos_axisangle_fingers":  # sim/robosuite_env.py's, from the twin's readings
        g = st.gripper_joints
        if g.size < 2 or not np.all(np.isfinite(st.eef_quat)):
            raise ValueError(f"state {kind!r} needs the MuJoCo twin's lift scene (no finger joints here)")
        fingers = g if g.size == 2 else g[[0, g.size // 2]]
        return np.concatenate([st.tcp_pose[:3], quat_to_axisangle(st.eef_quat), fingers])
    return np.concatenate([st.tcp_pose, [st.gripper, -st.gripper]])


class RobotNode:
    """Build, `start()`, then `wait()` or use as a context manager; `close()` stops everything."""

    def __init__(
        self,
        config: RobotConfig,
        backend: str,
        *,
        server: str,
        host: str | None = None,
        control: str = DEFAULT_CONTROL,
        out: str | Path | None = None,
        prompt: str | None = None,
        backend_options: dict | None = None,
        autostart: bool = True,
        infer_timeout: float = 2.0,
        rt_priority: int = 0,
        trace_path: str | Path | None = None,
        trace_ticks: int = 0,
        allow_insecure_control: bool = False,
        server_key: bytes | str | Path | Keypair | None = None,
        keypair: Keypair | str | Path | None = None,
        operator_token: str | None = None,
    ):
        if backend != "mujoco" and config.scene != "static":
            raise ValueError(
                f"robot config {config.name}: scene {config.scene!r} is the MuJoCo twin's; the {backend} "
                "backend drives a real arm"
            )
        self.config = config
        # Resume over the control socket needs it (robot.control); generated per launch unless given.
        self.operator_token = operator_token or new_operator_token()
        self.backend = backend
        self.server = server
        self.server_key, self.keypair = server_key, keypair
        self.prompt = prompt or config.observation.prompt
        self.autostart = autostart
        self.infer_timeout = infer_timeout
        self.stats = NodeStats()
        self._stop = threading.Event()
        self.recorder: EpisodeRecorder | None = None  # the policy's name joins the metadata once known
        if out is not None:
            meta = {
                "task": self.prompt,
                "robot": config.name,
                "backend": backend,
                "action_convention": config.action.model_dump(),
                "controller_hz": config.controller_hz,
                "source": "robot",
            }
            self.recorder = EpisodeRecorder(Recorder(out), meta)
        self.servo = ServoProcess(
            backend,
            config,
            host,
            backend_options=backend_options,
            autostart=False,
            rt_priority=rt_priority,
            trace_path=trace_path,
            trace_ticks=trace_ticks,
        )
        self.shared = self.servo.shared
        self.client: Client | None = None
        self.info: ServerInfo | None = None
        self.control = control_server(self._control, control, allow_insecure=allow_insecure_control)
        self.control_address = self.control.address
        self._thread = threading.Thread(target=self._run, name="robot-inference", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="robot-episodes", daemon=True)
        self._liveness = threading.Thread(target=self._watch_policy, name="robot-liveness", daemon=True)
        self.cameras: dict[str, Any] = {}
        self.camera_hold = False  # a camera is stale: the arm holds, no chunk is sent
        self._cameras_built = threading.Event()  # set once built (or failed: the arm then holds)
        self._closed = False

    # -- lifecycle

    def start(self, hello_timeout: float = 30.0) -> RobotNode:
        """Start the servo process, reach the policy node, serve control. Closes everything if it fails."""
        try:
            self._start(hello_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _start(self, hello_timeout: float) -> None:
        self.servo.start()
        faults = self.config.faults
        self.client = Client(
            self.server,
            timeout=self.infer_timeout,
            retries=0,
            heartbeat_interval=faults.heartbeat_interval,
            liveness=faults.policy_liveness,
            server_key=self.server_key,
            keypair=self.keypair,
        )
        self._liveness.start()
        self.info = self.client.hello(timeout=hello_timeout)
        self._check_state(self.info)
        missing = sorted(set(self.info.image_keys) - set(self.config.observation.cameras))
        if missing and self.backend == "rtde":  # a real cell: black frames would steer it blind
            raise ValueError(
                f"the policy {self.info.policy} takes images {missing} that observation.cameras does not "
                "configure: add a camera for each (source: opencv | realsense)"
            )
        self.control.start()
        # The cameras first (the lift scene's model takes seconds to build, holding the interpreter): the
        # arm starts only once observations can flow, so the build cannot age the liveness stamps past the
        # servo loop's bound while the arm is already following.
        self._thread.start()
        if not self._cameras_built.wait(CAMERA_BUILD_TIMEOUT):
            raise RuntimeError(f"the cameras were not built within {CAMERA_BUILD_TIMEOUT:g} s")
        if self.autostart:
            deadline = time.monotonic() + 5.0  # the servo loop refuses to resume on a stale stamp
            while self.shared.status().policy_alive_age > self.config.faults.policy_liveness:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the policy node at {self.server} answers no heartbeats")
                time.sleep(0.01)
            self.servo.resume()
        self._watcher.start()

    def _check_state(self, info: ServerInfo) -> None:
        """A state the config builds with a fixed layout must be the size the policy takes."""
        kind, state_dim = self.config.observation.state, (info.info or {}).get("state_dim")
        if kind == "robosuite_eef_pos_axisangle_fingers" and state_dim not in (None, 8):
            raise ValueError(
                f"robot config {self.config.name}: observation.state {kind!r} is 8 floats; the policy "
                f"{info.policy} takes a state of {state_dim} (use another robot config, e.g. --config ur5e_mujoco)"
            )

    def wait(self) -> None:
        while not self._stop.is_set() and self.servo.process.is_alive():
            self._stop.wait(0.2)

    def close(self) -> None:
        """Stop everything this node started. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for t in (self._thread, self._watcher, self._liveness):
            if t.is_alive():
                t.join(5.0)
        st = self.shared.status()
        stopped = st.mode not in (Mode.RUNNING, Mode.HOLD) and st.reason.name != "NONE"
        self._end_episode(st.reason.name.lower() if stopped else "shutdown")
        self.servo.close()
        self.control.close()
        if self.client is not None:
            self.client.close()
        for cam in self.cameras.values():
            with contextlib.suppress(Exception):
                cam.close()

    def __enter__(self) -> RobotNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operator

    def status(self) -> Status:
        return self.shared.status()

    def stop(self) -> None:
        self.servo.stop()

    def resume(self) -> None:
        """The operator's resume (in process: the console, or the control socket after its token check)."""
        if self.shared.status().policy_alive_age > self.config.faults.policy_liveness:
            raise RuntimeError("the policy node is not alive: resume refused")
        self.servo.resume()

    def _control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """The control socket's handler (see robot.control); every op answers the status."""
        if op == "stop":
            self.stop()
        elif op == "resume":
            check_operator_token(args.get("token"), self.operator_token)
            try:
                self.resume()
            except RuntimeError as e:
                raise ProtocolError(REFUSED, str(e)) from None
        elif op == "event":
            kind, data = args.get("kind"), args.get("data") or {}
            if not isinstance(kind, str) or not kind or not isinstance(data, dict):
                raise ProtocolError(Code.BAD_PAYLOAD, "an event needs a non-empty 'kind' and a 'data' map")
            t = args.get("t")
            self._event(kind, t=float(t) if isinstance(t, (int, float)) else None, **data)
        return {"status": self.status_dict()}

    def status_dict(self) -> dict:
        d = self.shared.status().to_dict()
        d.update(
            backend=self.backend,
            robot=self.config.name,
            policy=self.info.policy if self.info else None,
            policy_alive=d["policy_alive_age"] <= self.config.faults.policy_liveness,
            servo_alive=self.servo.process.is_alive(),
            inferences=self.stats.inferences,
            errors=self.stats.errors,
            last_error=self.stats.last_error,
            episode=self.recorder.episode_id if self.recorder is not None else None,
            camera_hold=self.camera_hold,
            cameras={k: cam.health() for k, cam in list(self.cameras.items()) if hasattr(cam, "health")},
        )
        return d

    # -- network side

    def _alive(self, t: float) -> None:
        if t > self.shared.policy_alive_t():
            self.shared.policy_alive(t)

    def _watch_policy(self) -> None:
        """Copies the Client's heartbeat liveness into the shared block for the servo process.

        Sampled four times per heartbeat interval: a dropped connection (`alive` False at once) reaches the
        servo loop within a quarter interval; a hung node ages the stamp past `policy_liveness`.
        """
        was_alive = False
        while not self._stop.wait(self.config.faults.heartbeat_interval / 4):
            if self.client.alive:
                self._alive(self.client.last_pong)
                was_alive = True
            elif was_alive:
                self.shared.policy_lost()
                was_alive = False

    def _build_cameras(self, info: ServerInfo) -> None:
        for key, shape in info.image_keys.items():
            cam = self.config.observation.cameras.get(key)
            self.cameras[key] = build_camera(
                key, cam, tuple(shape), self.config.scene, self.config.scene_gripper
            )

    def _observation(self, st: Status) -> dict[str, Any]:
        joints = st.sim_qpos if st.sim_qpos.size else st.q  # a simulated scene renders as a whole
        obs: dict[str, Any] = {
            "instruction": self.prompt,
            "images": {k: cam.read(joints) for k, cam in self.cameras.items()},
        }
        state_dim = self.info.info.get("state_dim") if self.info else None
        if state_dim:
            s = policy_state(self.config.observation.state, st)
            obs["state"] = np.resize(np.nan_to_num(s), state_dim).astype(np.float32)
        return obs

    def _run(self) -> None:
        try:
            self._build_cameras(self.info)  # here: a GL context belongs to the thread that renders
        except Exception as e:  # noqa: BLE001 - no observations means no chunks: the arm holds
            self.stats.last_error = f"cameras: {e}"
            log.error("cannot build the cameras: %s", e)
            return
        finally:
            self._cameras_built.set()
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - keep serving; without new chunks the arm holds
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                log.exception("robot node step failed")
                self._stop.wait(0.1)

    def _step(self) -> None:
        hz = self.config.action.control_hz or (self.info.control_hz if self.info else 10.0)
        chunk_len = self.info.chunk_length if self.info else 1
        period = (self.config.action.execute or chunk_len) / hz
        st = self.shared.status()
        if st.mode not in (Mode.RUNNING, Mode.HOLD):
            self._end_episode(st.reason.name.lower())
            self._stop.wait(0.01)
            return
        t_obs = time.monotonic()
        try:
            obs = self._observation(st)
        except CameraStale as e:  # blind: hold now, as for a stale action, until frames flow again
            self.stats.last_error = str(e)  # first: whoever sees the hold also sees why
            if not self.camera_hold:
                self.servo.hold()
                self.camera_hold = True
                log.warning("holding the arm: %s", e)
            self._stop.wait(0.01)
            return
        if self.camera_hold:
            self.camera_hold = False
            log.warning("cameras are fresh again: following new chunks")
        try:
            # the tool's position and when: what the policy node's setpoint controllers measure (none unread)
            tool = st.tcp_pose[:3] if np.all(np.isfinite(st.tcp_pose[:3])) else None
            result = self.client.infer(obs, ee_pos=tool, ee_time=t_obs, timeout=self.infer_timeout)
        except (RequestTimeout, RemoteError, ProtocolError) as e:
            self.stats.errors += 1
            self.stats.last_error = str(e)
            log.warning("inference failed: %s", e)
            self._stop.wait(0.05)
            return
        t_recv = time.monotonic()
        self._alive(t_obs)
        times, wps = chunk_to_waypoints(
            result.actions,
            self.config.action,
            self.config.limits.gripper,
            pose=st.tcp_pose,
            q=st.q,
            gripper=st.gripper if np.isfinite(st.gripper) else self.config.limits.gripper.max,
            t_start=t_recv,
            control_hz=hz,
        )
        self.shared.write_chunk(times, wps, t_obs)
        self.stats.inferences += 1
        # A chunk that arrives after a stop is never followed: it is no step, and must not open an episode.
        if self.shared.status().mode in (Mode.RUNNING, Mode.HOLD):
            self._record(st, obs, result, wps)
        self._stop.wait(max(0.0, t_obs + period - time.monotonic()))

    # -- recording

    def _watch(self) -> None:
        """Ends the episode the moment the arm stops, whatever the inference thread is waiting on."""
        while not self._stop.wait(0.01):
            st = self.shared.status()
            if st.mode not in (Mode.RUNNING, Mode.HOLD):
                self._end_episode(st.reason.name.lower())

    def _record(self, st: Status, obs: dict, result: Any, wps: np.ndarray) -> None:
        if self.recorder is None:
            return
        chunk = np.asarray(result.actions, dtype=np.float32)
        state = obs.get("state", np.concatenate([st.q, [st.gripper]]))  # the arm's, if the policy takes none
        step = Step(
            Observation(obs["instruction"], obs["images"], state),
            action=chunk[0],
            action_chunk=chunk,
            ee_pos=st.tcp_pose[:3],
            ee_quat=mat_to_quat(rotvec_to_mat(st.tcp_pose[3:])),
            ee_vel=st.tcp_speed[:3],  # linear m/s: the store's one layout (angular is not recorded)
            steering=result.info.get("steering"),
            policy_info=result.info,
        )
        self.recorder.step(step, policy=self.info.policy if self.info else None)

    def _event(self, kind: str, t: float | None = None, **data: Any) -> None:
        if self.recorder is not None:
            self.recorder.event(kind, t=t, **data)  # kept for the next episode while none is open

    def _end_episode(self, reason: str) -> None:
        if self.recorder is None or self.recorder.episode_id is None:
            return
        mode = self.shared.status().mode.name.lower()
        self.recorder.end(event=Event("stop", {"reason": reason, "mode": mode}), stop_reason=reason)
