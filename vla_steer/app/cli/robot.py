"""The robot's subcommands in the CLI: `vla-steer robot ...` and `vla-steer knobs ui ...`.

add_robot_parser(sub)        # in build_parser()
add_knobs_ui_options(p)      # on the knobs parser; `knobs ui` then calls cmd_knobs_ui(args)
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from robot.control import DEFAULT_CONTROL, operator_token_path, read_operator_token

DEFAULT_UI_PORT = 8765
# What a new user's `vla-steer robot --backend mujoco` drives: the twin in the scene the bundled demo VLA knows.
DEFAULT_MUJOCO_CONFIG = "ur5e_mujoco_lift"


def add_robot_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "robot",
        help="drive a UR5/UR5e (or its MuJoCo twin) from a policy node, with a safe servo loop",
        description="Connect to the policy node, run the servo loop at the controller's rate in its own "
        "process (every command through the safety filter in the robot config), record every episode, and "
        "serve the control socket the knobs UI uses (stop / resume / status). Examples: `vla-steer serve "
        "--policy demo_vla` then `vla-steer robot --backend mujoco --out runs/robot` (the twin lifts the cube "
        "in robosuite's Lift scene); `vla-steer robot --backend mujoco --config ur5e_mujoco` for another "
        "policy's dry run; `vla-steer robot --backend rtde --host 192.168.1.10 --config my_ur5e.yaml --out "
        "runs/ur5e`.",
    )
    p.add_argument("--backend", choices=("rtde", "mujoco"), required=True)
    p.add_argument("--host", help="the robot's IP address (rtde backend)")
    p.add_argument(
        "--config",
        default=None,
        help="robot config YAML, or the name of a shipped one (vla_steer/configs/robots). Default for mujoco: "
        "ur5e_mujoco_lift, the UR5e twin in robosuite's Lift scene (cube, table, wrist camera) with the bundled "
        "demo VLA's action convention and scale (`vla-steer serve --policy demo_vla`); ur5e_mujoco is the "
        "plain twin for other policies (OpenVLA-style metre deltas). Default for rtde: ur5e",
    )
    p.add_argument("--server", default="tcp://127.0.0.1:5555", help="the policy node's address")
    p.add_argument(
        "--control", default=DEFAULT_CONTROL, help=f"control socket to bind (default {DEFAULT_CONTROL})"
    )
    p.add_argument("--out", type=Path, help="rollout store for the episodes (default: no recording)")
    p.add_argument("--prompt", help="the task instruction (default: the config's)")
    p.add_argument("--no-autostart", action="store_true", help="wait for an operator's resume before moving")
    p.add_argument(
        "--rt-priority",
        type=int,
        default=0,
        help="SCHED_FIFO priority for the servo process (an error where the system refuses it)",
    )
    p.add_argument("--infer-timeout", type=float, default=2.0, help="seconds to wait for one inference")
    p.add_argument(
        "--operator-token-file",
        type=Path,
        help="where to keep this launch's operator token, which resume needs (default: "
        "$XDG_RUNTIME_DIR/vla-steer/robot-<control>.operator, mode 0600; `knobs ui` reads it there)",
    )
    from vla_steer.app.cli.args import add_security  # the same key options as `knobs` (a client of the node)

    add_security(p, server=False)
    p.set_defaults(func=cmd_robot)
    return p


def cmd_robot(args) -> int:
    from robot.config import load_robot_config, safety_summary
    from robot.node import RobotNode
    from robot.servo_process import check_rt_priority

    if args.backend == "rtde" and not args.host:
        raise ValueError("--backend rtde needs --host ROBOT_IP")
    check_rt_priority(args.rt_priority)  # fail fast: a refused priority is not silently dropped
    config = args.config or (DEFAULT_MUJOCO_CONFIG if args.backend == "mujoco" else "ur5e")
    cfg = load_robot_config(config)
    print(safety_summary(cfg, config), flush=True)  # what will be enforced, before anything moves
    node = RobotNode(
        cfg,
        args.backend,
        server=args.server,
        host=args.host,
        control=args.control,
        out=args.out,
        prompt=args.prompt,
        autostart=not args.no_autostart,
        infer_timeout=args.infer_timeout,
        rt_priority=args.rt_priority,
        server_key=args.server_key,
        keypair=args.keypair,
    )
    from robot.control import write_operator_token

    token_file = args.operator_token_file or operator_token_path(args.control)
    scene = (
        f", scene {cfg.scene} with {cfg.scene_gripper}"
        if args.backend == "mujoco" and cfg.scene != "static"
        else ""
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        write_operator_token(token_file, node.operator_token)
        with node:
            print(
                f"robot node: {cfg.name} ({args.backend}{scene}) at {cfg.controller_hz:g} Hz following "
                f"{node.info.policy} on {args.server}; control socket {node.control_address}\n"
                f"operator token in {token_file} (the knobs page reads it to resume); "
                "type 'resume' or 'stop' + Enter here",
                flush=True,
            )
            threading.Thread(target=_console, args=(node,), name="robot-console", daemon=True).start()
            while not stop.wait(0.2) and node.servo.process.is_alive():
                pass
    finally:
        if read_operator_token(token_file) == node.operator_token:  # not a later launch's
            token_file.unlink()
    print("stopped", flush=True)
    return 0


def _console(node) -> None:
    """The operator at the robot's console: `resume` / `stop` / `status` lines on stdin."""
    for line in sys.stdin:
        cmd = line.strip().lower()
        if cmd in ("r", "resume"):
            try:
                node.resume()
                print("resume: following fresh actions once the arm is at rest", flush=True)
            except RuntimeError as e:
                print(f"resume refused: {e}", flush=True)
        elif cmd in ("s", "stop"):
            node.stop()
            print("stop: servoStop sent", flush=True)
        elif cmd == "status":
            st = node.status()
            print(f"mode {st.mode.name.lower()} ({st.reason.name.lower()})", flush=True)
        elif cmd:
            print(f"unknown command {cmd!r}: resume, stop or status", flush=True)


