"""Camera sources for the robot node's observations, one per policy image key (`observation.cameras`).

- `opencv`: a UVC camera (or a video file) through OpenCV's VideoCapture, at the configured resolution
  and rate; `realsense`: an Intel RealSense colour stream through pyrealsense2 (imported when used: the
  `realsense` extra). Both run behind `StreamCamera`: a grabber thread keeps the newest frame and counts
  failed grabs, so the node never waits on a camera; `read()` raises `CameraStale` when the newest frame
  is older than `max_frame_age` or more than `max_dropped` grabs in a row failed, and the node then holds
  the arm, as it does for a stale action, until frames flow again.
- `recorded`: frames from a .npy file ([n, H, W, 3] uint8), paced at `fps`, through the same
  `StreamCamera`: what the tests feed; at the end of the recording it loops, stalls or drops (`at_end`).
- `mujoco`: renders the simulated scene at the arm's current joints (read from the servo process's
  status) with its own copy of the model; `blank`: black frames for a key the setup has no camera for.

Every frame reaches the policy as RGB uint8 at the policy's image size (nearest-neighbour resize).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


class CameraStale(RuntimeError):
    """A camera stalled or dropped frames beyond its bounds: no observation may be built from it."""


class FrameSource(Protocol):
    """A camera driver: `grab()` waits for the next frame (RGB uint8 [H, W, 3]) or returns None (dropped)."""

    def grab(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


def resize(frame: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of an [H, W, 3] frame to `shape` (H', W', 3)."""
    h, w = shape[:2]
    if frame.shape[:2] == (h, w):
        return frame
    rows = (np.arange(h) * frame.shape[0] // h).clip(0, frame.shape[0] - 1)
    cols = (np.arange(w) * frame.shape[1] // w).clip(0, frame.shape[1] - 1)
    return frame[rows][:, cols]


class StreamCamera:
    """The newest frame of `source`, grabbed in a thread; `read()` refuses a stale one."""

    def __init__(
        self,
        key: str,
        source: FrameSource,
        shape: tuple[int, ...],
        *,
        max_frame_age: float,
        max_dropped: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.key, self.source, self.shape = key, source, tuple(shape)
        self.max_frame_age, self.max_dropped = max_frame_age, max_dropped
        self.clock = clock
        self.frames = 0  # frames grabbed
        self.dropped = 0  # failed grabs in a row
        self.error: str | None = None
        self._frame: np.ndarray | None = None
        self._t = -np.inf
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._grab_loop, name=f"camera-{key}", daemon=True)
        self._thread.start()

    def _grab_loop(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.source.grab()
            except Exception as e:  # noqa: BLE001 - a failing driver counts as dropped frames
                frame, self.error = None, f"{type(e).__name__}: {e}"
                self._stop.wait(0.01)
            if frame is None:
                self.dropped += 1
                continue
            frame = resize(np.asarray(frame, dtype=np.uint8), self.shape)
            with self._lock:
                self._frame, self._t = frame, self.clock()
                self.frames += 1
                self.dropped = 0

    def age(self) -> float:
        return self.clock() - self._t

    def health(self) -> dict[str, Any]:
        age = self.age()
        return {"frames": self.frames, "age": age if np.isfinite(age) else None, "dropped": self.dropped,
                "ok": self._problem() is None, "error": self.error}  # fmt: skip

    def _problem(self) -> str | None:
        age = self.age()
        if self._frame is None:
            return "no frame yet"
        if age > self.max_frame_age:
            return f"newest frame is {age:.3f} s old (max_frame_age {self.max_frame_age} s)"
        if self.dropped > self.max_dropped:
            return f"{self.dropped} frames dropped in a row (max_dropped {self.max_dropped})"
        return None

    def read(self, q: np.ndarray | None = None) -> np.ndarray:
        with self._lock:
            problem = self._problem()
            if problem is not None:
                raise CameraStale(
                    f"camera {self.key!r}: {problem}" + (f" ({self.error})" if self.error else "")
                )
            return self._frame

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)  # a grab blocked in a stalled driver is left to the driver's close
        self.source.close()


class RecordedSource:
    """Recorded frames at `fps`: a camera's stand-in for tests and replays (`at_end`: loop/stall/drop)."""

    def __init__(self, frames: np.ndarray, fps: float, at_end: str = "loop"):
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
            raise ValueError(f"recorded frames must be uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}")
        self.frames, self.period, self.at_end = frames, 1.0 / fps, at_end
        self.i = 0
        self._next = time.monotonic()
        self._closed = threading.Event()

    @classmethod
    def from_file(cls, path: str | os.PathLike, fps: float, at_end: str = "loop") -> RecordedSource:
        return cls(np.load(path, allow_pickle=False), fps, at_end)

    def grab(self) -> np.ndarray | None:
        self._closed.wait(max(0.0, self._next - time.monotonic()))
        self._next = max(self._next + self.period, time.monotonic() - self.period)
        if self.i >= len(self.frames):
            if self.at_end == "stall":
                self._closed.wait()  # no frame ever again, as a hung camera
                return None
            if self.at_end == "drop":
                return None
            self.i = 0
        frame = self.frames[self.i]
        self.i += 1
        return frame

    def close(self) -> None:
        self._closed.set()


class OpenCVSource:
    """A UVC camera (`device`: index or /dev/videoN) or a video file, through cv2.VideoCapture."""

    def __init__(self, device: int | str, width: int, height: int, fps: float):
        try:
            import cv2
        except ImportError as e:
            raise ImportError("opencv cameras need OpenCV: pip install 'vla-steer[robot]'") from e
        self._cv2 = cv2
        self.cap = cv2.VideoCapture(device)
        if not self.cap.isOpened():
            raise RuntimeError(f"OpenCV cannot open camera {device!r}")
        self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self.cap.set(cv2.CAP_PROP_FPS, fps)
        self.cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of old ones

    def grab(self) -> np.ndarray | None:
        ok, bgr = self.cap.read()
        return self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB) if ok else None

    def close(self) -> None:
        self.cap.release()


class RealSenseSource:
    """An Intel RealSense colour stream (`device`: serial number, "" for the first camera found)."""

    def __init__(self, device: str, width: int, height: int, fps: float, rs: Any = None):
        if rs is None:
            try:
                import pyrealsense2 as rs
            except ImportError as e:
                raise ImportError(
                    "realsense cameras need pyrealsense2: pip install 'vla-steer[realsense]'"
                ) from e
        self.rs = rs
        self.timeout_ms = max(100, int(2000 / fps))
        config = rs.config()
        if device:
            config.enable_device(str(device))
        config.enable_stream(rs.stream.color, int(width), int(height), rs.format.rgb8, int(fps))
        self.pipeline = rs.pipeline()
        self.pipeline.start(config)

    def grab(self) -> np.ndarray | None:
        ok, frames = self.pipeline.try_wait_for_frames(self.timeout_ms)
        color = frames.get_color_frame() if ok else None
        return np.asanyarray(color.get_data()).copy() if color else None

    def close(self) -> None:
        self.pipeline.stop()


class BlankCamera:
    def __init__(self, shape: tuple[int, int, int]):
        self.frame = np.zeros(shape, dtype=np.uint8)

    def read(self, q: np.ndarray) -> np.ndarray:
        return self.frame


class MujocoCamera:
    """Renders camera `name` of the MuJoCo twin's scene (robot/backends/mujoco.py) at the arm's joints, or at
    the whole scene's joints (`sim_qpos`: gripper and cube too). The lift scene renders as robosuite's env
    does for the demo VLA (sim/robosuite_env.py): collision geoms hidden, reflections off."""

    def __init__(
        self, name: str, shape: tuple[int, int, int], scene: str = "static", gripper: str = "Robotiq85Gripper"
    ):
        os.environ.setdefault("MUJOCO_GL", "egl")
        import mujoco

        from robot.backends.mujoco import build_scene

        self._mj = mujoco
        self.scene = build_scene(scene, gripper=gripper)
        self.model = m = self.scene.model
        self.data = mujoco.MjData(m)
        self.data.qpos[:] = self.scene.qpos0()
        self.arm_q = [m.joint(n).qposadr[0] for n in self.scene.arm_joints]
        if mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, name) < 0:
            cams = [m.camera(i).name for i in range(m.ncam)]
            raise ValueError(f"the MuJoCo scene {scene!r} has no camera {name!r}; it has {cams}")
        self.name = name
        self.renderer = mujoco.Renderer(m, height=shape[0], width=shape[1])
        self.option = mujoco.MjvOption()
        if scene == "lift":  # as robosuite renders: collision geoms (group 0) hidden
            self.option.geomgroup[0] = 0
            self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def read(self, q: np.ndarray) -> np.ndarray:
        """The frame at joints `q`: the arm's 6, or the scene's whole qpos."""
        if len(q) == self.model.nq:
            self.data.qpos[:] = q
        else:
            self.data.qpos[self.arm_q] = q
        self._mj.mj_forward(self.model, self.data)
        self.renderer.update_scene(self.data, camera=self.name, scene_option=self.option)
        return self.renderer.render().copy()

    def close(self) -> None:
        self.renderer.close()


def build_camera(
    key: str, cam: Any, shape: tuple[int, int, int], scene: str = "static", gripper: str = "Robotiq85Gripper"
) -> Any:
    """The camera for policy image key `key` from its config (`robot.config.Camera`), or black frames;
    `scene` and `gripper`: the MuJoCo twin's scene a `mujoco` camera renders (robot config scene keys)."""
    if cam is None or cam.source == "blank":
        return BlankCamera(shape)
    if cam.source == "mujoco":
        return MujocoCamera(cam.camera, shape, scene, gripper)
    if cam.source == "opencv":
        source: FrameSource = OpenCVSource(cam.device, cam.width, cam.height, cam.fps)
    elif cam.source == "realsense":
        source = RealSenseSource(str(cam.device), cam.width, cam.height, cam.fps)
    else:
        source = RecordedSource.from_file(cam.path, cam.fps, cam.at_end)
    return StreamCamera(key, source, shape, max_frame_age=cam.max_frame_age, max_dropped=cam.max_dropped)
