"""Bad input never hurts the engine or other tenants (issue 7): each refusal, through a real broker.

Every decoding or validation failure must come back to the sender's ``reply_to`` as an ``error`` with a
stable ``code`` (when the envelope is readable), a record that fails to decode is also copied verbatim to
the dead-letter topic, and the engine keeps serving: each test ends with a well-behaved tenant's
``forward_backward`` + ``optim_step`` and a ``list_adapters`` probe.

Which code: ``bad_message`` when the bytes are not a valid message (msgpack, version, type, shape, a
range the schema declares such as ``n >= 1``, a size over ``max_message_bytes``); ``invalid_request``
when a well-formed message carries a value the engine refuses (vocabulary, context length, NaN, a
checkpoint path outside ``checkpoint_dir``...); ``unknown_adapter`` for an adapter that does not exist.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.kafka.service_config import ServiceConfig, from_sources
from hotlora.schemas import (
    CreateAdapter,
    Datum,
    Error,
    ForwardBackward,
    ListAdapters,
    LoadState,
    Message,
    OptimStep,
    Sample,
    SaveState,
    encode,
    pack_f32,
    pack_i32,
)
from tests.helpers import Tenant, service_config_for_tests

pytestmark = pytest.mark.timeout(300)
WAIT_S = 60.0
LIMIT = 256 * 1024  # max_message_bytes of the engine under test
VOCAB_HIGH = 10**6  # beyond any test model's vocabulary
CONTEXT = 256  # TEST_RECIPE's max_positions


def _datum(tokens: list[int], **fields: Any) -> Datum:
    return Datum(input_tokens=pack_i32(tokens[:-1]), target_tokens=pack_i32(tokens[1:]), **fields)


def _raw(**fields: Any) -> bytes:
    return msgspec.msgpack.encode(fields)


def _tenant(broker: EmbeddedBroker, prefix: str, model: Path, tmp: Path, **overrides: Any) -> Tenant:
    config = service_config_for_tests(
        broker.bootstrap, prefix, model, tmp / "ckpt", max_message_bytes=LIMIT, heartbeat_interval=60.0, **overrides
    )
    return Tenant(config, f"{prefix}.replies", max_bytes=64 * LIMIT, linger_ms=5)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _expect(tenant: Tenant, message: Message, code: str, text: str = "") -> Error:
    reply = await tenant.call(message)
    assert isinstance(reply, Error), (type(message).__name__, reply)
    assert reply.code == code, (type(message).__name__, reply)
    assert text in reply.message, (text, reply.message)
    assert reply.adapter_id == message.adapter_id and reply.seq == message.seq
    return reply


# ----- pure config -----


def test_max_message_bytes_is_a_config_field_with_flag_and_env() -> None:
    assert ServiceConfig().max_message_bytes == 64 * 1024 * 1024
    assert from_sources(None, {"HOTLORA_MAX_MESSAGE_BYTES": "1024"}).max_message_bytes == 1024
    from hotlora import cli

    args = cli.build_parser().parse_args(["engine", "--max-message-bytes", "2048"])
    assert from_sources(args, {}).max_message_bytes == 2048


# ----- decoding failures: bad_message, dead-lettered -----


def test_undecodable_records_are_dead_lettered_and_answered_when_the_envelope_is_readable(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    async def body() -> None:
        async with _tenant(broker, topic_prefix, tiny_model_path, tmp_path) as t:
            assert not isinstance(await t.call(CreateAdapter(rank=2, **t.envelope("good", 1))), Error)
            env = {"v": 1, "adapter_id": "x", "seq": 0, "reply_to": t.reply_to, "sent_at_ms": 1}
            valid = encode(Sample(prompt_tokens=pack_i32([1, 2, 3]), **t.envelope("x", request_id="trunc")))
            records = {
                # (topic, bytes): the request id that must get a bad_message reply, or None (dead letter only)
                "garbage": (t.topics.rollout, b"\xc1\xff not msgpack at all", None),
                "truncated": (t.topics.rollout, valid[: len(valid) // 2], None),
                "not a map": (t.topics.control, msgspec.msgpack.encode([1, 2, 3]), None),
                "version": (t.topics.control, _raw(type="list_adapters", request_id="v2", **{**env, "v": 2}), "v2"),
                "unknown type": (t.topics.control, _raw(type="format_disk", request_id="ut", **env), "ut"),
                "wrong type": (
                    t.topics.rollout,
                    _raw(type="sample", request_id="wt", prompt_tokens=[1, 2], **env),
                    "wt",
                ),
                "missing field": (t.topics.rollout, _raw(type="sample", request_id="mf", **env), "mf"),
                "n negative": (
                    t.topics.rollout,
                    _raw(type="sample", request_id="nn", prompt_tokens=pack_i32([1]), n=-1, **env),
                    "nn",
                ),
                "max_tokens negative": (
                    t.topics.rollout,
                    _raw(type="sample", request_id="mtn", prompt_tokens=pack_i32([1]), max_tokens=-5, **env),
                    "mtn",
                ),
                "max_tokens zero": (
                    t.topics.rollout,
                    _raw(type="sample", request_id="mt0", prompt_tokens=pack_i32([1]), max_tokens=0, **env),
                    "mt0",
                ),
                "ragged packed array": (
                    t.topics.gradient,
                    _raw(
                        type="forward_backward",
                        request_id="rag",
                        datums=[
                            {"input_tokens": pack_i32([1, 2]), "target_tokens": pack_i32([2, 3]), "weights": b"abc"}
                        ],
                        **env,
                    ),
                    "rag",
                ),
                "a result, not a request": (
                    t.topics.control,
                    encode(Error(code="x", message="y", **t.envelope("x", request_id="res"))),
                    "res",
                ),
                "empty request_id": (t.topics.control, _raw(type="list_adapters", request_id="", **env), None),
                "deep nesting": (
                    t.topics.control,
                    b"\x88"
                    + _raw(type="list_adapters", request_id="deep", **env)[1:]
                    + b"\xa1z"
                    + b"\x91" * 10**5
                    + b"\xc0",
                    None,
                ),
                "oversize": (
                    t.topics.rollout,
                    encode(Sample(prompt_tokens=pack_i32(range(LIMIT // 4 + 1)), **t.envelope("x", request_id="big"))),
                    "big",
                ),
                "oversize x4": (
                    t.topics.rollout,
                    encode(Sample(prompt_tokens=pack_i32(range(LIMIT)), **t.envelope("x", request_id="big4"))),
                    "big4",
                ),
            }
            for topic, value, _ in records.values():
                await t.send_raw(topic, value, key=b"x")
            bad_reply_to = _raw(type="list_adapters", request_id="rt", **{**env, "reply_to": "../../etc/passwd"})
            await t.send_raw(t.topics.control, bad_reply_to)

            every = [value for _, value, _ in records.values()] + [bad_reply_to]
            # A record larger than the engine's transport limit (2 x max_message_bytes + 1 MiB) is still
            # read and refused, but only its first max_message_bytes are dead-lettered.
            every = [value if len(value) < 2 * LIMIT + (1 << 20) else value[:LIMIT] for value in every]
            await t.until("every record dead-lettered", lambda: len(t.dead) >= len(every))
            assert sorted(t.dead) == sorted(every)
            for name, (_, _, rid) in records.items():
                if rid is not None:
                    reply = await t.reply(rid)
                    assert isinstance(reply, Error) and reply.code == "bad_message", (name, reply)
                    assert reply.adapter_id == "x", (name, reply)
            assert "max_message_bytes" in (await t.reply("big")).message
            assert "version" in (await t.reply("v2")).message
            # An illegal reply_to is answered on the shared results topic, never published to as a topic.
            shared = await t.until("the reply_to refusal", lambda: [m for m in t.shared if m.request_id == "rt"])
            assert shared[0].code == "bad_message" and "reply_to" in shared[0].message
            await t.healthy()

    _run(body())


# ----- engine validation: invalid_request / unknown_adapter, answered to the sender -----


def test_hostile_values_are_refused_with_invalid_request(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    nan, inf = float("nan"), float("inf")

    async def body() -> None:
        async with _tenant(broker, topic_prefix, tiny_model_path, tmp_path) as t:
            assert not isinstance(await t.call(CreateAdapter(rank=2, **t.envelope("good", 1))), Error)
            assert not isinstance(await t.call(CreateAdapter(rank=2, **t.envelope("h", 1))), Error)
            h = t.envelope("h")  # seq 0: unordered, each answered on its own
            ok = [3, 4, 5, 6]
            await _expect(t, ForwardBackward(datums=[_datum(ok)], **t.envelope("nope")), "unknown_adapter")
            await _expect(t, OptimStep(**t.envelope("nope")), "unknown_adapter")
            await _expect(t, Sample(prompt_tokens=pack_i32([1]), **t.envelope("nope")), "unknown_adapter")
            # token ids outside the vocabulary, and negative ones
            await _expect(t, ForwardBackward(datums=[_datum([3, VOCAB_HIGH, 4])], **h), "invalid_request", "vocab")
            await _expect(t, ForwardBackward(datums=[_datum([3, -1, 4])], **h), "invalid_request", "negative")
            await _expect(t, Sample(prompt_tokens=pack_i32([1, VOCAB_HIGH]), **h), "invalid_request", "vocab")
            await _expect(t, Sample(prompt_tokens=pack_i32([-7]), **h), "invalid_request", "vocab")
            await _expect(t, Sample(prompt_tokens=pack_i32([1]), stop=[VOCAB_HIGH], **h), "invalid_request")
            # longer than the model's context
            long = [3 + i % 20 for i in range(CONTEXT + 2)]
            await _expect(t, ForwardBackward(datums=[_datum(long)], **h), "invalid_request", "at most")
            await _expect(t, Sample(prompt_tokens=pack_i32(long), max_tokens=1, **h), "invalid_request", "positions")
            await _expect(t, Sample(prompt_tokens=pack_i32([1]), max_tokens=CONTEXT, **h), "invalid_request")
            # absurd n / max_tokens (negative ones are schema errors, see above)
            await _expect(t, Sample(prompt_tokens=pack_i32([1]), n=10**9, **h), "invalid_request")
            await _expect(t, Sample(prompt_tokens=pack_i32([1]), max_tokens=2**63, **h), "invalid_request")
            await _expect(t, Sample(prompt_tokens=pack_i32([1]), temperature=nan, **h), "invalid_request")
            await _expect(t, Sample(prompt_tokens=pack_i32([1]), top_p=inf, **h), "invalid_request")
            await _expect(t, Sample(prompt_tokens=pack_i32([]), **h), "invalid_request")
            # NaN / inf in per-token floats, for every loss
            for name in ("weights", "logprobs", "advantages"):
                for bad in (nan, inf, -inf):
                    floats = {"weights": pack_f32([1, 1, 1]), "logprobs": pack_f32([-1] * 3)}
                    floats["advantages"] = pack_f32([0.5] * 3)
                    floats[name] = pack_f32([1.0, bad, 1.0])
                    for loss_fn in ("cross_entropy", "ppo"):
                        message = ForwardBackward(datums=[_datum(ok, **floats)], loss_fn=loss_fn, **h)
                        await _expect(t, message, "invalid_request", name)
            await _expect(
                t,
                ForwardBackward(datums=[_datum(ok)], loss_fn="ppo", loss_config={"clip_epsilon": nan}, **h),
                "invalid_request",
            )
            await _expect(t, ForwardBackward(datums=[_datum(ok)], loss_fn="rm -rf", **h), "invalid_request")
            await _expect(t, ForwardBackward(datums=[], **h), "invalid_request")
            # mismatched array lengths in a datum
            short = Datum(input_tokens=pack_i32([3, 4, 5]), target_tokens=pack_i32([4, 5]))
            await _expect(t, ForwardBackward(datums=[short], **h), "invalid_request", "target_tokens")
            for name in ("weights", "logprobs", "advantages"):
                ragged = _datum(ok, **{name: pack_f32([1.0] * 7)})
                await _expect(t, ForwardBackward(datums=[ragged], loss_fn="ppo", **h), "invalid_request", name)
            # every AdamParams field: NaN, inf, out of range
            for field in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
                for bad in (nan, inf, -inf):
                    await _expect(t, OptimStep(**{field: bad}, **h), "invalid_request", field)
            await _expect(t, OptimStep(learning_rate=-1.0, **h), "invalid_request")
            await _expect(t, OptimStep(beta1=1.0, **h), "invalid_request")
            # adapter creation: NaN alpha, absurd rank, bad weight or targets
            await _expect(t, CreateAdapter(alpha=nan, **t.envelope("c1")), "invalid_request", "alpha")
            await _expect(t, CreateAdapter(alpha=inf, **t.envelope("c2")), "invalid_request", "alpha")
            await _expect(t, CreateAdapter(rank=10**9, **t.envelope("c3")), "invalid_request", "rank")
            await _expect(t, CreateAdapter(weight=nan, **t.envelope("c4")), "invalid_request", "weight")
            await _expect(t, CreateAdapter(weight=5e-324, **t.envelope("c4")), "invalid_request", "weight")
            await _expect(t, CreateAdapter(weight=1e300, **t.envelope("c4")), "invalid_request", "weight")
            await _expect(t, CreateAdapter(targets="everything", **t.envelope("c5")), "invalid_request")
            await _expect(t, CreateAdapter(targets=[], **t.envelope("c6")), "invalid_request")
            await _expect(t, CreateAdapter(**t.envelope("../evil")), "invalid_request", "adapter id")
            # nothing the refusals touched changed the adapter: it is still at version 0
            listed = await t.call(ListAdapters(**t.envelope()))
            assert {a.adapter_id: a.version for a in listed.adapters} == {"good": 0, "h": 0}, listed
            assert not t.dead, "engine validation failures are answered, not dead-lettered"
            await t.healthy()

    _run(body())


# ----- checkpoint paths stay under checkpoint_dir -----


def test_checkpoint_paths_must_stay_under_checkpoint_dir(
    broker: EmbeddedBroker, topic_prefix: str, tiny_model_path: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"

    async def body() -> None:
        async with _tenant(broker, topic_prefix, tiny_model_path, tmp_path) as t:
            root = t.service.checkpoint_dir
            assert not isinstance(await t.call(CreateAdapter(rank=2, **t.envelope("good", 1))), Error)
            g = t.envelope("good")
            # inside: relative, an absolute path under checkpoint_dir, and a harmless ".." inside it
            for path, expected in [
                ("runs/a", root / "runs" / "a"),
                (str(root / "abs"), root / "abs"),
                ("x/../y", root / "y"),
            ]:
                saved = await t.call(SaveState(path=path, **g))
                assert not isinstance(saved, Error), (path, saved)
                assert saved.path == str(expected)
            loaded = await t.call(LoadState(path="runs/a", **t.envelope("copy", 1)))
            assert not isinstance(loaded, Error), loaded
            # outside: refused before anything touches the disk
            for path in [
                str(outside),
                "../outside",
                "runs/../../outside",
                "/etc",
                "/",
                "",
                ".",
                "runs/\x00nul",
                "../" * 50 + "etc/passwd",
            ]:
                await _expect(t, SaveState(path=path, **g), "invalid_request", "checkpoint")
                await _expect(t, LoadState(path=path, **t.envelope("other")), "invalid_request", "checkpoint")
            assert not outside.exists()
            # a symlink inside checkpoint_dir that points outside it is refused too
            outside.mkdir()
            (root / "link").symlink_to(outside)
            await _expect(t, SaveState(path="link/a", **g), "invalid_request", "checkpoint")
            assert not any(outside.iterdir())
            await t.healthy()

    _run(body())
