"""Round-trip latency of our ZeroMQ transport against openpi's websocket serving stack, over loopback TCP.

Payload (both stacks): an openpi/LIBERO-style observation of two 224x224x3 uint8 images, an 8-dim float32
state and a prompt string; reply: a 50x7 float32 action chunk (fixed content, freshly allocated per call).

  ours     vla_steer.wire: a `Server` with an "infer" handler, driven by our `Client.infer`; the server
           batches as `vla-steer serve` does by default (the handler has `infer_batch`, batch_max and
           batch_wait are serve's defaults), so the figure is a lone client's on a batching node
  openpi   the `openpi-client` package as openpi uses it: its `WebsocketClientPolicy` against a server
           that reproduces the behaviour (not the code) of openpi's `WebsocketPolicyServer`: a
           `websockets.asyncio.server.serve(..., compression=None, max_size=None)` server that sends its
           metadata on connect, then per message unpacks the observation with `msgpack_numpy`, calls the
           policy, adds "server_timing" and sends the result packed with `msgpack_numpy`
  inproc   reference, no sockets: the same request/reply path through our codec in one process
           (client encode -> server decode + checks -> handler -> encode -> client decode + checks),
           the plain handler call, and the same for openpi's codec

Every server and every client runs in a process of its own (4 processes plus this orchestrator, which
only sends "run N round trips" commands and collects the times the clients measured around each
`infer` call with perf_counter_ns; gc is off inside a block, on between blocks). After warm-up, blocks
of round trips alternate between the stacks (ours, openpi, ours-inproc, openpi-inproc, then rotated),
so drifts of the machine land on all of them alike.

openpi-client 0.1.2 pins numpy<2 (and imports typing_extensions without declaring it), so it is not
installed into the project's environment: the openpi processes run from a side virtual environment
(default $XDG_CACHE_HOME/vla-steer/openpi-client-venv, created on first use with
`pip install openpi-client 'websockets>=13' typing-extensions`; or --openpi-python PATH). Without it the
benchmark still measures our side and writes its JSON with value null and a `skipped_reason`.

Headline: p50(ours) / p50(openpi), target <= 0.5. Batching must not cost the lone client: the JSON's
`lone_client_bound` (0.7) is the ratio it must stay under with batching on.

Also measured ("liveness" in the JSON), the figures behind requirements the tests check only as events
with generous timeouts (tests/wire, tests/core/test_node.py): how long after a SIGKILL of the server
process `Client.alive` turns False (designed: within the liveness window, 1 s, plus one heartbeat
interval), how long after a client closes the server drops it from `live_clients()`, how long a request to
an address nobody listens on takes to fail (designed: timeout x attempts), and how long decode takes to
refuse a 10 MB header bomb.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

NAME = "transport_rtt"
TARGET = 0.5
LONE_CLIENT_BOUND = 0.7  # with batching on at serve's defaults, what the ratio must stay under
THIS = Path(__file__).resolve()

IMAGE_SHAPE = (224, 224, 3)
STATE_DIM = 8
CHUNK_SHAPE = (50, 7)
PROMPT = "put the black bowl on the plate"
OBS_SPEC = {
    "observation/image": (IMAGE_SHAPE, "uint8"),
    "observation/wrist_image": (IMAGE_SHAPE, "uint8"),
    "observation/state": ((STATE_DIM,), "float32"),
}
COMMAND_TIMEOUT_S = 120.0


# -- payload and handler (shared by every role) -------------------------------------------------------


def make_observation() -> dict:
    rng = np.random.default_rng(0)
    return {
        "observation/image": rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8),
        "observation/state": rng.standard_normal(STATE_DIM).astype(np.float32),
        "prompt": PROMPT,
    }


EXPECTED_CHUNK = (np.arange(np.prod(CHUNK_SHAPE), dtype=np.float32).reshape(CHUNK_SHAPE) / 100.0) - 1.0
EXPECTED_CHUNK.flags.writeable = False


def check_observation(obs) -> None:
    """What both handlers do with the observation: confirm it arrived intact in shape and type (O(1))."""
    for key, (shape, dtype) in OBS_SPEC.items():
        a = obs[key]
        if a.shape != shape or a.dtype != np.dtype(dtype):
            raise ValueError(f"{key}: got {a.dtype} {a.shape}, expected {dtype} {shape}")
    if obs["prompt"] != PROMPT:
        raise ValueError(f"prompt: got {obs['prompt']!r}")


def policy_infer(obs) -> np.ndarray:
    """The stand-in policy: a fixed-content, freshly allocated action chunk."""
    check_observation(obs)
    return EXPECTED_CHUNK.copy()


def check_actions(actions) -> None:
    if not (
        isinstance(actions, np.ndarray)
        and actions.shape == CHUNK_SHAPE
        and actions.dtype == np.float32
        and np.array_equal(actions, EXPECTED_CHUNK)
    ):
        raise AssertionError(f"wrong action chunk in the reply: {type(actions).__name__} {actions!r:.200}")


def percentiles_ms(times_ns: list[int]) -> dict:
    a = np.asarray(times_ns, dtype=np.float64) / 1e6
    return {
        "n": int(a.size),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


# -- worker roles (run in their own processes; stdout carries one JSON object per line) --------------


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _exit_on_stdin_eof() -> None:
    """Servers live as long as the orchestrator holds their stdin open (no orphans if it dies)."""

    def watch():
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _timed_block(call, n: int, check) -> list[int]:
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            r = call()
            t1 = time.perf_counter_ns()
            times.append(t1 - t0)
            check(r)
    finally:
        gc.enable()
    return times


def _client_loop(rtt, check_rtt, inproc_steps) -> None:
    """Serve the orchestrator's commands: {"cmd": "rtt"|"inproc", "n": N} -> times in ns."""
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "rtt":
                _say({"times": _timed_block(rtt, cmd["n"], check_rtt)})
            elif cmd["cmd"] == "inproc":
                out = {}
                for name, (fn, check) in inproc_steps.items():
                    out[name] = _timed_block(fn, cmd["n"], check)
                _say(out)
            elif cmd["cmd"] == "quit":
                _say({"bye": True})
                return
            else:
                _say({"error": f"unknown command {cmd!r}"})
        except Exception:
            _say({"error": traceback.format_exc()})
            return


