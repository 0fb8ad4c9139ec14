"""Grouped-query attention for the sampler's decode step, without repeating K and V per query head.

transformers' SDPA integration passes GQA to ``scaled_dot_product_attention(enable_gqa=True)`` only
when there is no attention mask; a batch of rows of different lengths needs one, so the stock path
``repeat_kv``-expands every layer's K and V ``heads / kv_heads`` times (4x for Qwen3-4B) on every
step. With one query token per row there is a cheaper exact form: the ``g = heads / kv_heads`` query
heads that share a KV head become ``g`` query *positions* of that KV head,

    q ``[rows, heads, 1, d]`` -> ``[rows, kv_heads, g, d]``,   attend to K, V ``[rows, kv_heads, span, d]``,

which is plain (non-causal) attention with a per-row additive mask broadcast over heads and queries:
K and V are read once, never copied, and SDPA keeps its fused kernels (fp32 accumulation in bf16).

The store keeps rows in its own order (see ``engine.kv_cache``), the batch in adapter order; a
``DecodePlan`` carries the permutation, and the queries are gathered into store order and the outputs
back (``rows x heads x d`` each, tiny beside K and V).

The implementation is switched on only around the sampler's decode forwards (``decode_attention``),
not at model load: training forwards and prefills keep transformers' stock path and its masks
untouched, and with no mask function registered for this name transformers builds no decode mask at
all (the plan carries it). One worker thread owns the model (``engine.core``), so the switch cannot
leak into a concurrent forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

DECODE_ATTENTION = "hotlora_gqa_decode"


@dataclass(frozen=True)
class DecodePlan:
    """What every layer's decode attention shares in one step; passed to the model as ``hotlora_decode``.

    ``bias`` is ``[rows, 1, 1, span]`` in store row order: 0 where a row has a token, ``-inf`` past its
    length. ``store_rows[i]`` is the store row of batch row ``i`` and ``batch_rows`` its inverse; both
    are None when the two orders agree.
    """

    bias: torch.Tensor
    store_rows: torch.Tensor | None = None
    batch_rows: torch.Tensor | None = None


def padding_bias(lengths: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of rows holding ``lengths + 1`` tokens each, ``[rows, 1, 1, span]``.

    Its storage is padded to a multiple of 16 columns, the alignment SDPA's memory-efficient CUDA kernel
    wants for a mask (it would otherwise pad a copy in every layer).
    """
    width = -(-span // 16) * 16
    columns = torch.arange(width, device=lengths.device)
    bias = torch.zeros(lengths.shape[0], width, dtype=dtype, device=lengths.device)
    bias.masked_fill_(columns[None, :] > lengths[:, None], float("-inf"))
    return bias[:, None, None, :span]


def gqa_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    hotlora_decode: DecodePlan | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: one-token queries with a plan take the grouped path, the rest stock SDPA."""
    plan = hotlora_decode
    if plan is None or query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    if plan.batch_rows is not None:
        grouped = grouped.index_select(0, plan.batch_rows)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=plan.bias, scale=scaling)
    if plan.store_rows is not None:
        out = out.index_select(0, plan.store_rows)
    return out.reshape(rows, 1, heads, dim), None


AttentionInterface.register(DECODE_ATTENTION, gqa_decode_attention)


@contextmanager
def decode_attention(model: PreTrainedModel) -> Iterator[None]:
    """Route the model's attention layers to ``gqa_decode_attention`` for the duration of one forward."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
