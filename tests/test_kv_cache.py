"""The sampler's KV store: doubling growth, in-place writes, row moves; and the sampler's use of it."""

from __future__ import annotations

import pytest
import torch

from hotlora.engine.kv_cache import KVStore, StoreCache
from hotlora.engine.runner import ModelRunner
from hotlora.engine.sampler import NativeSampler
from hotlora.engine.types import Sample, SamplingParams
from hotlora.schemas.errors import CapacityExceeded

LAYERS, KV_HEADS, DIM = 2, 2, 4
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def store(max_rows: int = 64, max_tokens: int | None = None) -> KVStore:
    return KVStore(LAYERS, KV_HEADS, DIM, torch.float32, torch.device("cpu"), max_rows, max_tokens)


def fill(kv: KVStore, rows: int, cols: int) -> None:
    """Distinct values in every live cell, so a lost or misplaced copy shows."""
    kv.rows = rows
    for i, tensor in enumerate(kv.keys + kv.values):
        tensor[:rows, :, :cols] = (
            torch.arange(rows * KV_HEADS * cols * DIM, dtype=torch.float32).view(rows, KV_HEADS, cols, DIM) + 1000 * i
        )


def test_growth_doubles_each_short_axis_keeps_live_columns_and_zeroes_the_rest() -> None:
    kv = store()
    kv.reserve(3, 5, used_cols=0)
    assert (kv.row_capacity, kv.col_capacity) == (3, 5)
    fill(kv, 3, 5)
    before = [t[:3, :, :5].clone() for t in kv.keys + kv.values]
    kv.reserve(3, 6, used_cols=5)  # one column short: doubles
    assert (kv.row_capacity, kv.col_capacity) == (3, 10)
    kv.reserve(4, 6, used_cols=5)
    assert (kv.row_capacity, kv.col_capacity) == (6, 10)
    for old, new in zip(before, kv.keys + kv.values, strict=True):
        assert new.shape == (6, KV_HEADS, 10, DIM)
        assert torch.equal(new[:3, :, :5], old)
        assert not new[3:].any() and not new[:, :, 5:].any()  # never garbage: 0 * NaN would poison attention
    ptr = kv.keys[0].data_ptr()
    kv.reserve(6, 10, used_cols=5)  # fits: nothing reallocated
    assert kv.keys[0].data_ptr() == ptr


def test_growth_is_amortised_over_a_long_sequence() -> None:
    kv = store()
    grows = 0
    for cols in range(1, 1025):
        capacity = kv.col_capacity
        kv.reserve(1, cols, used_cols=cols - 1)
        grows += kv.col_capacity != capacity
    assert grows == 11  # 1, 2, 4, ..., 1024


def test_growth_respects_the_row_column_and_token_limits() -> None:
    kv = store(max_rows=5, max_tokens=60)
    kv.reserve(4, 6, used_cols=0)
    kv.reserve(5, 6, used_cols=0)
    assert kv.row_capacity == 5  # not 8
    kv.reserve(5, 7, used_cols=6, max_cols=9)
    assert kv.col_capacity == 9  # not 12: no row will ever need more
    kv.reserve(5, 11, used_cols=9)
    assert kv.row_capacity * kv.col_capacity <= 60 and kv.col_capacity >= 11


def test_a_regrowth_under_the_budget_sheds_rows_no_longer_live() -> None:
    kv = store(max_tokens=100)
    kv.reserve(10, 5, used_cols=0)
    fill(kv, 10, 5)
    kv.rows = 2  # a burst of short rows left; two remain and grow long
    kept = [t[:2, :, :5].clone() for t in kv.keys + kv.values]
    kv.reserve(2, 40, used_cols=5)
    assert (kv.row_capacity, kv.col_capacity) == (2, 40)  # not 10 x 40 = 400 tokens
    assert all(torch.equal(t[:2, :, :5], old) for t, old in zip(kv.keys + kv.values, kept, strict=True))
    kv.reserve(3, 1, used_cols=30)  # asks for fewer columns than live rows use: those are kept anyway
    assert kv.col_capacity >= 30 and kv.row_capacity * kv.col_capacity <= 100


def test_prefill_writes_fresh_rows_and_attends_over_its_own_prompt() -> None:
    kv = store()
    kv.reserve(5, 8, used_cols=0)
    fill(kv, 2, 8)
    keys, values = torch.randn(3, KV_HEADS, 4, DIM), torch.randn(3, KV_HEADS, 4, DIM)
    cache = StoreCache.prefill(kv, first_row=2)
    assert cache.get_mask_sizes(4, 0) == (4, 0) and cache.get_seq_length() == 0
    got = cache.update(keys, values, 1)
    assert got[0] is keys and got[1] is values
    assert torch.equal(kv.keys[1][2:5, :, :4], keys) and torch.equal(kv.values[1][2:5, :, :4], values)
    assert kv.keys[1][0, 0, 0, 0] == 1000  # the rows already there are untouched


