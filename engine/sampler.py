"""The native sampler: continuous batching of many LoRA adapters over one hot base model.

Each ``step`` admits waiting requests while rows and KV memory are free (one prefill forward for all of
them; a request's ``n`` rows share its prompt's KV), runs ONE decode forward over every running row of
every adapter, and retires the rows that stopped. Rows of one adapter sit next to each other in the
batch, so every LoRA layer sees one run per adapter. The LoRA layers read the adapters' live tensors, so
weights are never copied or synced: an ``optim_step`` changes what the very next forward reads. The
engine therefore holds an adapter's ``optim_step`` while ``active_adapters`` names it, so one sequence
never mixes two versions.

**KV cache.** A preallocated ``KVStore`` (``engine.kv_cache``): row ``r``'s token at position ``p`` sits
in column ``p`` of the store, and each decode step writes its new token there in place. Nothing is
copied per step: the store grows by doubling (amortised O(1) per token), a joining request's prompt is
written once by its prefill, and a leaving row is overwritten by one live row from the end (so the
store's row order differs from the batch's; the decode attention carries the permutation). Decode
attends over the longest live row's columns with an additive mask, and explicit ``position_ids`` give
each row its own positions, so what a row attends to never depends on what else is in the batch. Admission
counts KV memory as well as rows: a request waits until ``rows x longest possible row`` fits
``max_kv_bytes``, so decoding can never run out of KV memory midway.

**Fair decode rows (pausing).** The store may hold more rows (``max_rows``, *resident*) than one decode
step runs (``decode_rows``). Each time rows join or leave, ``_rebalance`` shares the decode rows among
tenants (adapters; the base model is one more) by weighted max-min fairness over whole requests: the
tenant with the fewest rows per unit of weight takes its oldest resident request next, while it fits.
Rows that get no share are *paused*: their KV stays where it is (the store keeps active rows in
``[0, active)`` and paused ones after them, so a pause or resume moves a row's columns once, like a
retirement), and they simply skip decode steps. All rows of one request are active or paused together.
A paused row draws nothing: greedy rows draw no randomness and a seeded row owns its generator, which
advances only when the row decodes, so a paused-then-resumed row gets the tokens it gets unpaused (its
logprobs equal up to float rounding, as in any other batch). Unseeded rows share their adapter's
generator and are not reproducible anyway. So a tenant that arrives while another holds every decode
row runs at its next step: the hog's newest requests pause, and resume (oldest first) as rows free.

**Attention.** Decode forwards switch the model to ``engine.decode_attention``, which computes grouped-
query attention for one-token queries without ``repeat_kv``; prefills and training keep transformers'
stock SDPA. A prefill is right-padded (prompts start at column 0), so its causal attention needs no
padding mask and keeps SDPA's causal kernels.

**Host syncs.** One per decode step: the sampled tokens and their logprobs come back in one transfer.
Everything else a step needs (positions, masks, uniforms through a pinned buffer) stays on the device or
goes to it asynchronously; per-row tensors are rebuilt on the host only when rows join or leave (and
the LoRA layers' per-batch tensors are kept until then too, so they are uploaded once per layout).

**Numerics.** Reported logprobs are the raw log-softmax (temperature 1, no top-p/k) of the sampled
token, which is what the trainer computes. In fp32 they equal the trainer's to about 1e-5 (so RL
importance ratios start at 1), and a row's tokens are the same alone or in any batch, its logprobs equal
up to float rounding (the tests' spine). Those equalities hold in fp32 only. In bf16 the sampler's decode
and the trainer's full-sequence forward round differently: their logprobs differ at about 1e-2 per
token (the tiny test model on CPU: mean 6e-3, 99th percentile 4e-2), and a row's tokens can change
with what else is in its batch, so batch invariance is not claimed in bf16.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import math
import operator
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from hotlora.engine.adapters import Adapter
from hotlora.engine.decode_attention import DecodePlan, decode_attention, padding_bias
from hotlora.engine.kv_cache import KVStore, StoreCache, to_device, upload
from hotlora.engine.lora import lora_batch
from hotlora.engine.runner import ModelRunner
from hotlora.engine.types import Sample, SampledSequence, SamplingParams, is_int
from hotlora.schemas.errors import CapacityExceeded, HotLoraError, InvalidRequest, UnknownAdapter

# Extra tokens decoded before a stop string's worth of bytes, so a multi-byte character cut at the
# window's start cannot hide a match.
STOP_TAIL_MARGIN = 3
# Share of the device memory free at start that the KV store may take by default (see default_kv_bytes).
KV_MEMORY_FRACTION = 0.5


def validate_sample(request: Sample, vocab_size: int, max_positions: int, max_rows: int) -> list[int]:
    """The request's prompt as plain ints, or ``InvalidRequest`` naming what is wrong.

    Shared by every sampler backend, so a bad request fails the same way whichever one serves it.
    """
    rid = request.request_id
    if not isinstance(rid, str) or not rid:
        raise InvalidRequest(f"request_id must be a non-empty string, got {rid!r}")
    params = request.params
    if not isinstance(params, SamplingParams):
        raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
    if not is_int(request.n) or not 1 <= request.n <= max_rows:
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

    request: Sample
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
    paused: bool = False  # resident (KV kept) but skipping decode steps: no share of the decode rows now

    @property
    def tenant(self) -> str | None:
        """Who the decode rows are shared among: the adapter (None: the base model)."""
        return self.request.adapter_id

    @property
    def columns(self) -> int:
        """KV columns each of its rows fills by its last step: the prompt minus the token decode feeds, plus outputs."""
        return len(self.request.prompt_tokens) - 1 + self.request.params.max_tokens


@dataclass(eq=False)
class _Row:
    """One running sequence; ``generator`` is None for greedy rows (they draw no randomness)."""

    req: _Request
    index: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    kv_row: int = -1  # its row in the KV store (not its place in the batch)

    @property
    def cached(self) -> int:
        """Real tokens in this row's KV cache: the prompt minus the token still to be fed, plus output so far."""
        return len(self.req.request.prompt_tokens) - 1 + len(self.tokens)

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.req.slot, self.req.order, self.index)


