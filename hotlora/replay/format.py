"""The ``.hlr`` file: Kafka records as a stream of length-prefixed MessagePack frames (``docs/replay.md``).

Why this shape: a recording must be writable while a run is live (``record --follow``) and readable
without loading it whole, so it is a stream, not one document. Each frame is a 4-byte big-endian length
and one MessagePack map; the first frame is a header naming the format and its version, so a reader can
refuse a file it does not understand before it misreads one. Record values are the raw bytes taken off
the topic, never re-encoded, so a recording is evidence of exactly what travelled.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import msgspec

FORMAT_NAME = "hotlora-replay"
FORMAT_VERSION = 1
_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = (1 << 32) - 1


class HlrError(ValueError):
    """A file that is not an ``.hlr`` file of a version this reader supports, or is damaged."""


class Header(msgspec.Struct, kw_only=True):
    """Frame 0. ``kind`` is ``recording`` (``hotlora record``) or ``replay`` (``hotlora replay``'s output);
    ``meta`` says where the records came from (bootstrap, topics, filters, replay settings)."""

    format: str  # required on read: a map without it is not a header, whatever else it holds
    version: int
    kind: str = "recording"
    created_at_ms: int = 0
    meta: dict[str, Any] = msgspec.field(default_factory=dict)

    @classmethod
    def new(cls, kind: str, meta: dict[str, Any]) -> Header:
        return cls(
            format=FORMAT_NAME, version=FORMAT_VERSION, kind=kind, created_at_ms=time.time_ns() // 1_000_000, meta=meta
        )


class Record(msgspec.Struct, kw_only=True, frozen=True):
    """One Kafka record as consumed (or, in a replay file, as published): ``value`` is the raw bytes.

    ``timestamp`` is the record's Kafka timestamp in epoch ms (-1 when the broker gave none).
    """

    topic: str
    partition: int
    offset: int
    timestamp: int = -1
    key: bytes | None = None
    value: bytes | None = None
    headers: list[tuple[str, bytes]] = msgspec.field(default_factory=list)


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(Header)
_record_decoder = msgspec.msgpack.Decoder(Record)


class HlrWriter:
    """``with HlrWriter(path, header) as out: out.write(record)``; the header is written on open.

    Frames go through a buffered file; ``flush()`` makes what was written readable by another process
    (``record --follow`` flushes after every fetched batch, so an interrupted recording loses at most that).
    """

    def __init__(self, path: str | Path, header: Header) -> None:
        self.path = Path(path)
        self.header = header
        self.records = 0
        self._file: IO[bytes] | None = None

    def open(self) -> HlrWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close() / __exit__
        self._frame(_encoder.encode(self.header))
        self._file.flush()  # a file that exists has a readable header, even while a --follow recording runs
        return self

    def write(self, record: Record) -> None:
        self._frame(_encoder.encode(record))
        self.records += 1

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _frame(self, payload: bytes) -> None:
        if self._file is None:
            raise HlrError(f"{self.path} is not open for writing")
        if len(payload) > MAX_FRAME_BYTES:
            raise HlrError(f"a frame of {len(payload)} bytes does not fit the 32-bit length prefix")
        self._file.write(_LENGTH.pack(len(payload)))
        self._file.write(payload)

    def __enter__(self) -> HlrWriter:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _frames(stream: IO[bytes], path: Path, strict: bool) -> Iterator[bytes]:
    while True:
        prefix = stream.read(_LENGTH.size)
        if not prefix:
            return
        if len(prefix) < _LENGTH.size:
            if strict:
                raise HlrError(f"{path}: truncated length prefix at the end of the file")
            return
        (size,) = _LENGTH.unpack(prefix)
        payload = stream.read(size)
        if len(payload) < size:
            # A recording killed mid-write ends in a partial frame; everything before it is intact.
            if strict:
                raise HlrError(f"{path}: last frame truncated ({len(payload)} of {size} bytes)")
            return
        yield payload


def read_header(path: str | Path) -> Header:
    """Only the header frame: cheap, for ``meta`` look-ups."""
    path = Path(path)
    with open(path, "rb") as stream:
        for payload in _frames(stream, path, strict=True):
            return _decode_header(payload, path)
    raise HlrError(f"{path}: empty file, not a {FORMAT_NAME} file")


def iter_records(path: str | Path, *, strict: bool = False) -> Iterator[Record]:
    """The records of a file, streamed, after checking its header. ``strict=False`` drops a truncated last frame."""
    path = Path(path)
    with open(path, "rb") as stream:
        frames = _frames(stream, path, strict)
        first = next(frames, None)
        if first is None:
            raise HlrError(f"{path}: empty file, not a {FORMAT_NAME} file")
        _decode_header(first, path)
        for index, payload in enumerate(frames, start=1):
            try:
                yield _record_decoder.decode(payload)
            except msgspec.DecodeError as err:
                raise HlrError(f"{path}: frame {index} is not a record: {err}") from None


def read_file(path: str | Path) -> tuple[Header, list[Record]]:
    """Header and every record in memory (replay and diff need random access; recordings are small)."""
    return read_header(path), list(iter_records(path))


def _decode_header(payload: bytes, path: Path) -> Header:
    try:
        header = _header_decoder.decode(payload)
    except msgspec.DecodeError as err:
        raise HlrError(f"{path}: not a {FORMAT_NAME} file (bad header: {err})") from None
    if header.format != FORMAT_NAME:
        raise HlrError(f"{path}: format {header.format!r}, expected {FORMAT_NAME!r}")
    if header.version > FORMAT_VERSION:
        raise HlrError(f"{path}: {FORMAT_NAME} version {header.version}; this hotlora reads up to {FORMAT_VERSION}")
    return header
