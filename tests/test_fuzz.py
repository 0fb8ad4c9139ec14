"""Fuzzing the engine's Kafka edge: hostile traffic must not crash it nor change another tenant's results.

A well-behaved tenant runs a fixed, seeded SFT loop (``forward_backward`` cross entropy + ``optim_step``,
a few steps, then ``save_state``) against an in-process engine service over the real broker, once alone
and once while thousands of malformed and hostile records (hypothesis-generated, deterministic) hit the
same engine on all three request topics: random bytes, truncated messages, unknown tags, wrong types,
huge / negative / NaN / inf numbers, huge arrays, deep nesting, path traversal. Asserted: the engine is
still up and answers a ``list_adapters`` probe on every request partition, and the tenant's per-step
losses, target logprobs and final adapter weights are bit-identical to the clean run.

The fuzz traffic never uses the tenant's adapter id (an adapter belongs to one agent, see
docs/protocol.md section 6) but does create, train, save and load adapters of its own.

Number of fuzz records: ``HOTLORA_FUZZ_MESSAGES`` (default 1000). The full run::

    HOTLORA_FUZZ_MESSAGES=10000 .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from hotlora.engine.kafka.admin import create_topics
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.schemas import (
    CreateAdapter,
    Datum,
    Error,
    ForwardBackward,
    ListAdapters,
    OptimStep,
    SaveState,
    Topics,
    encode,
    pack_f32,
    pack_i32,
    unpack_f32,
)
from tests.test_bad_input import Tenant, _tenant

FUZZ_MESSAGES = int(os.environ.get("HOTLORA_FUZZ_MESSAGES", "1000"))
pytestmark = pytest.mark.timeout(300 + FUZZ_MESSAGES // 20)
TENANT = "tenant"
STEPS = 4

# ----- hostile values -----

REQUEST_TAGS = [
    "create_adapter",
    "delete_adapter",
    "list_adapters",
    "sample",
    "forward_backward",
    "optim_step",
    "save_state",
    "load_state",
]
OTHER_TAGS = ["error", "checkpoint", "heartbeat", "sample_result", "", "SAMPLE", "sample\x00", "x" * 300]
FUZZ_ADAPTERS = ["f0", "f1", "f2", "", "../f", "f" * 200, "f\x00", "é"]
PATHS = ["fz/a", "fz/b", "", ".", "..", "../x", "/", "/etc/passwd", "fz/../../x", "fz/\x00", "../" * 40, "fz"]

huge_ints = st.sampled_from([-(2**63), -(2**31) - 1, -1, 0, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**64 - 1])
small_ints = st.integers(min_value=-3, max_value=300)
floats = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e308, -1e308, 5e-324, 1e-300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1.0),
)
scalars = st.one_of(
    st.none(), st.booleans(), small_ints, huge_ints, floats, st.text(max_size=20), st.binary(max_size=20)
)
wrong = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=5), scalars, max_size=3))


def _f32(values: list[float]) -> bytes:
    with np.errstate(over="ignore"):  # 1e308 becomes inf, on purpose
        return np.asarray(values, dtype=np.float64).astype("<f4").tobytes()


def deep(depth: int) -> msgspec.Raw:
    """Pre-encoded nesting (arrays or maps of one element) far deeper than any decoder's recursion limit."""
    return msgspec.Raw(b"\x91" * depth + b"\xc0")


deep_values = st.builds(deep, st.sampled_from([50, 1000, 10**5]))
tokens = st.one_of(
    st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12),
    st.lists(
        st.one_of(st.integers(-(2**31), 2**31 - 1), huge_ints.filter(lambda x: -(2**31) <= x < 2**31)), max_size=6
    ),
    st.integers(min_value=250, max_value=3000).map(lambda n: [5] * n),  # beyond the 256-position context
)
packed_i32 = st.one_of(tokens.map(pack_i32), st.binary(max_size=30))
packed_f32 = st.one_of(
    st.lists(floats, max_size=12).map(_f32),
    st.lists(st.floats(-2, 0), min_size=1, max_size=12).map(pack_f32),
    st.binary(max_size=30),
    st.none(),
)
hostile = st.one_of(wrong, deep_values, packed_i32, packed_f32)


HOSTILE_FIELD = 0.06  # chance that any one field is replaced by a hostile value of any type


class _Pick:
    """Draws a field's value: its plausible strategy, or (with probability HOSTILE_FIELD) ``hostile``.

    The choice uses a hypothesis-seeded ``Random``, not ``st.one_of``, whose branch draws favour the ends
    and would make nearly every message undecodable; many must decode to reach the engine's own checks.
    """

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.random = draw(st.randoms(use_true_random=True))

    def __call__(self, good: st.SearchStrategy[Any], p: float = HOSTILE_FIELD) -> Any:
        return self.draw(hostile if self.random.random() < p else good)

    def chance(self, p: float) -> bool:
        return self.random.random() < p


@st.composite
def _datum(draw: st.DrawFn) -> dict[str, Any]:
    pick = _Pick(draw)
    fields = {"input_tokens": pick(packed_i32), "target_tokens": pick(packed_i32)}
    for name in ("weights", "logprobs", "advantages"):
        if pick.chance(0.5):
            fields[name] = pick(packed_f32)
    return fields


