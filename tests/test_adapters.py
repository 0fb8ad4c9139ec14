"""Adapter residency sized from memory, and moves batched into one copy per flat buffer.

The bit-identity of offloading against an all-resident run is ``tests/test_offload.py``'s; here: how
many copies a move makes, what it copies from, and where the tensors end up.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
import torch
from torch import nn

from hotlora.engine import adapters as adapters_module
from hotlora.engine.adapters import (
    AdapterRegistry,
    adapter_bytes,
    flat_view,
    layer_shapes,
    slots_for_memory,
)
from hotlora.engine.lora import inject_multi_lora
from hotlora.engine.optim import AdapterOptimizer
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.types import AdamParams, Datum, LoraSpec
from hotlora.schemas.errors import InvalidRequest

GB = 10**9
HP = AdamParams(learning_rate=1e-2, weight_decay=0.01)


def qwen3_4b_shapes(layers: int = 36) -> dict[str, tuple[int, int]]:
    """Qwen3-4B's LoRA-wrapped modules: hidden 2560, 32 query / 8 key-value heads of 128, MLP 9728."""
    per_layer = {
        "self_attn.q_proj": (2560, 4096),
        "self_attn.k_proj": (2560, 1024),
        "self_attn.v_proj": (2560, 1024),
        "self_attn.o_proj": (4096, 2560),
        "mlp.gate_proj": (2560, 9728),
        "mlp.up_proj": (2560, 9728),
        "mlp.down_proj": (9728, 2560),
    }
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in per_layer.items()}


def test_adapter_bytes_counts_weights_gradients_and_both_moments() -> None:
    shapes = qwen3_4b_shapes()
    # rank 16 all-linear: 917,504 factor elements per layer, 36 layers, 4 fp32 copies.
    assert adapter_bytes(shapes, LoraSpec()) == 917_504 * 36 * 4 * 4 == 528_482_304
    assert adapter_bytes(shapes, LoraSpec(rank=8, targets=("q_proj", "v_proj"))) == 8 * (6656 + 3584) * 36 * 16
    assert adapter_bytes(shapes, LoraSpec(targets="mlp"), dtype=torch.bfloat16) == 16 * 12288 * 3 * 36 * 4 * 2
    assert adapter_bytes({"lm_head": (2560, 151936)}, LoraSpec()) == 0


