"""``hotlora bench sampler`` on a GPU: the native sampler vs vLLM colocated in the engine process.

The model is a random-init model of a real configuration (``hotlora.models.shapes``, default Llama-3.2-1B) in
bf16 (no downloads). Both backends run the same workload as on CPU (``hotlora.benchmarks.sampler.run_bench``):
decode tokens/s for 1-8 adapters in one mixed batch, and one GRPO-shaped RL step per adapter with
the weight sync into vLLM and the train/inference logprob mismatch (bf16, so expect about 1e-2, not
the 1e-6 of fp32 on CPU). vLLM and the trainer share one device: vLLM takes
``--gpu-memory-utilization`` of it (weights copy, LoRA slots, KV cache), the trainer the rest.

Requires the CUDA build: ``pip install -e ".[vllm]"``. On a machine without CUDA it says so and exits 0.

    python bench/gpu_vllm.py --out out/gpu_vllm.json [--adapters 1,2,4,8] [--gpu-memory-utilization 0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from hotlora.benchmarks.experiments import quiet_client_logs
from hotlora.benchmarks.sampler import BACKENDS, SamplerBenchConfig, parse_adapters, print_summary, run_bench
from hotlora.models.shapes import SHAPES, get_shape, write_shape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/gpu_vllm.json", help="where to write the JSON results")
    parser.add_argument("--adapters", default="1,2,4,8", help="decode: adapters in one batch, comma-separated")
    parser.add_argument("--rl-adapters", type=int, default=8, help="adapters in the RL step")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per sequence (random base: no EOS)")
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES), help="model configuration")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape has")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the GPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"skipped: no CUDA (torch {torch.__version__} sees no GPU); run `hotlora bench sampler` on CPU")
        return 0
    console = Console(stderr=True)
    quiet_client_logs()
    cfg = dataclasses.replace(
        SamplerBenchConfig(),
        adapters=parse_adapters(args.adapters),
        rl_adapters=args.rl_adapters,
        max_tokens=args.max_tokens,
        n=8,
        rl_group=16,
        device="cuda",
        dtype="bfloat16",
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-gpu-vllm-"))
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/gpu_vllm.py", *argv])])
    shape = get_shape(args.shape).with_overrides(layers=args.layers)
    try:
        with console.status(f"writing a random-init {shape.name} ({shape.num_layers} layers, bf16)"):
            model = str(write_shape(shape, workdir / "model", dtype=torch.bfloat16, device="cuda"))
        result = run_bench(cfg, model, BACKENDS, command, console)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["model"] = result["decode_model"] = f"random-init {shape.name}, {shape.num_layers} layers, bf16"
    print_summary(console, result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
