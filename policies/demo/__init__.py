"""The bundled demo VLA: a small OpenVLA-style policy (`policies.tiny_vla.TinyVLA`) trained here on
scripted robosuite Lift demonstrations whose instructions vary speed and carrying height, co-trained on
language. `WEIGHTS` is the shipped checkpoint; `vla-steer train-demo` reproduces it (`data` generates the
demonstrations, `train` trains)."""

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
