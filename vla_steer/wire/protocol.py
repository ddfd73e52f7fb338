"""The wire protocol between a policy node and its clients (simulator nodes, robot nodes, knob UIs).

Torch-free on purpose: the LIBERO node imports this from its own Python environment, so only the standard
library, numpy and msgpack are allowed here (see DESIGN.md, "Boundaries").

A message is a ZeroMQ multipart message:

    frame 0      msgpack header {"version", "kind", "id", "ts", "payload", "arrays"}
    frames 1..n  one raw C-contiguous little-endian buffer per numpy array

`payload` holds plain values only (None, bool, int, float, str, bytes, lists, dicts with str keys). Every
numpy array found in the payload is lifted out into its own frame and its slot is left as a None
placeholder; `arrays` lists `[key_path, dtype, shape]` per frame so decode can put it back. Key paths are
lists of dict keys (str) and list indices (int), so nested dicts and lists of arrays work. Nothing is ever
pickled: decode only ever builds plain msgpack values and `np.frombuffer` views over the received frames
(read-only, zero-copy; copy an array if you need to write to it).

Decoding is strict and raises `ProtocolError`, whose `code` says what class of problem it is and whose
`field` names the offending part, so a server can answer every malformed request with an error reply.
`check_request` / `check_reply` add the per-kind payload schemas; `require_finite` is the opt-in NaN/inf
check for observations and actions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

# "control" is a generic op + args request for a node's own control socket (the robot node: stop, resume,
# status, event), so such a socket speaks this protocol rather than one of its own.
REQUEST_KINDS = ("hello", "infer", "reset", "knobs", "heartbeat", "control")
# "error" only ever travels as a reply; "telemetry" only on the server's PUB socket.
KINDS = (*REQUEST_KINDS, "error", "telemetry")
KNOB_OPS = ("list", "get", "set", "enable", "disable", "off")

ALLOWED_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    | {"float16", "float32", "float64"}
)
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_NDIM = 32
MAX_DIM = 2**31 - 1  # per axis; bounds shapes of empty arrays, which the byte limit cannot
MAX_ARRAYS = 4096  # arrays (frames) per message
MAX_DEPTH = 32  # payload nesting
MAX_NAMES = 1024  # concepts / activation names in one request
MAX_OP_CHARS = 64  # a control op is a name, not data
# The header frame carries only plain values and the array table (arrays travel in frames of their own), so
# it is small; its own caps keep a few bytes of msgpack from expanding into gigabytes of Python objects on
# the server's socket thread (each empty list or map is 1 byte on the wire and ~60 bytes in memory).
MAX_HEADER_BYTES = 1024 * 1024
MAX_HEADER_LEN = max(MAX_ARRAYS, MAX_NAMES)  # elements of any one list or map in the header
MAX_HEADER_CONTAINERS = 16 * MAX_ARRAYS  # lists + maps in the whole header (the array table needs 3 each)

_HEADER_KEYS = ("version", "kind", "id", "ts", "payload", "arrays")
_MAX_ID = 2**63 - 1
_LITTLE = "<"  # the wire byte order
_NATIVE_LITTLE = np.little_endian


class Code:
    """Error codes carried by `ProtocolError` and error replies. Open set: handlers may add their own."""

    MALFORMED = "malformed"  # frames are not a message at all (bad msgpack, no frames)
    BAD_HEADER = "bad_header"  # header is not a dict, has unknown keys or ill-typed fields
    MISSING_FIELD = "missing_field"
    BAD_VERSION = "bad_version"
    BAD_KIND = "bad_kind"
    FRAME_COUNT = "frame_count"  # number of array frames does not match the array table
    BUFFER_SIZE = "buffer_size"  # a frame's byte length is not prod(shape) * itemsize
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    BAD_PAYLOAD = "bad_payload"  # payload values of the wrong type or out of range
    NOT_FINITE = "not_finite"
    TOO_LARGE = "too_large"
    UNSUPPORTED = "unsupported"  # the server has no handler for this kind
    BUSY = "busy"  # the inference queue is full
    HANDLER_ERROR = "handler_error"  # the handler raised


class ProtocolError(ValueError):
    """A message that breaks the protocol. `field` names the offending part (header key or payload path).

    `request_id` / `kind` are filled in when decode got far enough to read them, so the server can address
    its error reply to the request that caused it.
    """

    def __init__(
        self,
        code: str,
        message: str,
        field: str | None = None,
        *,
        request_id: int | None = None,
        kind: str | None = None,
    ):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.field = field
        self.request_id = request_id
        self.kind = kind


@dataclass
class Message:
    """A decoded (or to-be-encoded) message. Arrays inside `payload` are read-only after decode."""

    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    request_id: int = 0
    timestamp: float = 0.0
    version: int = PROTOCOL_VERSION


# ----------------------------------------------------------------------------------------------- encode


def encode(
    kind: str,
    payload: Mapping[str, Any] | None = None,
    *,
    request_id: int = 0,
    timestamp: float | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[bytes | np.ndarray]:
    """Encode one message into frames for `socket.send_multipart(frames, copy=False)`.

    C-contiguous little-endian arrays are not copied: their frame is a view of the caller's memory, so the
    caller must not mutate them until the send has completed (a request/reply round trip guarantees that).
    Numpy scalars become Python scalars; tuples become lists.
    """
    if kind not in KINDS:
        raise ProtocolError(Code.BAD_KIND, f"unknown kind {kind!r}; expected one of {KINDS}", "kind")
    if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id <= _MAX_ID:
        raise ProtocolError(
            Code.BAD_HEADER, f"request id must be an int in [0, 2**63), got {request_id!r}", "id"
        )
    if payload is None:
        payload = {}
    if not isinstance(payload, Mapping):
        raise ProtocolError(
            Code.BAD_PAYLOAD, f"payload must be a mapping, got {type(payload).__name__}", "payload"
        )
    table: list[list[Any]] = []
    buffers: list[np.ndarray] = []
    plain = _lift(payload, (), table, buffers, 0)
    header = {
        "version": PROTOCOL_VERSION,
        "kind": kind,
        "id": request_id,
        "ts": time.time() if timestamp is None else float(timestamp),
        "payload": plain,
        "arrays": table,
    }
    try:
        head = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as e:  # e.g. an int beyond 64 bits
        raise ProtocolError(Code.BAD_PAYLOAD, f"cannot encode payload: {e}", "payload") from e
    if len(head) > MAX_HEADER_BYTES:  # the peer would refuse it; say so here, naming the cause
        raise ProtocolError(
            Code.TOO_LARGE,
            f"header is {len(head)} bytes, over the header limit of {MAX_HEADER_BYTES}: send bulk data as "
            "numpy arrays (they travel in frames of their own), not as lists, strings or bytes",
            "header",
        )
    total = len(head) + sum(b.nbytes for b in buffers)
    if total > max_bytes:
        raise ProtocolError(
            Code.TOO_LARGE, f"message is {total} bytes, over the limit of {max_bytes}", "payload"
        )
    return [head, *buffers]


def _lift(obj: Any, path: tuple[str | int, ...], table: list, buffers: list, depth: int) -> Any:
    """Copy `obj` as plain msgpack values, moving arrays into `table`/`buffers` (None left in their slot)."""
    if depth > MAX_DEPTH:
        raise ProtocolError(Code.BAD_PAYLOAD, f"payload nested deeper than {MAX_DEPTH}", _fmt(path))
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, np.ndarray):
        if len(buffers) >= MAX_ARRAYS:
            raise ProtocolError(Code.BAD_PAYLOAD, f"more than {MAX_ARRAYS} arrays in one message", _fmt(path))
        name = obj.dtype.name
        if obj.dtype.kind not in "biuf" or name not in ALLOWED_DTYPES:
            raise ProtocolError(
                Code.BAD_DTYPE,
                f"dtype {obj.dtype.str!r} not allowed; use one of {sorted(ALLOWED_DTYPES)}",
                _fmt(path),
            )
        arr = obj
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not _NATIVE_LITTLE):
            arr = arr.astype(arr.dtype.newbyteorder(_LITTLE))
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
        table.append([list(path), name, list(arr.shape)])
        buffers.append(arr.reshape(-1).view(np.uint8))
        return None
    if isinstance(obj, np.generic):
        if obj.dtype.name not in ALLOWED_DTYPES and obj.dtype.kind not in "SU":
            raise ProtocolError(
                Code.BAD_DTYPE, f"numpy scalar of dtype {obj.dtype.str!r} not allowed", _fmt(path)
            )
        return obj.item()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ProtocolError(Code.BAD_PAYLOAD, f"dict keys must be str, got {k!r}", _fmt(path))
            out[k] = _lift(v, (*path, k), table, buffers, depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [_lift(v, (*path, i), table, buffers, depth + 1) for i, v in enumerate(obj)]
    raise ProtocolError(Code.BAD_PAYLOAD, f"cannot encode a {type(obj).__name__}", _fmt(path) or "payload")


# ----------------------------------------------------------------------------------------------- decode


def decode(
    frames: Sequence[Any],
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Message:
    """Decode and validate frames (bytes, memoryviews or `zmq.Frame`s). Raises `ProtocolError`.

    Arrays are `np.frombuffer` views over the frames: zero-copy and read-only. The header frame is bounded
    separately (`max_header_bytes`, list/map lengths, total number of lists and maps), so decoding a
    hostile header costs at most a few MB and milliseconds.
    """
    if len(frames) == 0:
        raise ProtocolError(Code.MALFORMED, "empty message (no frames)", "frames")
    bufs = [_buffer(f) for f in frames]
    total = sum(b.nbytes for b in bufs)
    too_large = ProtocolError(
        Code.TOO_LARGE, f"message is {total} bytes, over the limit of {max_bytes}", "frames"
    )
    if bufs[0].nbytes > max_bytes:
        raise too_large
    if bufs[0].nbytes > max_header_bytes:
        raise ProtocolError(
            Code.TOO_LARGE,
            f"header frame is {bufs[0].nbytes} bytes, over the header limit of {max_header_bytes} "
            "(arrays travel in frames of their own)",
            "header",
        )
    hook = _container_budget(MAX_HEADER_CONTAINERS)
    try:
        header = msgpack.unpackb(
            bufs[0],
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
            timestamp=0,
            list_hook=hook,
            object_hook=hook,
            max_str_len=max_header_bytes,
            max_bin_len=max_header_bytes,
            max_array_len=MAX_HEADER_LEN,
            max_map_len=MAX_HEADER_LEN,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises a zoo of ValueError/TypeError subclasses on garbage
        if "exceeds max_" in str(e):  # one of the length limits above
            raise ProtocolError(Code.TOO_LARGE, f"header frame too large: {e}", "header") from e
        raise ProtocolError(Code.MALFORMED, f"header frame is not valid msgpack: {e}", "header") from e
    if not isinstance(header, dict):
        raise ProtocolError(Code.BAD_HEADER, f"header must be a map, got {type(header).__name__}", "header")
    rid = header.get("id")
    rid = rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= _MAX_ID else None
    kind = header.get("kind") if isinstance(header.get("kind"), str) else None
    try:
        # The size check comes after reading the header so that an oversize request still learns its
        # error reply's id (the header alone is small and has been bounded above).
        if total > max_bytes:
            raise too_large
        return _decode_header(header, bufs, max_bytes)
    except ProtocolError as e:
        e.request_id, e.kind = rid, kind
        raise


def _container_budget(limit: int) -> Callable[[Any], Any]:
    """A msgpack list/object hook that refuses a header with more than `limit` lists and maps in all."""
    left = limit

    def hook(obj: Any) -> Any:
        nonlocal left
        left -= 1
        if left < 0:
            raise ProtocolError(
                Code.TOO_LARGE, f"header holds more than {limit} lists and maps in all", "header"
            )
        return obj

    return hook


def _decode_header(header: dict, bufs: list[memoryview], max_bytes: int) -> Message:
    # Version first: a newer peer may have different fields, and "bad version" is the useful answer then.
    if "version" not in header:
        raise ProtocolError(Code.MISSING_FIELD, "header has no 'version'", "version")
    version = header["version"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            Code.BAD_VERSION,
            f"protocol version {version!r} not supported; this side speaks {PROTOCOL_VERSION}",
            "version",
        )
    for key in _HEADER_KEYS:
        if key not in header:
            raise ProtocolError(Code.MISSING_FIELD, f"header has no {key!r}", key)
    extra = sorted(set(header) - set(_HEADER_KEYS))
    if extra:
        raise ProtocolError(Code.BAD_HEADER, f"unknown header keys {extra}", str(extra[0]))
    kind = header["kind"]
    if kind not in KINDS:
        raise ProtocolError(Code.BAD_KIND, f"unknown kind {kind!r}; expected one of {KINDS}", "kind")
    rid = header["id"]
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= _MAX_ID:
        raise ProtocolError(Code.BAD_HEADER, f"'id' must be an int in [0, 2**63), got {rid!r}", "id")
    ts = header["ts"]
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
        raise ProtocolError(Code.BAD_HEADER, f"'ts' must be a finite number, got {ts!r}", "ts")
    payload = header["payload"]
    if not isinstance(payload, dict):
        raise ProtocolError(
            Code.BAD_HEADER, f"'payload' must be a map, got {type(payload).__name__}", "payload"
        )
    _check_plain(payload, (), 0)
    table = header["arrays"]
    if not isinstance(table, list):
        raise ProtocolError(Code.BAD_HEADER, f"'arrays' must be a list, got {type(table).__name__}", "arrays")
    if len(table) > MAX_ARRAYS:
        raise ProtocolError(Code.BAD_HEADER, f"{len(table)} arrays, over the limit of {MAX_ARRAYS}", "arrays")
    if len(bufs) != len(table) + 1:
        raise ProtocolError(
            Code.FRAME_COUNT,
            f"header lists {len(table)} arrays but {len(bufs) - 1} array frames arrived",
            "arrays",
        )
    for i, entry in enumerate(table):
        path, dtype, shape = _check_entry(entry, i, max_bytes)
        where = _fmt(path)
        nbytes = math.prod(shape) * dtype.itemsize
        if bufs[i + 1].nbytes != nbytes:
            raise ProtocolError(
                Code.BUFFER_SIZE,
                f"array {where!r} ({dtype.name} {tuple(shape)}) needs {nbytes} bytes, frame {i + 1} has "
                f"{bufs[i + 1].nbytes}",
                where,
            )
        arr = np.frombuffer(bufs[i + 1], dtype=dtype).reshape(tuple(shape))
        arr.flags.writeable = False  # always, whatever the frame: a view of a received message
        _place(payload, path, arr)
    return Message(kind=kind, payload=payload, request_id=rid, timestamp=float(ts), version=version)


def _check_entry(entry: Any, i: int, max_bytes: int) -> tuple[list[str | int], np.dtype, list[int]]:
    where = f"arrays[{i}]"
    if not isinstance(entry, list) or len(entry) != 3:
        raise ProtocolError(Code.BAD_HEADER, f"{where} must be [path, dtype, shape]", where)
    path, dtype_name, shape = entry
    if (
        not isinstance(path, list)
        or not path
        or len(path) > MAX_DEPTH
        or not all(
            isinstance(p, str) or (isinstance(p, int) and not isinstance(p, bool) and p >= 0) for p in path
        )
    ):
        raise ProtocolError(
            Code.BAD_HEADER, f"{where} path must be a non-empty list of keys, got {path!r}", where
        )
    where = _fmt(path)
    if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
        raise ProtocolError(
            Code.BAD_DTYPE,
            f"array {where!r}: dtype {dtype_name!r} not allowed; use one of {sorted(ALLOWED_DTYPES)}",
            where,
        )
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ProtocolError(
            Code.BAD_SHAPE, f"array {where!r}: shape must be a list of <= {MAX_NDIM} ints", where
        )
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_DIM:
            raise ProtocolError(
                Code.BAD_SHAPE, f"array {where!r}: bad dimension {d!r} in shape {shape!r}", where
            )
    dtype = np.dtype(dtype_name).newbyteorder(_LITTLE)
    if math.prod(shape) * dtype.itemsize > max_bytes:
        raise ProtocolError(
            Code.BAD_SHAPE, f"array {where!r}: shape {shape!r} exceeds the message size limit", where
        )
    return path, dtype, shape


def _place(payload: dict, path: list[str | int], arr: np.ndarray) -> None:
    """Put `arr` into the None placeholder at `path`; the placeholder must exist (no inventing structure)."""
    node: Any = payload
    for depth, key in enumerate(path):
        last = depth == len(path) - 1
        in_dict = isinstance(node, dict) and isinstance(key, str) and key in node
        in_list = isinstance(node, list) and isinstance(key, int) and key < len(node)
        if not (in_dict or in_list):
            raise ProtocolError(
                Code.BAD_HEADER, f"array path {_fmt(path)!r} does not match the payload structure", _fmt(path)
            )
        if last:
            if node[key] is not None:
                raise ProtocolError(
                    Code.BAD_HEADER,
                    f"array path {_fmt(path)!r} has no placeholder (duplicate path?)",
                    _fmt(path),
                )
            node[key] = arr
        else:
            node = node[key]


def _check_plain(obj: Any, path: tuple, depth: int) -> None:
    """msgpack already limits types; this bounds nesting and rejects non-str keys and stray ext values."""
    if depth > MAX_DEPTH:
        raise ProtocolError(
            Code.BAD_PAYLOAD, f"payload nested deeper than {MAX_DEPTH}", _fmt(path) or "payload"
        )
    if isinstance(obj, dict):
        # The common case (scalar children within the depth limit), checked at C speed:
        if (
            depth < MAX_DEPTH
            and set(map(type, obj)) <= {str}
            and set(map(type, obj.values())) <= _SCALAR_TYPES
        ):
            return
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ProtocolError(
                    Code.BAD_PAYLOAD, f"dict keys must be str, got {k!r}", _fmt(path) or "payload"
                )
            _check_plain(v, (*path, k), depth + 1)
    elif isinstance(obj, list):
        if depth < MAX_DEPTH and set(map(type, obj)) <= _SCALAR_TYPES:
            return
        for i, v in enumerate(obj):
            _check_plain(v, (*path, i), depth + 1)
    elif not (obj is None or isinstance(obj, (bool, int, float, str, bytes))):
        raise ProtocolError(Code.BAD_PAYLOAD, f"value of type {type(obj).__name__} not allowed", _fmt(path))


_SCALAR_TYPES = frozenset({type(None), bool, int, float, str, bytes})  # exact types, as msgpack builds them


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} not allowed")


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes its bytes as .buffer without a copy
    view = memoryview(buf)
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


def _fmt(path: Iterable[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


# ------------------------------------------------------------------------------------------- finiteness


def require_finite(obj: Any, name: str = "") -> None:
    """Raise `ProtocolError(NOT_FINITE)` naming the first path holding a NaN or inf (floats only)."""
    _finite(obj, (name,) if name else ())


def _finite(obj: Any, path: tuple) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f" and obj.size and not np.isfinite(obj).all():
            bad = np.flatnonzero(~np.isfinite(obj))
            first = np.unravel_index(bad[0], obj.shape) if obj.ndim else ()
            where = _fmt(path)
            raise ProtocolError(
                Code.NOT_FINITE,
                f"{where!r} has {bad.size} non-finite values (first at index {tuple(int(i) for i in first)})",
                where,
            )
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise ProtocolError(Code.NOT_FINITE, f"{_fmt(path)!r} is {obj}", _fmt(path))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _finite(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, (*path, i))


# ---------------------------------------------------------------------------------------------- schemas


def _t_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _t_str(v: Any) -> bool:
    return isinstance(v, str)


def _t_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _t_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _t_names(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_NAMES and all(isinstance(x, str) for x in v)


def _t_number_map(v: Any) -> bool:
    return isinstance(v, dict) and len(v) <= MAX_NAMES and all(_t_number(x) for x in v.values())


def _t_array_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, np.ndarray) for x in v.values())


def _t_actions(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.ndim == 2 and v.dtype.kind == "f"


def _t_shape_map(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(s, list) and all(_t_int(d) and d >= 0 for d in s) for s in v.values()
    )


def _t_dict_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, dict) for x in v.values())


def _t_opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _t_op(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_OP_CHARS


def _t_plain_map(v: Any) -> bool:
    """A map holding plain values only, no arrays (decode has already bounded depth and key types)."""
    return isinstance(v, dict) and not _holds_array(v)


def _holds_array(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return True
    if isinstance(v, dict):
        return any(_holds_array(x) for x in v.values())
    if isinstance(v, list):
        return any(_holds_array(x) for x in v)
    return False


# (required, check, what the check wants); every kind also accepts a free-form "info" dict.
_Spec = dict[str, tuple[bool, Any, str]]
_INFO = {"info": (False, _t_dict, "a map")}
_REQUESTS: dict[str, _Spec] = {
    "hello": {"client": (False, _t_str, "a string"), **_INFO},
    "infer": {
        "observation": (True, _t_dict, "a map of arrays and scalars"),
        "activations": (False, _t_names, f"a list of <= {MAX_NAMES} names"),
        **_INFO,
    },
    "reset": {"episode": (False, _t_str, "a string"), "seed": (False, _t_int, "an int"), **_INFO},
    "knobs": {
        "op": (True, lambda v: v in KNOB_OPS, f"one of {KNOB_OPS}"),
        "concepts": (False, _t_names, f"a list of <= {MAX_NAMES} names"),
        "strengths": (False, _t_number_map, "a map of concept -> finite number"),
        **_INFO,
    },
    "heartbeat": {"client": (False, _t_str, "a string"), **_INFO},
    "control": {
        "op": (True, _t_op, f"a non-empty string of <= {MAX_OP_CHARS} characters"),
        "args": (True, _t_plain_map, "a map of plain values (no arrays)"),
    },
}
_REPLIES: dict[str, _Spec] = {
    "hello": {
        "protocol": (True, _t_int, "an int"),
        "policy": (True, _t_str, "a string"),
        "action_dim": (True, _t_int, "an int"),
        "chunk_length": (True, _t_int, "an int"),
        "control_hz": (True, _t_number, "a number"),
        "image_keys": (True, _t_shape_map, "a map of image key -> shape"),
        "concepts": (True, _t_names, "a list of names"),
        **_INFO,
    },
    "infer": {
        "actions": (True, _t_actions, "a 2-D float array (chunk, action_dim)"),
        "activations": (False, _t_array_map, "a map of name -> array"),
        **_INFO,
    },
    "reset": {**_INFO},
    "knobs": {"knobs": (True, _t_dict_map, "a map of concept -> state map"), **_INFO},
    "heartbeat": {
        "time": (True, _t_number, "a number"),
        "busy": (False, lambda v: isinstance(v, bool), "a bool"),
        **_INFO,
    },
    "error": {
        "code": (True, _t_str, "a string"),
        "message": (True, _t_str, "a string"),
        "field": (False, _t_opt_str, "a string or None"),
        **_INFO,
    },
}


def _check_spec(payload: dict, spec: _Spec, what: str) -> None:
    for name, (required, check, wants) in spec.items():
        if name not in payload:
            if required:
                raise ProtocolError(Code.MISSING_FIELD, f"{what} payload has no {name!r}", name)
        elif not check(payload[name]):
            raise ProtocolError(Code.BAD_PAYLOAD, f"{what} field {name!r} must be {wants}", name)
    extra = sorted(set(payload) - set(spec))
    if extra:
        raise ProtocolError(Code.BAD_PAYLOAD, f"{what} payload has unknown fields {extra}", extra[0])


def check_request(msg: Message) -> None:
    """Validate a request's kind and payload schema (after `decode`)."""
    if msg.kind not in REQUEST_KINDS:
        raise ProtocolError(
            Code.BAD_KIND, f"{msg.kind!r} is not a request kind; expected one of {REQUEST_KINDS}", "kind"
        )
    _check_spec(msg.payload, _REQUESTS[msg.kind], f"{msg.kind} request")
    if msg.kind == "knobs":
        op = msg.payload["op"]
        if op == "set" and "strengths" not in msg.payload:
            raise ProtocolError(Code.MISSING_FIELD, "knobs 'set' needs 'strengths'", "strengths")
        if op in ("enable", "disable") and not msg.payload.get("concepts"):
            raise ProtocolError(
                Code.MISSING_FIELD, f"knobs {op!r} needs a non-empty 'concepts' list", "concepts"
            )


