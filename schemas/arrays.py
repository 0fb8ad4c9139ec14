"""Packed binary arrays: token ids as little-endian int32, per-token floats as little-endian float32.

A list of ints costs 1-5 bytes per element plus a decode loop; a packed array is one memcpy on either
side and is trivial to produce in any language. Byte order is fixed (little-endian), not native, so a
big-endian host reads the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import msgspec
import numpy as np

from hotlora.schemas.errors import SchemaError

I32 = np.dtype("<i4")
F32 = np.dtype("<f4")
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1

# The ``extra`` metadata names the element type: property tests and docs read it from the type itself.
I32Array = Annotated[bytes, msgspec.Meta(extra={"dtype": "<i4"}, description="packed little-endian int32")]
F32Array = Annotated[bytes, msgspec.Meta(extra={"dtype": "<f4"}, description="packed little-endian float32")]


def pack_i32(values: Iterable[int] | np.ndarray) -> bytes:
    """Pack integers (token ids) as little-endian int32; out-of-range values are an error, not a wrap."""
    array = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    if array.size == 0:
        return b""
    if array.dtype.kind not in "iub":
        raise SchemaError(f"int32 array needs integers, got dtype {array.dtype}")
    if int(array.min()) < _I32_MIN or int(array.max()) > _I32_MAX:
        raise SchemaError("int32 array value out of range")
    return array.astype(I32, copy=False).reshape(-1).tobytes()


def pack_f32(values: Iterable[float] | np.ndarray) -> bytes:
    """Pack floats (logprobs, weights, advantages) as little-endian float32."""
    array = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    return array.astype(F32).reshape(-1).tobytes()


def unpack_i32(data: bytes) -> np.ndarray:
    """Writable int64 copy of a packed int32 array (int64 is what torch token tensors use)."""
    check_length("int32 array", data, 4)
    return np.frombuffer(data, dtype=I32).astype(np.int64)


def unpack_f32(data: bytes) -> np.ndarray:
    """Writable float32 copy of a packed float32 array."""
    check_length("float32 array", data, 4)
    return np.frombuffer(data, dtype=F32).astype(np.float32)


def check_length(name: str, data: bytes, itemsize: int) -> None:
    """Reject a packed array whose byte length is not a whole number of elements."""
    if len(data) % itemsize:
        raise SchemaError(f"{name} has {len(data)} bytes, not a multiple of {itemsize}")
