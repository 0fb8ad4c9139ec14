"""``docs/protocol.md`` against the code: what a client in another language reads there must be true.

The field tables are compared with the msgspec Structs (names, order, types, defaults), the worked hex
examples and their byte-by-byte breakdowns with the encoder, the partition examples with the
partitioner the engine assumes, and the number rule of section 1 (integers are accepted where floats
are expected; floats and booleans are refused where integers are) with the decoder the engine runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from aiokafka.partitioner import murmur2

from hotlora.engine.base_model import model_name
from hotlora.engine.kafka.convert import from_engine, to_engine
from hotlora.engine.kafka.heartbeats import ModelFacts
from hotlora.engine.kafka.placement import partition_for
from hotlora.engine.kafka.service_config import add_arguments, from_sources
from hotlora.engine.runner import ModelRunner
from hotlora.engine.types import ForwardBackwardOutput
from hotlora.schemas import MESSAGE_TYPES, REQUEST_TYPES, SchemaError, decode, encode, pack_f32, pack_i32, tag_of
from hotlora.schemas import messages as wire
from tests.test_schemas import example_sample_request

PROTOCOL_DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
NESTED = (wire.Datum, wire.AdapterLoad, wire.AdapterInfo, wire.SampledSequence)
# Documented once, in the envelope table (section 2), not in each type's table.
ENVELOPE = {f.name for f in msgspec.structs.fields(wire.Request)}


def _doc() -> str:
    return PROTOCOL_DOC.read_text()


# ----- the field tables -----


def _render(info: msgspec.inspect.Type) -> str:
    """A type in the document's words ("int ≥0", "f32 array", "array of str \\| int", ...)."""
    mi = msgspec.inspect
    if isinstance(info, mi.Metadata):
        dtype = (info.extra or {}).get("dtype")
        return {"<i4": "i32 array", "<f4": "f32 array"}[dtype] if dtype else _render(info.type)
    if isinstance(info, mi.IntType):
        return "int" + ("" if info.ge is None else f" ≥{info.ge}")
    if isinstance(info, mi.UnionType):
        types = sorted(info.types, key=lambda t: isinstance(t, mi.NoneType))  # nil last
        return " | ".join(_render(t) for t in types)
    if isinstance(info, mi.ListType):
        return f"array of {_render(info.item_type)}"
    if isinstance(info, mi.DictType):
        return f"map {_render(info.key_type)} → {_render(info.value_type)}"
    if isinstance(info, mi.StructType):
        return info.cls.__name__
    simple = {mi.FloatType: "float", mi.StrType: "str", mi.BoolType: "bool", mi.NoneType: "nil"}
    return simple[type(info)]


def _default(field: msgspec.inspect.Field) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return "required"


def _parse_default(text: str) -> Any:
    words = {"required": "required", "nil": None, "true": True, "false": False}
    return words[text] if text in words else ast.literal_eval(text)


def _table(section: str) -> list[tuple[str, str, Any]]:
    """(field, type, default) rows of the table under ``#### <section>``."""
    match = re.search(rf"^#### {re.escape(section)}\n(.*?)(?=^#|\Z)", _doc(), re.S | re.M)
    assert match, f"docs/protocol.md has no section '#### {section}'"
    rows = []
    for line in match.group(1).splitlines():
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), cells[1], _parse_default(cells[2])))
    return rows


@pytest.mark.parametrize("cls", MESSAGE_TYPES + NESTED, ids=lambda c: c.__name__)
def test_field_tables_match_the_structs(cls: type[msgspec.Struct]) -> None:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    is_message = issubclass(cls, wire.Message)
    skip = ENVELOPE if is_message else set()
    wanted = [(f.name, _render(f.type), _default(f)) for f in info.fields if f.name not in skip]
    section = tag_of(cls) if is_message else cls.__name__  # type: ignore[arg-type]
    documented = _table(section)
    if not wanted:
        assert documented == [], f"{section}: the document lists fields the type does not have"
        assert "No fields beyond the envelope" in re.split(rf"#### {section}\n", _doc())[1][:200]
        return
    assert documented == wanted


# ----- section 1: numbers -----


def _minimal(cls: type[wire.Request]) -> wire.Request:
    required: dict[str, Any] = {
        wire.Sample: {"prompt_tokens": pack_i32([1, 2])},
        wire.ForwardBackward: {"datums": [wire.Datum(input_tokens=pack_i32([1]), target_tokens=pack_i32([2]))]},
        wire.SaveState: {"path": "p"},
        wire.LoadState: {"path": "p"},
    }.get(cls, {})
    return cls(request_id="r", adapter_id="a", seq=1, sent_at_ms=1, **required)


