"""Coverage-guided fuzzing of the wire decoder with atheris (libFuzzer): `python fuzz_decoder.py -runs=N`.

Run by tests/wire/test_fuzz_decoder.py with a fixed budget; also by hand for longer sessions
(`python tests/wire/fuzz_decoder.py -max_total_time=600 CORPUS_DIR`). One input is a message's frames
joined by SEP. The properties, on any input:
- `decode` returns a Message or raises `ProtocolError`, nothing else; so do `check_request`,
  `Observation.from_payload` and `peek_id` (which never raises);
- a message `decode` accepted re-encodes and decodes again to the same kind, id and array table.
The seed corpus holds valid requests of every kind, so mutation starts from messages that get deep.
"""

from __future__ import annotations

import sys

import atheris
import numpy as np

with atheris.instrument_imports(include=["vla_steer"]):  # our code; msgpack and numpy are C
    from vla_steer.wire.codec import ProtocolError, decode, encode, peek_id
    from vla_steer.wire.messages import Observation, check_request

SEP = b"\xf0\x9f\x8e\xb2|frame|"  # splits one fuzz input into frames (rare inside msgpack)
MAX_BYTES = 1 << 16
KEYS = {"agentview": (4, 4, 3)}


def seeds() -> list[bytes]:
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    obs = {"instruction": "pick", "images": {"agentview": image}, "state": np.ones(3, np.float64)}
    messages = [
        encode("infer", {"observation": obs, "activations": ["fast", "layer:1"]}, request_id=7),
        encode("hello", {"client": "sim"}, request_id=1),
        encode("knobs", {"op": "set", "strengths": {"fast": 4.0}}, request_id=2),
        encode("reset", {"episode": "e1", "seed": 3}, request_id=3),
        encode("control", {"op": "stop", "args": {"why": [1, 2.5, None]}}, request_id=4),
        encode("heartbeat", {}, request_id=5),
        encode("infer", {"observation": {"x": [np.zeros((2, 0), np.float16), {"y": np.int64(3)}]}}),
    ]
    return [SEP.join(bytes(memoryview(f)) for f in frames) for frames in messages]


def one_input(data: bytes) -> None:
    frames = data.split(SEP)
    peek_id(frames[0])
    try:
        msg = decode(frames, max_bytes=MAX_BYTES)
    except ProtocolError:
        return
    again = decode(
        [bytes(memoryview(f)) for f in encode(msg.kind, msg.payload, request_id=msg.request_id)],
        max_bytes=2 * MAX_BYTES,
    )
    assert (again.kind, again.request_id) == (msg.kind, msg.request_id), (msg, again)
    try:
        check_request(msg)
        if msg.kind == "infer":
            Observation.from_payload(msg.payload["observation"], KEYS, 3)
    except ProtocolError:
        return
    except ValueError as e:  # Observation's own rules are ValueErrors naming the key
        assert str(e).startswith("observation."), e


def main() -> None:
    argv = list(sys.argv)
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if corpus:  # write the seeds into the corpus directory libFuzzer reads and extends
        from pathlib import Path

        for i, seed in enumerate(seeds()):
            path = Path(corpus[0]) / f"seed-{i}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(seed)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