def check_reply(msg: Message, expected_kind: str) -> None:
    """Validate a reply: either an error or the same kind as the request, with that kind's schema."""
    if msg.kind != "error" and msg.kind != expected_kind:
        raise ProtocolError(Code.BAD_KIND, f"expected a {expected_kind!r} reply, got {msg.kind!r}", "kind")
    if msg.kind == "control":  # free-form: whatever map the node's control handler returned
        return
    _check_spec(msg.payload, _REPLIES[msg.kind], f"{msg.kind} reply")


def error_payload(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "field": field}


# ----------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ServerInfo:
    """The "hello" reply: what a client needs to know to drive the policy."""

    policy: str
    action_dim: int
    chunk_length: int
    control_hz: float
    image_keys: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # key -> (H, W, C)
    concepts: tuple[str, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)  # policy-specific extras (e.g. unnorm_key)

    def to_payload(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "policy": self.policy,
            "action_dim": int(self.action_dim),
            "chunk_length": int(self.chunk_length),
            "control_hz": float(self.control_hz),
            "image_keys": {k: [int(d) for d in s] for k, s in self.image_keys.items()},
            "concepts": list(self.concepts),
            "info": dict(self.info),
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ServerInfo:
        return cls(
            policy=payload["policy"],
            action_dim=payload["action_dim"],
            chunk_length=payload["chunk_length"],
            control_hz=float(payload["control_hz"]),
            image_keys={k: tuple(s) for k, s in payload["image_keys"].items()},
            concepts=tuple(payload["concepts"]),
            info=dict(payload.get("info", {})),
        )


@dataclass
class InferResult:
    """The "infer" reply: an action chunk (chunk_length, action_dim) and the requested activations."""

    actions: np.ndarray
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"actions": self.actions}
        if self.activations:
            out["activations"] = self.activations
        if self.info:
            out["info"] = self.info
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> InferResult:
        return cls(payload["actions"], dict(payload.get("activations", {})), dict(payload.get("info", {})))