def _fields_of(cls: type[msgspec.Struct], kind: type) -> list[str]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return [f.name for f in info.fields if isinstance(f.type, kind)]


def _with(message: msgspec.Struct, **changes: Any) -> bytes:
    """``message`` as a client would write it, with some values replaced by exactly what it wrote."""
    fields = msgspec.to_builtins(message, builtin_types=(bytes,))
    return msgspec.msgpack.encode({**fields, **changes})


@pytest.mark.parametrize("cls", REQUEST_TYPES, ids=tag_of)
def test_integers_are_accepted_in_float_fields(cls: type[wire.Request]) -> None:
    """What a JavaScript encoder writes for ``1.0``: the integer 1. It reads as the float 1.0."""
    message = _minimal(cls)
    for name in _fields_of(cls, msgspec.inspect.FloatType):
        for value in (1, 0, -3, 2**40):
            decoded = decode(_with(message, **{name: value}))
            assert getattr(decoded, name) == float(value) and type(getattr(decoded, name)) is float, name


def test_integers_in_nested_float_fields() -> None:
    fb = _with(_minimal(wire.ForwardBackward), loss_fn="ppo", loss_config={"clip_epsilon": 0})
    assert decode(fb).loss_config == {"clip_epsilon": 0.0}  # type: ignore[union-attr]
    result = wire.ForwardBackwardResult(losses=[1.5], logprobs=[pack_f32([-1.0])], num_tokens=1)
    back = decode(_with(result, losses=[2]))
    assert back.losses == [2.0] and type(back.losses[0]) is float  # type: ignore[union-attr]


def test_the_engine_gets_floats_from_integer_fields() -> None:
    """Through the engine's own conversion: an all-integer optim_step is the same step as its float twin."""
    ints = to_engine(decode(_with(_minimal(wire.OptimStep), learning_rate=1, beta1=0, eps=1, weight_decay=0)))
    floats = to_engine(decode(_with(_minimal(wire.OptimStep), learning_rate=1.0, beta1=0.0, eps=1.0, weight_decay=0.0)))
    assert ints == floats  # type: ignore[comparison-overlap]
    params = ints.params  # type: ignore[attr-defined]
    assert all(type(getattr(params, name)) is float for name in ("learning_rate", "beta1", "eps", "weight_decay"))
    create = decode(_with(_minimal(wire.CreateAdapter), alpha=32, weight=2))
    spec = to_engine(create).spec  # type: ignore[arg-type, attr-defined]
    assert (spec.alpha, type(spec.alpha)) == (32.0, float)


@pytest.mark.parametrize("cls", REQUEST_TYPES, ids=tag_of)
def test_floats_and_booleans_are_refused_in_integer_fields(cls: type[wire.Request]) -> None:
    """An integer field takes only a MessagePack integer: not ``16.0`` (even whole), not ``true``."""
    message = _minimal(cls)
    ints = _fields_of(cls, msgspec.inspect.IntType) + (["seed"] if cls is wire.Sample else [])  # seed: int | nil
    assert {"v", "seq", "sent_at_ms"} <= set(ints)
    for name in ints:
        for value in (float(getattr(message, name) or 1), True):
            with pytest.raises(SchemaError, match=r"Expected `int"):
                decode(_with(message, **{name: value}))
    for name in _fields_of(cls, msgspec.inspect.FloatType):
        with pytest.raises(SchemaError, match="Expected `float`, got `bool`"):
            decode(_with(message, **{name: True}))
    for name in _fields_of(cls, msgspec.inspect.BoolType):
        for value in (1, 0, None):
            with pytest.raises(SchemaError, match=r"Expected `bool`"):
                decode(_with(message, **{name: value}))


def test_token_ids_in_stop_must_be_integers() -> None:
    data = _with(_minimal(wire.Sample), stop=["\n", 2])
    assert decode(data).stop == ["\n", 2]  # type: ignore[union-attr]
    with pytest.raises(SchemaError):
        decode(_with(_minimal(wire.Sample), stop=[2.0]))


# ----- the worked examples -----


def example_forward_backward() -> tuple[wire.ForwardBackward, wire.ForwardBackwardResult]:
    """The second worked example of docs/protocol.md (section 8); keep the two in step."""
    request = wire.ForwardBackward(
        request_id="r2",
        adapter_id="a",
        seq=2,
        reply_to="hotlora.results",
        sent_at_ms=1_700_000_000_100,
        datums=[
            wire.Datum(
                input_tokens=pack_i32([1, 2, 3]),
                target_tokens=pack_i32([2, 3, 4]),
                weights=pack_f32([0.0, 1.0, 1.0]),
            )
        ],
    )
    result = wire.ForwardBackwardResult(
        request_id="r2",
        adapter_id="a",
        seq=2,
        reply_to="hotlora.results",
        sent_at_ms=1_700_000_000_250,
        received_at_ms=1_700_000_000_120,
        finished_at_ms=1_700_000_000_240,
        losses=[3.25],
        logprobs=[pack_f32([-0.5, -1.25, -2.0])],
        num_tokens=3,
    )
    return request, result