def serve_batching() -> dict:
    """The batching settings `vla-steer serve` runs with when none are given (what users get)."""
    from vla_steer.app.cli import build_parser

    args = build_parser().parse_args(["serve", "--policy", "demo_vla"])
    return {"batch_max": args.batch_max, "batch_wait": args.batch_wait_ms / 1e3}


class _OursHandler:
    """The stand-in policy behind our server, batching like a `PolicyNode` (one call for concurrent
    requests), so the lone client's round trip goes through the batching worker as a served node's does."""

    def infer(self, req):
        from vla_steer.wire import InferResult

        return InferResult(policy_infer(req.payload["observation"]))

    def infer_batch(self, reqs):
        return [self.infer(r) for r in reqs]


def role_ours_server() -> None:
    from vla_steer.wire import Server

    batching = serve_batching()
    server = Server(_OursHandler(), "tcp://127.0.0.1:*", **batching).start()
    _say({"address": server.address, "pid": os.getpid(), "batching": batching})
    try:
        sys.stdin.read()  # until the orchestrator closes our stdin
    finally:
        server.close()


def role_ours_client(address: str) -> None:
    import zmq

    from vla_steer.wire import Client, InferResult, Message, Request, decode, encode, require_finite
    from vla_steer.wire.messages import check_reply, check_request

    obs = make_observation()
    client = Client(address)  # as the sim/robot node uses it: defaults, heartbeat thread on
    if not client.wait_alive(10.0):
        raise RuntimeError(f"our server at {address} did not answer heartbeats")

    def rtt():
        return client.infer(obs).actions

    handler = _OursHandler().infer  # the same handler the server runs

    rid = iter(range(1, 1 << 62))

    def codec_and_call():
        i = next(rid)
        msg = decode(encode("infer", {"observation": obs}, request_id=i))  # client encode, server decode
        check_request(msg)
        require_finite(msg.payload["observation"], "observation")
        result = handler(Request(msg.kind, msg.payload, msg.request_id, msg.timestamp, b"bench"))
        payload = result.to_payload()
        check_reply(Message("infer", payload), "infer")
        reply = decode(encode("infer", payload, request_id=i))  # server encode, client decode
        check_reply(reply, "infer")
        actions = InferResult.from_payload(reply.payload).actions
        require_finite(actions, "actions")
        return actions

    def plain_call():
        return policy_infer(obs)

    check_actions(rtt())
    _say(
        {
            "ready": True,
            "pid": os.getpid(),
            "versions": {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "numpy": np.__version__},
        }
    )
    try:
        _client_loop(
            rtt,
            check_actions,
            {"codec_and_call": (codec_and_call, check_actions), "call": (plain_call, check_actions)},
        )
    finally:
        client.close()


