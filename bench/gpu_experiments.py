"""``hotlora bench experiments`` on a GPU: cold vs warm vs concurrent throughput with a ~1B Llama-shaped model.

The model is a random-init Llama of Llama-3.2-1B's shape (16 layers, hidden 2048, GQA 32/8, vocab
128256) in bf16, written to a temporary directory with the engine's byte tokenizer (no downloads;
sampled ids outside the byte vocabulary decode to nothing). The measurement is exactly
``hotlora.benchmarks.experiments.run_bench`` with the engine on CUDA: the same catalogue of GRPO
experiments cold (a fresh engine process each), warm (one at a time) and all at once, plus the sweep.

Throughput only: a random-init base earns no reward, so the reward band is not meaningful here and
``no_reward_regression`` is left out of the JSON (the CPU run on the pretrained tiny base checks it).

    python bench/gpu_experiments.py --out out/gpu_experiments.json [--experiments 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from hotlora.benchmarks.experiments import DEFAULT_SWEEP, Plan, parse_sweep, quiet_client_logs, run_bench
from hotlora.engine.tiny_model import build_tokenizer

MODEL_NAME = "random-init Llama-3.2-1B shape"


def llama_1b_config(num_layers: int = 16) -> LlamaConfig:
    """Llama-3.2-1B's shape, written out; the byte tokenizer's special ids replace Llama's."""
    tokenizer = build_tokenizer()
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def write_model(directory: Path, num_layers: int) -> Path:
    """Build the model on the GPU (fast init) and save it in bf16 with the byte tokenizer."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_1b_config(num_layers)).to(torch.bfloat16)
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/gpu_experiments.json", help="where to write the JSON results")
    parser.add_argument("--experiments", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps per experiment")
    parser.add_argument("--sweep", default=",".join(map(str, DEFAULT_SWEEP)), help="concurrency levels")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16 = Llama-3.2-1B)")
    parser.add_argument("--max-decode-rows", type=int, default=256, help="the engine's decode batch rows")
    parser.add_argument("--bootstrap", default=None, help="use this broker (default: embedded Tansu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"skipped: no CUDA (torch {torch.__version__} sees no GPU); run `hotlora bench experiments` on CPU")
        return 0
    if args.experiments < 1 or args.steps < 1:
        raise SystemExit("error: --experiments and --steps must be >= 1")
    console = Console(stderr=True)
    quiet_client_logs()
    plan = Plan(args.experiments, args.steps, solo_seeds=1, sweep=parse_sweep(args.sweep))
    workdir = Path(tempfile.mkdtemp(prefix="hotlora-gpu-experiments-"))
    try:
        with console.status(f"writing the {MODEL_NAME} model ({args.layers} layers, bf16)"):
            model = str(write_model(workdir / "model", args.layers))
        engine_args = ["--device", "cuda", "--dtype", "bfloat16", "--max-decode-rows", str(args.max_decode_rows)]
        command = shlex_command(argv)
        result = run_bench(plan, model, args.bootstrap, command, console, engine_args, torch.device("cuda"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["model"] = f"{MODEL_NAME}, {args.layers} layers, bf16"
    result.pop("no_reward_regression", None)
    result["rewards_note"] = "random-init base: rewards are ~0 and not meaningful; throughput only"
    console.print(
        f"cold_ratio = {result['cold_ratio']:.2f}, warm_ratio = {result['warm_ratio']:.2f} "
        f"(T1 {result['T1_seconds']:.1f} s, T2 {result['T2_seconds']:.1f} s, T3 {result['T3_seconds']:.1f} s)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


def shlex_command(argv: list[str] | None) -> str:
    return shlex.join(["python", *(sys.argv if argv is None else ["bench/gpu_experiments.py", *argv])])


if __name__ == "__main__":
    sys.exit(main())