def test_slots_for_memory() -> None:
    per_adapter = adapter_bytes(qwen3_4b_shapes(), LoraSpec())
    # An H200 after an 8 GB bf16 base: a quarter of ~131 GB holds 61 default adapters, not 256.
    assert slots_for_memory(131 * GB, 0.25, per_adapter, max_adapters=256) == 61
    assert slots_for_memory(131 * GB, 1.0, per_adapter, max_adapters=128) == 128
    assert slots_for_memory(GB // 10, 0.25, per_adapter, max_adapters=256) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InvalidRequest):
            slots_for_memory(131 * GB, bad, per_adapter, max_adapters=256)


def wide_context(layers: int = 2):
    """A decoder's LoRA layers without weights: meta-device linears named like a Qwen3's."""
    with torch.device("meta"):
        model = nn.Module()
        model.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.self_attn = nn.Module()
            block.mlp = nn.Module()
            for name, (fan_in, fan_out) in {"q_proj": (64, 128), "k_proj": (64, 32), "v_proj": (64, 32)}.items():
                setattr(block.self_attn, name, nn.Linear(fan_in, fan_out, bias=False))
            block.self_attn.o_proj = nn.Linear(128, 64, bias=False)
            for name in ("gate_proj", "up_proj"):
                setattr(block.mlp, name, nn.Linear(64, 192, bias=False))
            block.mlp.down_proj = nn.Linear(192, 64, bias=False)
            model.layers.append(block)
    return inject_multi_lora(model)


def test_cuda_residency_is_sized_from_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    context = wide_context()
    per_adapter = adapter_bytes(layer_shapes(context), LoraSpec())
    assert per_adapter == 16 * (192 + 96 * 2 + 192 + 256 * 3) * 2 * 16
    free = 1000 * per_adapter
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    cuda = torch.device("cuda")
    with structlog.testing.capture_logs() as logs:
        registry = AdapterRegistry(context, cuda, max_adapters=256)
    assert registry.resident_slots == 250
    assert logs == [
        {
            "event": "resident_slots_sized",
            "log_level": "info",
            "slots": 250,
            "max_adapters": 256,
            "adapter_bytes": per_adapter,
            "free_bytes": free,
            "total_bytes": 2 * free,
            "resident_memory_fraction": 0.25,
        }
    ]
    assert AdapterRegistry(context, cuda, max_adapters=256, resident_memory_fraction=0.1).resident_slots == 100
    assert AdapterRegistry(context, cuda, max_adapters=64).resident_slots == 64
    assert AdapterRegistry(context, cuda, max_adapters=256, resident_slots=300).resident_slots == 256  # capped
    assert AdapterRegistry(context, cuda, max_adapters=256, resident_slots=7).resident_slots == 7
    with pytest.raises(InvalidRequest):
        AdapterRegistry(context, cuda, resident_memory_fraction=0.0)
    assert AdapterRegistry(context, torch.device("cpu"), max_adapters=256).resident_slots == 256  # CPU: all


@pytest.fixture
def recorded_moves(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every group move as a real copy (CPU only), recording its size and whether it had to pack first."""
    moves: list[dict] = []

    def record(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        packed = flat_view(tensors) is None
        moved = adapters_module.copy_group(tensors, device)
        moves.append({"tensors": len(tensors), "packed": packed, "dtype": tensors[0].dtype})
        for tensor in tensors:
            tensor.fill_(float("nan"))
        return moved

    monkeypatch.setattr(adapters_module, "transfer", record)
    return moves


def datums(seed: int) -> list[Datum]:
    generator = torch.Generator().manual_seed(seed)
    return [Datum.from_sequence(torch.randint(3, 200, (12,), generator=generator).tolist(), prompt_len=3)]


def snapshot(runner: ModelRunner, adapter_id: str) -> list[torch.Tensor]:
    adapter = runner.adapters.get(adapter_id)
    state = adapter.optimizer.torch_optimizer.state
    tensors = [t for p in adapter.parameters() for t in (p, p.grad) if t is not None]
    tensors += [v for p in adapter.parameters() for v in state.get(p, {}).values()]
    return [t.detach().clone() for t in tensors]


def test_a_move_is_one_copy_per_group(tiny_model_path: Path, recorded_moves: list[dict]) -> None:
    config = RunnerConfig(resident_slots=2, max_adapters=4)
    runner = ModelRunner.from_pretrained(tiny_model_path, dtype="float32", device="cpu", config=config)
    adapter = runner.create_adapter("a", LoraSpec(rank=4, targets="all-linear", seed=1))
    params = adapter.parameters()
    state = adapter.optimizer.torch_optimizer.state
    runner.forward_backward("a", datums(0))
    runner.optim_step("a", HP)
    runner.forward_backward("a", datums(1))  # gradients pending across the round trip
    steps = [state[p]["step"] for p in params]
    before = snapshot(runner, "a")
    n = len(params)

    recorded_moves.clear()  # the copying transfer copies even a move to where the tensors are (attach)
    runner.adapters.offload("a")
    # weights with exp_avg and exp_avg_sq in one buffer, gradients in another; the CPU steps stay put
    assert recorded_moves == [
        {"tensors": 3 * n, "packed": True, "dtype": torch.float32},
        {"tensors": n, "packed": True, "dtype": torch.float32},
    ]
    host_weights = [t for p in params for t in (p.data, state[p]["exp_avg"], state[p]["exp_avg_sq"])]
    assert flat_view(host_weights) is not None and flat_view([p.grad for p in params]) is not None
    assert all(state[p]["step"] is step for p, step in zip(params, steps, strict=True))

    recorded_moves.clear()
    runner.adapters.acquire(["a"])
    # the way back copies the host buffers as they are: nothing to pack
    assert [move["packed"] for move in recorded_moves] == [False, False]
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot(runner, "a"), strict=True))
    assert adapter.parameters() == params and all(p in state for p in params)
    assert all(runner.lora.layers[name].slots[adapter.slot] is pair for name, pair in adapter.pairs.items())

    runner.optim_step("a", HP)  # drops the gradients: the next move has one group
    recorded_moves.clear()
    runner.adapters.offload("a")
    assert len(recorded_moves) == 1 and recorded_moves[0]["tensors"] == 3 * n
    runner.adapters.acquire(["a"])


def test_cpu_moves_are_noops_without_a_copying_transfer(tiny_model_path: Path) -> None:
    config = RunnerConfig(resident_slots=1, max_adapters=4)
    runner = ModelRunner.from_pretrained(tiny_model_path, dtype="float32", device="cpu", config=config)
    adapter = runner.create_adapter("a", LoraSpec(rank=4, seed=1))
    runner.forward_backward("a", datums(0))
    pointers = [p.data_ptr() for p in adapter.parameters()] + [p.grad.data_ptr() for p in adapter.parameters()]
    runner.adapters.offload("a")
    runner.adapters.acquire(["a"])
    assert pointers == [p.data_ptr() for p in adapter.parameters()] + [p.grad.data_ptr() for p in adapter.parameters()]


def test_fused_optimizer_steps_travel_with_the_weights(tiny_model_path: Path, recorded_moves: list[dict]) -> None:
    """Fused AdamW (CUDA) keeps ``step`` beside the parameters: a move must take it along.

    Stood in for on CPU by torch's CPU fused kernel, which keeps ``step`` on the parameters' device too.
    """
    config = RunnerConfig(resident_slots=1, max_adapters=4)
    runner = ModelRunner.from_pretrained(tiny_model_path, dtype="float32", device="cpu", config=config)
    adapter = runner.create_adapter("a", LoraSpec(rank=4, seed=1))
    adapter.optimizer = AdapterOptimizer(adapter.parameters(), device=torch.device("cuda"))
    params = adapter.parameters()
    runner.forward_backward("a", datums(0))
    runner.optim_step("a", HP)
    state = adapter.optimizer.torch_optimizer.state
    before = snapshot(runner, "a")
    recorded_moves.clear()
    runner.adapters.offload("a")
    assert recorded_moves == [{"tensors": 4 * len(params), "packed": True, "dtype": torch.float32}]
    moved = [t for p in params for t in (p.data, state[p]["step"], state[p]["exp_avg"], state[p]["exp_avg_sq"])]
    assert flat_view(moved) is not None
    runner.adapters.acquire(["a"])
    assert all(torch.equal(x, y) for x, y in zip(before, snapshot(runner, "a"), strict=True))
    assert [float(state[p]["step"]) for p in params] == [1.0] * len(params)
    runner.forward_backward("a", datums(1))
    runner.optim_step("a", HP)
    assert [float(state[p]["step"]) for p in params] == [2.0] * len(params)
