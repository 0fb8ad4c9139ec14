"""Packed binary arrays: token ids as little-endian int32, per-token floats as little-endian float32.

A list of ints costs 1-5 bytes per element plus a decode loop; a packed array is one memcpy on either
side and is trivial to produce in any language. Byte order is fixed (little-endian), not native, so a
big-endian host reads the same bytes. The standard library's ``array`` does the packing: the wire
layer needs neither numpy nor torch (the Kafka edge turns these into tensors, ``engine.kafka.convert``).
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterable
from typing import Annotated

import msgspec

from hotlora.schemas.errors import SchemaError

# ``array`` typecodes of exactly 4 bytes on every platform CPython supports; checked, not assumed.
I32, F32 = "i", "f"
assert array.array(I32).itemsize == 4 and array.array(F32).itemsize == 4
_BIG_ENDIAN = sys.byteorder == "big"

# The ``extra`` metadata names the element type: property tests and docs read it from the type itself.
I32Array = Annotated[bytes, msgspec.Meta(extra={"dtype": "<i4"}, description="packed little-endian int32")]
F32Array = Annotated[bytes, msgspec.Meta(extra={"dtype": "<f4"}, description="packed little-endian float32")]


def pack_i32(values: Iterable[int]) -> bytes:
    """Pack integers (token ids) as little-endian int32; out-of-range values are an error, not a wrap."""
    try:
        packed = array.array(I32, values if isinstance(values, list | tuple | range) else list(values))
    except OverflowError:
        raise SchemaError("int32 array value out of range") from None
    except TypeError as err:
        raise SchemaError(f"int32 array needs integers ({err})") from None
    return _little_endian(packed)


def pack_f32(values: Iterable[float]) -> bytes:
    """Pack floats (logprobs, weights, advantages) as little-endian float32."""
    try:
        packed = array.array(F32, [float(v) for v in values])
    except (TypeError, ValueError) as err:
        raise SchemaError(f"float32 array needs numbers ({err})") from None
    return _little_endian(packed)


def unpack_i32(data: bytes) -> array.array[int]:
    """A packed int32 array as an ``array('i')`` in native byte order (``.tolist()`` for plain ints)."""
    check_length("int32 array", data, 4)
    return _native(I32, data)


def unpack_f32(data: bytes) -> array.array[float]:
    """A packed float32 array as an ``array('f')`` in native byte order."""
    check_length("float32 array", data, 4)
    return _native(F32, data)


def check_length(name: str, data: bytes, itemsize: int) -> None:
    """Reject a packed array whose byte length is not a whole number of elements."""
    if len(data) % itemsize:
        raise SchemaError(f"{name} has {len(data)} bytes, not a multiple of {itemsize}")


def _little_endian(packed: array.array) -> bytes:  # type: ignore[type-arg]
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def _native(typecode: str, data: bytes) -> array.array:  # type: ignore[type-arg]
    unpacked = array.array(typecode)
    unpacked.frombytes(data)
    if _BIG_ENDIAN:
        unpacked.byteswap()
    return unpacked
