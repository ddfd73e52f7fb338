"""The frame format of the wire: how one message becomes ZeroMQ frames and back, strictly.

Torch-free on purpose: the LIBERO node imports this from its own Python environment, so only the standard
library, numpy and msgpack are allowed here (see DESIGN.md, "Boundaries"). What each kind's payload holds
is `vla_steer.wire.messages`; this module knows only the envelope.

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
`require_finite` is the opt-in NaN/inf check for observations and actions.

Longer than ~400 lines on purpose: `encode` and `decode` are each other's inverse and every limit below is
enforced by both, so they are read and changed together.
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
    if bufs[0].nbytes > max_bytes:
        raise too_large(total, max_bytes)
    header = _unpack_header(bufs[0], max_header_bytes)
    if not isinstance(header, dict):
        raise ProtocolError(Code.BAD_HEADER, f"header must be a map, got {type(header).__name__}", "header")
    rid, kind = _id_and_kind(header)
    try:
        # The size check comes after reading the header so that an oversize request still learns its
        # error reply's id (the header alone is small and has been bounded above).
        if total > max_bytes:
            raise too_large(total, max_bytes)
        return _decode_header(header, bufs, max_bytes)
    except ProtocolError as e:
        e.request_id, e.kind = rid, kind
        raise


def too_large(total: int, max_bytes: int) -> ProtocolError:
    """The error for a message of `total` bytes over `max_bytes`. Built where it is raised: an exception
    kept in a local of the frame that raises it forms a cycle (exception -> traceback -> frame -> exception)
    that would keep the message's frames alive until the garbage collector runs."""
    return ProtocolError(Code.TOO_LARGE, f"message is {total} bytes, over the limit of {max_bytes}", "frames")


def peek_id(header_frame: Any, max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[int | None, str | None]:
    """The request id and kind of a header frame, (None, None) when unreadable: enough to address an error
    reply to a request whose arrays were never kept (see `Server`: requests over the size cap)."""
    try:
        header = _unpack_header(_buffer(header_frame), max_header_bytes)
    except ProtocolError:
        return None, None
    return _id_and_kind(header) if isinstance(header, dict) else (None, None)


def _id_and_kind(header: dict) -> tuple[int | None, str | None]:
    rid = header.get("id")
    rid = rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= _MAX_ID else None
    kind = header.get("kind") if isinstance(header.get("kind"), str) else None
    return rid, kind


def _unpack_header(buf: memoryview, max_header_bytes: int) -> Any:
    """msgpack-decode a header frame within the header bounds (size, list/map lengths, containers)."""
    if buf.nbytes > max_header_bytes:
        raise ProtocolError(
            Code.TOO_LARGE,
            f"header frame is {buf.nbytes} bytes, over the header limit of {max_header_bytes} "
            "(arrays travel in frames of their own)",
            "header",
        )
    hook = _container_budget(MAX_HEADER_CONTAINERS)
    try:
        return msgpack.unpackb(
            buf,
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