def test_decode_writes_each_row_in_place_and_returns_views_of_the_store() -> None:
    kv = store()
    kv.reserve(3, 8, used_cols=0)
    fill(kv, 3, 8)
    before = kv.keys[0].clone()
    ptr = kv.keys[0].data_ptr()
    rows, positions = torch.tensor([2, 0, 1]), torch.tensor([5, 1, 3])
    new_k, new_v = torch.randn(3, KV_HEADS, 1, DIM), torch.randn(3, KV_HEADS, 1, DIM)
    cache = StoreCache.decode(kv, rows, positions, span=6)
    assert cache.get_mask_sizes(1, 0) == (6, 0)
    keys, values = cache.update(new_k, new_v, 0)
    assert kv.keys[0].data_ptr() == ptr and keys.data_ptr() == ptr  # no copy, no new tensor
    assert keys.shape == values.shape == (3, KV_HEADS, 6, DIM)
    for i in range(3):
        assert torch.equal(kv.keys[0][rows[i], :, positions[i]], new_k[i, :, 0])
        assert torch.equal(kv.values[0][rows[i], :, positions[i]], new_v[i, :, 0])
    touched = torch.zeros(3, 8, dtype=torch.bool)
    touched[rows, positions] = True
    assert torch.equal(kv.keys[0].permute(0, 2, 1, 3)[~touched], before.permute(0, 2, 1, 3)[~touched])


def test_copy_rows_moves_only_the_given_columns() -> None:
    kv = store()
    kv.reserve(4, 6, used_cols=0)
    fill(kv, 4, 6)
    before = [t.clone() for t in kv.keys + kv.values]
    kv.copy_rows([3], [1], cols=4)
    for old, new in zip(before, kv.keys + kv.values, strict=True):
        assert torch.equal(new[1, :, :4], old[3, :, :4])
        assert torch.equal(new[1, :, 4:], old[1, :, 4:])
        assert torch.equal(new[[0, 2, 3]], old[[0, 2, 3]])
    kv.release()
    assert kv.keys == [] and kv.row_capacity == kv.col_capacity == kv.rows == 0


def test_the_store_is_not_reallocated_per_step_and_a_leaving_row_moves_one_row(runner: ModelRunner) -> None:
    sampler = NativeSampler(runner)
    kv = sampler._store
    sampler.add(Sample(None, [5, 6, 7], 1, SamplingParams(max_tokens=2, temperature=0.0), request_id="short"))
    sampler.add(Sample(None, [8, 9], 2, SamplingParams(max_tokens=40, temperature=0.0), request_id="long"))
    sampler.step()
    assert [row.kv_row for row in sampler._rows] == [0, 1, 2]
    buffers: set[int] = set()
    copies: list[list[int]] = []
    original = kv.copy_rows
    kv.copy_rows = lambda src, dst, cols: (copies.append(src), original(src, dst, cols))[1]  # type: ignore[method-assign]
    for _ in range(39):
        sampler.step()
        if kv.keys:
            buffers.add(kv.keys[0].data_ptr())
    assert copies[0] == [2]  # "short" (store row 0) left; the last row moved into its place, alone
    assert [row.kv_row for row in sampler._rows] == [] and kv.row_capacity == 0  # idle: memory released
    assert len(buffers) <= 5  # 41 columns by doubling from 3, not one buffer per step


def test_a_kv_budget_makes_requests_wait_and_they_still_match_solo(runner: ModelRunner) -> None:
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    solo = {i: NativeSampler(runner).sample(None, p, 1, GREEDY)[0].tokens for i, p in enumerate(prompts)}
    probe = NativeSampler(runner)
    per_token = probe._store.bytes_per_token
    columns = len(prompts[0]) - 1 + GREEDY.max_tokens  # the widest request's rows
    sampler = NativeSampler(runner, max_kv_bytes=2 * columns * per_token)  # room for two rows at a time
    for i, prompt in enumerate(prompts):
        sampler.add(Sample(None, prompt, 1, GREEDY, request_id=f"r{i}"))
    sampler.step()
    assert sampler.num_running_rows() == 2  # the third waits for KV memory, not for a row
    results: dict[str, list[list[int]]] = {}
    while sampler.has_unfinished():
        results.update({rid: [s.tokens for s in seqs] for rid, seqs in sampler.step()})
    assert all(results[f"r{i}"] == [solo[i]] for i in solo)
    with pytest.raises(CapacityExceeded):
        sampler.add(Sample(None, prompts[0], 3, GREEDY, request_id="huge"))  # could never fit, so it must not wait
