"""The few protobuf messages of the Tinker API, read and written by hand (no ``protobuf`` dependency).

Since SDK 0.25 the ``tinker`` SDK posts ``forward_backward`` as a protobuf ``ForwardBackwardRequest`` and
asks for ``ForwardBackwardOutput`` and ``SampleResponse`` results as protobuf
(``Accept: application/x-protobuf``). These are small proto3 messages whose bulk is packed bytes, so a
hand-written codec of the wire format (varints, length-delimited fields, fixed64 doubles) is short and
fast: Python loops run over field tags only, never over tokens. Field numbers are the SDK's
(``tinker/proto/tinker_public_pb2``), read from its descriptor; ``tests/test_gateway_proto.py`` checks this
codec against the SDK's own generated classes in both directions.

Unknown fields are skipped, as proto3 requires, so a newer SDK that adds fields still decodes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

# Wire types.
VARINT, I64, LEN, I32 = 0, 1, 2, 5

# The DType enum of tinker_public.proto.
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32, DTYPE_BFLOAT16 = 1, 2, 3, 4
NUMPY_DTYPES = {DTYPE_FLOAT32: np.dtype("<f4"), DTYPE_INT64: np.dtype("<i8"), DTYPE_INT32: np.dtype("<i4")}
STOP_REASONS = {"stop": 0, "length": 1}


class ProtoError(ValueError):
    """The body is not a well-formed message of the expected type."""


# ----- reading -----


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtoError("varint longer than 10 bytes")


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of each field: an int for varints and fixed-width fields (their
    raw bits), ``bytes`` for length-delimited ones."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ProtoError("field number 0")
        if wire == VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ProtoError("length-delimited field runs past the end")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire == I64:
            if pos + 8 > end:
                raise ProtoError("truncated fixed64")
            yield number, wire, int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == I32:
            if pos + 4 > end:
                raise ProtoError("truncated fixed32")
            yield number, wire, int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise ProtoError(f"unsupported wire type {wire} (groups are not used by this API)")


def _signed(value: int) -> int:
    """A varint read as int32/int64: negative numbers travel as 64-bit two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _double(bits: int) -> float:
    return float(struct.unpack("<d", bits.to_bytes(8, "little"))[0])


def _text(value: int | bytes, name: str) -> str:
    if not isinstance(value, bytes):
        raise ProtoError(f"{name} must be length-delimited")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtoError(f"{name} is not UTF-8") from err


