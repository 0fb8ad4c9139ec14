"""One mixed ``forward_backward`` of K adapters: wall time, peak memory and aten op counts.

The base is a random-init Qwen3 built in memory (default: hidden 1024, 4 layers, 16/8 heads of 64,
vocabulary 32768; ``--shape qwen3-4b`` for the real model's shape on a GPU). Each of the K adapters
sends ``tokens / K`` tokens in datums of ``--seq-len``; half use ``cross_entropy``, half ``ppo``, and
all rows share micro-batches, exactly as ``ModelRunner.forward_backward_many`` packs them.

- ``seconds``: median over ``--repeats`` steps after ``--warmup`` (gradients cleared between steps);
  ``cpu_seconds`` the same in process CPU time (all threads), steadier on a shared CPU.
- ``peak_bytes``: the most bytes of tensors alive at once during one step, beyond what was alive
  before it (torch.profiler's allocation events, so it means the same on CPU and CUDA); on CUDA also
  ``cuda_peak_bytes`` (``max_memory_allocated``) and on Linux ``rss_peak_bytes`` (the process's
  high-water mark of resident memory during the step, glibc told to hand big blocks back at once).
- ``aten_ops``: aten operator calls in one step (forward, backward and the per-step bookkeeping),
  nested calls included, and the most frequent ones.

    python bench/profile_train.py [--device cpu|cuda] [--adapters 8] [--tokens 4096] [--dtype auto]
    python bench/profile_train.py --device cuda --shape qwen3-4b --tokens 8192
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, Qwen3Config

from hotlora.benchmarks.core import git_commit, machine_info
from hotlora.engine import base_model as base_model_module
from hotlora.engine.base_model import BaseModel, resolve_device, resolve_dtype
from hotlora.engine.batching import pack_forward_backward
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.types import Datum, ForwardBackward, LoraSpec

SHAPES: dict[str, dict[str, int]] = {
    "wide": dict(hidden=1024, layers=4, heads=16, kv_heads=8, head_dim=64, intermediate=3072, vocab=32768),
    "qwen3-4b": dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728, vocab=151936),
}
# Below this, glibc keeps freed blocks for reuse and the RSS high-water mark would track the allocator,
# not the tensors; set before the process starts (see main).
MMAP_THRESHOLD = "65536"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32 or bfloat16")
    parser.add_argument("--adapters", type=int, default=8, help="K adapters in the step")
    parser.add_argument("--tokens", type=int, default=4096, help="total tokens in the step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per datum")
    parser.add_argument("--shape", default="wide", choices=sorted(SHAPES), help="model shape; flags below override")
    for name in ("hidden", "layers", "heads", "kv-heads", "head-dim", "intermediate", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--token-budget", type=int, default=None, help="per micro-batch (default: --tokens)")
    parser.add_argument("--lora-backend", default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-ops", type=int, default=12, help="how many of the most frequent ops to list")
    parser.add_argument("--no-profile", action="store_true", help="time only: no profiler step")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: steadier on a busy CPU)")
    return parser.parse_args(argv)


def build_runner(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> ModelRunner:
    shape = {**SHAPES[args.shape]}
    for key in shape:
        value = getattr(args, key.replace("-", "_"))
        if value is not None:
            shape[key] = value
    config = Qwen3Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=max(4096, args.seq_len),
        tie_word_embeddings=False,
    )
    # What load_base_model does to a device once (TF32 on CUDA); trees from before it existed lack it.
    prepare = getattr(base_model_module, "prepare_device", None)
    if prepare is not None:
        prepare(device)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    base = BaseModel(model=model, tokenizer=None, path=f"random-init qwen3 {shape}", device=device, dtype=dtype)  # type: ignore[arg-type]
    runner_config = RunnerConfig(token_budget=args.token_budget or args.tokens, lora_backend=args.lora_backend)
    if args.gradient_checkpointing:
        runner_config.gradient_checkpointing = True  # type: ignore[attr-defined]
    return ModelRunner(base, runner_config)


def make_calls(args: argparse.Namespace, vocab: int) -> list[ForwardBackward]:
    gen = torch.Generator().manual_seed(1)
    per_adapter = args.tokens // args.adapters
    calls = []
    for k in range(args.adapters):
        datums = []
        left = per_adapter
        while left > 0:
            length = min(args.seq_len, left)
            tokens = torch.randint(3, vocab, (length + 1,), generator=gen)
            weights = torch.ones(length)
            weights[: length // 4] = 0.0  # a prompt
            logprobs = -torch.rand(length, generator=gen) * 3.0
            advantages = torch.randn(length, generator=gen) * weights
            datums.append(Datum.create(tokens[:-1], tokens[1:], weights, logprobs, advantages))
            left -= length
        calls.append(ForwardBackward(f"ad-{k}", datums, "cross_entropy" if k % 2 == 0 else "ppo"))
    return calls


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(runner: ModelRunner) -> None:
    for adapter in runner.adapters.list():
        adapter.optimizer.zero_grad()


def step(runner: ModelRunner, calls: list[ForwardBackward]) -> None:
    for output in runner.forward_backward_many(calls):
        if isinstance(output, Exception):
            raise output


def release_free_memory() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_high_water_reset() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def profiled_step(runner: ModelRunner, calls: list[ForwardBackward], device: torch.device, top: int) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step(runner, calls)
        sync(device)
    memory_device = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    counts: collections.Counter[str] = collections.Counter()
    memory: list[tuple[int, int]] = []
    for event in prof.profiler.kineto_results.events():  # type: ignore[union-attr]
        name = event.name()
        if name == "[memory]":
            if event.device_type() == memory_device:
                memory.append((event.start_ns(), event.nbytes()))
        elif name.startswith("aten::"):
            counts[name] += 1
    live = peak = 0
    for _, nbytes in sorted(memory):
        live += nbytes
        peak = max(peak, live)
    return {
        "peak_bytes": peak,
        "aten_ops": sum(counts.values()),
        "top_ops": dict(counts.most_common(top)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(args.dtype, device)
    runner = build_runner(args, device, dtype)
    spec = LoraSpec(rank=args.rank, targets=args.targets)
    for k in range(args.adapters):
        runner.create_adapter(f"ad-{k}", LoraSpec(rank=spec.rank, targets=spec.targets, seed=k))
    calls = make_calls(args, runner.base.vocab_size)
    slots = {call.adapter_id: runner.adapters.get(call.adapter_id).slot for call in calls}

    for _ in range(args.warmup):
        step(runner, calls)
        clear_grads(runner)
    sync(device)

    result: dict[str, Any] = {}
    release_free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    rss_ok = device.type == "cpu" and rss_high_water_reset()
    rss_before = rss_kib("VmRSS") if rss_ok else 0
    start, cpu_start = time.perf_counter(), time.process_time()
    step(runner, calls)
    sync(device)
    times, cpu_times = [time.perf_counter() - start], [time.process_time() - cpu_start]
    if rss_ok:
        result["rss_peak_bytes"] = (rss_kib("VmHWM") - rss_before) * 1024
    if device.type == "cuda":
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
    clear_grads(runner)
    for _ in range(args.repeats - 1):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step(runner, calls)
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        clear_grads(runner)
    result["seconds"] = statistics.median(times)
    result["seconds_all"] = [round(t, 4) for t in times]
    result["cpu_seconds"] = statistics.median(cpu_times)
    result["cpu_seconds_all"] = [round(t, 4) for t in cpu_times]
    if not args.no_profile:
        result.update(profiled_step(runner, calls, device, args.top_ops))
        clear_grads(runner)
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "commit": git_commit(),
        "machine": machine_info(device),
        "dtype": str(dtype).removeprefix("torch."),
        "args": vars(args),
        "micro_batches": len(pack_forward_backward(calls, slots, runner.config.token_budget)),
        **result,
    }


if __name__ == "__main__":
    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    print(json.dumps(main(), indent=2))
