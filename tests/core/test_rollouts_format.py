"""Rollout record format: framing, values the store refuses (named by field), non-finite values flagged."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from rollout_steps import make_step

from vla_steer.core.rollouts import Recorder, SchemaError, open_store
from vla_steer.core.rollouts.format import BadRecord, decode_record, encode_record


def test_schema_errors_name_the_field(tmp_path):
    rng = np.random.default_rng(0)
    ep = Recorder(tmp_path).start_episode({"task": "x"})
    first = make_step(0, rng)
    ep.step(**first)

    def bad(match: str, **change):
        with pytest.raises(SchemaError, match=match):
            ep.step(**{**make_step(1, rng), **change})

    bad(r"^state: .*\(9,\).*\(8,\)", state=np.zeros(9))
    bad(r"^action: .*float64", action=np.zeros(7))
    bad(r"^ee_quat: expected shape \(4,\)", ee_quat=np.zeros(3))
    bad(r"^ee_vel: expected shape \(3,\)", ee_vel=np.zeros(6))  # linear only: no rad/s in the speed
    bad(r"images\['wrist'\]: .*uint8", images={**first["images"], "wrist": np.zeros((12, 16, 3), np.float32)})
    bad(
        r"images\['front'\]: not in the episode's first step",
        images={**first["images"], "front": first["images"]["wrist"]},
    )
    bad(
        r"activations\['fast'\]: .*\(13,\)",
        activations={**first["activations"], "fast": np.zeros(13, np.float32)},
    )
    bad(r"^ee_vel: missing", ee_vel=None)
    bad(r"^state: dtype <U3 is not numeric", state=np.array(["abc"]))
    bad(r"^state: not an array", state=[[1.0, 2.0], [3.0]])
    bad(r"^reward: expected a number", reward="high")
    bad(r"^steering\.fast: object cannot be stored", steering={"fast": object()})
    assert ep.n_steps == 1  # nothing half-written by the rejected steps

    nan = make_step(1, rng)
    nan["action"][2] = np.nan
    ep.step(**nan)  # recorded as-is, flagged by an event
    ep.end(success=False)
    back = open_store(tmp_path).load(ep.id)
    assert np.isnan(back.arrays["action"][1, 2])
    assert {"kind": "nonfinite", "step": 1, "fields": ["action"]}.items() <= back.events[-1].items()


def test_a_record_decodes_to_what_was_encoded_and_damage_is_refused():
    arrays = {
        "img/cam": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
        "state": np.array([1.5, -2.0], np.float64),
        "empty": np.zeros((0, 4), np.float32),
    }
    record = encode_record({"k": "step", "i": 7, "scalars": {"t_wall": 1.0}}, arrays)
    view = memoryview(b"junk" + record)
    header, back, end = decode_record(view, 4)
    assert header == {"k": "step", "i": 7, "scalars": {"t_wall": 1.0}, "arrays": header["arrays"]}
    assert end == len(view) and back.keys() == arrays.keys()
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        np.testing.assert_array_equal(back[name], a)

    flipped = bytearray(record)
    flipped[-1] ^= 0x01
    for damaged, why in (
        (record[:-1], "truncated record"),
        (record[:10], "truncated record prefix"),
        (b"XXXX" + record[4:], "bad magic"),
        (bytes(flipped), "crc mismatch"),
    ):
        with pytest.raises(BadRecord, match=why):
            decode_record(memoryview(damaged), 0)


def test_the_store_imports_without_torch():
    """The LIBERO venv has no torch: the store (and the one episode recorder) must not need it."""
    code = (
        "import sys, vla_steer.core.rollouts; "
        "bad = sorted(m for m in ('torch', 'transformers', 'pandas', 'av') if m in sys.modules); "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
