"""Cameras: recorded frames through the same StreamCamera a real camera uses; a stall or dropped frames
make `read()` refuse (the node then holds, see test_mujoco_backend.py); OpenCV through a video file; a FAKE
of pyrealsense2's API (no RealSense here)."""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest
from support import wait_for

from robot.cameras import CameraStale, OpenCVSource, RealSenseSource, RecordedSource, StreamCamera, resize
from robot.config import Camera


def frames(n: int = 6, h: int = 24, w: int = 32) -> np.ndarray:
    """Frame i is filled with value 10 * (i + 1), so any frame says which it is."""
    return np.stack([np.full((h, w, 3), 10 * (i + 1), np.uint8) for i in range(n)])


def stream(source, shape=(12, 16, 3), max_frame_age=0.2, max_dropped=3) -> StreamCamera:
    return StreamCamera("agentview", source, shape, max_frame_age=max_frame_age, max_dropped=max_dropped)


def test_recorded_frames_reach_the_policy_resized_and_in_order():
    cam = stream(RecordedSource(frames(), fps=50, at_end="loop"), max_frame_age=1.0)  # a loaded machine
    try:
        wait_for(lambda: cam.frames >= 1, 10, what="a first frame")
        seen = set()
        wait_for(lambda: seen.add(int(cam.read()[0, 0, 0])) or len(seen) >= 3, 10, what="frames")
        assert cam.read().shape == (12, 16, 3) and cam.read().dtype == np.uint8
        assert seen <= {10, 20, 30, 40, 50, 60}
    finally:
        cam.close()


@pytest.mark.parametrize("at_end", ["stall", "drop"])
def test_a_camera_that_stalls_or_drops_frames_is_refused_until_frames_flow(at_end):
    source = RecordedSource(frames(3), fps=50, at_end=at_end)
    cam = stream(source)
    try:
        wait_for(lambda: cam.frames >= 1, 10, what="a first frame")
        cam.read()
        err = wait_for(lambda: _stale(cam), 10, what="the camera to go stale")
        assert ("old" if at_end == "stall" else "dropped") in str(err)
        assert not cam.health()["ok"]
        if at_end == "drop":  # frames again: read() works again
            source.frames, source.i, source.at_end = frames(3), 0, "loop"
            wait_for(lambda: not _stale(cam), 10, what="the camera to recover")
    finally:
        cam.close()


def _stale(cam: StreamCamera) -> CameraStale | None:
    try:
        cam.read()
    except CameraStale as e:
        return e
    return None


class Silent:
    """A camera that never delivers a frame (grab blocks until closed)."""

    def __init__(self):
        self.closed = threading.Event()

    def grab(self):
        self.closed.wait()
        return None

    def close(self):
        self.closed.set()


def test_no_frame_yet_is_stale_too():
    cam = stream(Silent())
    try:
        with pytest.raises(CameraStale, match="no frame yet"):
            cam.read()
    finally:
        cam.close()


def test_resize_is_nearest_neighbour():
    f = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert resize(f, (4, 6, 3)) is f
    assert np.array_equal(resize(f, (2, 3, 3)), f[::2, ::2])
    assert resize(f, (8, 12, 3)).shape == (8, 12, 3)


def test_opencv_source_reads_rgb_from_a_video_file(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "red.avi"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (32, 24))
    for _ in range(30):
        out.write(
            np.dstack([np.zeros((24, 32)), np.zeros((24, 32)), np.full((24, 32), 255)]).astype(np.uint8)
        )
    out.release()  # BGR red
    source = OpenCVSource(str(path), 32, 24, 30)
    r, g, b = source.grab().reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 50 and b < 50  # RGB for the policy
    cam = stream(source, shape=(24, 32, 3), max_frame_age=1.0)  # a file is read as fast as it decodes
    try:
        wait_for(lambda: cam.frames >= 1, 10, what="a frame")
        err = wait_for(lambda: _stale(cam), 10, what="the end of the file to read as dropped frames")
        assert "dropped" in str(err)
    finally:
        cam.close()
    with pytest.raises(RuntimeError, match="cannot open camera"):
        OpenCVSource(str(tmp_path / "missing.avi"), 32, 24, 30)


class FakeRealSense(types.SimpleNamespace):
    """A FAKE of the pyrealsense2 names RealSenseSource uses (no RealSense camera can exist here)."""

    def __init__(self, images: np.ndarray):
        calls: list = []
        dry = threading.Event()  # after the images: wait (a camera between frames) until the test says

        class Config:
            def enable_device(self, serial):
                calls.append(("enable_device", serial))

            def enable_stream(self, stream, width, height, fmt, fps):
                calls.append(("enable_stream", stream, width, height, fmt, fps))

        class Frame:
            def __init__(self, image):
                self.image = image

            def get_data(self):
                return memoryview(self.image)

        class Frames:
            def __init__(self, image):
                self.image = image

            def get_color_frame(self):
                return Frame(self.image)

        class Pipeline:
            i = 0

            def start(self, config):
                calls.append(("start",))

            def try_wait_for_frames(self, timeout_ms):
                if Pipeline.i >= len(images):
                    dry.wait()
                    return False, None
                Pipeline.i += 1
                return True, Frames(images[Pipeline.i - 1])

            def stop(self):
                calls.append(("stop",))
                dry.set()

        super().__init__(config=Config, pipeline=Pipeline, calls=calls, dry=dry,
                         stream=types.SimpleNamespace(color="color"), format=types.SimpleNamespace(rgb8="rgb8"))  # fmt: skip


def test_realsense_source_configures_the_colour_stream_and_feeds_stream_camera():
    rs = FakeRealSense(frames(4, 48, 64))
    cam = stream(RealSenseSource("123", 64, 48, 30, rs=rs), shape=(24, 32, 3), max_frame_age=1.0)
    try:
        wait_for(lambda: cam.frames == 4, 10, what="the four frames")
        assert int(cam.read()[0, 0, 0]) == 40 and cam.read().shape == (24, 32, 3)
        rs.dry.set()  # no more frames arrive
        wait_for(lambda: _stale(cam), 10, what="dropped frames once the fake runs dry")
    finally:
        cam.close()
    assert rs.calls[:3] == [
        ("enable_device", "123"),
        ("enable_stream", "color", 64, 48, "rgb8", 30),
        ("start",),
    ]
    assert rs.calls[-1] == ("stop",)


def test_realsense_without_pyrealsense2_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyrealsense2", None)
    with pytest.raises(ImportError, match=r"pip install 'vla-steer\[realsense\]'"):
        RealSenseSource("", 640, 480, 30)


def test_camera_config_ranges():
    Camera(source="opencv", device=0)
    for bad in ({"fps": 0}, {"fps": 500}, {"max_frame_age": 0}, {"max_frame_age": 2.0},
                {"max_frame_age": float("inf")}, {"max_dropped": -1}, {"max_dropped": 1000},
                {"width": 0}, {"fps": 30, "max_frame_age": 0.01}):  # fmt: skip
        with pytest.raises(ValueError):
            Camera(source="opencv", **bad)
    with pytest.raises(ValueError, match="needs path"):
        Camera(source="recorded")
