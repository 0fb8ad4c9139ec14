"""The model runner: the only code that touches the model, its adapters and their optimizers.

It knows nothing of queues, tenants' fairness or sockets; the engine loop (Engine core II) asks it
to run one micro-batch or one optimizer step at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from hotlora.engine.adapters import (
    DEFAULT_RESIDENT_MEMORY_FRACTION,
    Adapter,
    AdapterRegistry,
    ordered_parameter_keys,
)
from hotlora.engine.base_model import BaseModel, load_base_model
from hotlora.engine.batching import MicroBatch, ResultAssembler, collate, pack_forward_backward
from hotlora.engine.checkpoint import LoadedAdapter, load_checkpoint, save_checkpoint
from hotlora.engine.lora import inject_multi_lora, lora_batch
from hotlora.engine.losses import CLIPPED_LOSSES, RL_LOSSES, compute_loss, target_logprobs, validate_loss_config
from hotlora.engine.types import (
    AdamParams,
    AdapterInfo,
    Datum,
    ForwardBackward,
    ForwardBackwardOutput,
    LoraSpec,
    OptimStepOutput,
)
from hotlora.schemas.errors import CheckpointError, HotLoraError, InvalidRequest

# Config fields (the known ones) of models that transform their logits after the output head. Training
# computes logprobs from the head directly (``losses.target_logprobs``): such a model would train wrong.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


@dataclass
class RunnerConfig:
    """Knobs of the model runner.

    ``token_budget`` caps padded tokens per micro-batch. ``max_adapters`` caps registered adapters and
    ``resident_slots`` (default: ``max_adapters``) those resident on the device at once; the rest wait
    on ``host_device`` and reload on their next use. ``gradient_checkpointing`` keeps only each decoder
    layer's input through a training forward and recomputes the rest in the backward (about a third
    more compute for a fraction of the activation memory).
    """

    token_budget: int = 8192
    lora_backend: str = "auto"
    max_adapters: int = 256
    resident_slots: int | None = None
    host_device: str = "cpu"
    gradient_checkpointing: bool = False
    # CUDA without ``resident_slots``: the share of free device memory resident adapters may fill.
    resident_memory_fraction: float = DEFAULT_RESIDENT_MEMORY_FRACTION


class ModelRunner:
    def __init__(self, base: BaseModel, config: RunnerConfig | None = None) -> None:
        self.base = base
        self.config = config or RunnerConfig()
        self.model = base.model
        self.body, self.head = decoder_and_head(self.model)
        self.lora = inject_multi_lora(self.model, self.config.lora_backend)
        self._checkpointed = enable_gradient_checkpointing(self.model) if self.config.gradient_checkpointing else []
        self.adapters = AdapterRegistry(
            self.lora,
            base.device,
            max_adapters=self.config.max_adapters,
            resident_slots=self.config.resident_slots,
            host_device=self.config.host_device,
            resident_memory_fraction=self.config.resident_memory_fraction,
        )
        # Called with each training micro-batch before it runs (engine.observability); None costs nothing.
        self.micro_batch_hook: Callable[[MicroBatch], None] | None = None

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: str = "auto", device: str = "auto", config: RunnerConfig | None = None
    ) -> ModelRunner:
        return cls(load_base_model(path, dtype=dtype, device=device), config)

    @property
    def device(self) -> torch.device:
        return self.base.device

    # ----- adapter lifecycle -----

    def create_adapter(self, adapter_id: str, spec: LoraSpec | None = None) -> Adapter:
        return self.adapters.create(adapter_id, spec or LoraSpec())

    def delete_adapter(self, adapter_id: str) -> None:
        self.adapters.delete(adapter_id)

    def list_adapters(self) -> list[AdapterInfo]:
        return [
            AdapterInfo(
                adapter_id=a.adapter_id,
                slot=a.slot,
                resident=a.resident,
                rank=a.spec.rank,
                alpha=a.spec.alpha,
                targets=a.spec.target_modules(),
                version=a.version,
                num_parameters=a.num_parameters(),
            )
            for a in self.adapters.list()
        ]

    # ----- training -----

    def forward_backward(
        self,
        adapter_id: str,
        datums: Sequence[Datum],
        loss_fn: str = "cross_entropy",
        loss_config: dict[str, float] | None = None,
    ) -> ForwardBackwardOutput:
        call = ForwardBackward(adapter_id, list(datums), loss_fn, dict(loss_config or {}))
        result = self.forward_backward_many([call])[0]
        if isinstance(result, HotLoraError):
            raise result
        return result

    def forward_backward_many(self, calls: Sequence[ForwardBackward]) -> list[ForwardBackwardOutput | HotLoraError]:
        """Run many adapters' calls in shared micro-batches; a bad call fails alone."""
        results: list[ForwardBackwardOutput | HotLoraError | None] = [None] * len(calls)
        valid: list[int] = []
        for index, call in enumerate(calls):
            try:
                self.validate_call(call)
                valid.append(index)
            except HotLoraError as err:
                results[index] = err
        # Forward-only calls (Tinker's ``forward``) run apart, without autograd: they never touch gradients.
        for backward in (True, False):
            indices = [i for i in valid if calls[i].forward_only != backward]
            if not indices:
                continue
            good_calls = [calls[i] for i in indices]
            outputs = self.run_calls(good_calls) if backward else self._run_calls(good_calls, backward=False)
            for index, output in zip(indices, outputs, strict=True):
                results[index] = output
        return [r for r in results if r is not None]

    def validate_call(self, call: ForwardBackward) -> None:
        self.adapters.get(call.adapter_id)
        validate_loss_config(call.loss_fn, call.loss_config)
        vocab, max_len = self.base.vocab_size, self.base.max_positions
        for i, datum in enumerate(call.datums):
            datum.validate()
            if len(datum) > max_len:
                raise InvalidRequest(f"datum {i} has {len(datum)} tokens; the model takes at most {max_len}")
            top = int(max(datum.input_tokens.max(), datum.target_tokens.max()))
            if top >= vocab:
                raise InvalidRequest(f"datum {i} has token id {top}, outside the vocabulary of {vocab}")
            if call.loss_fn in RL_LOSSES and (datum.logprobs is None or datum.advantages is None):
                raise InvalidRequest(f"datum {i}: {call.loss_fn!r} needs sampler logprobs and advantages")
            thresholds = datum.clip_low_threshold is not None or datum.clip_high_threshold is not None
            if thresholds and call.loss_fn not in CLIPPED_LOSSES:
                raise InvalidRequest(
                    f"datum {i}: per-token clip thresholds are read only by {sorted(CLIPPED_LOSSES)}, "
                    f"not {call.loss_fn!r}"
                )
            mask = datum.sequence_ratio_mask
            if (mask is None) != (call.loss_fn != "gspo"):
                need = "needs" if mask is None else "is read only by 'gspo', not by"
                raise InvalidRequest(f"datum {i}: a sequence_ratio_mask {need} {call.loss_fn!r}")
            if mask is not None and not bool((mask != 0).any()):
                raise InvalidRequest(f"datum {i}: its sequence_ratio_mask marks no token (gspo's ratio is their mean)")

    def run_calls(self, calls: Sequence[ForwardBackward]) -> list[ForwardBackwardOutput]:
        """Pack and run validated calls; outputs come back in call order.

        When the calls name more adapters than can be resident beside the pinned ones, they run in
        groups (see ``resident_groups``), each acquired (and so given valid slots) before packing.
        All or nothing for the gradients: if anything fails (say, out of memory in the third
        micro-batch), every adapter's ``.grad`` is left exactly as it was, so a retry counts nothing twice.
        """
        params = self._parameters(dict.fromkeys(call.adapter_id for call in calls))
        with self._gradients_aside(params) as new:
            outputs = self._run_calls(calls)
        _add_gradients(params, new)
        return outputs

    def forward_backward_aside(
        self, call: ForwardBackward, aside: list[torch.Tensor | None] | None
    ) -> tuple[ForwardBackwardOutput, list[torch.Tensor | None]]:
        """Run one validated call without touching the adapter's gradients: return its output and
        ``aside`` plus the call's gradient, one tensor (or None) per adapter parameter.

        For the parts of a split call (``engine.split_calls``): their sum reaches the adapter at once,
        with ``add_gradients``, so a part that fails leaves the adapter exactly as it was.
        """
        with self._gradients_aside(self._parameters([call.adapter_id])) as mine:
            (output,) = self._run_calls([call])
        if aside is None:
            return output, mine
        with torch.no_grad():
            summed = [
                new if held is None else held if new is None else held.to(new.device).add_(new)
                for held, new in zip(aside, mine, strict=True)
            ]
        return output, summed

    def add_gradients(self, adapter_id: str, grads: Sequence[torch.Tensor | None]) -> None:
        """Add gradients set aside by ``forward_backward_aside`` to the adapter's accumulated ones."""
        _add_gradients(self._parameters([adapter_id]), grads)

    def _parameters(self, adapter_ids: Iterable[str]) -> list[torch.Tensor]:
        return [p for adapter_id in adapter_ids for p in self.adapters.get(adapter_id).parameters()]

    @staticmethod
    @contextmanager
    def _gradients_aside(params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor | None]]:
        """Run a step into fresh gradients, which the yielded list receives once the step succeeded; the
        earlier ones are put back afterwards, whether or not it did.

        The earlier gradients are held aside, not copied. They stay where they were even if the step
        offloads their adapter; the restored tensor goes wherever the parameter is by then.
        """
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        new: list[torch.Tensor | None] = []
        try:
            yield new
            new.extend(p.grad for p in params)
        finally:
            for p, grad in zip(params, earlier, strict=True):
                p.grad = None if grad is None else grad.to(p.device)

    def _run_calls(self, calls: Sequence[ForwardBackward], backward: bool = True) -> list[ForwardBackwardOutput]:
        outputs: list[ForwardBackwardOutput | None] = [None] * len(calls)
        for group in self.resident_groups(calls):
            group_calls = [calls[i] for i in group]
            adapters = self.adapters.acquire(call.adapter_id for call in group_calls)
            slots = {adapter_id: adapter.slot for adapter_id, adapter in adapters.items()}
            assembler = ResultAssembler(group_calls)
            for batch in pack_forward_backward(group_calls, slots, self.config.token_budget):
                if self.micro_batch_hook is not None:
                    self.micro_batch_hook(batch)
                row_losses, target_logprobs = self.run_micro_batch(batch, group_calls, backward)
                assembler.add(batch, row_losses, target_logprobs)
            for index, output in zip(group, assembler.outputs(), strict=True):
                outputs[index] = output
        return [o for o in outputs if o is not None]

    def resident_groups(self, calls: Sequence[ForwardBackward]) -> list[list[int]]:
        """Split call indices, in order, into groups whose adapters fit in the resident slots.

        A group closes when one more distinct adapter would push it, together with the adapters pinned
        elsewhere, past ``resident_slots``. With every adapter resident this is one group, i.e. exactly
        the unsplit packing. A group that cannot hold even one adapter is left to ``acquire`` to refuse.
        """
        capacity = self.adapters.resident_slots
        pinned = self.adapters.pinned_ids()
        groups: list[list[int]] = []
        current: list[int] = []
        names: set[str] = set()
        for index, call in enumerate(calls):
            if call.adapter_id not in names and current and len(names | pinned | {call.adapter_id}) > capacity:
                groups.append(current)
                current, names = [], set()
            current.append(index)
            names.add(call.adapter_id)
        if current:
            groups.append(current)
        return groups

    def run_micro_batch(
        self, batch: MicroBatch, calls: Sequence[ForwardBackward], backward: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward and one backward over rows of many adapters; gradients accumulate per adapter.

        Logprobs come from the decoder's last hidden states at real positions only, through the output
        head a chunk at a time (``losses.target_logprobs``); padding positions get 0. The backward runs
        inside ``lora_batch`` too: checkpointed layers recompute their forward during it. With
        ``backward=False`` (forward-only calls) nothing is recorded for autograd and no layer is
        checkpointed: the same forward, the same losses, no gradient.
        """
        tensors = collate(batch, calls, self.device)
        rows, width = len(batch.rows), batch.width
        grad_mode = nullcontext() if backward else torch.no_grad()
        checkpointing = self._checkpointing() if backward else nullcontext()
        with grad_mode, lora_batch(self.lora, batch.slots), checkpointing:
            # Right padding with a causal mask: real tokens never attend to the padding after them.
            hidden = self.body(input_ids=tensors.input_ids, use_cache=False).last_hidden_state
            real = hidden.reshape(rows * width, -1).index_select(0, tensors.token_index)
            targets = tensors.target_ids.reshape(-1).index_select(0, tensors.token_index)
            flat = target_logprobs(real, self.head, targets)
            logprobs = flat.new_zeros(rows * width).index_put((tensors.token_index,), flat).view(rows, width)
            row_losses = torch.zeros(rows, device=self.device)
            for (loss_fn, config_items), group in tensors.loss_groups.items():
                losses = compute_loss(loss_fn, tensors.loss_inputs(group, logprobs), dict(config_items))
                row_losses = row_losses.index_put((torch.tensor(group, device=self.device),), losses)
            if backward:
                row_losses.sum().backward()
        return row_losses.detach(), logprobs.detach()

    @contextmanager
    def _checkpointing(self) -> Iterator[None]:
        """HF checkpoints a layer only while it is in training mode, and a layer in training mode also drops
        the KV cache, which would break decoding: so the checkpointed layers are in training mode only
        for a training step. Only the layer objects themselves: dropout lives in their children, which
        stay in eval mode.
        """
        for layer in self._checkpointed:
            layer.training = True
        try:
            yield
        finally:
            for layer in self._checkpointed:
                layer.training = False

    def optim_step(self, adapter_id: str, params: AdamParams | None = None) -> OptimStepOutput:
        adapter = self.adapters.acquire([adapter_id])[adapter_id]
        norm = adapter.optimizer.step(params or AdamParams())
        adapter.version += 1
        return OptimStepOutput(adapter_id=adapter_id, version=adapter.version, grad_norm=norm)

    # ----- inference helper -----

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, adapter_ids: Sequence[str | None]) -> torch.Tensor:
        """Full-sequence logits, each row under its own adapter (``None``: the plain base)."""
        adapters = self.adapters.acquire(a for a in adapter_ids if a is not None)
        slots = [-1 if a is None else adapters[a].slot for a in adapter_ids]
        with lora_batch(self.lora, slots):
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    # ----- checkpoints -----

    def save_state(self, adapter_id: str, path: str | Path, include_optimizer: bool = True) -> Path:
        """PEFT weights plus (by default) everything needed to resume training exactly.

        Reads the tensors wherever they live, device or host: saving never evicts another adapter.
        """
        loaded = self._state_of(adapter_id, include_optimizer, copy=False)
        return save_checkpoint(path, adapter_id, loaded, self.base.path, include_state=include_optimizer)

    def capture_state(self, adapter_id: str) -> LoadedAdapter:
        """A host copy of the adapter's whole training state, to be written later by another thread."""
        return self._state_of(adapter_id, include_optimizer=True, copy=True)

    def _state_of(self, adapter_id: str, include_optimizer: bool, copy: bool) -> LoadedAdapter:
        adapter = self.adapters.get(adapter_id)

        def take(tensor: torch.Tensor) -> torch.Tensor:
            # The next optim_step updates the live tensors in place: a capture must own its memory.
            return tensor.detach().to("cpu", copy=True) if copy else tensor

        moments = None
        if include_optimizer:
            raw = adapter.optimizer.moments()
            keys = ordered_parameter_keys(adapter.pairs)
            if raw is not None:
                moments = {k: (take(m), take(v), step) for k, (m, v, step) in zip(keys, raw, strict=True)}
        return LoadedAdapter(
            spec=adapter.spec,
            weights={name: (take(pair.A), take(pair.B)) for name, pair in adapter.pairs.items()},
            version=adapter.version,
            moments=moments,
            rng_state=adapter.generator.get_state() if include_optimizer else None,
            adam_params=adapter.optimizer.last_params,
        )

    def save_weights(self, adapter_id: str, path: str | Path) -> Path:
        """Weights only, in PEFT format: what a sampler or ``PeftModel.from_pretrained`` needs."""
        return self.save_state(adapter_id, path, include_optimizer=False)

    def load_state(self, adapter_id: str, path: str | Path) -> Adapter:
        """Create (or replace) ``adapter_id`` from a checkpoint; optimizer state is restored when present.

        Like ``create_adapter``, the new adapter takes a free or evictable resident slot, else it starts
        offloaded; restoring works in place either way.
        """
        loaded = load_checkpoint(path)
        if adapter_id in self.adapters:
            self.adapters.delete(adapter_id)
        adapter = self.adapters.create(adapter_id, loaded.spec)
        try:
            self._restore(adapter, loaded, Path(path))
        except Exception:
            self.adapters.delete(adapter_id)
            raise
        return adapter

    def _restore(self, adapter: Adapter, loaded: LoadedAdapter, path: Path) -> None:
        if set(loaded.weights) != set(adapter.pairs):
            missing = sorted(set(adapter.pairs) - set(loaded.weights))
            extra = sorted(set(loaded.weights) - set(adapter.pairs))
            raise CheckpointError(
                f"{path}: weights do not match the base model (missing {missing[:3]}, extra {extra[:3]})"
            )
        with torch.no_grad():
            for name, (a, b) in loaded.weights.items():
                pair = adapter.pairs[name]
                if a.shape != pair.A.shape or b.shape != pair.B.shape:
                    raise CheckpointError(
                        f"{path}: {name} has shapes {tuple(a.shape)}/{tuple(b.shape)}, "
                        f"expected {tuple(pair.A.shape)}/{tuple(pair.B.shape)}"
                    )
                pair.A.copy_(a)
                pair.B.copy_(b)
        adapter.version = loaded.version
        if loaded.moments is not None:
            keys = ordered_parameter_keys(adapter.pairs)
            adapter.optimizer.load_moments([loaded.moments[k] for k in keys])
        adapter.optimizer.last_params = loaded.adam_params
        if loaded.rng_state is not None:
            adapter.generator.set_state(loaded.rng_state)


def decoder_and_head(model: PreTrainedModel) -> tuple[nn.Module, nn.Linear]:
    """The causal LM's decoder stack (up to its final norm) and its output head, for ``run_micro_batch``."""
    for name in LOGIT_TRANSFORMS:
        value = getattr(model.config, name, None)
        if value is not None and value != 1:
            raise InvalidRequest(f"the base model transforms its logits after the output head ({name}={value})")
    body = model.base_model
    head = model.get_output_embeddings()
    if body is model or not isinstance(head, nn.Linear):
        raise InvalidRequest(f"{type(model).__name__} is not a causal LM with a decoder and a linear output head")
    return body, head


def enable_gradient_checkpointing(model: PreTrainedModel) -> list[nn.Module]:
    """Non-reentrant checkpointing of every decoder layer; returns the layers (see ``_checkpointing``)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Only reentrant checkpointing needs the embeddings' output to require grad; with it, autograd would
    # also compute the gradient of the first layer's input, which nothing uses.
    model.disable_input_require_grads()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise InvalidRequest(f"{type(model).__name__} has no layers that support gradient checkpointing")
    return layers


def _add_gradients(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """``earlier + new`` per parameter, in that order, as autograd's accumulation would have added them."""
    with torch.no_grad():
        for p, grad in zip(params, grads, strict=True):
            if grad is not None:
                p.grad = grad.to(p.device) if p.grad is None else p.grad.add_(grad.to(p.device))
