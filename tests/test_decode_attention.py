"""Grouped decode attention: equal to transformers' stock SDPA path (``repeat_kv`` plus a padding mask)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hotlora.engine.decode_attention import (
    DECODE_ATTENTION,
    DecodePlan,
    decode_attention,
    gqa_decode_attention,
    padding_bias,
)

ROWS, HEADS, KV_HEADS, DIM, SPAN = 6, 8, 2, 16, 11
TOL = 1e-5


class FakeAttention(nn.Module):
    """The two attributes transformers' SDPA function reads from an attention layer."""

    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, K, V and per-row lengths (cached tokens; the row attends to ``length + 1`` columns)."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(ROWS, HEADS, 1, DIM, generator=gen)
    keys = torch.randn(ROWS, KV_HEADS, SPAN, DIM, generator=gen)
    values = torch.randn(ROWS, KV_HEADS, SPAN, DIM, generator=gen)
    lengths = torch.tensor([SPAN - 1, 0, 3, SPAN - 1, 7, 1])  # padded rows: all but two
    return query, keys, values, lengths


def stock(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """transformers' own path for a padded decode batch: a boolean mask, so K and V are repeated per head."""
    mask = torch.arange(SPAN)[None, :] <= lengths[:, None]
    out, _ = sdpa_attention_forward(FakeAttention(), query, keys, values, mask[:, None, None, :], scaling=DIM**-0.5)
    return out


def test_grouped_decode_equals_the_stock_path_with_padded_rows() -> None:
    query, keys, values, lengths = batch()
    plan = DecodePlan(bias=padding_bias(lengths, SPAN, torch.float32))
    got, weights = gqa_decode_attention(
        FakeAttention(), query, keys, values, None, scaling=DIM**-0.5, hotlora_decode=plan
    )
    want = stock(query, keys, values, lengths)
    assert weights is None and got.shape == want.shape == (ROWS, 1, HEADS, DIM)
    assert torch.allclose(got, want, atol=TOL, rtol=0)
    # Padding really matters here: attending over every column gives something else.
    full = stock(query, keys, values, torch.full((ROWS,), SPAN - 1))
    assert not torch.allclose(got, full, atol=1e-2)


def test_grouped_decode_with_store_rows_in_another_order() -> None:
    """K and V in the store's row order, queries and outputs in the batch's: the plan's permutation joins them."""
    query, keys, values, lengths = batch(seed=1)
    store_rows = torch.tensor([4, 0, 5, 2, 1, 3])  # batch row i lives in store row store_rows[i]
    batch_rows = torch.empty_like(store_rows)
    batch_rows[store_rows] = torch.arange(ROWS)
    stored = lambda t: t.index_select(0, batch_rows)  # noqa: E731  (store row p holds batch row batch_rows[p])
    plan = DecodePlan(padding_bias(stored(lengths), SPAN, torch.float32), store_rows, batch_rows)
    got, _ = gqa_decode_attention(
        FakeAttention(), query, stored(keys), stored(values), None, scaling=DIM**-0.5, hotlora_decode=plan
    )
    assert torch.allclose(got, stock(query, keys, values, lengths), atol=TOL, rtol=0)


def test_strided_store_views_are_read_in_place() -> None:
    """Decode passes ``[:rows, :, :span]`` views of a larger store; the result must not depend on that."""
    query, keys, values, lengths = batch(seed=2)
    big_k = torch.randn(ROWS + 3, KV_HEADS, SPAN + 9, DIM)
    big_v = torch.randn(ROWS + 3, KV_HEADS, SPAN + 9, DIM)
    big_k[:ROWS, :, :SPAN], big_v[:ROWS, :, :SPAN] = keys, values
    plan = DecodePlan(bias=padding_bias(lengths, SPAN, torch.float32))
    got, _ = gqa_decode_attention(
        FakeAttention(),
        query,
        big_k[:ROWS, :, :SPAN],
        big_v[:ROWS, :, :SPAN],
        None,
        scaling=DIM**-0.5,
        hotlora_decode=plan,
    )
    assert torch.allclose(got, stock(query, keys, values, lengths), atol=TOL, rtol=0)


def test_without_a_plan_or_with_several_queries_it_is_the_stock_function() -> None:
    query, keys, values, lengths = batch(seed=3)
    mask = (torch.arange(SPAN)[None, :] <= lengths[:, None])[:, None, None, :]
    plain, _ = gqa_decode_attention(FakeAttention(), query, keys, values, mask, scaling=DIM**-0.5)
    assert torch.equal(plain, stock(query, keys, values, lengths))
    prefill = torch.randn(ROWS, HEADS, SPAN, DIM)
    plan = DecodePlan(bias=padding_bias(lengths, SPAN, torch.float32))
    got, _ = gqa_decode_attention(FakeAttention(), prefill, keys, values, None, hotlora_decode=plan)
    want, _ = sdpa_attention_forward(FakeAttention(), prefill, keys, values, None)
    assert torch.equal(got, want)


def test_padding_bias_is_aligned_and_masks_past_each_length() -> None:
    lengths = torch.tensor([0, 4, 10])
    bias = padding_bias(lengths, SPAN, torch.float32)
    assert bias.shape == (3, 1, 1, SPAN) and bias.stride(0) % 16 == 0
    visible = bias[:, 0, 0, :] == 0
    assert visible.sum(dim=1).tolist() == [1, 5, 11]
    assert torch.isneginf(bias[:, 0, 0, :][~visible]).all()


def test_the_switch_covers_one_forward_and_is_undone_on_error() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    with decode_attention(model):
        assert model.config._attn_implementation == DECODE_ATTENTION
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), decode_attention(model):
        raise RuntimeError("a failed decode forward")
    assert model.config._attn_implementation == "sdpa"
