"""Every op of a training step sees its tensors on one device: the check a GPU run would make, without a GPU.

The base model lives on the ``meta`` device (shapes, dtypes and devices, no data), the stand-in for a
CUDA device: a host tensor that reaches a device op is a crash on CUDA. ``DeviceRecorder`` sees every
aten op of one ``forward_backward_many`` and records those whose tensor arguments sit on two devices
(0-dim CPU tensors are allowed, as CUDA allows them; transfers are what they are). Where the engine
reads a device value back (``.item()``, ``.cpu()``), the recorder answers with a placeholder, since
meta tensors have no values. The meta kernels of ``torch._grouped_mm`` also check CUDA's 16-byte
alignment rules, so the grouped path is checked for those too.

Why meta and not FakeTensorMode's fake CUDA tensors: on a CPU-only torch build these fail in C++
wherever a CUDA device guard is needed (``.to("cuda")`` without an index, Python indexing such as
``x[:, :1]``, which the model's mask code does), before any op reaches the fake kernels. And meta
kernels do not refuse mixed devices by themselves (``cpu_tensor[meta_index]`` runs), hence the recorder.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from hotlora.engine.base_model import BaseModel, prepare_device
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.types import ForwardBackward, LoraSpec
from tests.helpers import random_datum

META = torch.device("meta")
CPU = torch.device("cpu")
VOCAB = 64
TRANSFERS = frozenset({torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default})


class DeviceRecorder(TorchDispatchMode):
    """Records ops whose tensor arguments are on more than one device; stands in for meta's missing values."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[tuple[str, list[str]]] = []
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        self.ops += 1
        devices = {str(t.device) for t in tensors if not (t.device == CPU and t.dim() == 0)}
        if len(devices) > 1 and func not in TRANSFERS:
            self.mixed.append((str(func), sorted(devices)))
        on_meta = bool(tensors) and tensors[0].device == META
        if func is torch.ops.aten._local_scalar_dense.default and on_meta:
            return torch.ones((), dtype=tensors[0].dtype).item()  # e.g. HF's "all positions consecutive?" probe
        if func is torch.ops.aten._to_copy.default and on_meta and kwargs.get("device") == CPU:
            return torch.zeros(tensors[0].shape, dtype=kwargs.get("dtype") or tensors[0].dtype)
        return func(*args, **kwargs)


def meta_runner(dtype: torch.dtype, backend: str, gradient_checkpointing: bool = False) -> ModelRunner:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with META:
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    model.requires_grad_(False)
    base = BaseModel(model=model, tokenizer=None, path="meta", device=META, dtype=dtype)  # type: ignore[arg-type]
    settings = RunnerConfig(lora_backend=backend)
    if gradient_checkpointing:
        settings.gradient_checkpointing = True
    return ModelRunner(base, settings)


def mixed_calls(runner: ModelRunner, count: int) -> list[ForwardBackward]:
    gen = torch.Generator().manual_seed(0)
    losses = ["cross_entropy", "ppo", "importance_sampling", "cispo"]
    calls = []
    for i in range(count):
        # ranks 4 and 12 are not 16-byte multiples in bf16: the grouped path must pad them
        runner.create_adapter(f"a{i}", LoraSpec(rank=[4, 12, 8][i % 3], seed=i, targets="all-linear"))
        datums = [random_datum(gen, VOCAB, n, rl=True) for n in (9, 5, 7)[: 2 + i % 2]]
        calls.append(ForwardBackward(f"a{i}", datums, losses[i % len(losses)]))
    return calls


def record_step(runner: ModelRunner, calls: list[ForwardBackward]) -> DeviceRecorder:
    recorder = DeviceRecorder()
    with recorder:
        outputs = runner.forward_backward_many(calls)
    for output in outputs:
        assert not isinstance(output, Exception), output
    return recorder


@pytest.mark.parametrize(
    ("dtype", "backend", "adapters"),
    [
        (torch.float32, "auto", 3),
        (torch.float32, "segment", 3),
        (torch.float32, "stacked", 3),
        (torch.float32, "reference", 2),
        (torch.bfloat16, "grouped", 3),
        (torch.bfloat16, "auto", 1),
    ],
)
def test_training_step_keeps_every_op_on_one_device(dtype: torch.dtype, backend: str, adapters: int) -> None:
    runner = meta_runner(dtype, backend)
    calls = mixed_calls(runner, adapters)
    recorder = record_step(runner, calls)
    assert recorder.ops > 100, "the recorder saw no step"
    assert recorder.mixed == [], recorder.mixed[:5]
    for call in calls:
        for p in runner.adapters.get(call.adapter_id).parameters():
            assert p.grad is not None and p.grad.device == META and p.grad.dtype == torch.float32


def test_checkpointed_step_keeps_every_op_on_one_device() -> None:
    """The backward's recomputation runs the layers (and so the LoRA deltas) again, on the same device."""
    plain = meta_runner(torch.bfloat16, "auto")
    plain_ops = record_step(plain, mixed_calls(plain, 3)).ops
    runner = meta_runner(torch.bfloat16, "auto", gradient_checkpointing=True)
    recorder = record_step(runner, mixed_calls(runner, 3))
    assert recorder.mixed == [], recorder.mixed[:5]
    assert recorder.ops > plain_ops, "no recomputation: the layers were not checkpointed"


def test_recorder_catches_a_host_tensor_in_a_device_op() -> None:
    """Guard the guard: indexing a host tensor with a device index (the bug this file was written for)."""
    recorder = DeviceRecorder()
    with recorder:
        host = torch.zeros(4, dtype=torch.bool)
        index = torch.tensor([0, 2], device=META)
        host[index]
    assert recorder.mixed == [("aten.index.Tensor", ["cpu", "meta"])]


def test_tf32_is_switched_on_for_cuda_only() -> None:
    """TF32 for CUDA's fp32 matmuls; the CPU's oneDNN keeps exact fp32, and libraries can still ask torch."""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        prepare_device(CPU)
        assert not torch.backends.cuda.matmul.allow_tf32
        prepare_device(torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")
        torch.get_float32_matmul_precision()  # raises once legacy and per-backend settings are mixed
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
