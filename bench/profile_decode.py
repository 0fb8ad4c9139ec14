"""Profile the native sampler's decode step: ops and kernels per step, host-device syncs, ms per step.

A random-init model of a named shape (or an HF directory) gets ``--adapters`` LoRA adapters; ``--rows``
sequences (one request each, spread over the adapters, prompts of about ``--prompt`` tokens) are
admitted, warmed up, then ``--steps`` steady-state decode steps are timed and ``--profile-steps`` more
run under ``torch.profiler``. By default no row finishes while measuring (EOS is ignored, ``max_tokens``
is large enough), so every measured step is one decode forward over all rows and nothing else; with
``--churn L`` rows finish at staggered steps and are replaced at once, so steps also admit and retire.

Syncs are counted three ways: ``tolist`` calls (the one sync a step needs), ``aten::_local_scalar_dense``
(``.item()``, ``bool(tensor)``) and ``aten::nonzero`` from the profiler, and on CUDA also the warnings of
``torch.cuda.set_sync_debug_mode`` and the pageable host-to-device copies in the kernel trace.

    python bench/profile_decode.py --device cpu --shape tiny --rows 16 --adapters 4 --steps 8
    python bench/profile_decode.py --device cpu --shape wide --rows 64 --adapters 8 --prompt 48
    python bench/profile_decode.py --device cuda --shape qwen3-4b --rows 512 --adapters 8 --prompt 300
    python bench/profile_decode.py --device cuda --shape qwen3-4b --rows 512 --adapters 8 --prompt 300 --churn 64
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen3Config

from hotlora.engine.base_model import BaseModel, load_base_model
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.sampler import NativeSampler
from hotlora.engine.types import LoraSpec, Sample, SamplingParams
from hotlora.models.shapes import SHAPES as REAL_SHAPES
from hotlora.models.shapes import build_shape_model, build_shape_tokenizer, get_shape
from hotlora.models.tiny_model import build_tokenizer

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


@dataclass(frozen=True)
class Shape:
    """The architecture fields a decode step's cost depends on."""

    arch: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


# CPU stand-ins; every shape in ``hotlora.models.shapes`` (qwen3-4b, qwen3-0.6b, ...) works too.
SHAPES = {
    # The test suite's tiny Llama (tests/conftest.py TEST_RECIPE), random weights.
    "tiny": Shape("llama", 64, 128, 2, 4, 2, 16, 259),
    # A wider CPU stand-in with the real models' GQA ratio.
    "wide": Shape("qwen3", 1024, 3072, 4, 16, 8, 64, 4096),
}


def model_config(shape: Shape) -> PretrainedConfig:
    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=40_960,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen3Config(**common) if shape.arch == "qwen3" else LlamaConfig(**common)


def build_base(name: str, device: torch.device, dtype: torch.dtype, layers: int | None = None) -> BaseModel:
    """A random-init shape built on the device (nothing downloaded), or an HF directory."""
    if Path(name).is_dir():
        return load_base_model(name, dtype=str(dtype).removeprefix("torch."), device=str(device))
    if name in SHAPES:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(model_config(SHAPES[name]), dtype=dtype)
        tokenizer = build_tokenizer()
    else:
        shape = get_shape(name).with_overrides(layers=layers)
        model = build_shape_model(shape, dtype, device)
        tokenizer = build_shape_tokenizer(shape.vocab_size)
    model.eval().requires_grad_(False)
    return BaseModel(model, tokenizer, f"random-init {name}", device, dtype)


