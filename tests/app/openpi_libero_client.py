"""An openpi LIBERO-style client loop, written against the `openpi-client` package only (no vla-steer
import): what openpi's examples/libero/main.py does per step, minus the simulator. Run from the
openpi-client side environment by tests/app/test_openpi_door.py; prints one JSON object.

    python openpi_libero_client.py PORT loop STEPS [STEER_JSON]
                                                        actions of STEPS steps (replanning every chunk),
                                                        each observation carrying "vla_steer/steer" if given
    python openpi_libero_client.py PORT errors          what bad requests get, and that serving goes on
"""

import json
import sys

import numpy as np
from openpi_client import image_tools, websocket_client_policy

PROMPT = "lift the red cube"


def observation(step: int) -> dict:
    """A deterministic LIBERO-shaped observation: 256x256 camera frames resized and padded to 224 on the
    client side (as openpi's example does), an 8-float state (eef pos, axis-angle, gripper qpos)."""
    rng = np.random.default_rng(step)
    frame = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    state = np.array([-0.02, 0.0, 0.91 + 0.01 * step, 3.13, 0.0, 0.2, 0.033, -0.033])
    return {
        "observation/image": image_tools.convert_to_uint8(image_tools.resize_with_pad(frame, 224, 224)),
        "observation/wrist_image": image_tools.convert_to_uint8(image_tools.resize_with_pad(wrist, 224, 224)),
        "observation/state": state,
        "prompt": PROMPT,
    }


def loop(port: int, steps: int, steer: dict | None = None) -> dict:
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    actions, plan, steering = [], [], None
    for t in range(steps):
        if not plan:
            obs = observation(t) if steer is None else {**observation(t), "vla_steer/steer": steer}
            reply = client.infer(obs)
            chunk, steering = reply["actions"], reply["steering"]
            assert chunk.ndim == 2 and chunk.shape[1] == 7, chunk.shape
            plan.extend(chunk)
        actions.append(np.asarray(plan.pop(0)).tolist())
    return {"metadata": client.get_server_metadata(), "actions": actions, "steering": steering}


def errors(port: int) -> dict:
    out = {}
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    bad = observation(0)
    bad["observation/state"] = np.zeros(3)
    try:
        client.infer(bad)
    except RuntimeError as e:
        out["wrong_state"] = str(e)
    out["after_wrong_state"] = client.infer(observation(0))["actions"].shape
    huge = observation(0)
    huge["observation/image"] = np.zeros((5000, 5000, 3), np.uint8)  # 75 MB: over the node's limit
    try:
        client.infer(huge)
    except Exception as e:  # the connection is closed: 1009, message too big
        out["oversize"] = f"{type(e).__name__}: {e}"
    again = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    out["new_connection"] = again.infer(observation(0))["actions"].shape
    return out


if __name__ == "__main__":
    port, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "loop":
        result = loop(port, int(sys.argv[3]), json.loads(sys.argv[4]) if len(sys.argv) > 4 else None)
    else:
        result = errors(port)
    print(json.dumps(result, default=list))
