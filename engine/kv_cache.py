"""The native sampler's KV cache: preallocated keys and values that each decode step writes in place.

transformers' ``DynamicCache`` appends a token with ``torch.cat``, which copies every layer's whole cache
on every decode step: O(context) bytes moved per generated token. ``KVStore`` instead keeps, per layer,
one tensor ``[row_capacity, kv_heads, col_capacity, head_dim]`` (transformers' own layout, so a step's
keys are the strided view ``[:rows, :, :span]`` and attention reads it without a copy):

- **Columns are positions.** Row ``r``'s token at position ``p`` lives in column ``p``, so a row never
  moves when others are longer or shorter; columns past a row's length are masked by the caller.
- **Rows are slots.** Live rows are dense in ``[0, rows)``; their order is the store's, not the batch's,
  and the sampler keeps the mapping. A finished row is overwritten by a live row from the end (one
  row's copy), so leaving costs the leavers' size, never the whole cache.
- **Growth doubles.** When a step needs more rows or columns than allocated, that axis doubles (clamped
  to the caller's limits and token budget) and the live part is copied once: amortised O(1) per token.
  New memory is zeroed, because attention multiplies masked columns by zero and ``0 * NaN`` is NaN.

``StoreCache`` is one forward's window on the store in the ``Cache`` API that the model's attention
layers call (transformers 5.17 and 5.19 share it): a prefill writes fresh rows' prompts into columns
``[0, width)`` and attends over them alone; a decode step writes each row's new token at its own column
and attends over the store's first ``span`` columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Cache


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without blocking: on CUDA through pinned memory and an asynchronous copy.

    ``tensor.to("cuda")`` from pageable memory makes the host wait for everything queued on the stream.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def upload(columns: Sequence[Sequence[int | float]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Several host lists as device tensors in one transfer (views of one packed tensor)."""
    flat = [value for column in columns for value in column]
    packed = to_device(torch.tensor(flat, dtype=dtype), device)
    return list(packed.split([len(column) for column in columns]))


def _grown(capacity: int, needed: int, limit: int | None) -> int:
    """``capacity`` if it suffices, else double it (at least ``needed``, at most ``limit`` unless more is needed)."""
    if needed <= capacity:
        return capacity
    target = max(needed, 2 * capacity)
    return max(needed, min(target, limit)) if limit is not None else target


class KVStore:
    """Per-layer K and V for up to ``max_rows`` sequences, at most ``max_tokens`` rows x columns in all."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_rows: int,
        max_tokens: int | None = None,
    ) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # live rows, dense from row 0; the owner sets it as rows join and leave
        self.active = 0  # rows [0, active) decode; the rest of the live rows are paused (kept, not read)
        self.row_capacity = 0
        self.col_capacity = 0

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize

    def reserve(self, rows: int, cols: int, used_cols: int, max_cols: int | None = None) -> None:
        """Room for ``rows`` x ``cols``; live rows keep their first ``used_cols`` columns across a regrowth.

        Each short axis doubles, clamped to ``max_rows``/``max_cols`` and then to the token budget (never
        below what is asked, but the other axis may shrink to its live size: after a burst of short rows,
        a few long ones must not inherit the burst's row count). Layers are replaced one at a time, so the
        transient is one layer, not a copy of the whole store.
        """
        cols = max(cols, used_cols)
        if rows <= self.row_capacity and cols <= self.col_capacity:
            return
        new_rows = _grown(self.row_capacity, rows, self.max_rows)
        new_cols = _grown(self.col_capacity, cols, max_cols)
        if self.max_tokens is not None and new_rows * new_cols > self.max_tokens:
            new_cols = max(cols, min(new_cols, self.max_tokens // new_rows))
            new_rows = max(rows, min(new_rows, self.max_tokens // new_cols))
        shape = (new_rows, self.kv_heads, new_cols, self.head_dim)
        keep = (slice(0, self.rows), slice(None), slice(0, min(used_cols, self.col_capacity)))
        for tensors in (self.keys, self.values):
            for layer in range(self.num_layers):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(tensors):
                    fresh[keep].copy_(tensors[layer][keep])
                    tensors[layer] = fresh
                else:
                    tensors.append(fresh)
        self.row_capacity, self.col_capacity = new_rows, new_cols

    def copy_rows(self, src: list[int], dst: list[int], cols: int) -> None:
        """Row ``dst[i]`` takes row ``src[i]``'s first ``cols`` columns, in every layer (rows must not overlap)."""
        if not src:
            return
        src_index, dst_index = upload([src, dst], torch.long, self.device)
        for tensor in self.keys + self.values:
            view = tensor[:, :, :cols]
            view.index_copy_(0, dst_index, view.index_select(0, src_index))

    def release(self) -> None:
        """Drop every row and the memory (it goes back to the allocator, for training to reuse)."""
        self.keys, self.values = [], []
        self.rows = self.active = self.row_capacity = self.col_capacity = 0


class StoreCache(Cache):
    """One forward's window on a ``KVStore``; build it with ``prefill`` or ``decode``."""

    def __init__(
        self, store: KVStore, rows: torch.Tensor | int, positions: torch.Tensor | None, seen: int, live: int = 0
    ) -> None:
        super().__init__(layers=[])
        self.live = live
        self.store = store
        self.rows = rows
        self.positions = positions
        self.seen = seen

    @classmethod
    def prefill(cls, store: KVStore, first_row: int) -> StoreCache:
        """The forward's batch row ``i`` writes store row ``first_row + i``, columns ``[0, width)``."""
        return cls(store, first_row, None, 0)

    @classmethod
    def decode(
        cls, store: KVStore, rows: torch.Tensor, positions: torch.Tensor, span: int, live: int | None = None
    ) -> StoreCache:
        """Batch row ``i`` writes its one new token at store row ``rows[i]``, column ``positions[i]``.

        Attention then reads the store's first ``span`` columns of its first ``live`` rows (default: all
        live rows), in the store's row order; rows after them (paused ones) are neither read nor written.
        """
        return cls(store, rows, positions, span - 1, store.rows if live is None else live)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]
        if self.positions is None:
            assert isinstance(self.rows, int)
            window = (slice(self.rows, self.rows + key_states.shape[0]), slice(None), slice(0, key_states.shape[2]))
            keys[window].copy_(key_states)
            values[window].copy_(value_states)
            return key_states, value_states  # a prefill attends over its own prompt only
        assert isinstance(self.rows, torch.Tensor)
        keys[self.rows, :, self.positions] = key_states[:, :, 0]
        values[self.rows, :, self.positions] = value_states[:, :, 0]
        live = self.live
        return keys[:live, :, : self.seen + 1], values[:live, :, : self.seen + 1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(columns attention spans, offset): what transformers' mask builders ask a cache."""
        return self.seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.store.col_capacity
