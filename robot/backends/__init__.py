"""Robot backends behind one interface: `rtde` (a real UR through ur_rtde) and `mujoco` (a simulated UR5e)."""

from robot.backends.base import Backend, RobotState, make_backend

__all__ = ["Backend", "RobotState", "make_backend"]
