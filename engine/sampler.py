"""The native sampler: continuous batching of many LoRA adapters over one hot base model.

Each ``step`` admits waiting requests while rows are free (one prefill forward per request; its ``n``
rows share that prompt's KV cache), runs ONE decode forward over every running row of every adapter,
and retires the rows that stopped. Rows of one adapter sit next to each other, so every LoRA layer
sees one run per adapter. The KV cache is the model's own ``DynamicCache``, left-padded: all rows
share one width, each row's real tokens are right-aligned, the attention mask hides the padding and
explicit ``position_ids`` give each row its own positions, so a row's tokens never depend on what
else is in the batch. The LoRA layers read the adapters' live tensors, so weights are never copied or
synced: an ``optim_step`` changes what the very next forward reads. The engine therefore holds an
adapter's ``optim_step`` while ``active_adapters`` names it, so one sequence never mixes two versions.

Reported logprobs are the raw log-softmax (temperature 1, no top-p/k) of the sampled token, which is
what the trainer computes, so RL importance ratios are exactly 1 at zero staleness.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from hotlora.engine.adapters import Adapter
from hotlora.engine.errors import CapacityExceeded, HotLoraError, InvalidRequest, UnknownAdapter
from hotlora.engine.lora import lora_batch
from hotlora.engine.runner import ModelRunner

# Extra tokens decoded before a stop string's worth of bytes, so a multi-byte character cut at the
# window's start cannot hide a match.
STOP_TAIL_MARGIN = 3


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. ``temperature=0`` is greedy; EOS always stops a sequence."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop: tuple[str | int, ...] = ()  # stop strings or stop token ids
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise InvalidRequest(f"temperature must be a number, got {temperature!r}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidRequest(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise InvalidRequest(f"top_p must lie in (0, 1], got {top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        stop = (self.stop,) if isinstance(self.stop, (str, int)) else self.stop
        if not isinstance(stop, (tuple, list)):
            raise InvalidRequest(f"stop must be a tuple of strings or token ids, got {self.stop!r}")
        for item in stop:
            if isinstance(item, str) and not item:
                raise InvalidRequest("stop strings must be non-empty")
            if not isinstance(item, str) and not (_is_int(item) and item >= 0):
                raise InvalidRequest(f"stop entries must be non-empty strings or token ids >= 0, got {item!r}")
        object.__setattr__(self, "stop", tuple(stop))  # frozen: keep it hashable
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequest(f"seed must be an integer or None, got {self.seed!r}")


@dataclass
class SampledSequence:
    """One generated sequence: its tokens (with the stop token that ended it) and raw logprobs."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" | "length"
    adapter_version: int


@dataclass
class SampleRequest:
    request_id: str
    adapter_id: str | None  # None = plain base
    prompt_tokens: list[int]
    n: int
    params: SamplingParams


def validate_sample(request: SampleRequest, vocab_size: int, max_positions: int, max_rows: int) -> list[int]:
    """The request's prompt as plain ints, or ``InvalidRequest`` naming what is wrong.

    Shared by every sampler backend, so a bad request fails the same way whichever one serves it.
    """
    rid = request.request_id
    if not isinstance(rid, str) or not rid:
        raise InvalidRequest(f"request_id must be a non-empty string, got {rid!r}")
    params = request.params
    if not isinstance(params, SamplingParams):
        raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
    if not _is_int(request.n) or not 1 <= request.n <= max_rows:
        raise InvalidRequest(f"n must be an integer in [1, {max_rows}], got {request.n!r}")
    try:
        prompt = [operator.index(t) for t in request.prompt_tokens]
    except TypeError:
        raise InvalidRequest("prompt_tokens must be a sequence of integer token ids") from None
    if not prompt:
        raise InvalidRequest("prompt_tokens must hold at least one token")
    stop_ids = [s for s in params.stop if not isinstance(s, str)]
    bad = [t for t in prompt + stop_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary of {vocab_size}")
    if len(prompt) + params.max_tokens > max_positions:
        raise InvalidRequest(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's {max_positions} "
            "positions"
        )
    return prompt


@dataclass(eq=False)
class _Request:
    """A request's sampler-side state: resolved adapter, stop sets and the sequences done so far."""

    request: SampleRequest
    adapter: Adapter | None
    slot: int
    order: int
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    tail_tokens: int
    version: int = 0
    results: list[SampledSequence | None] = field(default_factory=list)
    remaining: int = 0
    pinned: bool = False  # holds one pin on its adapter (resident, fixed slot) from admission to release


@dataclass(eq=False)
class _Row:
    """One running sequence; ``generator`` is None for greedy rows (they draw no randomness)."""

    req: _Request
    index: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def cached(self) -> int:
        """Real tokens in this row's KV cache: the prompt minus the token still to be fed, plus output so far."""
        return len(self.req.request.prompt_tokens) - 1 + len(self.tokens)

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.req.slot, self.req.order, self.index)