@dataclass(frozen=True)
class KnobsRequest:
    """A "knobs" request. `concepts=None` means all concepts (for list/get)."""

    op: str
    concepts: tuple[str, ...] | None = None
    strengths: Mapping[str, float] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op}
        if self.concepts is not None:
            out["concepts"] = list(self.concepts)
        if self.op == "set":
            out["strengths"] = {k: float(v) for k, v in self.strengths.items()}
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> KnobsRequest:
        concepts = payload.get("concepts")
        return cls(
            payload["op"], None if concepts is None else tuple(concepts), dict(payload.get("strengths", {}))
        )


@dataclass(frozen=True)
class TelemetryRecord:
    """One per-request record from the server's PUB socket. Latencies are in milliseconds."""

    kind: str
    request_id: int
    client: str  # hex routing id of the sender
    ok: bool
    error_code: str | None
    latency_ms: Mapping[str, float]  # decode, queue (worker kinds), handler, encode, total
    telemetry: Mapping[str, Any]  # whatever the handler returned as telemetry
    timestamp: float

    def to_payload(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "request_id": self.request_id,
            "client": self.client,
            "ok": self.ok,
            "error_code": self.error_code,
            "latency_ms": dict(self.latency_ms),
            "telemetry": dict(self.telemetry),
        }

    @classmethod
    def from_message(cls, msg: Message) -> TelemetryRecord:
        p = msg.payload
        try:
            return cls(
                kind=str(p["kind"]),
                request_id=int(p["request_id"]),
                client=str(p["client"]),
                ok=bool(p["ok"]),
                error_code=p.get("error_code"),
                latency_ms={str(k): float(v) for k, v in p["latency_ms"].items()},
                telemetry=dict(p.get("telemetry") or {}),
                timestamp=msg.timestamp,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(Code.BAD_PAYLOAD, f"bad telemetry record: {e!r}", "payload") from e


def parse_strengths(items: list[str]) -> dict[str, float]:
    """['fast=4', 'up=-2.5'] -> {'fast': 4.0, 'up': -2.5}; anything else names the bad item."""
    out = {}
    for item in items:
        name, sep, value = item.strip().partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"knob settings look like fast=4 or up=-2.5, got {item!r}") from None
        if not math.isfinite(out[name]):
            raise ValueError(f"knob {name!r}: the strength must be a finite number, got {value!r}")
    return out


def parse_setting(text: str) -> dict[str, float]:
    """'off' -> {} (every knob off); 'fast=4,up=2' -> {'fast': 4.0, 'up': 2.0}."""
    return {} if text.strip() in ("off", "baseline", "") else parse_strengths(text.split(","))
