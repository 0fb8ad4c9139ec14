"""The three per-step profiles of the device session in one JSON: decode, a training step, one adapter.

Each profile runs as its own process (a fresh allocator, so peak-memory figures do not mix) and prints
JSON; this gathers them under ``decode`` (512 rows over 8 adapters at about 300 tokens of context:
the GRPO-shaped batch of ``gpu_experiments.py``; and the same with rows finishing and joining),
``train`` (one mixed forward_backward of 8 adapters) and ``adapter`` (bytes, optim_step, offload and
reload, peak memory per resident adapter). A profile that fails is recorded with its error and the
others still run.

    python bench/gpu_profiles.py --out out/profiles.json [--shape qwen3-4b] [--device cuda]
    python bench/gpu_profiles.py --device cpu --shape tiny --quick --out /tmp/profiles.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hotlora.models.shapes import get_shape

HERE = Path(__file__).resolve().parent
PROFILE_TIMEOUT_S = 240


def profile_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    shape = get_shape(args.shape)
    py = [sys.executable]
    common = ["--device", args.device, "--dtype", args.dtype]
    if args.quick:
        decode = ["--rows", "16", "--adapters", "4", "--prompt", "16", "--steps", "4", "--profile-steps", "1"]
        train = ["--tokens", "512", "--seq-len", "64", "--adapters", "4", "--repeats", "1"]
        adapter = ["--layers", "2", "--repeats", "2", "--adapters", "2"]
    else:
        decode = ["--rows", "512", "--adapters", "8", "--prompt", "300", "--steps", "6", "--profile-steps", "1"]
        train = ["--tokens", "8192", "--seq-len", "512", "--adapters", "8", "--repeats", "2"]
        adapter = ["--layers", str(shape.num_layers), "--repeats", "3", "--adapters", "8"]
    dims = [
        "--hidden", str(shape.hidden_size), "--intermediate", str(shape.intermediate_size),
        "--heads", str(shape.num_heads), "--kv-heads", str(shape.num_kv_heads), "--head-dim", str(shape.head_dim),
        "--vocab", str(shape.vocab_size),
    ]  # fmt: skip
    train_dims = [
        "--hidden", str(shape.hidden_size), "--intermediate", str(shape.intermediate_size),
        "--heads", str(shape.num_heads), "--kv-heads", str(shape.num_kv_heads), "--head-dim", str(shape.head_dim),
        "--vocab", str(shape.vocab_size), "--layers", str(shape.num_layers),
    ]  # fmt: skip
    churn = ["--churn", "8" if args.quick else "64"]
    return {
        "decode": [*py, str(HERE / "profile_decode.py"), "--shape", args.shape, *common, *decode],
        "decode_churn": [*py, str(HERE / "profile_decode.py"), "--shape", args.shape, *common, *decode, *churn],
        "train": [*py, str(HERE / "profile_train.py"), *common, *train, *train_dims],
        "adapter": [*py, str(HERE / "profile_adapter.py"), "--device", args.device, *adapter, *dims],
    }


def run_profile(argv: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROFILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {PROFILE_TIMEOUT_S} s", "command": argv}
    seconds = round(time.perf_counter() - started, 2)
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}", "command": argv, "wall_seconds": seconds}
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": f"no JSON on stdout: {done.stdout[-500:]}", "command": argv, "wall_seconds": seconds}
    return {**result, "wall_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="out/profiles.json")
    parser.add_argument("--shape", default="qwen3-4b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the CPU rehearsal")
    parser.add_argument("--only", default=None, help="comma-separated profile names")
    args = parser.parse_args(argv)
    commands = profile_commands(args)
    wanted = args.only.split(",") if args.only else list(commands)
    results: dict[str, Any] = {}
    for name in wanted:
        print(f"[gpu_profiles] {name}", file=sys.stderr, flush=True)
        results[name] = run_profile(commands[name])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    failed = [name for name, result in results.items() if "error" in result]
    print(json.dumps({"profiles": list(results), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
