"""node_soak: a policy node's memory and answers under mixed valid, malformed and oversized traffic.

A TinyVLA policy node runs in its own process (`vla-steer serve`, the default 64 MB request cap). After a
warm-up its idle RSS is read, its peak-RSS counter reset (/proc/PID/clear_refs), and 8 client threads send
traffic for 5 minutes (`--quick`: 20 s), each drawing per request: valid (an infer, a hello or a knobs
list: 70%), malformed (garbage frames, a bad header, a NaN or beyond-float32 observation, an overflowing
knob, a non-ASCII layer name, a frame count that does not match: 25%) or oversized (3 frames of 24 MB, each
within the cap, together beyond it: 5%). Every valid request must get its answer; every malformed and
oversized one an error reply naming its code. Headline: peak RSS / idle RSS of the node, target <= 1.5.
Nothing is asserted: the counts, the RSS series and the ratio go to the JSON.

What the ratio measures, and its floor: libzmq caps each frame (MAXMSGSIZE), not a multipart message,
and hands a message to the server only once all of it has arrived, so while an oversized request is in
flight libzmq holds up to that request's bytes per connection; the server then frees it frame by frame.
With a tiny model (idle ~0.4 GB) and up to 8 such requests in flight the ratio is dominated by that
transient; a real VLA's idle RSS is many GB.
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402
from common import arg_parser, load_average, machine, meets_target, tiny_vla_node, write_result  # noqa: E402

from vla_steer.wire import Client, RemoteError, decode, encode  # noqa: E402

NAME = "node_soak"
TARGET = 1.5
CLIENTS = 8
OVERSIZE_FRAME = 24 << 20  # 3 of them: 72 MB, over the 64 MB request cap; each frame within it
IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
OBS = {"instruction": "pick up the red block", "images": {"agentview": IMAGE}}


def _status(pid: int, key: str) -> int:
    """A /proc/PID/status figure in bytes (VmRSS: resident now; VmHWM: peak since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _malformed(rng: random.Random) -> tuple[str, list[bytes]]:
    """One malformed request: (its case name, its frames)."""
    good = [bytes(memoryview(f)) for f in encode("infer", {"observation": OBS}, request_id=9)]
    head = msgpack.unpackb(good[0], raw=False)
    case = rng.choice(
        ["garbage", "truncated", "bad_dtype", "nan", "beyond_f32", "knob", "layer", "frames", "version"]
    )
    if case == "garbage":
        return case, [rng.randbytes(rng.randint(1, 64)) for _ in range(rng.randint(1, 3))]
    if case == "truncated":
        return case, [good[0][: rng.randint(1, len(good[0]) - 1)], *good[1:]]
    if case == "bad_dtype":
        head["arrays"][0][1] = "complex64"
    elif case == "version":
        head["version"] = 99
    elif case == "frames":
        return case, [*good, b"extra"]
    elif case in ("nan", "beyond_f32"):
        state = np.array([np.nan if case == "nan" else 1e39, 0.0])
        obs = {**OBS, "state": state}
        return case, [bytes(memoryview(f)) for f in encode("infer", {"observation": obs}, request_id=9)]
    elif case == "knob":
        req = {"op": "set", "strengths": {"fast": 1e39}}
        return case, [bytes(memoryview(f)) for f in encode("knobs", req, request_id=9)]
    elif case == "layer":
        req = {"observation": OBS, "activations": ["layer:\u0663"]}
        return case, [bytes(memoryview(f)) for f in encode("infer", req, request_id=9)]
    return case, [msgpack.packb(head, use_bin_type=True), *good[1:]]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.failures: list[str] = []

    def add(self, kind: str, answered: bool, code: str | None = None, failure: str | None = None) -> None:
        with self.lock:
            self.sent[kind] += 1
            self.answered[kind] += answered
            if code:
                self.codes[code] += 1
            if failure and len(self.failures) < 50:
                self.failures.append(failure)


def _client(address: str, seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    pad = np.zeros(OVERSIZE_FRAME, np.uint8)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(address)
    try:
        with Client(address, max_message_bytes=2**31, timeout=60, retries=0) as c:
            while not stop.is_set():
                draw = rng.random()
                if draw < 0.70:
                    op = rng.choice(["infer", "infer", "hello", "knobs"])
                    try:
                        if op == "infer":
                            ok = c.infer(OBS).actions.shape == (1, 7)
                        elif op == "hello":
                            ok = c.hello().policy == "tiny-vla"
                        else:
                            ok = isinstance(c.list_knobs(), dict)
                        tally.add("valid", ok, failure=None if ok else f"wrong {op} answer")
                    except Exception as e:  # a valid request must never fail: record why
                        tally.add("valid", False, failure=f"{op}: {type(e).__name__}: {e}")
                elif draw < 0.95:
                    case, frames = _malformed(rng)
                    raw.send_multipart(frames)
                    if raw.poll(60_000):
                        reply = decode(raw.recv_multipart(copy=False))
                        ok = reply.kind == "error"
                        tally.add(
                            "malformed", ok, reply.payload.get("code"), None if ok else f"{case} accepted"
                        )
                    else:
                        tally.add("malformed", False, failure=f"{case}: no answer")
                else:
                    try:
                        c.infer({**OBS, "pad": [pad, pad, pad]})
                        tally.add("oversized", False, failure="an oversized request was served")
                    except RemoteError as e:
                        tally.add("oversized", e.code == "too_large", e.code)
                    except Exception as e:
                        tally.add("oversized", False, failure=f"oversized: {type(e).__name__}: {e}")
    finally:
        raw.close()
        ctx.term()


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()

    duration = 20.0 if args.quick else 300.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with tiny_vla_node(tmp) as (server, address):
            with Client(address, timeout=60) as c:
                for _ in range(5):
                    c.infer(OBS)  # warm: the first inferences allocate the model's working memory
            time.sleep(1.0)
            idle = _status(server.pid, "VmRSS")
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
            tally, stop = Tally(), threading.Event()
            threads = [
                threading.Thread(target=_client, args=(address, i, stop, tally), daemon=True)
                for i in range(CLIENTS)
            ]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            series = []
            while time.monotonic() - t0 < duration:
                series.append((round(time.monotonic() - t0, 2), _status(server.pid, "VmRSS") >> 20))
                time.sleep(0.25)
            stop.set()
            for t in threads:
                t.join(120)
            elapsed = time.monotonic() - t0
            peak, end = _status(server.pid, "VmHWM"), _status(server.pid, "VmRSS")
            alive = server.poll() is None
    ratio = peak / idle
    valid_all = tally.answered["valid"] == tally.sent["valid"]
    result = {
        "name": NAME,
        "value": ratio,
        "unit": "peak RSS / idle RSS of the node",
        "target": TARGET,
        "better": "lower",
        "quick": args.quick,
        "description": __doc__.split("\n\n")[1].replace("\n", " "),
        "machine": machine(),
        "load_average": load_average(),
        "duration_s": elapsed,
        "clients": CLIENTS,
        "requests_sent": dict(tally.sent),
        "requests_answered": dict(tally.answered),
        "valid_answered_all": valid_all,
        "node_alive_at_end": alive,
        "error_codes": dict(tally.codes),
        "rss_mb": {"idle": idle >> 20, "peak": peak >> 20, "end": end >> 20},
        "end_over_idle": end / idle,
        "raw": {
            "rss_series_mb": series,
            "failures": tally.failures,
            "oversize_request_bytes": 3 * OVERSIZE_FRAME,
        },
    }
    result["meets_target"] = meets_target(result) and valid_all and alive
    path = write_result(result, args.out)
    print(
        f"node_soak: {elapsed:.0f} s, {CLIENTS} clients; sent {dict(tally.sent)}, answered {dict(tally.answered)}"
    )
    print(
        f"  RSS idle {idle >> 20} MB, peak {peak >> 20} MB, end {end >> 20} MB: peak/idle {ratio:.2f} "
        f"(target <= {TARGET}; {'met' if result['meets_target'] else 'NOT met'})"
    )
    print(f"  -> {path}")


if __name__ == "__main__":
    main()
