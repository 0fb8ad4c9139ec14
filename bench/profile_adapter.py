"""What one LoRA adapter costs the engine: bytes, one ``optim_step`` (ms, aten ops) and an offload + reload.

The base is a random-init Qwen3 shape built on the meta device: nothing here runs it (gradients are
synthetic), only its linear modules' shapes matter. The LoRA layers, the adapter registry and the
per-adapter AdamW are exactly the engine's. On CPU the host and the device are the same memory, so a
move would be a no-op: the registry's transfer seam is swapped for a copying one, as
tests/test_offload.py does. On CUDA it also reports the peak device memory per resident adapter.

    python bench/profile_adapter.py [--device cpu|cuda] [--rank 16] [--layers 8] [--adapters 8]
    # Qwen3-4B's shape (the H200 target):
    python bench/profile_adapter.py --device cuda --layers 36 --hidden 2560 --intermediate 9728 \
        --heads 32 --kv-heads 8 --head-dim 128
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from hotlora.benchmarks.core import git_commit, machine_info
from hotlora.engine import adapters as adapters_module
from hotlora.engine.adapters import (
    DEFAULT_RESIDENT_MEMORY_FRACTION,
    AdapterRegistry,
    adapter_bytes,
    layer_shapes,
    slots_for_memory,
)
from hotlora.engine.lora import inject_multi_lora
from hotlora.engine.types import AdamParams, LoraSpec


def model_config(args: argparse.Namespace) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
    )


def use_copying_transfer() -> None:
    """CPU only: make every move a real copy (host and device are one memory here)."""
    adapters_module.transfer = adapters_module.copy_group


def synthetic_grads(params: list[torch.Tensor], generator: torch.Generator) -> None:
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(p.device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def count_ops(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """aten ops in ``fn``: all of them, and the top-level ones (those no other aten op called)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = list(prof.events())

    def top_level(event: Any) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    aten = [e for e in events if e.name.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU]
    counts = {
        "aten_ops": len(aten),
        "aten_ops_top_level": sum(1 for e in aten if top_level(e)),
        "copies": sum(1 for e in aten if e.name == "aten::copy_"),
    }
    if device.type == "cuda":
        counts["cuda_kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return counts


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(model_config(args))
    context = inject_multi_lora(model)
    spec = LoraSpec(rank=args.rank, targets="all-linear")
    hp = AdamParams()
    generator = torch.Generator().manual_seed(0)
    if device.type == "cpu":
        use_copying_transfer()
    registry = AdapterRegistry(context, device, max_adapters=args.adapters + 2, resident_slots=args.adapters + 1)
    adapter = registry.create("probe", spec)
    params = adapter.parameters()
    result: dict[str, Any] = {
        "tensors": {"parameters": len(params), "moved_per_swap_with_grads": 4 * len(params)},
        "bytes_per_adapter_estimate": adapter_bytes(layer_shapes(context), spec),
    }

    synthetic_grads(params, generator)
    adapter.optimizer.step(hp)  # creates the moments
    synthetic_grads(params, generator)
    state = adapter.optimizer.torch_optimizer.state
    held = [p for p in params] + [p.grad for p in params]
    held += [v for p in params for v in state[p].values() if v.dim() > 0]
    result["bytes_per_adapter_measured"] = sum(t.numel() * t.element_size() for t in held)

    step_ms = []
    for _ in range(args.repeats):
        synthetic_grads(params, generator)
        step_ms.append(timed(lambda: adapter.optimizer.step(hp), device))
    synthetic_grads(params, generator)
    result["optim_step"] = {"ms": median_ms(step_ms), **count_ops(lambda: adapter.optimizer.step(hp), device)}

    for label, with_grads in (("with_grads", True), ("no_grads", False)):
        offload_ms, reload_ms = [], []
        for _ in range(args.repeats):
            if with_grads:
                synthetic_grads(params, generator)
            offload_ms.append(timed(lambda: registry.offload("probe"), device))
            reload_ms.append(timed(lambda: registry.acquire(["probe"]), device))
        offload_ops = count_ops(lambda: registry.offload("probe"), device)
        reload_ops = count_ops(lambda: registry.acquire(["probe"]), device)
        result[f"swap_{label}"] = {
            "offload_ms": median_ms(offload_ms),
            "reload_ms": median_ms(reload_ms),
            "offload_ops": offload_ops,
            "reload_ops": reload_ops,
        }
        adapter.optimizer.zero_grad()

    if device.type == "cuda":
        result["cuda_memory"] = cuda_memory_per_adapter(registry, spec, hp, generator, args.adapters, device)
    return result


def cuda_memory_per_adapter(
    registry: AdapterRegistry,
    spec: LoraSpec,
    hp: AdamParams,
    generator: torch.Generator,
    count: int,
    device: torch.device,
) -> dict[str, Any]:
    """Device memory of ``count`` more resident adapters, each created and stepped once."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for i in range(count):
        adapter = registry.create(f"resident-{i}", spec)
        synthetic_grads(adapter.parameters(), generator)
        adapter.optimizer.step(hp)
    torch.cuda.synchronize(device)
    after = torch.cuda.memory_allocated(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    per_adapter = adapter_bytes(layer_shapes(registry.context), spec)
    return {
        "adapters": count,
        "allocated_per_adapter": (after - before) // count,
        "peak_per_adapter": (peak - before) // count,
        "free_bytes": free,
        "total_bytes": total,
        "estimate_per_adapter": per_adapter,
        # what the engine picks without --resident-slots (before this bench's adapters took their share)
        "default_resident_slots": slots_for_memory(
            free + after - before, DEFAULT_RESIDENT_MEMORY_FRACTION, per_adapter, 256
        ),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--adapters", type=int, default=8, help="CUDA: adapters created for the memory figure")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "bench": "profile_adapter",
        "command": shlex.join(["python", "bench/profile_adapter.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": git_commit(),
        "machine": machine_info(torch.device(args.device)),
        "model": f"meta-device Qwen3 shape: {args.layers} layers, hidden {args.hidden}, "
        f"intermediate {args.intermediate}, heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}",
        "rank": args.rank,
    }
    result.update(run(args))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