def sequence_seed(seed: int, index: int) -> int:
    """A generator seed for sequence ``index`` of a seeded request: stable, and distinct per (seed, index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _left_pad(kv: torch.Tensor, width: int) -> torch.Tensor:
    """Zero columns on the left of a ``[rows, heads, seq, dim]`` tensor; the mask hides them."""
    missing = width - kv.shape[2]
    return F.pad(kv, (0, 0, missing, 0)) if missing else kv


def _invert_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first entry whose cumulative mass exceeds ``u * total``: always a token with mass > 0."""
    total = cdf[:, -1]
    # u * total may round up to total itself; just below it still lands on the last token with mass.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None].contiguous(), right=True).squeeze(1)


class NativeSampler:
    """Continuous-batching sampler over the runner's model; see the module docstring."""

    def __init__(self, runner: ModelRunner, max_rows: int = 64) -> None:
        if not _is_int(max_rows) or max_rows < 1:
            raise InvalidRequest(f"max_rows must be a positive integer, got {max_rows!r}")
        config = runner.model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or ()
        if any(kind != "full_attention" for kind in layer_types):
            # Left padding shifts a row's columns, which a sliding window or linear attention would misread.
            raise InvalidRequest(
                f"the native sampler needs full attention in every layer, got {sorted(set(layer_types))}"
            )
        self.runner = runner
        self.model = runner.model
        self.device = runner.device
        self.max_rows = max_rows
        self.tokenizer = runner.base.tokenizer
        self.vocab_size = runner.base.vocab_size
        self.eos_ids = self._eos_ids()
        self.generator = torch.Generator(device="cpu").manual_seed(0)  # base rows without a seed
        self._waiting: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}  # unfinished: waiting or running
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._width = 0  # columns in the KV cache, shared by all rows
        self._ready: list[tuple[str, list[SampledSequence]]] = []  # finished under sample(), owed to step()
        self._failures: dict[str, HotLoraError] = {}
        self._order = itertools.count()
        self._sample_ids = itertools.count()
        self._rebuild()

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        sources = [self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)]
        for source in sources:
            if _is_int(source):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(i for i in source if _is_int(i))
        return frozenset(ids)

    # ----- requests -----

    def add(self, request: SampleRequest) -> None:
        """Validate and queue; a bad request raises here and never reaches the batch."""
        prompt = validate_sample(request, self.vocab_size, self.runner.base.max_positions, self.max_rows)
        rid, params = request.request_id, request.params
        if rid in self._requests:
            raise InvalidRequest(f"request {rid!r} is already queued or running")
        stop_ids = [s for s in params.stop if not isinstance(s, str)]
        adapter = None if request.adapter_id is None else self.runner.adapters.get(request.adapter_id)
        stop_strings = tuple(s for s in params.stop if isinstance(s, str))
        state = _Request(
            request=SampleRequest(rid, request.adapter_id, prompt, request.n, params),
            adapter=adapter,
            slot=-1,  # known once admission pins the adapter into a resident slot
            order=next(self._order),
            stop_ids=self.eos_ids | frozenset(stop_ids),
            stop_strings=stop_strings,
            tail_tokens=max((len(s.encode()) for s in stop_strings), default=0) + STOP_TAIL_MARGIN,
            results=[None] * request.n,
            remaining=request.n,
        )
        self._requests[rid] = state
        self._waiting.append(state)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def active_adapters(self) -> set[str]:
        return {r.request.adapter_id for r in self._requests.values() if r.request.adapter_id is not None}

    def num_running_rows(self) -> int:
        return len(self._rows)

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request; its rows leave the batch now. False if unknown or finished."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return False
        self._release(state)
        if state in self._waiting:
            self._waiting.remove(state)
        else:
            with torch.no_grad():
                self._retire([i for i, row in enumerate(self._rows) if row.req is state])
        return True

    def abort_all(self) -> list[str]:
        """Drop every waiting and running request (after a failed step left the cache suspect)."""
        request_ids = list(self._requests)
        for state in self._requests.values():
            self._release(state)
        self._requests.clear()
        self._waiting.clear()
        self._rows = []
        self._set_cache([], 0)
        self._rebuild()
        return request_ids

    def _release(self, state: _Request) -> None:
        """Give back the request's pin, once, unless its adapter is gone (a delete drops its pins)."""
        if not state.pinned:
            return
        state.pinned = False
        adapter_id = state.request.adapter_id
        registry = self.runner.adapters
        if adapter_id is not None and adapter_id in registry and registry.get(adapter_id) is state.adapter:
            registry.unpin(adapter_id)

    def pop_failures(self) -> dict[str, HotLoraError]:
        """Requests dropped by the sampler itself (their adapter was deleted or replaced), by request id."""
        failures, self._failures = self._failures, {}
        return failures

    def sample(
        self,
        adapter_id: str | None,
        prompt_tokens: Sequence[int],
        n: int = 1,
        params: SamplingParams | None = None,
    ) -> list[SampledSequence]:
        """Add one request and step until it is done; other requests' results stay owed to ``step``."""
        request_id = f"sample-{next(self._sample_ids)}"
        while request_id in self._requests:
            request_id = f"sample-{next(self._sample_ids)}"
        self.add(SampleRequest(request_id, adapter_id, list(prompt_tokens), n, params or SamplingParams()))
        others: list[tuple[str, list[SampledSequence]]] = []
        try:
            while True:
                for rid, sequences in self.step():
                    if rid == request_id:
                        return sequences
                    others.append((rid, sequences))
                if request_id in self._failures:
                    raise self._failures.pop(request_id)
        finally:
            self._ready.extend(others)

    # ----- the step -----

    @torch.no_grad()
    def step(self) -> list[tuple[str, list[SampledSequence]]]:
        """Admit, then ONE decode forward over all running rows; returns the requests that finished."""
        completed, self._ready = self._ready, []
        self._drop_stale_adapters()
        self._admit()
        if self._rows:
            completed.extend(self._decode())
        return completed

    def _drop_stale_adapters(self) -> None:
        """A deleted (or deleted and recreated) adapter's slot may now hold other weights: fail its requests."""
        registry = self.runner.adapters
        for rid, state in list(self._requests.items()):
            adapter_id = state.request.adapter_id
            if adapter_id is None or (adapter_id in registry and registry.get(adapter_id) is state.adapter):
                continue
            self.abort(rid)
            self._failures[rid] = UnknownAdapter(f"adapter {adapter_id!r} was deleted while request {rid!r} ran")

    def _admit(self) -> None:
        """First come, first served: a request that does not fit waits, and so do the ones behind it."""
        free = self.max_rows - len(self._rows)
        admitted: list[_Request] = []
        while self._waiting and self._waiting[0].request.n <= free:
            state = self._waiting[0]
            if state.adapter is not None:
                try:
                    state.slot = self.runner.adapters.pin(state.request.adapter_id).slot
                except CapacityExceeded:
                    break  # every resident slot is pinned by running rows: wait for some to finish
                state.pinned = True
            self._waiting.popleft()
            free -= state.request.n
            admitted.append(state)
        if admitted:
            self._merge(list(zip(admitted, self._prefill(admitted), strict=True)))

    def _prefill(self, states: list[_Request]) -> list[list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """KV of each prompt minus its last token (the decode step feeds that one, and samples).

        All admitted prompts go through ONE forward, left-padded, rows grouped by adapter slot: a mixed-
        adapter micro-batch, so the cost of admitting k requests is one forward, not k. Each request's KV
        comes back without the padding columns, exactly the shape a lone prefill would give.
        """
        for state in states:
            state.version = 0 if state.adapter is None else state.adapter.version
        todo = sorted(
            (i for i, s in enumerate(states) if len(s.request.prompt_tokens) > 1), key=lambda i: states[i].slot
        )
        found: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * len(states)
        if not todo:
            return found
        lengths = [len(states[i].request.prompt_tokens) - 1 for i in todo]
        width = max(lengths)
        ids = torch.zeros(len(todo), width, dtype=torch.long)
        for row, (i, length) in enumerate(zip(todo, lengths, strict=True)):
            ids[row, width - length :] = torch.tensor(states[i].request.prompt_tokens[:-1])
        pad = torch.tensor([width - length for length in lengths])
        columns = torch.arange(width)
        mask = columns[None, :] >= pad[:, None]
        positions = (columns[None, :] - pad[:, None]).clamp(min=0)
        cache = DynamicCache()
        with lora_batch(self.runner.lora, [states[i].slot for i in todo]):
            self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        for row, (i, length) in enumerate(zip(todo, lengths, strict=True)):
            found[i] = [
                (layer.keys[row : row + 1, :, width - length :], layer.values[row : row + 1, :, width - length :])
                for layer in cache.layers
            ]
        return found

    def _merge(self, admitted: list[tuple[_Request, list[tuple[torch.Tensor, torch.Tensor]] | None]]) -> None:
        """Left-pad running and new KV to one width, stack them, and reorder rows so each slot is contiguous."""
        new_rows = [
            _Row(state, index, self._row_generator(state, index))
            for state, _ in admitted
            for index in range(state.request.n)
        ]
        rows = self._rows + new_rows
        order = sorted(range(len(rows)), key=lambda i: rows[i].sort_key)
        width = max([self._width] + [len(s.request.prompt_tokens) - 1 for s, _ in admitted])
        running = [(layer.keys, layer.values) for layer in self._cache.layers] if self._cache else None
        # (rows, KV with one row to broadcast or all rows, or None for rows that have no columns yet)
        sources = [(len(self._rows), running)] + [(s.request.n, kv) for s, kv in admitted]
        sources = [(count, kv) for count, kv in sources if count > 0]
        template = next((kv for _, kv in sources if kv is not None), None)
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if template is not None:
            perm = None if order == list(range(len(rows))) else torch.tensor(order, device=self.device)
            for layer_index, pair in enumerate(template):
                merged = []
                for which, ref in enumerate(pair):
                    parts = [
                        ref.new_zeros(count, ref.shape[1], width, ref.shape[3])
                        if kv is None
                        else _left_pad(kv[layer_index][which], width).expand(count, -1, -1, -1)
                        for count, kv in sources
                    ]
                    stacked = torch.cat(parts, dim=0)
                    merged.append(stacked if perm is None else stacked.index_select(0, perm))
                layers.append((merged[0], merged[1]))
        self._rows = [rows[i] for i in order]
        self._set_cache(layers, width)
        self._rebuild()

    def _row_generator(self, state: _Request, index: int) -> torch.Generator | None:
        params = state.request.params
        if params.temperature == 0:
            return None
        if params.seed is not None:
            return torch.Generator(device="cpu").manual_seed(sequence_seed(params.seed, index))
        return self.generator if state.adapter is None else state.adapter.generator

    def _set_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> None:
        self._width = width
        if not layers:
            self._cache = None
            return
        cache = DynamicCache()
        for keys, values in layers:
            cache.layers.append(cache.layer_class_to_replicate())
            cache.layers[-1].lazy_initialization(keys, values)
            cache.layers[-1].keys, cache.layers[-1].values = keys, values
        self._cache = cache

    def _retire(self, indices: list[int]) -> None:
        """Drop rows from the batch and cut the left columns that only padding still occupies."""
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not self._rows or self._cache is None:
            self._set_cache([], 0)
        else:
            trim = self._width - max(row.cached for row in self._rows)
            index = torch.tensor(keep, device=self.device)
            layers = [(layer.keys, layer.values) for layer in self._cache.layers]
            self._set_cache(
                [(k.index_select(0, index)[:, :, trim:], v.index_select(0, index)[:, :, trim:]) for k, v in layers],
                self._width - trim,
            )
        self._rebuild()

    def _rebuild(self) -> None:
        """Per-row tensors of the current batch; they change only when rows join or leave."""
        rows = self._rows
        device = self.device
        params = [row.req.request.params for row in rows]
        self._slots = [row.req.slot for row in rows]
        self._pad = torch.tensor([self._width - row.cached for row in rows], dtype=torch.long, device=device)
        last = [row.tokens[-1] if row.tokens else row.req.request.prompt_tokens[-1] for row in rows]
        self._next = torch.tensor(last, dtype=torch.long, device=device)
        self._temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        # A row's sampling path depends on its own params only, never on its neighbours: plain rows invert
        # the CDF in vocabulary order, filtered rows (top-k/top-p) in descending-probability order.
        plain = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_k == 0 and p.top_p >= 1.0]
        filtered = [i for i, p in enumerate(params) if p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0)]
        self._any_sampled = bool(plain or filtered)
        self._plain_rows = self._row_index(plain)
        self._filtered_rows = self._row_index(filtered)
        top_k = [params[i].top_k for i in filtered]
        # top-k alone needs only the k best candidates; a full sort is costly on CPU.
        self._candidates = self.vocab_size if 0 in top_k else min(max(top_k, default=1), self.vocab_size)
        self._top_k = torch.tensor([k or self.vocab_size for k in top_k], dtype=torch.long, device=device)
        self._top_p = torch.tensor([params[i].top_p for i in filtered], device=device)
        # One draw per generator per step: unseeded rows of one adapter share its generator and draw together.
        groups: dict[int, tuple[torch.Generator, list[int]]] = {}
        for i, row in enumerate(rows):
            if row.generator is not None:
                groups.setdefault(id(row.generator), (row.generator, []))[1].append(i)
        self._gen_groups = [(gen, len(idx)) for gen, idx in groups.values()]
        self._draw_index = torch.tensor([i for _, idx in groups.values() for i in idx], dtype=torch.long)

    def _row_index(self, indices: list[int]) -> torch.Tensor | None:
        """None when no row is in the group; the full-batch case is kept as an index too (one cheap gather)."""
        return torch.tensor(indices, dtype=torch.long, device=self.device) if indices else None

    def _uniforms(self) -> torch.Tensor:
        draws = torch.cat([torch.rand(count, generator=gen) for gen, count in self._gen_groups])
        u = torch.zeros(len(self._rows)).index_copy_(0, self._draw_index, draws)
        return u.to(self.device, non_blocking=True)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy rows take the argmax; sampled rows invert their (filtered) CDF at one uniform draw each."""
        chosen = logits.argmax(dim=-1)
        if not self._any_sampled:
            return chosen
        u = self._uniforms()
        scaled = logits / self._temperature[:, None]
        if self._plain_rows is not None:
            rows = self._plain_rows
            cdf = torch.softmax(scaled.index_select(0, rows), dim=-1).cumsum(dim=-1)
            chosen.index_copy_(0, rows, _invert_cdf(cdf, u.index_select(0, rows)))
        if self._filtered_rows is not None:
            rows = self._filtered_rows
            sub = scaled.index_select(0, rows)
            if self._candidates < sub.shape[-1]:
                values, vocab_ids = sub.topk(self._candidates, dim=-1)
            else:
                values, vocab_ids = sub.sort(dim=-1, descending=True)
            ranks = torch.arange(values.shape[-1], device=values.device)
            values = values.masked_fill(ranks[None, :] >= self._top_k[:, None], -math.inf)
            probs = torch.softmax(values, dim=-1)  # renormalised over the top-k, as vLLM does before top-p
            # Nucleus: drop a token once the mass before it reaches top_p (the top token always stays).
            probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= self._top_p[:, None], 0.0)
            pick = _invert_cdf(probs.cumsum(dim=-1), u.index_select(0, rows))
            chosen.index_copy_(0, rows, vocab_ids.gather(1, pick[:, None]).squeeze(1))
        return chosen

    def _decode(self) -> list[tuple[str, list[SampledSequence]]]:
        width = self._width
        columns = torch.arange(width + 1, device=self.device)
        mask = columns[None, :] >= self._pad[:, None]
        positions = (width - self._pad)[:, None]
        cache = self._cache if self._cache is not None else DynamicCache()
        with lora_batch(self.runner.lora, self._slots):
            out = self.model(
                input_ids=self._next[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        self._cache, self._width = cache, width + 1
        logits = out.logits[:, -1, :].float()
        tokens = self._choose(logits)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        self._next = tokens
        token_list, logprob_list = tokens.tolist(), logprobs.tolist()
        finished: list[int] = []
        completed: list[tuple[str, list[SampledSequence]]] = []
        for i, row in enumerate(self._rows):
            token = token_list[i]
            row.tokens.append(token)
            row.logprobs.append(logprob_list[i])
            state = row.req
            if token in state.stop_ids or (state.stop_strings and self._hit_stop_string(row)):
                reason = "stop"
            elif len(row.tokens) >= state.request.params.max_tokens:
                reason = "length"
            else:
                continue
            finished.append(i)
            state.results[row.index] = SampledSequence(row.tokens, row.logprobs, reason, state.version)
            state.remaining -= 1
            if state.remaining == 0:
                del self._requests[state.request.request_id]
                self._release(state)
                completed.append((state.request.request_id, [s for s in state.results if s is not None]))
        self._retire(finished)
        return completed

    def _hit_stop_string(self, row: _Row) -> bool:
        text = self.tokenizer.decode(row.tokens[-row.req.tail_tokens :], skip_special_tokens=False)
        return any(stop in text for stop in row.req.stop_strings)
