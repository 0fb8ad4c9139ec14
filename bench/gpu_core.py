"""``hotlora bench core`` on a GPU: a random-init model of Qwen3-0.6B's configuration, in bf16.

The model is built locally from a ``Qwen3Config`` (no downloads, no tokenizer files: the engine's byte
tokenizer stands in, which only the sampler's EOS lookup reads), and the measurement is exactly
``hotlora.benchmarks.core.run_core``: mixed vs looped vs single-adapter forward/backward for
K = 1..16 at equal total tokens, and decode mixed over 8 adapters vs one.

    python bench/gpu_core.py --json out/gpu_core.json [--tokens 8192] [--repeats 10] [--docs]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from transformers import Qwen3Config, Qwen3ForCausalLM

from hotlora.benchmarks.core import CoreBenchConfig, append_docs, provenance, run_core, runner_config
from hotlora.benchmarks.core import print_summary as print_core_summary
from hotlora.engine.base_model import BaseModel
from hotlora.engine.runner import ModelRunner
from hotlora.engine.tiny_model import build_tokenizer

MODEL_NAME = "random-init Qwen3-0.6B configuration"


def qwen3_0_6b_config(num_layers: int = 28) -> Qwen3Config:
    """Qwen/Qwen3-0.6B's config.json, written out (28 layers, GQA 16/8, head_dim 128, tied embeddings)."""
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    )


def build_runner(cfg: CoreBenchConfig, num_layers: int, device: torch.device, dtype: torch.dtype) -> ModelRunner:
    config = qwen3_0_6b_config(num_layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.eval()
    model.requires_grad_(False)
    base = BaseModel(model=model, tokenizer=build_tokenizer(), path=MODEL_NAME, device=device, dtype=dtype)
    return ModelRunner(base, runner_config(cfg))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="out/gpu_core.json", help="where to write the results")
    parser.add_argument("--tokens", type=int, default=8192, help="total tokens per training step")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16, help="mean LoRA rank")
    parser.add_argument("--min-len", type=int, default=128, help="shortest datum")
    parser.add_argument("--max-len", type=int, default=512, help="longest datum")
    parser.add_argument("--decode-rows", type=int, default=64)
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (28 = Qwen3-0.6B)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--docs", action="store_true", help="also append a section to docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench/gpu_core.py needs a CUDA device, and torch sees none (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}). For the CPU numbers run `hotlora bench core`.",
            file=sys.stderr,
        )
        return 2
    console = Console(stderr=True)
    cfg = CoreBenchConfig(
        tokens=args.tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        rank=args.rank,
        min_len=args.min_len,
        max_len=args.max_len,
        decode_rows=args.decode_rows,
        decode_prompt=args.decode_prompt,
        decode_tokens=args.decode_tokens,
    )
    device = torch.device(args.device)
    runner = build_runner(cfg, args.layers, device, torch.bfloat16)
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(["python bench/gpu_core.py", *argv])
    result = provenance(runner, f"{MODEL_NAME}, {args.layers} layers", command)
    console.print(f"[bold]bench/gpu_core.py[/bold]  {result['machine'].get('gpu')}  commit {result['commit']}")
    result.update(run_core(runner, cfg, console))
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print_core_summary(console, result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json}")
    if args.docs:
        console.print(f"appended to {append_docs(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
