"""Camera sources for the robot node's observations.

`mujoco`: renders the simulated scene at the arm's current joints (read from the servo process's status),
with its own copy of the model, so rendering never slows the servo loop. `blank`: black frames, for
policies that take an image the setup does not have. Real cameras (RealSense, USB) plug in as another
class with the same `read()`.
"""

from __future__ import annotations

import os

import numpy as np


class BlankCamera:
    def __init__(self, shape: tuple[int, int, int]):
        self.frame = np.zeros(shape, dtype=np.uint8)

    def read(self, q: np.ndarray) -> np.ndarray:
        return self.frame


class MujocoCamera:
    """Renders camera `name` of the simulated UR5e scene at joints `q`."""

    def __init__(self, name: str, shape: tuple[int, int, int]):
        os.environ.setdefault("MUJOCO_GL", "egl")
        import mujoco

        from robot.backends.mujoco import build_model

        self._mj = mujoco
        self.model = build_model()
        self.data = mujoco.MjData(self.model)
        if mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, name) < 0:
            cams = [self.model.camera(i).name for i in range(self.model.ncam)]
            raise ValueError(f"the MuJoCo scene has no camera {name!r}; it has {cams}")
        self.name = name
        self.renderer = mujoco.Renderer(self.model, height=shape[0], width=shape[1])

    def read(self, q: np.ndarray) -> np.ndarray:
        self.data.qpos[:6] = q
        self._mj.mj_forward(self.model, self.data)
        self.renderer.update_scene(self.data, camera=self.name)
        return self.renderer.render().copy()

    def close(self) -> None:
        self.renderer.close()
