"""The bundled demo VLA's checkpoint: a small OpenVLA-style policy (`policies.tiny_vla.TinyVLA`) trained on
scripted robosuite Lift demonstrations whose instructions vary speed and carrying height, co-trained on
language. `WEIGHTS` is the shipped checkpoint (served through `vla_steer/configs/policies/demo_vla.yaml`);
`vla-steer train-demo` reproduces it (the pipeline lives in the app layer, `vla_steer.app.demo`, since
generating demonstrations runs the simulator)."""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
