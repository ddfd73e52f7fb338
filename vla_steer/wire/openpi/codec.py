"""openpi's message encoding, read strictly: msgpack maps with numpy arrays as tagged maps, never pickle.

An openpi peer (the `openpi-client` package) packs a numpy array as the map
`{b"__ndarray__": True, b"data": <raw bytes>, b"dtype": <dtype.str, e.g. "<f4">, b"shape": [...]}` and a
numpy scalar as `{b"__npgeneric__": True, b"data": <value>, b"dtype": ...}`; everything else is plain
msgpack. `unpack` accepts exactly that and nothing more: numeric dtypes only (no object, void or structured
dtypes, so nothing can ask for pickle), the byte length must match the shape, extension types are refused,
and the number and size of maps and lists are bounded, so a few hostile bytes cannot become gigabytes.
Every refusal is a `ProtocolError` whose message names what was wrong.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack
import numpy as np

from vla_steer.wire.codec import MAX_DIM, MAX_HEADER_CONTAINERS, MAX_HEADER_LEN, MAX_NDIM, Code, ProtocolError

_ARRAY_KEYS = {b"__ndarray__", b"data", b"dtype", b"shape"}
_SCALAR_KEYS = {b"__npgeneric__", b"data", b"dtype"}
# bool, signed and unsigned ints, floats; any byte order. Nothing else is ever turned into a dtype.
_DTYPE = re.compile(r"^[<>|=]?(b1|i1|i2|i4|i8|u1|u2|u4|u8|f2|f4|f8)$")


def pack(obj: Any) -> bytes:
    """Pack plain values and numpy arrays/scalars the way openpi's client and server do."""
    return msgpack.packb(obj, default=_pack_numpy, use_bin_type=True)


def unpack(data: bytes, max_bytes: int) -> Any:
    """Unpack one message; raises `ProtocolError` naming the problem. Arrays come back read-only."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(Code.MALFORMED, "expected a binary msgpack message", "message")
    if len(data) > max_bytes:
        raise ProtocolError(Code.TOO_LARGE, f"message is {len(data)} bytes, over {max_bytes}", "message")
    containers = [MAX_HEADER_CONTAINERS]

    def count(obj: Any) -> Any:
        containers[0] -= 1
        if containers[0] < 0:
            raise ProtocolError(
                Code.TOO_LARGE, f"more than {MAX_HEADER_CONTAINERS} maps and lists", "message"
            )
        return obj

    def object_hook(obj: dict) -> Any:
        count(obj)
        if b"__ndarray__" in obj:
            return _array(obj)
        if b"__npgeneric__" in obj:
            return _scalar(obj)
        return obj

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            timestamp=0,
            object_hook=object_hook,
            list_hook=count,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=MAX_HEADER_LEN,
            max_map_len=MAX_HEADER_LEN,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many ValueError/TypeError subclasses on garbage
        code = Code.TOO_LARGE if "exceeds max_" in str(e) else Code.MALFORMED
        raise ProtocolError(code, f"not a valid openpi (msgpack) message: {e}", "message") from e


def _array(obj: dict) -> np.ndarray:
    if set(obj) != _ARRAY_KEYS:
        raise ProtocolError(
            Code.BAD_PAYLOAD, f"an __ndarray__ map has keys {sorted(map(repr, obj))}", "array"
        )
    dtype = _dtype(obj[b"dtype"])
    shape, data = obj[b"shape"], obj[b"data"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise ProtocolError(
            Code.BAD_SHAPE, f"array shape must be <= {MAX_NDIM} sizes, got {shape!r}", "array"
        )
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise ProtocolError(
            Code.BUFFER_SIZE,
            f"array {dtype.name}{shape} needs {math.prod(shape) * dtype.itemsize} bytes, got {got}",
            "array",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)  # read-only: a view of the message


def _scalar(obj: dict) -> int | float | bool:
    if set(obj) != _SCALAR_KEYS:
        raise ProtocolError(
            Code.BAD_PAYLOAD, f"an __npgeneric__ map has keys {sorted(map(repr, obj))}", "scalar"
        )
    dtype, value = _dtype(obj[b"dtype"]), obj[b"data"]
    if not isinstance(value, (bool, int, float)):
        raise ProtocolError(
            Code.BAD_PAYLOAD, f"a numpy scalar's value must be a number, got {value!r}", "scalar"
        )
    try:
        return dtype.type(value).item()
    except (OverflowError, ValueError) as e:
        raise ProtocolError(Code.BAD_PAYLOAD, f"{value!r} is not a {dtype.name}: {e}", "scalar") from None


def _dtype(text: Any) -> np.dtype:
    if not isinstance(text, str) or not _DTYPE.match(text):
        raise ProtocolError(
            Code.BAD_DTYPE, f"dtype {text!r} not allowed (bool, int, uint or float arrays only)", "dtype"
        )
    return np.dtype(text)


def _pack_numpy(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if not _DTYPE.match(obj.dtype.str):
            raise TypeError(f"cannot send a {obj.dtype} array (bool, int, uint or float only)")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}  # fmt: skip
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot pack a {type(obj).__name__}")


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} not allowed")