def build_runner(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> ModelRunner:
    base = build_base(args.shape, device, dtype, args.layers)
    runner = ModelRunner(base, RunnerConfig(max_adapters=max(args.adapters, 1)))
    for k in range(args.adapters):
        adapter = runner.create_adapter(f"a{k}", LoraSpec(rank=args.rank, targets="all-linear", seed=k))
        with torch.no_grad():
            for pair in adapter.pairs.values():  # non-zero B: the deltas are really computed and added
                pair.B.normal_(0, 0.02)
    return runner


class Workload:
    """The decode rows: ``--rows`` requests (one row each), round-robin over the adapters, ragged prompts.

    Without ``--churn`` no row leaves while measured (``max_tokens`` outlasts the run). With ``--churn L``
    rows stop after ``L/2..3L/2`` tokens and are replaced by new requests at once, so measured steps also
    admit (prefill) and retire rows, as continuous batching does in an RL rollout.
    """

    def __init__(self, sampler: NativeSampler, args: argparse.Namespace, vocab: int) -> None:
        self.sampler, self.args, self.vocab = sampler, args, vocab
        self.rng = random.Random(1)  # Python's, not torch's: the profile counts only the sampler's ops
        self.added = self.finished = self.joined = 0
        sampler.eos_ids = frozenset()  # random weights emit EOS at random; rows leave only as configured

    def _params(self, index: int) -> SamplingParams:
        args = self.args
        if args.churn:
            max_tokens = self.rng.randint(args.churn // 2, 3 * args.churn // 2)
        else:
            max_tokens = args.warmup + args.steps + args.profile_steps + 4
        temperature = 0.0 if args.greedy else 1.0
        return SamplingParams(max_tokens=max(1, max_tokens), temperature=temperature, seed=index)

    def top_up(self) -> None:
        """Add requests until ``--rows`` are unfinished."""
        args = self.args
        while self.added - self.finished < args.rows:
            spread = args.prompt // 4
            length = max(2, args.prompt + self.rng.randint(-spread, spread))
            prompt = [self.rng.randrange(3, self.vocab) for _ in range(length)]
            adapter = f"a{self.added % args.adapters}" if args.adapters else None
            request = Sample(adapter, prompt, 1, self._params(self.added), request_id=f"r{self.added}")
            self.sampler.add(request)
            self.added += 1

    def step(self) -> None:
        before = self.added
        self.top_up()
        self.joined += self.added - before
        self.finished += len(self.sampler.step())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TolistCounter:
    """Counts ``Tensor.tolist`` calls (each one waits for the device) while active."""

    def __init__(self) -> None:
        self.calls = 0
        self._original = torch.Tensor.tolist

    def __enter__(self) -> TolistCounter:
        original = self._original

        def counted(tensor: torch.Tensor) -> Any:
            self.calls += 1
            return original(tensor)

        torch.Tensor.tolist = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist = self._original  # type: ignore[method-assign]


def profile_steps(work: Workload, steps: int, device: torch.device) -> dict[str, Any]:
    """Per-step op, kernel and sync counts of ``steps`` decode steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with TolistCounter() as tolist, profile(activities=activities) as prof:
        for _ in range(steps):
            work.step()
        _sync(device)
    events = prof.events()
    names = collections.Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    aten = {name: count for name, count in names.items() if name.startswith("aten::")}
    # Leaf aten ops (no aten op beneath them) are what reaches a kernel on CPU.
    leaves = sum(
        1
        for e in events
        if e.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in e.cpu_children)
    )
    out: dict[str, Any] = {
        "aten_ops_per_step": sum(aten.values()) / steps,
        "aten_leaf_ops_per_step": leaves / steps,
        "sync_ops_per_step": {name: names.get(name, 0) / steps for name in SYNC_OPS},
        "tolist_per_step": tolist.calls / steps,
        "top_ops_per_step": {n: c / steps for n, c in sorted(aten.items(), key=lambda kv: -kv[1])[:15]},
    }
    averages = prof.key_averages()
    out["top_self_cpu_ms_per_step"] = {
        a.key: round(a.self_cpu_time_total / 1e3 / steps, 3)
        for a in sorted(averages, key=lambda a: -a.self_cpu_time_total)[:12]
    }
    if device.type == "cuda":
        out["top_self_cuda_ms_per_step"] = {
            a.key: round(a.self_device_time_total / 1e3 / steps, 3)
            for a in sorted(averages, key=lambda a: -a.self_device_time_total)[:12]
        }
        gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        out["cuda_kernels_per_step"] = sum(1 for e in gpu if not e.name.startswith("Memcpy")) / steps
        out["memcpy_per_step"] = dict(collections.Counter(e.name for e in gpu if e.name.startswith("Memcpy")))
        out["memcpy_per_step"] = {k: v / steps for k, v in out["memcpy_per_step"].items()}
    return out


def count_cuda_syncs(work: Workload, steps: int, device: torch.device) -> float | None:
    """Synchronising CUDA calls per step, as ``torch.cuda.set_sync_debug_mode`` reports them."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                work.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def timed_steps(work: Workload, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall and process-CPU milliseconds of each step (CPU time is the steadier number on a shared host)."""
    wall, cpu = [], []
    for _ in range(steps):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        work.step()
        _sync(device)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median": round(ordered[len(ordered) // 2], 3),
        "min": round(ordered[0], 3),
        "mean": round(sum(ordered) / len(ordered), 3),
    }


def provenance(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    commit = os.environ.get("HOTLORA_COMMIT", "unknown")
    try:
        found = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
        if found.returncode == 0:
            commit = found.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {"command": shlex.join([sys.executable, *sys.argv]), "commit": commit, "machine": machine}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: fp32 on CPU")
    names = sorted(SHAPES) + sorted(REAL_SHAPES)
    parser.add_argument("--shape", default="tiny", help=f"one of {names} or a Hugging Face model directory")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (hotlora.models.shapes only)")
    parser.add_argument("--rows", type=int, default=64, help="decode rows (one request each)")
    parser.add_argument("--adapters", type=int, default=8, help="LoRA adapters the rows are spread over (0: base)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64, help="mean prompt length (ragged +-25%%)")
    parser.add_argument("--warmup", type=int, default=3, help="decode steps before measuring")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps")
    parser.add_argument("--profile-steps", type=int, default=3, help="decode steps under torch.profiler")
    parser.add_argument("--greedy", action="store_true", help="temperature 0 instead of seeded sampling at 1.0")
    parser.add_argument("--churn", type=int, default=0, help="rows stop after about this many tokens and are replaced")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    result: dict[str, Any] = provenance(args, device)
    runner = build_runner(args, device, dtype)
    sampler = NativeSampler(runner, max_rows=args.rows)
    work = Workload(sampler, args, runner.base.vocab_size)
    admit_ms = timed_steps(work, 1, device)[0][0]  # admission: one prefill forward, then the first decode
    assert sampler.num_running_rows() == args.rows, "not every row was admitted"
    timed_steps(work, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    joined = work.joined
    times, cpu_times = timed_steps(work, args.steps, device)
    joined = work.joined - joined
    counts = profile_steps(work, args.profile_steps, device)
    cuda_syncs = count_cuda_syncs(work, 1, device)
    assert args.churn or sampler.num_running_rows() == args.rows, "a row finished while measuring"
    result["config"] = {k: v for k, v in vars(args).items()} | {"dtype": str(dtype).removeprefix("torch.")}
    result["admit_ms"] = round(admit_ms, 2)
    result["rows_joined_per_timed_step"] = joined / args.steps
    result["ms_per_step"] = summary(times)
    result["cpu_ms_per_step"] = summary(cpu_times)
    result.update(counts)
    result["cuda_sync_warnings_per_step"] = cuda_syncs
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