def add_knobs_ui_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("knobs ui (the web page)")
    g.add_argument(
        "--robot", default=DEFAULT_CONTROL, help=f"the robot node's control socket ({DEFAULT_CONTROL})"
    )
    g.add_argument("--bind", default="127.0.0.1", help="web server address (default loopback only)")
    g.add_argument(
        "--port", type=int, default=DEFAULT_UI_PORT, help=f"web server port (default {DEFAULT_UI_PORT})"
    )
    g.add_argument(
        "--allow-remote",
        action="store_true",
        help="serve the page beyond loopback (the URL's secret is the login)",
    )
    g.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name the page may be reached as (besides loopback and --bind); repeatable",
    )
    g.add_argument(
        "--operator-token-file",
        type=Path,
        help="the robot node's operator token, which resume needs (default: the file `vla-steer robot` "
        "writes for --robot)",
    )


def cmd_knobs_ui(args) -> int:
    from robot.ui.server import KnobsUI
    from vla_steer.app.cli.args import check_port_free
    from vla_steer.wire.security import is_loopback

    if not (args.allow_remote or is_loopback(f"tcp://{args.bind}:0")):
        raise ValueError(
            f"--bind {args.bind}: the knobs page can stop and start the robot; serve it on loopback (the "
            "default) and use an SSH tunnel, or pass --allow-remote"
        )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: a TCP port is 0..65535")
    check_port_free(f"--port {args.port} on {args.bind}", args.bind, args.port,
                    "is another `vla-steer knobs ui` running? Choose another, e.g. --port 0 (any free port)")  # fmt: skip
    ui = KnobsUI(
        policy=args.server,
        robot=args.robot,
        host=args.bind,
        port=args.port,
        allow_remote=args.allow_remote,
        server_key=getattr(args, "server_key", None),
        keypair=getattr(args, "keypair", None),
        operator_token=read_operator_token(args.operator_token_file or operator_token_path(args.robot)),
        allowed_hosts=tuple(args.allow_host),
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with ui:
        resume = (
            "can resume"
            if ui.operator_token
            else "CANNOT resume (no operator token: see --operator-token-file)"
        )
        print(f"knobs UI on {ui.url} (policy {args.server}, robot {args.robot}; {resume})", flush=True)
        print("open that URL once: it carries this launch's secret and sets the page's cookie", flush=True)
        stop.wait()
    return 0
