"""Encode camera frames as mp4 with PyAV (imported when a video is written): one episode, or many back to back."""

from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from vla_steer.core.rollouts.reader import Store, open_store

VIDEO_FPS = 20  # a preview's frame rate (an export uses the dataset's)


def write_video(
    store: Store | str | os.PathLike, episode_id: str, camera: str, path: str | os.PathLike
) -> Path:
    """One episode's frames from one camera as an mp4 at `VIDEO_FPS` (needs PyAV)."""
    store = store if isinstance(store, Store) else open_store(store)
    ep = store.load(episode_id, activations=False)
    if camera not in ep.images:
        raise KeyError(f"episode {episode_id} has no camera {camera!r} (cameras: {sorted(ep.images)})")
    frames = ep.images[camera]
    writer = VideoWriter(Path(path), frames.shape[1:], VIDEO_FPS, crf=23)
    try:
        writer.write(frames)
    finally:
        writer.close()
    return Path(path)


class VideoWriter:
    """H.264 (libx264) at quality `crf`; episodes appended back to back; frame i has pts i at time base 1/fps."""

    def __init__(self, path: Path, shape: tuple[int, ...], fps: int, *, crf: int):
        import av

        self._av = av
        path.parent.mkdir(parents=True, exist_ok=True)
        self.h, self.w = int(shape[0]), int(shape[1])
        self.fps = fps
        self.n_frames = 0
        self.pix_fmt = "yuv420p" if self.h % 2 == 0 and self.w % 2 == 0 else "yuv444p"
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps, options={"crf": str(crf), "g": "2"})
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.w, self.h, self.pix_fmt
        self.codec = self.stream.codec_context.codec.canonical_name  # type: ignore[union-attr]
        self._closed = False

    def write(self, frames: np.ndarray) -> None:
        for img in frames:
            vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts, vf.time_base = self.n_frames, Fraction(1, self.fps)
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
            self.n_frames += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # an error path: the export is failing anyway
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()

    def info(self) -> dict[str, Any]:
        return {
            "video.height": self.h,
            "video.width": self.w,
            "video.codec": self.codec,
            "video.pix_fmt": self.pix_fmt,
            "video.is_depth_map": False,
            "video.fps": self.fps,
            "video.channels": 3,
            "has_audio": False,
        }
