"""Wire schema tests: property round trips for every message, rejection of bad bytes, engine mapping.

The message strategy is derived from each Struct's own type info (``msgspec.inspect``), so a message
type added later is covered without a hand-written strategy.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotlora.engine import types as eng
from hotlora.engine.kafka.convert import (
    ERROR_CODES,
    error_to_exception,
    from_engine,
    result_to_engine,
    to_engine,
    to_wire,
)
from hotlora.engine.types import (
    FLOAT_FIELDS,
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    OptimStepOutput,
    SamplingParams,
)
from hotlora.engine.types import AdapterInfo as EngineAdapterInfo
from hotlora.engine.types import SampledSequence as EngineSampledSequence
from hotlora.schemas import (
    MESSAGE_TYPES,
    REQUEST_TYPES,
    RESULT_FOR,
    SCHEMA_VERSION,
    Error,
    Message,
    SchemaError,
    Topics,
    decode,
    encode,
    key_for,
    pack_f32,
    pack_i32,
    tag_of,
    unpack_f32,
    unpack_i32,
)
from hotlora.schemas import messages as wire

PROTOCOL_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----- a strategy for any msgspec type, read from msgspec.inspect -----

_text = st.text(max_size=12)
_int32 = st.integers(-(2**31), 2**31 - 1)
_floats = st.floats(allow_nan=False, width=64)


def _packed(dtype: str) -> st.SearchStrategy[bytes]:
    if dtype == "<i4":
        return st.lists(_int32, max_size=8).map(pack_i32)
    return st.lists(st.floats(allow_nan=False, width=32), max_size=8).map(pack_f32)


def _strategy(info: msgspec.inspect.Type, extra: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    mi = msgspec.inspect
    if isinstance(info, mi.Metadata):
        return _strategy(info.type, info.extra)
    if isinstance(info, mi.StructType):
        fields = {f.name: _strategy(f.type) for f in info.fields}
        if "v" in fields:
            fields["v"] = st.just(SCHEMA_VERSION)  # other versions are rejected on purpose, tested below
        return st.builds(info.cls, **fields)
    if isinstance(info, mi.UnionType):
        return st.one_of(*(_strategy(t, extra) for t in info.types))
    if isinstance(info, mi.BytesType):
        return _packed(extra["dtype"]) if extra and "dtype" in extra else st.binary(max_size=8)
    if isinstance(info, mi.IntType):
        low = info.ge if info.ge is not None else -(2**63)
        return st.integers(low, 2**63 - 1)
    if isinstance(info, mi.FloatType):
        return _floats
    if isinstance(info, mi.StrType):
        return _text
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.ListType):
        return st.lists(_strategy(info.item_type), max_size=3)
    if isinstance(info, mi.DictType):
        return st.dictionaries(_strategy(info.key_type), _strategy(info.value_type), max_size=3)
    raise NotImplementedError(f"no strategy for {info!r}")


def messages_of(cls: type[Message]) -> st.SearchStrategy[Message]:
    return _strategy(msgspec.inspect.type_info(cls))


any_message = st.one_of(*(messages_of(cls) for cls in MESSAGE_TYPES))

# ----- round trips -----


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=tag_of)
def test_every_message_round_trips(cls: type[Message]) -> None:
    @FAST
    @given(messages_of(cls))
    def check(message: Message) -> None:
        data = encode(message)
        back = decode(data)
        assert type(back) is cls
        assert back == message
        assert encode(back) == data

    check()


def test_tags_are_unique_and_every_request_has_a_result() -> None:
    tags = [tag_of(cls) for cls in MESSAGE_TYPES]
    assert len(tags) == len(set(tags))
    assert set(RESULT_FOR) == set(REQUEST_TYPES)


@FAST
@given(st.lists(_int32, max_size=64))
def test_i32_round_trip(values: list[int]) -> None:
    data = pack_i32(values)
    assert len(data) == 4 * len(values)
    assert unpack_i32(data).tolist() == values
    assert data == np.asarray(values, dtype="<i4").tobytes()


@FAST
@given(st.lists(st.floats(width=32, allow_nan=False), max_size=64))
def test_f32_round_trip(values: list[float]) -> None:
    assert unpack_f32(pack_f32(values)).tolist() == values


def test_arrays_are_little_endian_and_range_checked() -> None:
    assert pack_i32([1, -1]) == b"\x01\x00\x00\x00\xff\xff\xff\xff"
    assert pack_f32([1.0]) == b"\x00\x00\x80\x3f"
    assert pack_i32(torch.tensor([7, 8]).numpy()) == pack_i32([7, 8])
    with pytest.raises(SchemaError):
        pack_i32([2**31])
    with pytest.raises(SchemaError):
        pack_i32([0.5])
    with pytest.raises(SchemaError):
        unpack_i32(b"\x00\x00\x00")


# ----- rejection -----


def _raw(message: Message, **changes: Any) -> bytes:
    """Re-encode a message as a plain dict with some keys changed (``None`` deletes the key)."""
    fields = msgspec.to_builtins(message, builtin_types=(bytes,))
    for key, value in changes.items():
        if value is None:
            fields.pop(key)
        else:
            fields[key] = value
    return msgspec.msgpack.encode(fields)


def _sample() -> wire.Sample:
    return wire.Sample(request_id="r1", adapter_id="a", reply_to="me", seq=3, prompt_tokens=pack_i32([1, 2]))


def _rejected(data: bytes, pattern: str) -> SchemaError:
    with pytest.raises(SchemaError, match=pattern) as info:
        decode(data)
    assert info.value.code == "bad_message"
    return info.value


def test_unknown_version_is_rejected_with_routing_fields() -> None:
    err = _rejected(_raw(_sample(), v=SCHEMA_VERSION + 1), "unsupported schema version v=2")
    assert (err.request_id, err.adapter_id, err.reply_to) == ("r1", "a", "me")


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"type": "no_such_verb"}, "Invalid value 'no_such_verb'"),
        ({"type": None}, "missing required field `type`"),
        ({"request_id": None}, "missing required field `request_id`"),
        ({"seq": None}, "missing required field `seq`"),
        ({"prompt_tokens": None}, "missing required field `prompt_tokens`"),
        ({"n": "one"}, r"Expected `int`, got `str` - at `\$.n`"),
        ({"prompt_tokens": [1, 2]}, r"Expected `bytes`, got `array` - at `\$.prompt_tokens`"),
        ({"prompt_tokens": b"\x01\x00\x00"}, "3 bytes, not a multiple of 4"),
        ({"seq": -1}, r"Expected `int` >= 0"),
        ({"n": 0}, r"Expected `int` >= 1"),
    ],
)
def test_bad_fields_are_rejected(changes: dict[str, Any], pattern: str) -> None:
    err = _rejected(_raw(_sample(), **changes), pattern)
    if "request_id" not in changes:
        assert err.request_id == "r1"


def test_bad_nested_array_names_its_path() -> None:
    datum = wire.Datum(input_tokens=pack_i32([1]), target_tokens=pack_i32([2]))
    message = wire.ForwardBackward(adapter_id="a", datums=[datum])
    fields = msgspec.to_builtins(message, builtin_types=(bytes,))
    fields["datums"][0]["weights"] = b"\x00\x00"
    _rejected(msgspec.msgpack.encode(fields), r"at `\$.datums\[0\]`")


def test_truncated_and_non_map_bytes_are_rejected() -> None:
    data = encode(_sample())
    for cut in range(len(data)):
        with pytest.raises(SchemaError):
            decode(data[:cut])
    _rejected(msgspec.msgpack.encode([1, 2, 3]), "bad envelope")
    _rejected(b"\xc1", "bad envelope")
    with pytest.raises(SchemaError):
        encode({"type": "sample"})  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64) | any_message.map(encode))
def test_random_bytes_only_raise_schema_error(data: bytes) -> None:
    with contextlib.suppress(SchemaError):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(any_message.map(encode), st.integers(0, 10_000), st.integers(0, 255))
def test_flipped_bytes_only_raise_schema_error(data: bytes, position: int, value: int) -> None:
    mutated = bytearray(data)
    mutated[position % len(mutated)] = value
    with contextlib.suppress(SchemaError):
        decode(bytes(mutated))


# ----- topics -----


def test_topics_route_every_message() -> None:
    topics = Topics(prefix="t1")
    assert topics.topic_for(wire.Sample) == "t1.rollout"
    assert topics.topic_for(wire.ForwardBackward) == topics.topic_for(wire.OptimStep) == "t1.gradient"
    for cls in (wire.CreateAdapter, wire.DeleteAdapter, wire.ListAdapters, wire.SaveState, wire.LoadState):
        assert topics.topic_for(cls) == "t1.control"
    assert topics.topic_for(wire.CheckpointEvent) == "t1.checkpoints"
    assert topics.topic_for(wire.Heartbeat) == topics.topic_for(wire.EngineStatus) == "t1.metrics"
    assert topics.topic_for(Error(code="x", message="y")) == "t1.results"
    assert topics.topic_for(Error(code="x", message="y", reply_to="agent-7")) == "agent-7"
    for cls in MESSAGE_TYPES:
        assert topics.topic_for(cls) in topics.all()
    assert set(topics.requests()) <= set(topics.all())
    assert topics.dead_letters == "t1.dead-letters"
    assert key_for(_sample()) == b"a"
    assert key_for(wire.ListAdapters()) is None
    with pytest.raises(ValueError):
        Topics(prefix="bad prefix!")


# ----- conversion to and from engine types -----


def _datum_fields(datum: Datum) -> list[list[float] | None]:
    names = ("input_tokens", "target_tokens", *FLOAT_FIELDS)
    return [None if getattr(datum, n) is None else getattr(datum, n).tolist() for n in names]


def _same_request(a: eng.Request, b: eng.Request) -> None:
    assert type(a) is type(b)
    if isinstance(a, eng.ForwardBackward):
        assert isinstance(b, eng.ForwardBackward)
        assert [_datum_fields(d) for d in a.datums] == [_datum_fields(d) for d in b.datums]
        assert (a.adapter_id, a.loss_fn, a.loss_config, a.request_id, a.forward_only) == (
            b.adapter_id,
            b.loss_fn,
            b.loss_config,
            b.request_id,
            b.forward_only,
        )
    else:
        assert a == b


_f32 = st.floats(-1e6, 1e6, width=32)
_tokens = st.lists(st.integers(0, 50_000), min_size=1, max_size=6)


@st.composite
def _datums(draw: st.DrawFn) -> Datum:
    n = draw(st.integers(1, 5))
    tokens = st.lists(st.integers(0, 50_000), min_size=n, max_size=n)
    floats = st.lists(_f32, min_size=n, max_size=n)
    lows = st.lists(st.floats(0, 1, width=32), min_size=n, max_size=n)  # thresholds: low <= 1 <= high
    highs = st.lists(st.floats(1, 50, width=32), min_size=n, max_size=n)
    return Datum.create(
        draw(tokens),
        draw(tokens),
        draw(floats),
        draw(st.none() | floats),
        draw(st.none() | floats),
        clip_low_threshold=draw(st.none() | lows),
        clip_high_threshold=draw(st.none() | highs),
        sequence_ratio_mask=draw(st.none() | floats),
    )


_adapter = st.text("abcxyz-_0123", min_size=1, max_size=8)
engine_requests = st.one_of(
    st.builds(
        eng.CreateAdapter,
        _adapter,
        st.builds(
            LoraSpec,
            rank=st.integers(1, 64),
            alpha=st.floats(0.5, 64),
            targets=st.sampled_from(["all-linear", "attention", ("q_proj", "v_proj")]),
            seed=st.integers(0, 9),
        ),
        st.floats(0.1, 10),
    ),
    st.builds(eng.DeleteAdapter, _adapter),
    st.builds(eng.ListAdapters),
    st.builds(
        eng.Sample,
        st.none() | _adapter,
        _tokens,
        st.integers(1, 4),
        st.builds(
            SamplingParams,
            max_tokens=st.integers(1, 64),
            temperature=st.floats(0, 2),
            top_p=st.floats(0.01, 1),
            top_k=st.integers(0, 50),
            stop=st.lists(st.one_of(st.integers(0, 100), st.text(min_size=1, max_size=3)), max_size=2).map(tuple),
            seed=st.none() | st.integers(0, 2**31),
        ),
    ),
    st.builds(
        eng.ForwardBackward,
        _adapter,
        st.lists(_datums(), min_size=1, max_size=3),
        st.sampled_from(["cross_entropy", "ppo", "gspo", "dro"]),
        st.dictionaries(st.sampled_from(["clip_low", "clip_high"]), st.floats(0, 1)),
        forward_only=st.booleans(),
    ),
    st.builds(eng.OptimStep, _adapter, st.builds(AdamParams, learning_rate=st.floats(0, 1))),
    st.builds(eng.SaveState, _adapter, st.text(min_size=1, max_size=10), st.booleans()),
    st.builds(eng.LoadState, _adapter, st.text(min_size=1, max_size=10)),
)


@FAST
@given(engine_requests, st.integers(0, 2**40), st.text(max_size=10))
def test_requests_round_trip_through_the_wire(request: eng.Request, seq: int, reply_to: str) -> None:
    message = to_wire(request, seq=seq, reply_to=reply_to)
    assert (message.seq, message.reply_to, message.request_id) == (seq, reply_to, request.request_id)
    back = to_engine(decode(encode(message)))  # type: ignore[arg-type]
    _same_request(request, back)


def _info(adapter_id: str = "a") -> EngineAdapterInfo:
    return EngineAdapterInfo(adapter_id, None, False, 8, 16.0, ("q_proj", "v_proj"), 3, 1024)


@st.composite
def _request_and_result(draw: st.DrawFn) -> tuple[eng.Request, Any]:
    request = draw(engine_requests)
    if isinstance(request, eng.CreateAdapter | eng.LoadState):
        result: Any = _info(request.adapter_id)
    elif isinstance(request, eng.DeleteAdapter):
        result = None
    elif isinstance(request, eng.ListAdapters):
        result = [_info("a"), EngineAdapterInfo("b", 0, True, 4, 4.0, ("o_proj",), 0, 64)]
    elif isinstance(request, eng.Sample):
        version = draw(st.integers(0, 9))
        sequences = [
            EngineSampledSequence(toks, draw(st.lists(_f32, min_size=len(toks), max_size=len(toks))), "stop", version)
            for toks in draw(st.lists(_tokens, min_size=1, max_size=3))
        ]
        result = eng.SampleOutput(sequences, version)
    elif isinstance(request, eng.ForwardBackward):
        logprobs = [torch.tensor(draw(st.lists(_f32, min_size=len(d), max_size=len(d)))) for d in request.datums]
        result = ForwardBackwardOutput(
            request.adapter_id, [1.5] * len(logprobs), logprobs, sum(map(len, request.datums))
        )
    elif isinstance(request, eng.OptimStep):
        result = OptimStepOutput(request.adapter_id, draw(st.integers(1, 99)), draw(st.floats(0, 10)))
    else:
        result = eng.SaveOutput(str(request.path), draw(st.integers(0, 9)))
    return request, result


@FAST
@given(_request_and_result())
def test_results_round_trip_through_the_wire(pair: tuple[eng.Request, Any]) -> None:
    request, result = pair
    message = to_wire(request, seq=5, reply_to="agent")
    reply = decode(encode(from_engine(message, result, received_at_ms=10, finished_at_ms=20)))
    assert type(reply) is RESULT_FOR[type(message)]
    assert (reply.request_id, reply.adapter_id, reply.seq, reply.reply_to) == (
        message.request_id,
        message.adapter_id,
        5,
        "agent",
    )
    assert (reply.received_at_ms, reply.finished_at_ms) == (10, 20)
    back = result_to_engine(reply)  # type: ignore[arg-type]
    if isinstance(result, ForwardBackwardOutput):
        assert (back.adapter_id, back.losses, back.num_tokens) == (result.adapter_id, result.losses, result.num_tokens)
        assert [t.tolist() for t in back.logprobs] == [t.tolist() for t in result.logprobs]
    else:
        assert back == result


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_errors_keep_their_code_across_the_wire(code: str) -> None:
    request = _sample()
    reply = decode(encode(from_engine(request, ERROR_CODES[code]("boom"))))
    assert isinstance(reply, Error)
    assert (reply.code, reply.message, reply.request_id) == (code, "boom", "r1")
    with pytest.raises(ERROR_CODES[code], match="boom") as info:
        result_to_engine(reply)
    assert info.value.code == code


def test_unexpected_exceptions_and_unknown_codes() -> None:
    reply = from_engine(_sample(), RuntimeError("oops"))
    assert isinstance(reply, Error) and reply.code == "internal" and "RuntimeError" in reply.message
    err = error_to_exception(Error(code="from_the_future", message="m"))
    assert err.code == "from_the_future"


def test_engine_validation_surfaces_as_invalid_request() -> None:
    from hotlora.schemas.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        to_engine(wire.Sample(prompt_tokens=pack_i32([1]), temperature=-1.0))
    bad = wire.Datum(input_tokens=pack_i32([1, 2]), target_tokens=pack_i32([1]))
    with pytest.raises(InvalidRequest):
        to_engine(wire.ForwardBackward(adapter_id="a", datums=[bad]))


# ----- the protocol document -----


def example_sample_request() -> wire.Sample:
    """The worked example of docs/protocol.md; keep the two in step."""
    return wire.Sample(
        request_id="r1",
        adapter_id="a",
        seq=1,
        reply_to="hotlora.results",
        sent_at_ms=1_700_000_000_000,
        prompt_tokens=pack_i32([1, 2, 3]),
        max_tokens=8,
    )


def test_protocol_doc_hex_matches_the_encoder() -> None:
    text = PROTOCOL_DOC.read_text()
    block = re.search(r"<!-- hex-example -->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/protocol.md lost its hex example block"
    assert bytes.fromhex(block.group(1)) == encode(example_sample_request())
    assert decode(bytes.fromhex(block.group(1))) == example_sample_request()


def test_protocol_doc_names_every_type_and_code() -> None:
    text = PROTOCOL_DOC.read_text()
    for cls in MESSAGE_TYPES:
        assert f"`{tag_of(cls)}`" in text, tag_of(cls)
    for code in ERROR_CODES:
        assert f"`{code}`" in text, code


def test_decoder_edge_faults_are_schema_errors() -> None:
    _rejected(b"\x81\xa2xx" + b"\x91" * 100_000 + b"\xc0", "bad envelope")  # deep nesting in an ignored field
    fields = msgspec.to_builtins(_sample(), builtin_types=(bytes,))
    data = msgspec.msgpack.encode(fields).replace(b"\xa1a", b"\xa1\x80")  # adapter_id "a" -> invalid UTF-8
    _rejected(data, "bad envelope")