class _BenchPolicy:
    def infer(self, obs):
        return {"actions": policy_infer(obs)}


async def _serve_openpi_protocol(policy, metadata, ws) -> None:
    """One connection of a server that behaves, on the wire, like openpi's `WebsocketPolicyServer`.

    Written from the protocol's observable behaviour, not from openpi's code: on connect the server sends
    its metadata packed with `msgpack_numpy`; then each message is a packed observation, answered with the
    policy's packed result (plus the "server_timing" entry openpi's server adds: this call's policy time
    and, from the second call on, the previous round's total). If anything fails, the traceback text goes
    to the client and the connection is closed with 1011 (internal error).
    """
    from openpi_client import msgpack_numpy
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import CloseCode

    pack = msgpack_numpy.Packer().pack
    last_round_ms = None
    try:
        await ws.send(pack(metadata))
        async for message in ws:
            received = time.monotonic()
            obs = msgpack_numpy.unpackb(message)
            called = time.monotonic()
            result = policy.infer(obs)
            timing = {"infer_ms": (time.monotonic() - called) * 1e3}
            if last_round_ms is not None:
                timing["prev_total_ms"] = last_round_ms
            result["server_timing"] = timing
            await ws.send(pack(result))
            last_round_ms = (time.monotonic() - received) * 1e3
    except ConnectionClosed:
        return
    except Exception:
        await ws.send(traceback.format_exc())
        await ws.close(CloseCode.INTERNAL_ERROR, "server error; its traceback is the previous message")
        raise


def role_openpi_server() -> None:
    import asyncio
    import functools

    from websockets.asyncio.server import serve

    metadata = {"policy": "bench", "action_dim": CHUNK_SHAPE[1], "chunk_length": CHUNK_SHAPE[0]}
    # openpi's settings that shape the transfer: no per-message compression, no message size limit.
    handler = functools.partial(_serve_openpi_protocol, _BenchPolicy(), metadata)

    async def run():
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
            _say({"port": server.sockets[0].getsockname()[1], "pid": os.getpid()})
            await server.serve_forever()

    _exit_on_stdin_eof()
    asyncio.run(run())


