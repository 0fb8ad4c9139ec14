"""The native sampler: a mixed, continuously batched decode must give every row what it gets alone.

Adapters get non-zero, distinct B factors so that a sampler which mixed up slots, rows or cache
columns would produce different tokens, and the tests check that they really do differ.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Cache

from hotlora.engine.runner import ModelRunner
from hotlora.engine.sampler import NativeSampler
from hotlora.engine.types import AdamParams, Datum, LoraSpec, Sample, SampledSequence, SamplingParams
from hotlora.schemas.errors import InvalidRequest, UnknownAdapter

SPECS = {
    "a-all": LoraSpec(rank=4, targets="all-linear", seed=1),
    "a-attn": LoraSpec(rank=8, targets="attention", seed=2),
    "a-mlp": LoraSpec(rank=2, targets="mlp", seed=3),
}
ADAPTERS: list[str | None] = ["a-all", "a-attn", "a-mlp", None]
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
LOGPROB_TOL = 1e-5


@pytest.fixture
def adapters(runner: ModelRunner) -> ModelRunner:
    """Three adapters of different ranks and targets, with random B so each one really changes the output."""
    for k, (adapter_id, spec) in enumerate(SPECS.items()):
        adapter = runner.create_adapter(adapter_id, spec)
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for name in sorted(adapter.pairs):
                pair = adapter.pairs[name]
                pair.B.copy_(torch.randn(pair.B.shape, generator=gen) * 0.2)
    return runner


def run_to_completion(sampler: NativeSampler, max_steps: int = 1000) -> dict[str, list[SampledSequence]]:
    results: dict[str, list[SampledSequence]] = {}
    for _ in range(max_steps):
        if not sampler.has_unfinished():
            return results
        results.update(sampler.step())
    raise AssertionError("sampler did not finish")


def solo(runner: ModelRunner, adapter_id: str | None, prompt: list[int], params: SamplingParams) -> SampledSequence:
    """The reference: the request alone in a fresh sampler."""
    return NativeSampler(runner).sample(adapter_id, prompt, 1, params)[0]


def assert_same(got: SampledSequence, want: SampledSequence, tol: float = LOGPROB_TOL) -> None:
    assert got.tokens == want.tokens
    assert got.stop_reason == want.stop_reason
    assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)) <= tol


def test_mixed_batch_matches_solo(adapters: ModelRunner) -> None:
    runner = adapters
    reference = {(a, j): solo(runner, a, p, GREEDY) for a in ADAPTERS for j, p in enumerate(PROMPTS)}
    # The test can fail: every adapter differs from the base and from every other adapter.
    for i, first in enumerate(ADAPTERS):
        for second in ADAPTERS[i + 1 :]:
            assert any(reference[first, j].tokens != reference[second, j].tokens for j in range(len(PROMPTS)))

    sampler = NativeSampler(runner)
    for a in reversed(ADAPTERS):  # added out of slot order: the sampler must group rows itself
        for j, prompt in enumerate(PROMPTS):
            sampler.add(Sample(a, prompt, 2, GREEDY, request_id=f"{a}-{j}"))
    results = run_to_completion(sampler)
    for a in ADAPTERS:
        for j in range(len(PROMPTS)):
            sequences = results[f"{a}-{j}"]
            assert len(sequences) == 2
            for sequence in sequences:
                assert_same(sequence, reference[a, j])
                assert sequence.stop_reason == "length" and len(sequence.tokens) == GREEDY.max_tokens
                assert sequence.adapter_version == 0


def test_one_forward_per_decode_step_with_one_run_per_adapter(adapters: ModelRunner) -> None:
    runner = adapters
    sampler = NativeSampler(runner)
    for k in range(8):
        sampler.add(Sample(ADAPTERS[k % 4], PROMPTS[k % 4], 1, GREEDY, request_id=f"r{k}"))
    sampler.step()  # admission: prefills plus the first decode
    assert sampler.num_running_rows() == 8
    runs: list[int] = []
    hook = runner.model.register_forward_pre_hook(lambda *_: runs.append(len(runner.lora.batch.runs)))
    try:
        for _ in range(3):
            sampler.step()
    finally:
        hook.remove()
    assert runs == [4, 4, 4]  # one forward per step, each adapter's rows in one contiguous run


def test_admitting_many_requests_prefills_them_in_one_forward(adapters: ModelRunner) -> None:
    runner = adapters
    sampler = NativeSampler(runner)
    for k in range(8):  # four adapters (and prompt lengths) mixed
        sampler.add(Sample(ADAPTERS[k % 4], PROMPTS[k % 4], 2, GREEDY, request_id=f"r{k}"))
    shapes: list[tuple[int, ...]] = []
    hook = runner.model.register_forward_pre_hook(
        lambda _m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        sampler.step()
    finally:
        hook.remove()
    widest = max(len(p) for p in PROMPTS) - 1
    prefilled = sum(len(PROMPTS[k % 4]) > 1 for k in range(8))  # a one-token prompt has nothing to prefill
    assert prefilled == 6
    assert shapes == [(prefilled, widest), (16, 1)]  # one prefill for all the prompts, one decode of all 16 rows


def test_request_joining_mid_decode_matches_solo(adapters: ModelRunner) -> None:
    runner = adapters
    early = [
        Sample("a-all", PROMPTS[1], 1, SamplingParams(max_tokens=3, temperature=0.0), request_id="early-0"),
        Sample("a-attn", PROMPTS[0], 2, GREEDY, request_id="early-1"),
        Sample(None, PROMPTS[2], 1, SamplingParams(max_tokens=20, temperature=0.0), request_id="early-2"),
    ]
    late = [
        Sample("a-mlp", PROMPTS[3] * 3, 1, GREEDY, request_id="late-long"),  # wider than the running cache
        Sample("a-all", PROMPTS[2], 1, GREEDY, request_id="late-short"),
    ]
    sampler = NativeSampler(runner)
    for request in early:
        sampler.add(request)
    results: dict[str, list[SampledSequence]] = {}
    for _ in range(4):  # early-0 finishes and leaves; the others are mid-decode
        results.update(sampler.step())
    assert "early-0" in results and sampler.num_running_rows() == 3
    for request in late:
        sampler.add(request)
    results.update(run_to_completion(sampler))
    for request in early + late:
        want = solo(runner, request.adapter_id, request.prompt_tokens, request.params)
        for got in results[request.request_id]:
            assert_same(got, want)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(adapters: ModelRunner) -> None:
    runner = adapters
    filtered = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    plain = SamplingParams(max_tokens=10, temperature=0.8, seed=99)
    prompt = PROMPTS[0]
    alone = NativeSampler(runner).sample("a-all", prompt, 3, filtered)
    again = NativeSampler(runner).sample("a-all", prompt, 3, filtered)
    assert [s.tokens for s in alone] == [s.tokens for s in again]
    assert len({tuple(s.tokens) for s in alone}) > 1  # sequence i has its own stream
    assert alone[0].tokens != solo(runner, "a-all", prompt, GREEDY).tokens[:10]  # it really samples
    plain_alone = NativeSampler(runner).sample("a-attn", PROMPTS[1], 2, plain)

    sampler = NativeSampler(runner)
    unseeded = SamplingParams(max_tokens=15, temperature=1.0, top_k=5)
    sampler.add(Sample("a-attn", PROMPTS[3], 3, unseeded, request_id="noise-0"))
    sampler.add(Sample(None, PROMPTS[2], 2, unseeded, request_id="noise-1"))
    sampler.add(Sample("a-mlp", PROMPTS[1], 2, GREEDY, request_id="greedy"))
    sampler.step()
    sampler.add(Sample("a-attn", PROMPTS[1], 2, plain, request_id="plain"))
    sampler.add(Sample("a-all", prompt, 3, filtered, request_id="filtered"))
    results = run_to_completion(sampler)
    for got, want in zip(results["filtered"] + results["plain"], alone + plain_alone, strict=True):
        assert_same(got, want)


def test_filters_at_their_limits_are_greedy(adapters: ModelRunner) -> None:
    runner = adapters
    prompt = PROMPTS[3]
    greedy = solo(runner, "a-all", prompt, GREEDY).tokens
    sampler = NativeSampler(runner)
    # Mixed k in one batch: the top-1 row must stay greedy although its neighbours keep 50 candidates.
    sampler.add(Sample("a-all", prompt, 2, SamplingParams(max_tokens=12, top_k=1, seed=3), request_id="k1"))
    sampler.add(Sample("a-all", prompt, 2, SamplingParams(max_tokens=12, top_k=50, seed=4), request_id="k50"))
    sampler.add(Sample("a-all", prompt, 2, SamplingParams(max_tokens=12, top_p=1e-6, seed=5), request_id="p0"))
    sampler.add(Sample("a-all", prompt, 2, SamplingParams(max_tokens=12, top_p=0.95, seed=6), request_id="p1"))
    results = run_to_completion(sampler)
    for request_id in ("k1", "p0"):
        assert [s.tokens for s in results[request_id]] == [greedy, greedy]
    assert any(s.tokens != greedy for s in results["k50"] + results["p1"])


def test_unseeded_rows_draw_from_the_adapter_generator(adapters: ModelRunner) -> None:
    runner = adapters
    unseeded = SamplingParams(max_tokens=12, temperature=1.0)
    generator = runner.adapters.get("a-all").generator
    outputs = []
    for seed in (7, 8, 7):
        generator.manual_seed(seed)
        outputs.append(solo(runner, "a-all", PROMPTS[3], unseeded).tokens)
    assert outputs[0] == outputs[2] != outputs[1]


def test_retired_rows_free_their_cache_columns(adapters: ModelRunner) -> None:
    runner = adapters
    sampler = NativeSampler(runner)
    sampler.add(Sample("a-all", PROMPTS[3] * 2, 1, SamplingParams(max_tokens=2, temperature=0.0), request_id="long"))
    sampler.add(Sample("a-mlp", PROMPTS[2], 1, GREEDY, request_id="short"))
    widths: list[int] = []

    def record(_module: torch.nn.Module, _args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        # Decode steps pass no padding mask (the KV store's rows are masked inside attention); the cache
        # says how many columns the step's attention spans, as transformers' mask builders ask it.
        ids, cache = kwargs["input_ids"], kwargs["past_key_values"]
        if isinstance(ids, torch.Tensor) and ids.shape[1] == 1 and isinstance(cache, Cache):
            widths.append(cache.get_mask_sizes(1, 0)[0])

    hook = runner.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        results = run_to_completion(sampler)
    finally:
        hook.remove()
    # Once "long" leaves, each step attends over exactly "short"'s own tokens: prompt, output so far, input.
    assert widths[-1] == len(PROMPTS[2]) + GREEDY.max_tokens - 1
    assert_same(results["short"][0], solo(runner, "a-mlp", PROMPTS[2], GREEDY))


def test_stop_token_stop_string_and_max_tokens(adapters: ModelRunner) -> None:
    runner = adapters
    tokenizer = runner.base.tokenizer
    prompt = PROMPTS[0]
    reference = solo(runner, "a-all", prompt, GREEDY)
    assert reference.stop_reason == "length" and len(reference.tokens) == GREEDY.max_tokens

    stop_id = reference.tokens[3]
    first = reference.tokens.index(stop_id)
    by_id = solo(runner, "a-all", prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=(stop_id,)))
    assert by_id.tokens == reference.tokens[: first + 1] and by_id.stop_reason == "stop"
    assert by_id.logprobs == pytest.approx(reference.logprobs[: first + 1], abs=LOGPROB_TOL)

    # A printable two-token piece of the output; the sequence must end where that text first appears.
    start = next(
        i for i in range(2, len(reference.tokens) - 1) if tokenizer.decode(reference.tokens[i : i + 2]).isprintable()
    )
    stop_text = tokenizer.decode(reference.tokens[start : start + 2])
    end = next(m for m in range(1, 13) if stop_text in tokenizer.decode(reference.tokens[:m]))
    by_text = solo(runner, "a-all", prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=("\x00", stop_text)))
    assert by_text.tokens == reference.tokens[:end] and by_text.stop_reason == "stop"

    short = solo(runner, "a-all", prompt, SamplingParams(max_tokens=2, temperature=0.0))
    assert short.tokens == reference.tokens[:2] and short.stop_reason == "length"


def test_eos_stops_and_a_new_sample_sees_the_new_version(runner: ModelRunner) -> None:
    """Train an adapter to answer then emit EOS; the sampler sees each optim_step without any sync call."""
    runner.create_adapter("eos", LoraSpec(rank=4, seed=0))
    sampler = NativeSampler(runner)
    eos = runner.base.tokenizer.eos_token_id
    prompt, answer = [40, 41, 42, 43], [50, 51, eos]
    before = sampler.sample("eos", prompt, 1, GREEDY)[0]
    assert before.adapter_version == 0 and before.stop_reason == "length"
    datum = Datum.from_sequence(prompt + answer, prompt_len=len(prompt))
    adapter = runner.adapters.get("eos")
    for _ in range(60):
        logprobs = runner.forward_backward("eos", [datum]).logprobs[0][len(prompt) - 1 :]
        if logprobs.min().item() > math.log(0.6):  # every answer token is the argmax now
            adapter.optimizer.zero_grad()
            break
        runner.optim_step("eos", AdamParams(learning_rate=2e-2))
    else:
        pytest.fail("the adapter did not learn the answer")
    after = sampler.sample("eos", prompt, 1, GREEDY)[0]
    assert after.tokens == answer and after.stop_reason == "stop"
    assert after.adapter_version == adapter.version > 0
    assert after.logprobs == pytest.approx(logprobs.tolist(), abs=1e-4)


def test_logprobs_equal_the_trainers(adapters: ModelRunner) -> None:
    """Raw logprobs (temperature 1, no filters) whatever the sampling params, so importance ratios start at 1."""
    runner = adapters
    prompt = PROMPTS[3]
    for adapter_id, params in [
        ("a-all", SamplingParams(max_tokens=10, temperature=1.0, seed=5)),
        ("a-attn", SamplingParams(max_tokens=10, temperature=0.6, top_k=8, top_p=0.8, seed=6)),
    ]:
        sequences = NativeSampler(runner).sample(adapter_id, prompt, 3, params)
        datums = [Datum.from_sequence(prompt + s.tokens, prompt_len=len(prompt)) for s in sequences]
        output = runner.forward_backward(adapter_id, datums)
        runner.adapters.get(adapter_id).optimizer.zero_grad()
        for sequence, trainer in zip(sequences, output.logprobs, strict=True):
            assert sequence.logprobs == pytest.approx(trainer[len(prompt) - 1 :].tolist(), abs=1e-4)


def test_admission_abort_and_bookkeeping(adapters: ModelRunner) -> None:
    runner = adapters
    sampler = NativeSampler(runner, max_rows=4)
    long = SamplingParams(max_tokens=30, temperature=0.0)
    sampler.add(Sample("a-all", PROMPTS[0], 3, long, request_id="first"))
    sampler.add(Sample("a-attn", PROMPTS[1], 3, long, request_id="second"))  # does not fit beside "first"
    sampler.add(Sample(None, PROMPTS[2], 1, long, request_id="third"))  # first come, first served: waits too
    assert sampler.step() == []
    assert sampler.num_running_rows() == 3
    assert sampler.active_adapters() == {"a-all", "a-attn"}
    assert sampler.abort("second") and not sampler.abort("second") and not sampler.abort("nope")
    assert sampler.active_adapters() == {"a-all"}
    sampler.step()
    assert sampler.num_running_rows() == 4  # "third" now admitted
    assert sampler.abort("first")
    assert sampler.num_running_rows() == 1 and sampler.active_adapters() == set()
    # sample() finishes its own request; others that finish meanwhile are handed to the next step().
    quick = sampler.sample("a-mlp", PROMPTS[0], 1, SamplingParams(max_tokens=40, temperature=0.0))
    assert quick[0].tokens == solo(runner, "a-mlp", PROMPTS[0], SamplingParams(max_tokens=40, temperature=0.0)).tokens
    assert [rid for rid, _ in sampler.step()] == ["third"]
    assert not sampler.has_unfinished() and sampler.num_running_rows() == 0


def test_deleting_an_adapter_fails_only_its_requests(adapters: ModelRunner) -> None:
    runner = adapters
    sampler = NativeSampler(runner, max_rows=2)
    sampler.add(Sample("a-mlp", PROMPTS[2], 2, GREEDY, request_id="running"))
    sampler.add(Sample("a-mlp", PROMPTS[0], 2, GREEDY, request_id="doomed"))  # waits: no free rows
    sampler.add(Sample("a-all", PROMPTS[1], 1, GREEDY, request_id="fine"))
    sampler.step()
    with pytest.raises(InvalidRequest, match="pinned"):
        runner.delete_adapter("a-mlp")  # admitted rows pin their adapter: it cannot vanish under them
    sampler.abort("running")
    runner.delete_adapter("a-mlp")
    runner.create_adapter("a-mlp", SPECS["a-mlp"])  # a new adapter with the same id is not the old one
    results = run_to_completion(sampler)
    failures = sampler.pop_failures()
    assert set(failures) == {"doomed"} and isinstance(failures["doomed"], UnknownAdapter)
    assert set(results) == {"fine"}
    assert_same(results["fine"][0], solo(runner, "a-all", PROMPTS[1], GREEDY))
    assert runner.adapters.pinned_ids() == set()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"max_tokens": 2.5},
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"temperature": True},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"stop": ("",)},
        {"stop": (-3,)},
        {"stop": (1.5,)},
        {"seed": "x"},
    ],
)
def test_bad_sampling_params_are_invalid(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        SamplingParams(**kwargs)


def test_bad_requests_are_rejected_at_add(adapters: ModelRunner) -> None:
    runner = adapters
    sampler = NativeSampler(runner, max_rows=4)
    vocab, limit = runner.base.vocab_size, runner.base.max_positions
    with pytest.raises(UnknownAdapter):
        sampler.add(Sample("missing", [5], 1, GREEDY, request_id="r"))
    bad = [
        Sample("a-all", [], 1, GREEDY, request_id="r"),
        Sample("a-all", [5, vocab], 1, GREEDY, request_id="r"),
        Sample("a-all", [5, -1], 1, GREEDY, request_id="r"),
        Sample("a-all", [5, "x"], 1, GREEDY, request_id="r"),  # type: ignore[list-item]
        Sample("a-all", [5], 0, GREEDY, request_id="r"),
        Sample("a-all", [5], 5, GREEDY, request_id="r"),  # more rows than the sampler has
        Sample("a-all", [5] * (limit - 3), 1, SamplingParams(max_tokens=4), request_id="r"),
        Sample("a-all", [5], 1, SamplingParams(stop=(vocab,)), request_id="r"),
        Sample("a-all", [5], 1, GREEDY, request_id=""),
    ]
    for request in bad:
        with pytest.raises(InvalidRequest):
            sampler.add(request)
    sampler.add(Sample("a-all", [5] * (limit - 4), 1, SamplingParams(max_tokens=4), request_id="r"))
    with pytest.raises(InvalidRequest):
        sampler.add(Sample("a-all", [5], 1, GREEDY, request_id="r"))  # duplicate id while unfinished
    assert not sampler.step()  # the valid request runs; nothing bad reached the batch
    assert sampler.num_running_rows() == 1


# ----- fair decode rows: pausing (issue 18) -----


def test_a_newcomer_pauses_the_hog_and_paused_sequences_match_unpaused(adapters: ModelRunner) -> None:
    """A hog holds every decode row; a newcomer decodes at the very next step, the hog's newest request
    pauses (KV kept) and later resumes, and every sequence is what it is alone: greedy and seeded."""
    runner = adapters
    seeded = SamplingParams(max_tokens=14, temperature=1.0, top_k=20, seed=7)
    greedy = SamplingParams(max_tokens=14, temperature=0.0)
    hog = [
        Sample("a-all", PROMPTS[0], 2, greedy, request_id="hog-0"),
        Sample("a-all", PROMPTS[3], 2, seeded, request_id="hog-1"),
        Sample("a-all", PROMPTS[1], 2, greedy, request_id="hog-2"),
        Sample("a-all", PROMPTS[2], 2, seeded, request_id="hog-3"),
    ]
    newcomer = Sample("a-attn", PROMPTS[1], 4, seeded, request_id="new")
    sampler = NativeSampler(runner, max_rows=12, decode_rows=8)
    for request in hog:
        sampler.add(request)
    results: dict[str, list[SampledSequence]] = {}
    for _ in range(3):
        results.update(sampler.step())
    assert sampler.tenant_rows() == {"a-all": (8, 0)}  # alone, the hog has every decode row
    sampler.add(newcomer)
    results.update(sampler.step())
    # At once: equal weights share 8 rows 4/4, whole requests, oldest first: hog-2 and hog-3 pause.
    assert sampler.tenant_rows() == {"a-all": (4, 4), "a-attn": (4, 0)}
    assert sampler.num_paused_rows() == 4
    paused_at = {row.req.request.request_id: len(row.tokens) for row in sampler._paused}
    assert set(paused_at) == {"hog-2", "hog-3"}
    results.update(sampler.step())
    still = {row.req.request.request_id: len(row.tokens) for row in sampler._paused}
    assert still == paused_at  # paused rows skip decode steps: no token, no draw
    results.update(run_to_completion(sampler))
    assert sampler.num_paused_rows() == 0 and not sampler.has_unfinished()
    for request in [*hog, newcomer]:
        alone = NativeSampler(runner).sample(request.adapter_id, request.prompt_tokens, request.n, request.params)
        for got, want in zip(results[request.request_id], alone, strict=True):
            assert_same(got, want)


def test_decode_rows_are_shared_by_weight_and_requests_stay_whole(adapters: ModelRunner) -> None:
    runner = adapters
    long = SamplingParams(max_tokens=40, temperature=0.0)
    weights = {"a-all": 3.0, "a-attn": 1.0}
    sampler = NativeSampler(runner, max_rows=24, decode_rows=8, weight=lambda a: weights.get(a or "", 1.0))
    for k in range(6):
        sampler.add(Sample("a-all", PROMPTS[k % 4], 2, long, request_id=f"heavy-{k}"))
        sampler.add(Sample("a-attn", PROMPTS[k % 4], 2, long, request_id=f"light-{k}"))
    sampler.step()
    assert sampler.tenant_rows() == {"a-all": (6, 6), "a-attn": (2, 10)}  # 3:1 of 8 rows, in whole requests
    by_request: dict[str, set[bool]] = {}
    for row in sampler._rows + sampler._paused:
        by_request.setdefault(row.req.request.request_id, set()).add(row.req.paused)
    assert all(len(states) == 1 for states in by_request.values())  # a request's rows pause together
    with pytest.raises(InvalidRequest, match="decode_rows"):
        NativeSampler(runner, max_rows=4, decode_rows=5)