def _hex_block(name: str) -> bytes:
    block = re.search(rf"<!-- {name} -->\s*```text\n(.*?)```", _doc(), re.S)
    assert block, f"docs/protocol.md lost its block <!-- {name} -->"
    return bytes.fromhex(block.group(1))


def _breakdown(name: str) -> bytes:
    """The bytes a breakdown lists: each line's leading hex groups, up to its first other word."""
    block = re.search(rf"<!-- {name} -->\s*```text\n(.*?)```", _doc(), re.S)
    assert block, f"docs/protocol.md lost its block <!-- {name} -->"
    out = []
    for line in block.group(1).splitlines():
        for word in line.split():
            if word == "|":
                continue
            if not re.fullmatch(r"(?:[0-9a-f]{2})+", word):
                break
            out.append(word)
    return bytes.fromhex("".join(out))


def test_forward_backward_hex_example_matches_the_encoder() -> None:
    request, result = example_forward_backward()
    assert _hex_block("hex-example-forward-backward") == encode(request)
    assert _hex_block("hex-example-forward-backward-result") == encode(result)
    assert decode(_hex_block("hex-example-forward-backward")) == request
    assert decode(_hex_block("hex-example-forward-backward-result")) == result


def test_hex_breakdowns_list_every_byte() -> None:
    request, result = example_forward_backward()
    assert _breakdown("hex-breakdown-sample") == encode(example_sample_request())
    assert _breakdown("hex-breakdown-forward-backward") == encode(request)
    assert _breakdown("hex-breakdown-forward-backward-result") == encode(result)


def test_forward_backward_example_result_is_what_the_engine_would_send() -> None:
    """The example's numbers obey the documented reduction (loss = -sum of weight x logprob) and the
    engine's own conversion of that output gives the example's fields."""
    request, result = example_forward_backward()
    engine_request = to_engine(request)
    datum = engine_request.datums[0]  # type: ignore[attr-defined]
    logprobs = [-0.5, -1.25, -2.0]
    assert result.losses[0] == -sum(w * lp for w, lp in zip(datum.weights.tolist(), logprobs, strict=True))
    output = ForwardBackwardOutput("a", [3.25], [torch.tensor(logprobs)], len(datum))
    reply = from_engine(request, output, received_at_ms=1_700_000_000_120, finished_at_ms=1_700_000_000_240)
    assert msgspec.structs.replace(reply, sent_at_ms=result.sent_at_ms) == result


# ----- section 5: keys and partitions -----


def test_partition_examples_match_the_engines_partitioner() -> None:
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \| (\d+) \|$", _doc(), re.M)
    assert len(rows) >= 3, "docs/protocol.md lost its partition examples"
    for adapter_id, murmur, partition in rows:
        assert (murmur2(adapter_id.encode()) & 0x7FFFFFFF) == int(murmur), adapter_id
        assert partition_for(adapter_id, 4) == int(partition), adapter_id


# ----- section 3: the model's name -----


def test_model_name_is_the_hub_repo_id_or_the_directory_name(tmp_path: Path) -> None:
    hub = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "c1899de289a04d12100db370d81485cdf75e47ca"
    assert model_name(hub) == "Qwen/Qwen3-0.6B"
    assert model_name(tmp_path / "models" / "my-llama") == "my-llama"
    assert model_name("relative/dir/") == "dir"


def test_model_facts_of_the_base(runner: ModelRunner, tiny_model_path: Path) -> None:
    """What heartbeats and ``engine_status`` say of the model, against its own config files."""
    config = json.loads((tiny_model_path / "config.json").read_text())
    facts = ModelFacts.of(runner.base)
    assert facts.name == tiny_model_path.name
    assert (facts.vocab_size, facts.context_length) == (config["vocab_size"], config["max_position_embeddings"])
    assert facts.eos_token_ids == [config["eos_token_id"]] == [runner.base.tokenizer.eos_token_id]
    assert ModelFacts.of(runner.base, "org/name").name == "org/name"


def test_model_name_from_flag_and_environment() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model-name", "Qwen/Qwen3-8B"])
    assert from_sources(args, {"HOTLORA_MODEL_NAME": "other"}).model_name == "Qwen/Qwen3-8B"
    assert from_sources(None, {"HOTLORA_MODEL_NAME": "other"}).model_name == "other"
    assert from_sources(None, {}).model_name is None