datum = _datum()
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "create_adapter": {
        "rank": st.one_of(st.integers(1, 8), huge_ints),
        "alpha": st.one_of(st.floats(0.5, 64), floats),
        "targets": st.one_of(
            st.sampled_from(["attention", "mlp", "all-linear", "bogus"]),
            st.lists(st.sampled_from(["q_proj", "v_proj", "nope", ""]), max_size=4),
        ),
        "seed": st.one_of(small_ints, huge_ints),
        "weight": st.one_of(st.floats(0.1, 10), floats),
    },
    "sample": {
        "prompt_tokens": packed_i32,
        "n": st.one_of(st.integers(1, 2), huge_ints),
        "max_tokens": st.one_of(st.integers(1, 3), huge_ints, st.integers(200, 300)),
        "temperature": floats,
        "top_p": floats,
        "top_k": st.one_of(small_ints, huge_ints),
        "stop": st.lists(st.one_of(st.text(max_size=3), small_ints, huge_ints), max_size=3),
        "seed": st.one_of(st.none(), small_ints, huge_ints),
    },
    "forward_backward": {
        "datums": st.one_of(
            st.lists(datum, max_size=3),
            st.integers(200, 2000).map(lambda n: [{"input_tokens": pack_i32([3]), "target_tokens": pack_i32([4])}] * n),
        ),
        "loss_fn": st.sampled_from(["cross_entropy", "importance_sampling", "ppo", "cispo", "bogus"]),
        "loss_config": st.dictionaries(st.sampled_from(["clip_epsilon", "clip_epsilon_low", "x"]), floats, max_size=2),
    },
    "optim_step": {
        name: st.one_of(st.floats(0.0, 0.5), floats)
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    },
    "save_state": {"path": st.one_of(st.sampled_from(PATHS), st.text(max_size=30)), "include_optimizer": st.booleans()},
    "load_state": {"path": st.one_of(st.sampled_from(PATHS), st.text(max_size=30))},
}


@st.composite
def structured(draw: st.DrawFn, reply_to: str) -> bytes:
    """A message map: a real or bogus tag, an envelope and fields, each possibly hostile or missing."""
    pick = _Pick(draw)
    tag = draw(st.sampled_from(OTHER_TAGS if pick.chance(0.08) else REQUEST_TAGS))
    message: dict[str, Any] = {
        "type": tag,
        "v": pick(st.just(1)),
        "request_id": draw(st.text(max_size=10)) if pick.chance(0.05) else draw(st.uuids()).hex,
        "adapter_id": draw(st.sampled_from(FUZZ_ADAPTERS)),
        "seq": pick(st.just(0) if pick.chance(0.7) else st.integers(0, 5)),
        # Never a legal but missing topic name: each reply to one waits out the producer's metadata
        # timeout (40 s), which would only slow this test down; illegal names are answered on results.
        "reply_to": draw(st.sampled_from(["", "../x", " ", "x" * 300])) if pick.chance(0.1) else reply_to,
        "sent_at_ms": pick(st.just(1)),
    }
    for name, strategy in FIELDS.get(tag, {}).items():
        message[name] = pick(strategy)
    if pick.chance(0.1):
        name = draw(st.sampled_from(sorted(set(message) - {"reply_to"})))
        if pick.chance(0.5):
            message.pop(name)  # a missing required field
        else:
            message[name] = draw(hostile)  # a wrong type anywhere, the envelope included
    if pick.chance(0.1):
        message["unknown_" + draw(st.text(max_size=5))] = draw(st.one_of(wrong, deep_values))
    return msgspec.msgpack.encode(message)


@st.composite
def records(draw: st.DrawFn, reply_to: str) -> tuple[int, bytes]:
    """(request topic index, record value): structured messages, truncations of them, and plain noise."""
    pick = _Pick(draw)
    topic = pick.random.randrange(3)
    if pick.chance(0.05):
        return topic, draw(st.binary(min_size=1, max_size=64))
    value = draw(structured(reply_to))
    if pick.chance(0.1):
        value = value[: pick.random.randrange(1, len(value))] if len(value) > 1 else value
    return topic, value


def generate(count: int, reply_to: str) -> list[tuple[int, bytes]]:
    """``count`` records, deterministically: one hypothesis example per record (no shrinking, no database)."""
    out: list[tuple[int, bytes]] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=["generate"],
    )
    @given(records(reply_to))
    def collect(record: tuple[int, bytes]) -> None:
        out.append(record)

    collect()
    return out


# ----- the well-behaved tenant -----


def _sft_batch() -> list[Datum]:
    gen = torch.Generator().manual_seed(1234)
    batch = []
    for length in (9, 14, 6):
        ids = torch.randint(3, 40, (length + 1,), generator=gen).tolist()
        weights = [0.0, 0.0] + [1.0] * (length - 2)
        batch.append(Datum(input_tokens=pack_i32(ids[:-1]), target_tokens=pack_i32(ids[1:]), weights=pack_f32(weights)))
    return batch


