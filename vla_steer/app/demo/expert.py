"""A scripted expert for robosuite's Lift whose speed and carrying height follow the instruction.

It is the teacher of the bundled demo VLA: approach above the cube, descend, close the gripper, lift to
the commanded height and hold it there. Every motion moves the end effector toward a waypoint at
`speed` metres per control step at most, so "quickly" and "slowly" differ in how fast the arm moves,
not only in how long the episode lasts; "high" and "low" set where the cube is carried.
Actions are in the robosuite node's convention (see `sim.robosuite_env`): normalised OSC deltas
(1.0 = `max_delta_pos` metres) and the gripper as +1 open / -1 closed ("open_positive").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# What the instruction's words mean for the scripted motion (metres per control step at 10 Hz, metres
# above the table top).
SPEEDS = {"slow": 0.008, "normal": 0.016, "fast": 0.032}
HEIGHTS = {"low": 0.06, "normal": 0.14, "high": 0.26}
HOVER = 0.07  # approach this far above the cube before descending
GRASP_STEPS = 4  # control steps with the gripper closing before the lift


@dataclass
class LiftExpert:
    speed: float
    height: float
    max_delta_pos: float = 0.05
    table_z: float = 0.8
    phase: str = "approach"
    _closing: int = 0

    def reset(self) -> None:
        self.phase, self._closing = "approach", 0

    def act(self, eef: np.ndarray, cube: np.ndarray) -> np.ndarray:
        """One action from the end-effector and cube positions (world frame, metres)."""
        gripper = 1.0
        if self.phase == "approach":
            target = cube + np.array([0.0, 0.0, HOVER])
            if np.linalg.norm(target - eef) < 0.01:
                self.phase = "descend"
        if self.phase == "descend":
            target = cube + np.array([0.0, 0.0, -0.005])
            if np.linalg.norm(target - eef) < 0.008:
                self.phase = "grasp"
        if self.phase == "grasp":
            target, gripper = eef, -1.0
            self._closing += 1
            if self._closing >= GRASP_STEPS:
                self.phase = "lift"
        if self.phase == "lift":
            target, gripper = np.array([eef[0], eef[1], self.table_z + self.height]), -1.0
        delta = target - eef
        dist = float(np.linalg.norm(delta))
        if dist > self.speed:
            delta = delta * (self.speed / dist)
        action = np.zeros(7)
        action[:3] = np.clip(delta / self.max_delta_pos, -1.0, 1.0)
        action[6] = gripper
        return action
