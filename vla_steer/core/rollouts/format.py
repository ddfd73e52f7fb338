"""The record format: how one record is framed on disk, and the checks a value passes before it is written.

A record is a 20-byte prefix `<4sIQI` (magic b"VSR1", header length, body length, crc32 of header + body),
a msgpack header (`k`: "meta" | "step" | "event" | "end", plain values, and an `arrays` table of
`[name, dtype, shape]`), then the arrays' raw little-endian buffers back to back. Nothing is ever pickled:
headers hold plain values only (`plain`), arrays only the numeric dtypes in `DTYPES`.

The magic doubles as the sync marker: after a damaged record the reader searches for the next `MAGIC` whose
record decodes with a matching crc (see `damage.walk`). A false match inside array data fails its crc (or
its lengths), so resynchronising needs no change to this framing and every log ever written reads the same.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np

FORMAT_NAME = "vla-steer-rollouts"
FORMAT_VERSION = 1
MARKER = "rollouts.json"  # at the store's root: {"format": FORMAT_NAME, "version": FORMAT_VERSION}
LOG = "log.bin"  # an episode's append-only records
SUMMARY = "summary.json"  # written when an episode is closed (a cache of what its log says)
ID_RE = re.compile(r"^(\d{6,})-[0-9a-f]{8}$")  # an episode directory: <NNNNNN>-<hex8>

MAGIC = b"VSR1"  # starts every record; the reader resynchronises on it
PREFIX = struct.Struct("<4sIQI")
_MAX_HEADER = 64 * 1024 * 1024
DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    | {"float16", "float32", "float64"}
)
# The one pose and velocity layout of every writer (sim nodes, robot node), recorded in each episode's
# metadata's "conventions" (beside the writer's own, e.g. its gripper's): a quaternion is (x, y, z, w); ee_vel
# is the linear velocity only.
CONVENTIONS = {"ee_quat": "xyzw", "ee_vel": "linear m/s, world (robot base) frame", "ee_pos": "m"}
# Per-step array fields: name -> required shape (None: any, fixed by the episode's first step) and ndim.
VECTORS: dict[str, tuple[tuple[int, ...] | None, int]] = {
    "state": (None, 1),
    "ee_pos": ((3,), 1),
    "ee_quat": ((4,), 1),
    "ee_vel": ((3,), 1),
    "action_chunk": (None, 2),
    "action": (None, 1),
}
FINITE_CHECKED = ("action", "action_chunk", "state")


class SchemaError(ValueError):
    """A step or metadata value the store cannot record. `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class BadRecord(Exception):
    """A truncated or corrupt record: the reader skips it and resynchronises on the next intact one."""


# ------------------------------------------------------------------------------------------- framing


def encode_record(header: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """One record: `header` (plain values; its `arrays` table is filled in here) and the arrays' buffers."""
    table, bufs = [], []
    for name, a in arrays.items():
        table.append([name, a.dtype.name, list(a.shape)])
        bufs.append(a.reshape(-1).view(np.uint8))
    head = msgpack.packb({**header, "arrays": table}, use_bin_type=True)
    crc = zlib.crc32(head)
    for b in bufs:
        crc = zlib.crc32(b, crc)
    body = sum(b.nbytes for b in bufs)
    return b"".join([PREFIX.pack(MAGIC, len(head), body, crc), head, *bufs])


def decode_record(
    view: memoryview, pos: int, keep: Callable[[str], bool] | None = None
) -> tuple[dict, dict[str, np.ndarray], int]:
    """Decode the record at `pos`: (header, arrays as views into `view`, end offset) or raise BadRecord.
    Only the arrays whose name `keep` accepts are made (all by default); the table is checked whole."""
    size = len(view)
    if size - pos < PREFIX.size:
        raise BadRecord("truncated record prefix")
    magic, hlen, blen, crc = PREFIX.unpack_from(view, pos)
    if magic != MAGIC:
        raise BadRecord("bad magic")
    start = pos + PREFIX.size
    end = start + hlen + blen
    if hlen > _MAX_HEADER or end > size:
        raise BadRecord("truncated record")
    head, body = view[start : start + hlen], view[start + hlen : end]
    if zlib.crc32(body, zlib.crc32(head)) != crc:
        raise BadRecord("crc mismatch")
    try:
        header = msgpack.unpackb(head, raw=False, ext_hook=_no_ext, strict_map_key=True)
    except Exception as e:  # any msgpack failure means a corrupt record, whatever its class
        raise BadRecord(f"bad header: {e}") from None
    table = header.get("arrays") if isinstance(header, dict) else None
    if not isinstance(table, list):
        raise BadRecord("header has no array table")
    arrays, off = {}, 0
    for entry in table:
        try:
            name, dtype_name, shape = entry
            if dtype_name not in DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(entry)
            dtype = np.dtype(dtype_name).newbyteorder("<")
            count = math.prod(shape)
            if off + count * dtype.itemsize > blen:
                raise ValueError("runs past the body")
            if keep is None or keep(str(name)):
                arrays[str(name)] = np.frombuffer(body, dtype=dtype, count=count, offset=off).reshape(shape)
        except (ValueError, TypeError) as e:
            raise BadRecord(f"bad array entry {entry!r}: {e}") from None
        off += count * dtype.itemsize
    if off != blen:
        raise BadRecord("array table does not cover the body")
    return header, arrays, end


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


# -------------------------------------------------------------------------------------------- values


def field_name(array_name: str) -> str:
    """The name a caller gave for a stored array name ("img/wrist" -> "images['wrist']")."""
    if array_name.startswith("img/"):
        return f"images[{array_name[4:]!r}]"
    if array_name.startswith("act/"):
        return f"activations[{array_name[4:]!r}]"
    return array_name


def check_key(key: Any, what: str) -> str:
    if not isinstance(key, str) or not key:
        raise SchemaError(what, f"keys must be non-empty str, got {key!r}")
    return key


def as_array(value: Any, name: str) -> np.ndarray:
    """A contiguous little-endian numeric array, or SchemaError."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged lists and the like
        raise SchemaError(name, f"not an array: {e}") from None
    if a.dtype.name not in DTYPES:
        raise SchemaError(name, f"dtype {a.dtype} is not numeric (allowed: {', '.join(sorted(DTYPES))})")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a)


def as_vector(value: Any, name: str) -> np.ndarray:
    """One of the `VECTORS` fields, with its required shape or number of dimensions."""
    a = as_array(value, name)
    shape, ndim = VECTORS[name]
    if a.ndim != ndim or (shape is not None and a.shape != shape):
        want = shape if shape is not None else f"{ndim}-D"
        raise SchemaError(name, f"expected shape {want}, got {a.shape}")
    return a


def as_image(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
        got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise SchemaError(name, f"expected a uint8 (H, W, 3) array, got {got}")
    return np.ascontiguousarray(value)


def as_activation(value: Any, name: str) -> np.ndarray:
    a = as_array(value, name)
    if a.dtype.kind != "f":
        raise SchemaError(name, f"activations must be floating point, got {a.dtype}")
    return a


def as_scalar(value: Any, name: str) -> float:
    if isinstance(value, (str, bytes)) or (isinstance(value, np.ndarray) and value.size != 1):
        raise SchemaError(name, f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SchemaError(name, f"expected a number, got {value!r}") from None


def plain(obj: Any, path: str) -> Any:
    """A JSON/msgpack-safe copy: numpy scalars and small arrays become Python values; junk is refused."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in DTYPES:
            raise SchemaError(path, f"array of dtype {obj.dtype} is not allowed here")
        return obj.tolist()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise SchemaError(path, f"keys must be str, got {k!r}")
            out[k] = plain(v, f"{path}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    raise SchemaError(path, f"{type(obj).__name__} cannot be stored (use plain values or numpy arrays)")