async def _tenant_loop(t: Tenant) -> tuple[list[list[float]], list[bytes], dict[str, torch.Tensor]]:
    """Create, train STEPS steps, save; returns per-step losses, packed logprobs and the saved weights."""
    env = lambda seq: t.envelope(TENANT, seq)  # noqa: E731
    created = await t.call(CreateAdapter(rank=4, alpha=8.0, targets="all-linear", seed=7, **env(1)))
    assert not isinstance(created, Error), created
    losses, logprobs = [], []
    batch = _sft_batch()
    seq = 2
    for _ in range(STEPS):
        fb = await t.call(ForwardBackward(datums=batch, loss_fn="cross_entropy", **env(seq)))
        step = await t.call(OptimStep(learning_rate=5e-2, weight_decay=0.01, **env(seq + 1)))
        assert not isinstance(fb, Error) and not isinstance(step, Error), (fb, step)
        losses.append(list(fb.losses))
        logprobs += list(fb.logprobs)
        seq += 2
    saved = await t.call(SaveState(path=f"{TENANT}/final", include_optimizer=True, **env(seq)))
    assert not isinstance(saved, Error), saved
    weights = load_file(str(Path(saved.path) / "adapter_model.safetensors"))
    moments = load_file(str(Path(saved.path) / "training_state.safetensors"))
    return losses, logprobs, {**weights, **{f"state.{k}": v for k, v in moments.items()}}


async def _probe_every_partition(t: Tenant, partitions: int) -> None:
    """A list_adapters on each request partition: once all are answered, every earlier record was consumed."""
    sent = []
    for topic in t.topics.requests():
        for partition in range(partitions):
            probe = ListAdapters(**t.envelope())
            await t.producer.send_and_wait(topic, encode(probe), partition=partition)
            sent.append(probe)
    for probe in sent:
        reply = await t.reply(probe.request_id, timeout=240)
        assert not isinstance(reply, Error), reply
        assert TENANT in [a.adapter_id for a in reply.adapters]


async def _fuzz(bootstrap: str, topics: Topics, fuzz: list[tuple[int, bytes]], started: asyncio.Event) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=20, max_request_size=8 << 20
    )
    await producer.start()
    try:
        names = topics.requests()
        for start in range(0, len(fuzz), 200):
            futures = [await producer.send(names[i], value) for i, value in fuzz[start : start + 200]]
            await asyncio.gather(*futures)
            if start >= len(fuzz) // 10:
                started.set()  # the tenant starts once the engine is busy with fuzz traffic
        started.set()
    finally:
        await producer.stop()


def _run_tenant(
    broker: EmbeddedBroker, prefix: str, model: Path, tmp: Path, fuzz: list[tuple[int, bytes]] | None
) -> tuple[Any, ...]:
    async def body() -> tuple[Any, ...]:
        async with _tenant(broker, prefix, model, tmp, seq_gap_timeout=2.0, drain_timeout=60.0) as t:
            await create_topics(t.bootstrap, [f"{prefix}.fuzz-replies"], partitions=1)
            running = t._tasks[0]
            started = asyncio.Event()
            sender = None if fuzz is None else asyncio.create_task(_fuzz(t.bootstrap, t.topics, fuzz, started))
            if sender is not None:
                await started.wait()
            result = await _tenant_loop(t)
            if sender is not None:
                await sender
            await _probe_every_partition(t, t.config.partitions)
            assert not running.done(), "the engine service stopped"
            return result, len(t.dead)

    return asyncio.run(body())


def test_fuzzed_engine_survives_and_the_tenant_is_bit_identical(
    broker: EmbeddedBroker, tiny_model_path: Path, tmp_path: Path, topic_prefix: str
) -> None:
    started = time.monotonic()
    fuzz = generate(FUZZ_MESSAGES, f"{topic_prefix}-b.fuzz-replies")
    generated = time.monotonic()
    assert len(fuzz) == FUZZ_MESSAGES
    assert generate(20, "r") == generate(20, "r"), "fuzz generation must be deterministic"

    (clean, _) = _run_tenant(broker, f"{topic_prefix}-a", tiny_model_path, tmp_path / "clean", None)
    cleaned = time.monotonic()
    (fuzzed, dead) = _run_tenant(broker, f"{topic_prefix}-b", tiny_model_path, tmp_path / "fuzzed", fuzz)
    done = time.monotonic()
    print(
        f"fuzz: {FUZZ_MESSAGES} records ({sum(len(v) for _, v in fuzz)} bytes), generated in "
        f"{generated - started:.1f} s; clean run {cleaned - generated:.1f} s; fuzzed run {done - cleaned:.1f} s; "
        f"{dead} dead letters"
    )
    assert dead > 0
    (losses_a, logprobs_a, weights_a), (losses_b, logprobs_b, weights_b) = clean, fuzzed
    assert losses_a == losses_b, (losses_a, losses_b)
    assert logprobs_a == logprobs_b
    assert [len(unpack_f32(x)) for x in logprobs_a] == [9, 14, 6] * STEPS
    assert weights_a.keys() == weights_b.keys() and len(weights_a) > 0
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