def _inverse(store_rows: list[int]) -> list[int] | None:
    """Batch row of each store row, or None when the two orders agree."""
    if store_rows == list(range(len(store_rows))):
        return None
    inverse = [0] * len(store_rows)
    for batch_row, store_row in enumerate(store_rows):
        inverse[store_row] = batch_row
    return inverse


def sequence_seed(seed: int, index: int) -> int:
    """A generator seed for sequence ``index`` of a seeded request: stable, and distinct per (seed, index)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _invert_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first entry whose cumulative mass exceeds ``u * total``: always a token with mass > 0."""
    total = cdf[:, -1]
    # u * total may round up to total itself; just below it still lands on the last token with mass.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None].contiguous(), right=True).squeeze(1)


def default_kv_bytes(device: torch.device) -> int | None:
    """Half the device memory free (to this process) when the sampler starts on CUDA; no bound elsewhere.

    The other half is left to prefill and decode activations, logits, and the training steps that
    interleave with sampling on the same device.
    """
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int((free + cached) * KV_MEMORY_FRACTION)


class NativeSampler:
    """Continuous-batching sampler over the runner's model; see the module docstring.

    ``max_rows`` bounds the resident rows (running or paused, each holding its KV); ``decode_rows`` (default
    ``max_rows``: never pause) the rows one decode step runs, shared fairly by ``weight(adapter_id)``.
    ``max_kv_bytes`` bounds the KV store (None: ``default_kv_bytes``); a request waits until its rows fit.
    """

    def __init__(
        self,
        runner: ModelRunner,
        max_rows: int = 64,
        max_kv_bytes: int | None = None,
        decode_rows: int | None = None,
        weight: Callable[[str | None], float] | None = None,
    ) -> None:
        if not is_int(max_rows) or max_rows < 1:
            raise InvalidRequest(f"max_rows must be a positive integer, got {max_rows!r}")
        decode_rows = max_rows if decode_rows is None else decode_rows
        if not is_int(decode_rows) or not 1 <= decode_rows <= max_rows:
            raise InvalidRequest(f"decode_rows must be an integer in [1, max_rows={max_rows}], got {decode_rows!r}")
        if max_kv_bytes is not None and (not is_int(max_kv_bytes) or max_kv_bytes < 1):
            raise InvalidRequest(f"max_kv_bytes must be a positive integer or None, got {max_kv_bytes!r}")
        config = runner.model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or ()
        if any(kind != "full_attention" for kind in layer_types):
            # A row's columns are its positions over the whole prefix, which a sliding window or linear
            # attention layer would not read.
            raise InvalidRequest(
                f"the native sampler needs full attention in every layer, got {sorted(set(layer_types))}"
            )
        self.runner = runner
        self.model = runner.model
        self.device = runner.device
        self.max_rows = max_rows
        self.decode_rows = decode_rows
        self.weight: Callable[[str | None], float] = weight or (lambda _adapter_id: 1.0)
        self.tokenizer = runner.base.tokenizer
        self.vocab_size = runner.base.vocab_size
        self.eos_ids = runner.base.eos_token_ids
        self.generator = torch.Generator(device="cpu").manual_seed(0)  # base rows without a seed
        self.max_kv_bytes = default_kv_bytes(self.device) if max_kv_bytes is None else max_kv_bytes
        self._store = self._new_store(config, self.max_kv_bytes)
        self._waiting: deque[_Request] = deque()
        self._requests: dict[str, _Request] = {}  # unfinished: waiting or running
        self._rows: list[_Row] = []  # the decoding rows, in batch order: grouped by adapter slot
        self._paused: list[_Row] = []  # resident rows skipping decode steps (store rows after the active ones)
        self._ready: list[tuple[str, list[SampledSequence]]] = []  # finished under sample(), owed to step()
        self._failures: dict[str, HotLoraError] = {}
        self._order = itertools.count()
        self._sample_ids = itertools.count()
        # Decode rows run per tenant, summed over steps; ``shared_row_steps`` only over steps in which at
        # least two tenants decoded (each tenant's share of a contended batch, for metrics and benchmarks).
        self.row_steps: Counter[str | None] = Counter()
        self.shared_row_steps: Counter[str | None] = Counter()
        self._rebuild()

    def _new_store(self, config: PretrainedConfig, max_kv_bytes: int | None) -> KVStore:
        """An empty store shaped like the model's K/V, its token budget being ``max_kv_bytes`` (None: none)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        store = KVStore(
            num_layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=self.runner.base.dtype,
            device=self.device,
            max_rows=self.max_rows,
        )
        if max_kv_bytes is not None:
            store.max_tokens = max(1, max_kv_bytes // store.bytes_per_token)
        return store

    # ----- requests -----

    def add(self, request: Sample) -> None:
        """Validate and queue; a bad request raises here and never reaches the batch."""
        prompt = validate_sample(request, self.vocab_size, self.runner.base.max_positions, self.decode_rows)
        rid, params = request.request_id, request.params
        if rid in self._requests:
            raise InvalidRequest(f"request {rid!r} is already queued or running")
        stop_ids = [s for s in params.stop if not isinstance(s, str)]
        adapter = None if request.adapter_id is None else self.runner.adapters.get(request.adapter_id)
        stop_strings = tuple(s for s in params.stop if isinstance(s, str))
        state = _Request(
            request=dataclasses.replace(request, prompt_tokens=prompt),
            adapter=adapter,
            slot=-1,  # known once admission pins the adapter into a resident slot
            order=next(self._order),
            stop_ids=self.eos_ids | frozenset(stop_ids),
            stop_strings=stop_strings,
            tail_tokens=max((len(s.encode()) for s in stop_strings), default=0) + STOP_TAIL_MARGIN,
            results=[None] * request.n,
            remaining=request.n,
        )
        budget = self._store.max_tokens
        if budget is not None and request.n * state.columns > budget:
            raise CapacityExceeded(
                f"request {rid!r} needs {request.n} x {state.columns} KV tokens, more than the sampler's whole "
                f"budget of {budget} ({self._store.bytes_per_token} bytes each)"
            )
        self._requests[rid] = state
        self._waiting.append(state)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def active_adapters(self) -> set[str]:
        return {r.request.adapter_id for r in self._requests.values() if r.request.adapter_id is not None}

    def num_running_rows(self) -> int:
        """Rows that decode at the next step (paused rows not counted)."""
        return len(self._rows)

    def num_paused_rows(self) -> int:
        return len(self._paused)

    def tenant_rows(self) -> dict[str | None, tuple[int, int]]:
        """(decoding, paused) rows per tenant (adapter id; None: the base model), for metrics."""
        counts: dict[str | None, list[int]] = {}
        for rows, column in ((self._rows, 0), (self._paused, 1)):
            for row in rows:
                counts.setdefault(row.req.tenant, [0, 0])[column] += 1
        return {tenant: (c[0], c[1]) for tenant, c in counts.items()}

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
                self._paused = [row for row in self._paused if row.req is not state]
                self._rows = [row for row in self._rows if row.req is not state]
                self._rebalance()
        return True

    def abort_all(self) -> list[str]:
        """Drop every waiting and running request (after a failed step left the cache suspect)."""
        request_ids = list(self._requests)
        for state in self._requests.values():
            self._release(state)
        self._requests.clear()
        self._waiting.clear()
        self._rows = []
        self._paused = []
        self._store.release()
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
        self.add(Sample(adapter_id, list(prompt_tokens), n, params or SamplingParams(), request_id=request_id))
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
        """First come, first served: a request that does not fit (rows or KV memory) waits, as do those behind it.

        Rows count resident rows, paused ones included: they keep their KV.
        """
        rows, widest = len(self._rows) + len(self._paused), self._widest
        admitted: list[_Request] = []
        while self._waiting and self._fits(self._waiting[0], rows, widest):
            state = self._waiting[0]
            if state.adapter is not None:
                try:
                    state.slot = self.runner.adapters.pin(state.request.adapter_id).slot
                except CapacityExceeded:
                    break  # every resident slot is pinned by running rows: wait for some to finish
                state.pinned = True
            self._waiting.popleft()
            rows += state.request.n
            widest = max(widest, state.columns)
            admitted.append(state)
        if admitted:
            self._join(admitted)

    def _fits(self, state: _Request, rows: int, widest: int) -> bool:
        """Room for the request's rows beside ``rows`` others, each as long as the longest may get."""
        rows += state.request.n
        if rows > self.max_rows:
            return False
        budget = self._store.max_tokens
        return budget is None or rows * max(widest, state.columns) <= budget

    def _join(self, admitted: list[_Request]) -> None:
        """Give the admitted requests store rows, write their prompts' KV there, and merge their rows in."""
        for state in admitted:
            state.version = 0 if state.adapter is None else state.adapter.version
        prefilled = sorted((s for s in admitted if len(s.request.prompt_tokens) > 1), key=lambda s: s.slot)
        first = self._store.rows
        width = max((len(s.request.prompt_tokens) - 1 for s in prefilled), default=0)
        widest = max([self._widest] + [s.columns for s in admitted])
        total = sum(s.request.n for s in admitted)
        self._store.reserve(first + total, width, used_cols=self._kept, max_cols=widest)
        if prefilled:
            self._prefill(prefilled, first, width)
        new_rows, sources, copies = self._place(admitted, prefilled, first)
        self._store.rows = first + total
        self._store.copy_rows(sources, copies, width)
        for state in admitted:
            state.paused = True  # until ``_rebalance`` gives it a share
        self._paused.extend(new_rows)
        self._rebalance()

    def _place(
        self, admitted: list[_Request], prefilled: list[_Request], first: int
    ) -> tuple[list[_Row], list[int], list[int]]:
        """New rows with their store rows, and the (source, copy) store rows that share a prefilled prompt.

        Store rows ``[first, first + m)`` go to the first sequence of each of the ``m`` prefilled requests
        (the prefill writes that block); then come their other sequences, copies of the first one's
        columns, and the rows of one-token prompts, which have nothing cached yet.
        """
        written = {id(s): first + i for i, s in enumerate(prefilled)}
        spare = itertools.count(first + len(prefilled))
        rows: list[_Row] = []
        sources: list[int] = []
        copies: list[int] = []
        for state in admitted:
            for index in range(state.request.n):
                kv_row = written[id(state)] if index == 0 and id(state) in written else next(spare)
                if index > 0 and id(state) in written:
                    sources.append(written[id(state)])
                    copies.append(kv_row)
                rows.append(_Row(state, index, self._row_generator(state, index), kv_row=kv_row))
        return rows, sources, copies

    def _prefill(self, states: list[_Request], first: int, width: int) -> None:
        """KV of each prompt minus its last token (the decode step feeds that one, and samples) into store rows.

        All admitted prompts go through ONE forward, grouped by adapter slot: a mixed-adapter micro-batch,
        so admitting k requests costs one forward, not k. Prompts are right-padded: a real token never
        attends to the padding after it, so causal attention needs no padding mask, and each prompt's KV
        lands in columns ``[0, length)``, where decode expects it. Padding columns hold finite garbage
        past the row's length, which decode masks and then overwrites.
        """
        ids = torch.zeros(len(states), width, dtype=torch.long)
        for row, state in enumerate(states):
            prompt = state.request.prompt_tokens[:-1]
            ids[row, : len(prompt)] = torch.tensor(prompt)
        positions = torch.arange(width, device=self.device)[None, :]
        with lora_batch(self.runner.lora, [state.slot for state in states]):
            self.model(
                input_ids=to_device(ids, self.device),
                position_ids=positions,
                past_key_values=StoreCache.prefill(self._store, first),
                use_cache=True,
                logits_to_keep=1,
            )

    def _row_generator(self, state: _Request, index: int) -> torch.Generator | None:
        params = state.request.params
        if params.temperature == 0:
            return None
        if params.seed is not None:
            return torch.Generator(device="cpu").manual_seed(sequence_seed(params.seed, index))
        return self.generator if state.adapter is None else state.adapter.generator

    def _retire(self, indices: list[int]) -> None:
        """Drop rows from the batch; the freed decode rows may resume paused ones (``_rebalance``)."""
        if not indices:
            return
        gone = set(indices)
        self._rows = [row for i, row in enumerate(self._rows) if i not in gone]
        self._rebalance()

    def _rebalance(self) -> None:
        """Share the decode rows among tenants (``_share``), then lay the store out: active rows first."""
        rows = self._rows + self._paused
        if not rows:
            self._rows = []
            self._store.release()  # an idle sampler holds no KV memory
            self._rebuild()
            return
        active = self._share(list({id(row.req): row.req for row in rows}.values()))
        for row in rows:
            row.req.paused = id(row.req) not in active
        self._rows = sorted((row for row in rows if not row.req.paused), key=lambda row: row.sort_key)
        self._paused = sorted((row for row in rows if row.req.paused), key=lambda row: row.sort_key)
        self._layout()
        self._rebuild()

    def _share(self, requests: list[_Request]) -> set[int]:
        """Ids of the requests that decode: weighted max-min fairness over whole requests, oldest first.

        Repeatedly, the tenant with the fewest rows per unit of weight takes its oldest request if its
        unfinished sequences fit the rows left; a tenant whose oldest does not fit takes no more. Rows that
        whole requests leave idle then go to the oldest remaining requests that fit, whoever's they are
        (work-conserving).
        """
        queues: dict[str | None, deque[_Request]] = {}
        for state in sorted(requests, key=lambda s: s.order):
            queues.setdefault(state.tenant, deque()).append(state)
        weights = {tenant: self.weight(tenant) for tenant in queues}
        heap = [(0.0, queue[0].order, tenant) for tenant, queue in queues.items()]
        heapq.heapify(heap)
        held = dict.fromkeys(queues, 0)
        left, active = self.decode_rows, set()
        while heap and left > 0:
            _, _, tenant = heapq.heappop(heap)
            queue = queues[tenant]
            state = queue.popleft()
            if state.remaining > left:
                continue  # rows of one request stay together; this tenant's later ones wait behind it
            active.add(id(state))
            left -= state.remaining
            held[tenant] += state.remaining
            if queue:
                heapq.heappush(heap, (held[tenant] / weights[tenant], queue[0].order, tenant))
        for state in sorted(requests, key=lambda s: s.order):  # rows whole requests left idle: oldest that fit
            if left <= 0:
                break
            if id(state) not in active and state.remaining <= left:
                active.add(id(state))
                left -= state.remaining
        return active

    def _layout(self) -> None:
        """Store rows ``[0, active)`` hold the active rows, then the paused ones: rows out of place move once.

        One gather-then-scatter moves them all, so a row may take a slot another mover leaves.
        """
        active, total = len(self._rows), len(self._rows) + len(self._paused)
        free_active = iter(sorted(set(range(active)) - {r.kv_row for r in self._rows if r.kv_row < active}))
        taken = {r.kv_row for r in self._paused if active <= r.kv_row < total}
        free_paused = iter(sorted(set(range(active, total)) - taken))
        movers: list[tuple[_Row, int]] = []
        for row in self._rows:
            if row.kv_row >= active:
                movers.append((row, next(free_active)))
        for row in self._paused:
            if not active <= row.kv_row < total:
                movers.append((row, next(free_paused)))
        cols = max((row.cached for row, _ in movers), default=0)
        self._store.copy_rows([row.kv_row for row, _ in movers], [slot for _, slot in movers], cols)
        for row, slot in movers:
            row.kv_row = slot
        self._store.rows = total
        self._store.active = active

    def _rebuild(self) -> None:
        """Per-row tensors of the current batch; they change only when rows join or leave (never per step)."""
        rows = self._rows
        resident = rows + self._paused
        self._slots = [row.req.slot for row in rows]
        self._decoding = Counter(row.req.tenant for row in rows)
        self._longest = max((row.cached for row in rows), default=0)  # the decode span
        self._kept = max((row.cached for row in resident), default=0)  # columns a regrowth must keep
        self._widest = max((row.req.columns for row in resident), default=0)
        store_rows = [row.kv_row for row in rows]
        batch_rows = _inverse(store_rows)
        lengths = [row.cached for row in rows]
        last = [row.tokens[-1] if row.tokens else row.req.request.prompt_tokens[-1] for row in rows]
        uploaded = upload([lengths, store_rows, batch_rows or [], last], torch.long, self.device)
        self._lengths, self._store_rows, batch, self._next = uploaded
        self._batch_rows = None if batch_rows is None else batch
        self._lora_scratch: dict[object, torch.Tensor] = {}
        self._rebuild_sampling([row.req.request.params for row in rows])
        self._rebuild_draws()

    def _rebuild_sampling(self, params: list[SamplingParams]) -> None:
        """Which rows sample how, and their temperatures and filters."""
        # A row's sampling path depends on its own params only, never on its neighbours: plain rows invert
        # the CDF in vocabulary order, filtered rows (top-k/top-p) in descending-probability order.
        plain = [i for i, p in enumerate(params) if p.temperature > 0 and p.top_k == 0 and p.top_p >= 1.0]
        filtered = [i for i, p in enumerate(params) if p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0)]
        top_k = [params[i].top_k for i in filtered]
        # top-k alone needs only the k best candidates; a full sort is costly on CPU.
        self._candidates = self.vocab_size if 0 in top_k else min(max(top_k, default=1), self.vocab_size)
        limits = [k or self.vocab_size for k in top_k]
        plain_rows, filtered_rows, self._top_k = upload([plain, filtered, limits], torch.long, self.device)
        self._any_sampled = bool(plain or filtered)
        self._plain_rows = plain_rows if plain else None  # the full-batch case stays an index (one cheap gather)
        self._filtered_rows = filtered_rows if filtered else None
        temperature, top_p = [p.temperature or 1.0 for p in params], [params[i].top_p for i in filtered]
        self._temperature, self._top_p = upload([temperature, top_p], torch.float32, self.device)

    def _rebuild_draws(self) -> None:
        """One draw per generator per step: unseeded rows of one adapter share its generator and draw together."""
        groups: dict[int, tuple[torch.Generator, list[int]]] = {}
        for i, row in enumerate(self._rows):
            if row.generator is not None:
                groups.setdefault(id(row.generator), (row.generator, []))[1].append(i)
        self._gen_groups = [(gen, len(idx)) for gen, idx in groups.values()]
        self._draw_index = torch.tensor([i for _, idx in groups.values() for i in idx], dtype=torch.long)
        # Greedy rows keep u = 0; the buffer is pinned on CUDA so the per-step upload is truly asynchronous.
        self._u_host = torch.zeros(len(self._rows), pin_memory=self.device.type == "cuda")

    def _uniforms(self) -> torch.Tensor:
        """This step's draws, one per sampled row, in batch order; on CUDA uploaded without waiting.

        Refilling the pinned buffer is safe: the previous step's upload finished before that step's one sync.
        """
        draws = torch.cat([torch.rand(count, generator=gen) for gen, count in self._gen_groups])
        self._u_host.index_copy_(0, self._draw_index, draws)
        return self._u_host.to(self.device, non_blocking=True)  # on CPU: the buffer itself, used at once

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

    def _forward(self) -> torch.Tensor:
        """One decode forward over every row: each writes its next token's KV in place; returns fp32 logits."""
        span = self._longest + 1
        resident = len(self._rows) + len(self._paused)
        self._store.reserve(resident, span, used_cols=self._kept, max_cols=self._widest)
        lengths = self._lengths if self._batch_rows is None else self._lengths.index_select(0, self._batch_rows)
        plan = DecodePlan(
            bias=padding_bias(lengths, span, self.runner.base.dtype),
            store_rows=None if self._batch_rows is None else self._store_rows,
            batch_rows=self._batch_rows,
        )
        cache = StoreCache.decode(self._store, self._store_rows, self._lengths, span, live=len(self._rows))
        with lora_batch(self.runner.lora, self._slots) as batch, decode_attention(self.model):
            # The LoRA layers' per-batch tensors (row masks, group offsets) depend only on the batch's runs,
            # which change only when rows join or leave: kept across steps, they are uploaded once, not per step.
            batch.scratch = self._lora_scratch
            out = self.model(
                input_ids=self._next[:, None],
                position_ids=self._lengths[:, None],
                past_key_values=cache,
                use_cache=True,
                hotlora_decode=plan,
            )
        self._lengths += 1
        self._longest = span
        self._kept = max(self._kept, span)
        return out.logits[:, -1, :].float()

    def _decode(self) -> list[tuple[str, list[SampledSequence]]]:
        logits = self._forward()
        self.row_steps.update(self._decoding)
        if len(self._decoding) > 1:
            self.shared_row_steps.update(self._decoding)
        tokens = self._choose(logits)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        self._next = tokens
        # The step's one host sync: tokens (exact in float64) and logprobs come back in one transfer.
        token_list, logprob_list = torch.stack([tokens.double(), logprobs.double()]).tolist()
        finished: list[int] = []
        completed: list[tuple[str, list[SampledSequence]]] = []
        for i, row in enumerate(self._rows):
            token = int(token_list[i])
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
