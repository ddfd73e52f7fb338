"""Reference outputs for the LIBERO evaluation profiles, computed by the reference code itself.

Writes tests/data/libero_profiles/<family>.npz, which tests/sim/test_libero_profiles.py compares our
torch-free transforms (sim.libero_profile, sim.base.to_osc_action, policies.pi0) against. Each part runs in an
environment that has its reference's dependencies; the reference functions are executed from the reference
sources (extracted by name from the files, never copied into this repository):

    # OpenVLA: libero_utils.resize_image (TF JPEG + lanczos3), openvla_utils.crop_and_resize,
    # robot_utils.normalize_gripper_action / invert_gripper_action, libero_utils.get_libero_dummy_action
    python3.11 -m venv /tmp/ref && /tmp/ref/bin/pip install tensorflow-cpu openpi-client pillow numpy
    /tmp/ref/bin/python scripts/libero_profile_reference.py openvla --repo /path/to/openvla/openvla
    # openpi: openpi_client.image_tools.resize_with_pad / convert_to_uint8 (the installed package),
    # transforms.AbsoluteActions + make_bool_mask, examples/libero/main.py LIBERO_DUMMY_ACTION
    /tmp/ref/bin/python scripts/libero_profile_reference.py openpi --repo /path/to/Physical-Intelligence/openpi
    # LeRobot 0.6.1 (its own venv, with torch): vla_utils.resize_with_pad_torch, envs/libero.py's dummy action
    /tmp/lerobot-venv/bin/python scripts/libero_profile_reference.py lerobot

The inputs are made here by `scene` (deterministic, no RNG-version dependence beyond numpy's PCG64), so the
test rebuilds them instead of storing them. A `scene` is the renderer's raw frame (bottom row first): each
reference rotates it as its evaluation does before resizing.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "libero_profiles"
GRIPPER_INPUTS = np.array([0.0, 0.004, 0.25, 0.5, 0.75, 0.996, 1.0])  # OpenVLA's [0, 1] outputs


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A render-like uint8 image: smooth shading, hard edges (a checker, a disc) and a little noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    y, x = y / h, x / w
    r = 128 + 100 * np.sin(6 * x + 3 * y)
    g = 40 + 200 * y
    b = 60 + 150 * (((x * 8).astype(int) + (y * 6).astype(int)) % 2)
    disc = (x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.04
    img = np.stack([r, g, b], axis=-1)
    img[disc] = (230, 30, 30)
    noise = np.random.default_rng(seed).integers(-6, 7, img.shape)
    return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


def relative_inputs() -> tuple[np.ndarray, np.ndarray]:
    """A LIBERO state (8) and a 10-step chunk of 7-d actions, both fixed."""
    rng = np.random.default_rng(1)
    return rng.normal(size=8).astype(np.float32), rng.normal(size=(10, 7)).astype(np.float32)


def load_functions(path: Path, names: list[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """Execute the named top-level functions, classes and assignments of a reference file in `namespace`."""
    tree = ast.parse(path.read_text())
    wanted = []
    for node in tree.body:
        name = getattr(node, "name", None)
        if isinstance(node, ast.Assign):
            name = next((t.id for t in node.targets if isinstance(t, ast.Name)), None)
        if name in names:
            wanted.append(node)
    found = {getattr(n, "name", None) or n.targets[0].id for n in wanted}
    missing = sorted(set(names) - found)
    if missing:
        raise SystemExit(f"{path}: no {missing}")
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def openvla(repo: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    ns = load_functions(repo / "experiments/robot/libero/libero_utils.py", ["resize_image", "get_libero_dummy_action"],
                        {"tf": tf, "np": np, "math": math})  # fmt: skip
    load_functions(repo / "experiments/robot/openvla_utils.py", ["crop_and_resize"], ns)
    load_functions(repo / "experiments/robot/robot_utils.py",
                   ["normalize_gripper_action", "invert_gripper_action"], ns)  # fmt: skip
    render = scene(256, 256)
    resized = ns["resize_image"](render[::-1, ::-1], (224, 224))  # get_libero_image: rotate, resize
    # get_vla_action's crop: to float, crop_and_resize(0.9), clip, back to uint8 (saturating)
    img = tf.image.convert_image_dtype(tf.convert_to_tensor(resized), tf.float32)
    img = tf.clip_by_value(ns["crop_and_resize"](img, 0.9, 1), 0, 1)
    cropped = tf.image.convert_image_dtype(img, tf.uint8, saturate=True).numpy()
    # The lanczos step alone (the same TF call resize_image makes), to hold that step to a tighter bound.
    lanczos = tf.image.resize(render[::-1, ::-1], (224, 224), method="lanczos3", antialias=True)
    lanczos = tf.cast(tf.clip_by_value(tf.round(lanczos), 0, 255), tf.uint8).numpy()
    actions = np.zeros((len(GRIPPER_INPUTS), 7))
    actions[:, -1] = GRIPPER_INPUTS
    gripper = ns["invert_gripper_action"](ns["normalize_gripper_action"](actions.copy(), binarize=True))
    return {
        "render": render,
        "resized": np.asarray(resized, np.uint8),
        "lanczos_only": lanczos,
        "cropped": cropped,
        "gripper_in": GRIPPER_INPUTS,
        "gripper_out": gripper[:, -1],
        "dummy_action": np.asarray(ns["get_libero_dummy_action"]("openvla"), np.float64),
        "versions": np.array(json.dumps({"tensorflow": tf.__version__})),
    }


def openpi(repo: Path) -> dict[str, np.ndarray]:
    import dataclasses
    from collections.abc import Sequence

    import PIL
    from openpi_client import image_tools

    render, odd = scene(256, 256), scene(100, 180, seed=2)
    ns = load_functions(repo / "src/openpi/transforms.py", ["make_bool_mask"], {"np": np})
    # AbsoluteActions is a frozen dataclass deriving from the DataTransformFn protocol; run its body as is.
    ns |= {"dataclasses": dataclasses, "Sequence": Sequence, "DataDict": dict, "DataTransformFn": object}
    source = (repo / "src/openpi/transforms.py").read_text()
    cls = next(n for n in ast.parse(source).body if getattr(n, "name", None) == "AbsoluteActions")
    exec(compile(ast.Module(body=[cls], type_ignores=[]), "transforms.py", "exec"), ns)  # noqa: S102
    state, chunk = relative_inputs()
    absolute = ns["AbsoluteActions"](ns["make_bool_mask"](6, -1))({"state": state, "actions": chunk.copy()})
    main = load_functions(repo / "examples/libero/main.py", ["LIBERO_DUMMY_ACTION"], {})
    return {
        "render": render,
        "resized": image_tools.convert_to_uint8(image_tools.resize_with_pad(render[::-1, ::-1], 224, 224)),
        "odd": odd,
        "odd_resized": image_tools.convert_to_uint8(image_tools.resize_with_pad(odd, 224, 224)),
        "state": state,
        "chunk": chunk,
        "absolute": absolute["actions"],
        "dummy_action": np.asarray(main["LIBERO_DUMMY_ACTION"], np.float64),
        "versions": np.array(json.dumps({"pillow": PIL.__version__})),
    }


def lerobot() -> dict[str, np.ndarray]:
    import lerobot as lr
    import torch
    from lerobot.policies.common.vla_utils import resize_with_pad_torch

    libero_py = Path(lr.__file__).parent / "envs" / "libero.py"
    ns = load_functions(libero_py, ["get_libero_dummy_action"], {})
    render, odd = scene(360, 360), scene(100, 180, seed=2)

    def reference(img: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0  # preprocess_observation
        x = torch.flip(x, dims=[2, 3])  # LiberoProcessorStep
        out = resize_with_pad_torch(x.permute(0, 2, 3, 1), 224, 224)[0].numpy()  # as the pi0 model calls it
        return np.round(out * 65535).astype(np.uint16)  # 16-bit fixed point: 1.5e-5, far below 1/255

    return {
        "render": render,
        "resized": reference(render),  # [0, 1] (x 65535), what the model sees before 2x - 1
        "odd": odd,
        "odd_resized": reference(odd),
        "dummy_action": np.asarray(ns["get_libero_dummy_action"](), np.float64),
        "versions": np.array(json.dumps({"lerobot": lr.__version__, "torch": torch.__version__})),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["openvla", "openpi", "lerobot"])
    p.add_argument("--repo", type=Path, help="the reference repository's checkout (openvla, openpi)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.part != "lerobot" and args.repo is None:
        p.error(f"{args.part} needs --repo (a checkout of the reference repository)")
    data = lerobot() if args.part == "lerobot" else globals()[args.part](args.repo)
    args.out.mkdir(parents=True, exist_ok=True)
    # Inputs are rebuilt by the test from `scene`; store only the outputs (and a check that scene agrees).
    data = {k: v for k, v in data.items() if k not in ("render", "odd")} | {
        "render_sum": np.array(int(data["render"].astype(np.int64).sum()))
    }
    np.savez_compressed(args.out / f"{args.part}.npz", **data)
    print(f"wrote {args.out / args.part}.npz ({', '.join(sorted(data))})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
