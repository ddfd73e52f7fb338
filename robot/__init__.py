"""The UR5/UR5e robot node: a policy client, a real-time servo process behind a safety filter, ur_rtde and
MuJoCo backends, a control socket and the knobs web UI. See robot/node.py for the shape."""