def role_openpi_client(port: int) -> None:
    from importlib.metadata import version

    from openpi_client import msgpack_numpy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    obs = make_observation()
    policy = WebsocketClientPolicy(host="127.0.0.1", port=port)
    if policy.get_server_metadata().get("policy") != "bench":
        raise RuntimeError(f"unexpected server metadata {policy.get_server_metadata()!r}")

    def rtt():
        return policy.infer(obs)["actions"]

    packer = msgpack_numpy.Packer()
    server_policy = _BenchPolicy()

    def codec_and_call():  # the same steps as the websocket round trip, minus the websocket
        got = msgpack_numpy.unpackb(packer.pack(obs))
        action = server_policy.infer(got)
        action["server_timing"] = {"infer_ms": 0.0}
        return msgpack_numpy.unpackb(packer.pack(action))["actions"]

    def plain_call():
        return policy_infer(obs)

    check_actions(rtt())
    versions = {}
    for pkg in ("openpi-client", "websockets", "msgpack", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            versions[pkg] = None
    _say({"ready": True, "pid": os.getpid(), "python": sys.executable, "versions": versions})
    try:
        _client_loop(
            rtt,
            check_actions,
            {"codec_and_call": (codec_and_call, check_actions), "call": (plain_call, check_actions)},
        )
    finally:
        policy._ws.close()


# -- orchestrator --------------------------------------------------------------------------------------


class Worker:
    """A role in a subprocess; one JSON line per command and per answer."""

    def __init__(self, label: str, python: str, args: list[str]):
        self.label = label
        self.proc = subprocess.Popen(
            [python, str(THIS), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def answer(self, timeout: float = COMMAND_TIMEOUT_S) -> dict:
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"{self.label}: no answer within {timeout:.0f}s") from None
            if line is None:
                raise RuntimeError(f"{self.label}: process exited (code {self.proc.wait()}); see stderr")
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:  # stray output from a library: pass it on
                sys.stderr.write(f"[{self.label}] {line}")
                continue
            if "error" in msg:
                raise RuntimeError(f"{self.label} failed:\n{msg['error']}")
            return msg

    def call(self, cmd: dict, timeout: float = COMMAND_TIMEOUT_S) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.answer(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()


def measure_liveness(trials: int) -> dict:
    """See the module docstring ("liveness"): each figure over `trials` runs, in seconds."""
    import signal

    import msgpack

    from vla_steer.wire import Client, InferResult, ProtocolError, RequestTimeout, Server, decode

    def summary(xs: list[float]) -> dict:
        return {"median": float(np.median(xs)), "max": max(xs), "runs": xs}

    dead, dropped, unanswered, bomb = [], [], [], []
    for _ in range(trials):
        srv = Worker("liveness-server", sys.executable, ["--role", "ours-server"])
        try:
            address = srv.answer(60)["address"]
            with Client(address, liveness=1.0) as c:
                if not c.wait_alive(10.0):
                    raise RuntimeError("the liveness server did not answer heartbeats")
                srv.proc.send_signal(signal.SIGKILL)
                srv.proc.wait(10)
                t0 = time.monotonic()
                while c.alive and time.monotonic() - t0 < 10:
                    time.sleep(0.002)
                dead.append(time.monotonic() - t0)
        finally:
            srv.close()

        with (
            Server(
                {"infer": lambda req: InferResult(np.zeros((1, 7), np.float32))}, "tcp://127.0.0.1:*"
            ) as s,
            Client(s.address, name="leaving") as c,
        ):
            while "leaving" not in s.live_clients():
                time.sleep(0.002)
            c.close()
            t0 = time.monotonic()
            while "leaving" in s.live_clients() and time.monotonic() - t0 < 10:
                time.sleep(0.002)
            dropped.append(time.monotonic() - t0)

        with Client("tcp://127.0.0.1:1", timeout=0.1, retries=2, heartbeat_interval=None) as c:
            t0 = time.monotonic()
            with contextlib.suppress(RequestTimeout):
                c.hello()
            unanswered.append(time.monotonic() - t0)

        header = {"version": 1, "kind": "infer", "id": 1, "ts": 0.0, "arrays": []}
        frames = [msgpack.packb({**header, "payload": {"observation": {}, "info": [[]] * 10_000_000}})]
        t0 = time.perf_counter()
        with contextlib.suppress(ProtocolError):
            decode(frames)
        bomb.append(time.perf_counter() - t0)
        del frames
    return {
        "dead_server_detected_after_sigkill_s": summary(dead),
        "closed_client_dropped_by_server_s": summary(dropped),
        "nothing_listening_timeout_s": {**summary(unanswered), "configured": "timeout 0.1 s x 3 attempts"},
        "header_bomb_10MB_refused_s": summary(bomb),
    }


def find_openpi_python(args) -> tuple[str | None, dict]:
    """An interpreter that can import openpi-client; creates the side venv if allowed. (python, notes)."""
    from side_venv import side_python

    explicit = args.openpi_python or os.environ.get("VLA_STEER_OPENPI_PYTHON")
    return side_python("openpi-client", explicit=explicit, install=not args.no_install)


def main_orchestrator(argv: list[str]) -> int:
    sys.path.insert(0, str(THIS.parent))
    from common import (
        arg_parser,
        bootstrap_ratio_ci,
        load_average,
        machine,
        meets_target,
        write_result,
    )
    from side_venv import KNOWN

    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--n", type=int, default=None, help="round trips per stack (default 1000; 50 with --quick)"
    )
    p.add_argument("--block", type=int, default=None, help="round trips per interleaved block")
    p.add_argument("--openpi-python", default=None, help="an interpreter with openpi-client installed")
    p.add_argument("--no-install", action="store_true", help="never create the openpi side environment")
    args = p.parse_args(argv)
    n = args.n or (50 if args.quick else 1000)
    block = args.block or (10 if args.quick else 25)
    n_blocks = max(1, -(-n // block))
    n = n_blocks * block
    warmup = 20 if args.quick else 100
    load_start = load_average()
    t_start = time.perf_counter()

    workers: list[Worker] = []
    skipped_reason = None
    openpi_notes: dict = {}
    try:
        ours_srv = Worker("ours-server", sys.executable, ["--role", "ours-server"])
        workers.append(ours_srv)
        ours_started = ours_srv.answer(60)
        address = ours_started["address"]
        ours_cli = Worker("ours-client", sys.executable, ["--role", "ours-client", "--address", address])
        workers.append(ours_cli)
        ours_ready = ours_cli.answer(60)

        openpi_python, openpi_notes = find_openpi_python(args)
        op_cli = None
        op_ready: dict = {}
        if openpi_python is None:
            how = (
                "installing it was not allowed (--no-install / --openpi-python)"
                if args.no_install or args.openpi_python or os.environ.get("VLA_STEER_OPENPI_PYTHON")
                else "creating its side environment failed"
            )
            skipped_reason = (
                f"openpi-client is not importable from any candidate interpreter and {how}: "
                + json.dumps(openpi_notes)
            )
        else:
            try:
                op_srv = Worker("openpi-server", openpi_python, ["--role", "openpi-server"])
                workers.append(op_srv)
                port = op_srv.answer(60)["port"]
                op_cli = Worker(
                    "openpi-client", openpi_python, ["--role", "openpi-client", "--port", str(port)]
                )
                workers.append(op_cli)
                op_ready = op_cli.answer(60)
            except RuntimeError as e:
                skipped_reason = f"the openpi side failed to start: {e}"
                op_cli = None
        print(
            f"{NAME}: {n} round trips per stack in {n_blocks} interleaved blocks of {block} "
            f"(+{warmup} warm-up); openpi side: {'SKIPPED' if op_cli is None else openpi_python}",
            file=sys.stderr,
        )

        # cases: (label, worker, command); inproc blocks return two series
        cases = [("ours", ours_cli, "rtt"), ("ours_inproc", ours_cli, "inproc")]
        if op_cli is not None:
            cases[1:1] = [("openpi", op_cli, "rtt")]
            cases.append(("openpi_inproc", op_cli, "inproc"))
        for _label, w, cmd in cases:  # warm-up
            w.call({"cmd": cmd, "n": warmup})
        series: dict[str, list[int]] = {}
        order_log = []
        for k in range(n_blocks):
            order = cases[k % len(cases) :] + cases[: k % len(cases)]
            order_log.append([c[0] for c in order])
            for label, w, cmd in order:
                out = w.call({"cmd": cmd, "n": block})
                if cmd == "rtt":
                    series.setdefault(label, []).extend(out["times"])
                else:
                    for step, times in out.items():
                        series.setdefault(f"{label}_{step}", []).extend(times)
            if (k + 1) % max(1, n_blocks // 4) == 0:
                med = {lab: np.median(series[lab]) / 1e6 for lab in ("ours", "openpi") if lab in series}
                print(
                    f"  block {k + 1}/{n_blocks}: "
                    + "  ".join(f"{a} p50 {v:.3f} ms" for a, v in med.items()),
                    file=sys.stderr,
                )
        for w in (ours_cli, op_cli):
            if w is not None:
                w.call({"cmd": "quit"})
    finally:
        for w in reversed(workers):
            w.close()
    liveness = measure_liveness(2 if args.quick else 5)
    elapsed = time.perf_counter() - t_start

    stats = {k: percentiles_ms(v) for k, v in series.items()}
    ours, openpi = stats["ours"], stats.get("openpi")
    inproc = stats["ours_inproc_codec_and_call"]
    ratio = ours["p50"] / openpi["p50"] if openpi else None
    ratio_p99 = ours["p99"] / openpi["p99"] if openpi else None
    ci = None
    if openpi:
        lo, hi = bootstrap_ratio_ci(
            [t / 1e6 for t in series["ours"]], [t / 1e6 for t in series["openpi"]], n=1000
        )
        ci = [lo, hi]
    payload_bytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in OBS_SPEC.values()) + len(PROMPT)

    result = {
        "name": NAME,
        "value": ratio,
        "unit": "ratio",
        "target": TARGET,
        "better": "lower",
        "quick": args.quick,
        "description": "p50 round-trip latency of one infer request over loopback TCP, our ZeroMQ transport "
        "divided by openpi's websocket + msgpack_numpy stack (same payload, same trivial handler)",
        "machine": machine("cpu"),
        "ci95": {"value": ci},
        "latency_ms": {
            "ours": {"p50": ours["p50"], "p99": ours["p99"]},
            "openpi": {"p50": openpi["p50"], "p99": openpi["p99"]} if openpi else None,
            "ours_inproc_codec_and_call": {"p50": inproc["p50"], "p99": inproc["p99"]},
            "handler_call": {
                "p50": stats["ours_inproc_call"]["p50"],
                "p99": stats["ours_inproc_call"]["p99"],
            },
            "openpi_inproc_codec_and_call": (
                {k: stats["openpi_inproc_codec_and_call"][k] for k in ("p50", "p99")} if openpi else None
            ),
        },
        "p99_ratio": ratio_p99,
        "lone_client_bound": {
            "bound": LONE_CLIENT_BOUND,
            "met": ratio <= LONE_CLIENT_BOUND if ratio is not None else None,
            "batching": ours_started.get("batching"),
        },
        "ours_vs_inprocess": ours["p50"] / inproc["p50"],
        "ours_transport_overhead_ms": ours["p50"] - inproc["p50"],
        "openpi_transport_overhead_ms": (
            openpi["p50"] - stats["openpi_inproc_codec_and_call"]["p50"] if openpi else None
        ),
        "stats_ms": stats,
        "liveness": liveness,
        "payload": {
            "observation": {
                **{k: {"shape": list(s), "dtype": d} for k, (s, d) in OBS_SPEC.items()},
                "prompt": PROMPT,
            },
            "observation_bytes": payload_bytes,
            "reply": {"actions": {"shape": list(CHUNK_SHAPE), "dtype": "float32"}},
        },
        "setup": {
            "ours": "vla_steer.wire.Server(handler, 'tcp://127.0.0.1:*', batch_max=..., batch_wait=...) with "
            "the batching `vla-steer serve` uses by default (the handler has infer_batch, as a PolicyNode "
            "does) in one process, vla_steer.wire.Client(address) (defaults: heartbeat thread on) in another",
            "ours_batching": ours_started.get("batching"),
            "openpi": "a server reproducing the behaviour of openpi's WebsocketPolicyServer "
            "(websockets.asyncio.server.serve, compression=None, max_size=None, metadata on connect, "
            "msgpack_numpy, server_timing added) in one process, "
            "openpi_client.websocket_client_policy.WebsocketClientPolicy in another",
            "handler": "checks the observation's keys/shapes/dtypes, returns a copy of a fixed 50x7 float32 "
            "chunk; every reply is checked against it (outside the timed region)",
            "inproc": "ours: encode -> decode -> check_request -> require_finite -> handler -> check_reply -> "
            "encode -> decode -> check_reply -> require_finite, one process, no sockets; openpi: "
            "Packer.pack -> unpackb -> handler -> pack -> unpackb",
            "openpi_environment": (
                {
                    "python": openpi_python,
                    "why_separate": "openpi-client 0.1.2 requires numpy<2.0.0 (pip would downgrade the project's "
                    "numpy 2.x) and imports typing_extensions without declaring it; it runs from its own venv "
                    f"with {KNOWN['openpi-client'][0]}",
                    "versions": op_ready.get("versions"),
                    "lookup": openpi_notes,
                }
                if op_cli is not None
                else {"lookup": openpi_notes}
            ),
            "ours_versions": ours_ready.get("versions"),
        },
        "protocol": {
            "round_trips_per_stack": n,
            "block": block,
            "blocks": n_blocks,
            "warmup_round_trips": warmup,
            "order": "blocks interleaved, order rotated each block",
            "timing": "perf_counter_ns around client.infer(obs) inside each client process; gc disabled "
            "within a block",
            "processes": "each server and each client in its own process",
            "elapsed_s": elapsed,
        },
        "conditions": {"loadavg_start": load_start, "loadavg_end": load_average()},
        "raw": {
            "times_us": {k: [round(t / 1e3, 1) for t in v] for k, v in series.items()},
            "block_order": order_log,
        },
    }
    if skipped_reason:
        result["skipped_reason"] = skipped_reason
    result["meets_target"] = meets_target(result) if ratio is not None else None
    path = write_result(result, args.out)

    def fmt(s):
        return f"p50 {s['p50']:.3f} ms  p99 {s['p99']:.3f} ms"

    print(
        f"{NAME}{' (quick)' if args.quick else ''}: {n} round trips per stack, loopback TCP, {elapsed:.1f} s"
    )
    print(f"  ours (zmq)         {fmt(ours)}")
    if openpi:
        print(f"  openpi (websocket) {fmt(openpi)}")
    print(f"  ours in-process    {fmt(inproc)}   (codec + checks + handler, no sockets)")
    print(f"  handler call       {fmt(stats['ours_inproc_call'])}")
    if openpi:
        print(f"  openpi in-process  {fmt(stats['openpi_inproc_codec_and_call'])}")
        print(
            f"  ours / openpi p50 = {ratio:.3f}  (target <= {TARGET}; "
            f"{'met' if result['meets_target'] else 'NOT met'}); 95% CI [{ci[0]:.3f}, {ci[1]:.3f}]; "
            f"p99 ratio {ratio_p99:.3f}; lone client on a batching node <= {LONE_CLIENT_BOUND}: "
            f"{'met' if result['lone_client_bound']['met'] else 'NOT met'}"
        )
    else:
        print(f"  ours / openpi: skipped ({skipped_reason[:200]})")
    print(f"  ours / in-process p50 = {result['ours_vs_inprocess']:.2f}")
    for what, fig in liveness.items():
        print(f"  {what}: median {fig['median']:.3f}, max {fig['max']:.3f}")
    print(f"  -> {path}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--role"]:
        p = argparse.ArgumentParser()
        p.add_argument("--role", required=True)
        p.add_argument("--address")
        p.add_argument("--port", type=int)
        a = p.parse_args(argv)
        try:
            {
                "ours-server": role_ours_server,
                "ours-client": lambda: role_ours_client(a.address),
                "openpi-server": role_openpi_server,
                "openpi-client": lambda: role_openpi_client(a.port),
            }[a.role]()
        except Exception:
            _say({"error": traceback.format_exc()})
            return 1
        return 0
    return main_orchestrator(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