def _blob(value: int | bytes, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtoError(f"{name} must be length-delimited")
    return value


def _ints(wire: int, value: int | bytes) -> list[int]:
    """A repeated integer field: packed (proto3's default) or one value per field."""
    if wire == VARINT:
        return [_signed(value)]  # type: ignore[arg-type]
    out, pos, buf = [], 0, _blob(value, "packed integers")
    while pos < len(buf):
        item, pos = _varint(buf, pos)
        out.append(_signed(item))
    return out


@dataclass
class Tensor:
    """``tinker_public.Tensor``: dense bytes (or a sparse CSR layout, which the gateway refuses)."""

    dtype: int = 0
    shape: list[int] = field(default_factory=list)
    dense: bytes | None = None
    sparse: bool = False

    def array(self) -> np.ndarray:
        if self.sparse:
            raise ProtoError("sparse (CSR) tensors are not supported; send dense tensors")
        np_dtype = NUMPY_DTYPES.get(self.dtype)
        if np_dtype is None:
            raise ProtoError(f"unsupported tensor dtype {self.dtype}")
        data = np.frombuffer(self.dense or b"", dtype=np_dtype)
        if self.shape:
            if int(np.prod(self.shape)) != data.size:
                raise ProtoError(f"tensor of shape {self.shape} has {data.size} values")
            data = data.reshape(self.shape)
        return data


def read_tensor(buf: bytes) -> Tensor:
    tensor = Tensor()
    for number, wire, value in fields(buf):
        if number == 1:
            tensor.dense = _blob(value, "Tensor.dense")
        elif number == 2:
            tensor.sparse = True
        elif number == 3:
            tensor.dtype = int(value)  # type: ignore[arg-type]
        elif number == 4:
            tensor.shape.extend(_ints(wire, value))
    return tensor


@dataclass
class ProtoDatum:
    """``tinker_public.Datum``: the model input's token chunks and the loss inputs by name."""

    chunks: list[np.ndarray] = field(default_factory=list)  # int32 tokens of each text chunk
    loss_fn_inputs: dict[str, Tensor] = field(default_factory=dict)
    other_chunks: list[str] = field(default_factory=list)  # image / dmel chunks, which are refused

    def tokens(self) -> np.ndarray:
        if self.other_chunks:
            raise ProtoError(f"only text (encoded_text) chunks are supported, got {sorted(set(self.other_chunks))}")
        if not self.chunks:
            return np.zeros(0, dtype=np.int32)
        return self.chunks[0] if len(self.chunks) == 1 else np.concatenate(self.chunks)


def _map_entry(buf: bytes) -> tuple[str, int | bytes | None]:
    key, value = "", None
    for number, _wire, item in fields(buf):
        if number == 1:
            key = _text(item, "map key")
        elif number == 2:
            value = item
    return key, value


def read_datum(buf: bytes) -> ProtoDatum:
    datum = ProtoDatum()
    for number, _wire, value in fields(buf):
        if number == 1:  # Chunk (a oneof)
            for kind, _w, chunk in fields(_blob(value, "Chunk")):
                if kind == 1:  # EncodedTextChunk
                    tokens = b""
                    for n, _ww, raw in fields(_blob(chunk, "EncodedTextChunk")):
                        if n == 1:
                            tokens = _blob(raw, "EncodedTextChunk.tokens")
                    if len(tokens) % 4:
                        raise ProtoError("EncodedTextChunk.tokens is not a whole number of int32 values")
                    datum.chunks.append(np.frombuffer(tokens, dtype="<i4"))
                else:
                    datum.other_chunks.append({2: "image", 3: "dmel"}.get(kind, f"chunk field {kind}"))
        elif number == 2:
            key, raw = _map_entry(_blob(value, "loss_fn_inputs entry"))
            datum.loss_fn_inputs[key] = read_tensor(raw if isinstance(raw, bytes) else b"")
        # 3, 4: provenance spans, which only StableReinforce reads; ignored.
    return datum


@dataclass
class ProtoForwardBackward:
    """``tinker_public.ForwardBackwardRequest``."""

    model_id: str = ""
    seq_id: int | None = None
    data: list[ProtoDatum] = field(default_factory=list)
    loss_fn: str = ""
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False


def read_forward_backward(buf: bytes) -> ProtoForwardBackward:
    request = ProtoForwardBackward()
    legacy: dict[str, float] = {}
    typed: dict[str, float | str] = {}
    for number, wire, value in fields(buf):
        if number == 1:
            request.model_id = _text(value, "model_id")
        elif number == 2:
            request.seq_id = _signed(int(value)) if wire == VARINT else None  # type: ignore[arg-type]
        elif number == 3:
            request.data.append(read_datum(_blob(value, "Datum")))
        elif number == 4:
            request.loss_fn = _text(value, "loss_fn")
        elif number == 5:  # map<string, double>
            key, raw = _map_entry(_blob(value, "loss_fn_config entry"))
            legacy[key] = _double(raw) if isinstance(raw, int) else 0.0
        elif number == 6:
            request.forward_only = bool(value)
        elif number == 7:  # map<string, LossConfigValue>, preferred when present
            key, raw = _map_entry(_blob(value, "loss_fn_config_v2 entry"))
            for n, _w, item in fields(raw if isinstance(raw, bytes) else b""):
                if n == 1:
                    typed[key] = _double(int(item))  # type: ignore[arg-type]
                elif n == 2:
                    typed[key] = _text(item, "LossConfigValue.text")
    request.loss_fn_config = {**legacy, **typed}
    return request


# ----- writing -----


def _put_varint(out: bytearray, value: int) -> None:
    value &= (1 << 64) - 1
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_tag(out: bytearray, number: int, wire: int) -> None:
    _put_varint(out, (number << 3) | wire)


def _put_bytes(out: bytearray, number: int, data: bytes | bytearray) -> None:
    _put_tag(out, number, LEN)
    _put_varint(out, len(data))
    out += data


def _put_uint(out: bytearray, number: int, value: int) -> None:
    if value:  # proto3 leaves zero scalars out
        _put_tag(out, number, VARINT)
        _put_varint(out, value)


def _put_double(out: bytearray, number: int, value: float) -> None:
    _put_tag(out, number, I64)
    out += struct.pack("<d", value)


def _put_packed(out: bytearray, number: int, values: list[int]) -> None:
    if values:
        packed = bytearray()
        for value in values:
            _put_varint(packed, value)
        _put_bytes(out, number, packed)


@dataclass
class OutSequence:
    tokens: np.ndarray  # int32
    logprobs: np.ndarray | None  # float32
    stop_reason: str


def write_sample_response(sequences: list[OutSequence], prompt_logprobs: np.ndarray | None = None) -> bytes:
    """``tinker_public.SampleResponse``: the sampled sequences, and the prompt's logprobs if asked for (float32,
    NaN where a position has none)."""
    out = bytearray()
    for seq in sequences:
        body = bytearray()
        _put_uint(body, 1, STOP_REASONS[seq.stop_reason])
        _put_bytes(body, 2, np.ascontiguousarray(seq.tokens, dtype="<i4").tobytes())
        if seq.logprobs is not None:
            _put_bytes(body, 3, np.ascontiguousarray(seq.logprobs, dtype="<f4").tobytes())
        _put_bytes(out, 1, body)
    if prompt_logprobs is not None:
        _put_bytes(out, 2, np.ascontiguousarray(prompt_logprobs, dtype="<f4").tobytes())
    return bytes(out)


def write_forward_backward_output(
    per_datum: dict[str, list[np.ndarray]], metrics: dict[str, float], output_type: str = "ArrayRecord"
) -> bytes:
    """``tinker_public.ForwardBackwardOutput``: for each output name, every datum's float32 array concatenated,
    with byte offsets marking where each datum's array starts. Datums whose arrays have the same trailing
    shape (``(N,)``, or ``(N, K)`` for top-K targets) share one ``ArrayRecord``; a new record starts where it
    changes, in datum order."""
    out = bytearray()
    _put_bytes(out, 1, output_type.encode())
    names = list(per_datum)
    count = len(per_datum[names[0]]) if names else 0
    start = 0
    while start < count:
        trailing = per_datum[names[0]][start].shape[1:]
        end = start + 1
        while end < count and per_datum[names[0]][end].shape[1:] == trailing:
            end += 1
        _put_bytes(out, 2, _array_record(output_type, {n: per_datum[n][start:end] for n in names}, trailing))
        start = end
    for key, value in metrics.items():
        entry = bytearray()
        _put_bytes(entry, 1, key.encode())
        _put_double(entry, 2, float(value))
        _put_bytes(out, 3, entry)
    return bytes(out)


def _array_record(output_type: str, per_datum: dict[str, list[np.ndarray]], trailing: tuple[int, ...]) -> bytes:
    record = bytearray()
    _put_bytes(record, 1, output_type.encode())
    for name, arrays in per_datum.items():
        parts = [np.ascontiguousarray(a, dtype="<f4").tobytes() for a in arrays]
        offsets = np.cumsum([0, *(len(p) for p in parts)], dtype="<i8")
        tensor = bytearray()
        _put_bytes(tensor, 1, b"".join(parts))
        _put_bytes(tensor, 2, offsets.tobytes())
        _put_uint(tensor, 3, DTYPE_FLOAT32)
        _put_packed(tensor, 4, list(trailing))
        entry = bytearray()
        _put_bytes(entry, 1, name.encode())
        _put_bytes(entry, 2, tensor)
        _put_bytes(record, 2, entry)
    _put_uint(record, 3, len(next(iter(per_datum.values()), [])))
    return bytes(record)
