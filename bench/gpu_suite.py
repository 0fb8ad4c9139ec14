"""The GPU device session as one command: each check in its own time budget, every result as JSON.

A lent GPU comes with minutes, not hours, so the session is prepared here and rehearsed on the CPU
(``tests/test_gpu_suite.py`` runs ``--device cpu --shape tiny``). Stages run one after another in
separate processes; a stage that fails or runs out of time is recorded and the next one still runs.
What comes back is at most eight files under ``--out``:

- ``suite.json``: the machine, each stage's exit code, seconds and verdict, the CUDA tests' outcomes
  and their recorded measurements (junit properties);
- ``suite.log``: every stage's output;
- one JSON per measuring stage: ``gpu_core.json``, ``profiles.json``, ``gpu_experiments.json`` (and
  ``gpu_experiments.partial.json`` if it was cut short), ``gpu_claim.json``.

``bench/gpu_report.py`` turns them into sections of ``docs/benchmarks.md`` on the developer's machine.

    bash bench/gpu_suite.sh --out "$OUT"                    # H200, qwen3-4b, bf16 (about 8 minutes)
    bash bench/gpu_suite.sh --device cpu --shape tiny --out /tmp/suite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STAGE_GRACE_S = 10  # SIGTERM first, so benches can reap their engines and write partial results


@dataclass
class Stage:
    """One check: a command, its time budget, and the JSON file it writes (if any)."""

    name: str
    argv: list[str]
    budget_s: float
    output: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out/gpu_suite"), help="results folder")
    parser.add_argument("--device", default="cuda", help="cuda (the session) or cpu (the rehearsal)")
    parser.add_argument("--shape", default="qwen3-4b", help="model configuration for core, profiles, experiments")
    parser.add_argument("--total-budget", type=float, default=470.0, help="seconds for all stages together")
    parser.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    parser.add_argument("--experiments", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps per experiment")
    return parser.parse_args(argv)


def stages(args: argparse.Namespace, out: Path) -> list[Stage]:
    """The session, cheapest and most diagnostic first; experiments last, with whatever time is left."""
    py = sys.executable
    rehearsal = args.device == "cpu"
    dtype = "float32" if rehearsal else "bfloat16"
    shape = ["--shape", args.shape, "--device", args.device]
    core = [py, "bench/gpu_core.py", *shape, "--dtype", dtype, "--json", str(out / "gpu_core.json")]
    experiments = [
        py, "bench/gpu_experiments.py", *shape, "--dtype", dtype, "--out", str(out / "gpu_experiments.json"),
        "--experiments", str(args.experiments), "--steps", str(args.steps),
        # Tansu completes a group join after half the session timeout: 1 s here instead of 5 s per engine.
        "--engine-arg=--session-timeout-ms=2000", "--engine-arg=--heartbeat-interval-ms=300",
    ]  # fmt: skip
    if rehearsal:
        core.append("--quick")
        experiments += ["--max-tokens", "8", "--batch-size", "2", "--group-size", "4", "--max-decode-rows", "32"]
    profiles = [py, "bench/gpu_profiles.py", *shape, "--dtype", dtype, "--out", str(out / "profiles.json")]
    if rehearsal:
        profiles.append("--quick")
    tests_env = {"HOTLORA_TEST_DEVICE": args.device}
    tests = [py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "tests/test_train_cuda.py", "-q"]
    tests += ["-p", "no:cacheprovider"]
    tests += ["--junitxml", str(out / "cuda_tests.xml")]
    claim = [py, "bench/gpu_claim.py", "--out", str(out / "gpu_claim.json")]
    # The budgets are the device session's. The rehearsal checks the script, not its speed, on a shared
    # 2-core CPU whose speed varies several-fold (a CI run saw the profiles take 60 s, 25 s when idle).
    slack = 2.0 if rehearsal else 1.0
    return [
        Stage("cuda_tests", tests, 80 * slack, "cuda_tests.xml", tests_env),
        Stage("gpu_claim", claim, 20 * slack, "gpu_claim.json"),
        Stage("gpu_core", core, 85 * slack, "gpu_core.json"),
        Stage("profiles", profiles, 60 * slack, "profiles.json"),
        Stage("gpu_experiments", experiments, 0, "gpu_experiments.json"),  # 0: the rest of the budget
    ]


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    info["cpus"] = os.cpu_count()
    try:
        import torch
        import transformers

        info |= {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda}
        if device.startswith("cuda") and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30, "gpus": torch.cuda.device_count()}
    except ImportError as err:
        info["import_error"] = str(err)
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def run_stage(stage: Stage, budget: float, log: Any) -> dict[str, Any]:
    """Run one stage under ``budget`` seconds; SIGTERM at the budget, SIGKILL a grace period later."""
    log.write(f"\n===== {stage.name} (budget {budget:.0f} s): {shlex.join(stage.argv)}\n")
    log.flush()
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    child = subprocess.Popen(stage.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    timed_out = False
    try:
        rc = child.wait(timeout=max(budget, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        child.terminate()
        try:
            rc = child.wait(timeout=STAGE_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            rc = child.wait()
    seconds = time.perf_counter() - started
    log.write(f"===== {stage.name}: rc {rc}, {seconds:.1f} s{' (TIMED OUT)' if timed_out else ''}\n")
    log.flush()
    return {"rc": rc, "seconds": round(seconds, 2), "timed_out": timed_out, "budget_s": budget}


def junit_summary(path: Path) -> dict[str, Any]:
    """Outcome per test and every recorded property, from pytest's junit XML."""
    if not path.is_file():
        return {"error": f"{path.name} was not written"}
    root = ElementTree.parse(path).getroot()
    tests: dict[str, Any] = {}
    for case in root.iter("testcase"):
        outcome = "passed"
        detail = None
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                detail = (node.get("message") or "")[:500]
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests[case.get("name", "?")] = {"outcome": outcome, "detail": detail, "properties": properties}
    counts: dict[str, int] = {}
    for test in tests.values():
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else None
    plan = [s for s in stages(args, out) if wanted is None or s.name in wanted]
    summary: dict[str, Any] = {
        "commit": os.environ.get("HOTLORA_COMMIT", "unknown"),
        "command": shlex.join(["bash", "bench/gpu_suite.sh", *(sys.argv[1:] if argv is None else argv)]),
        "device": args.device,
        "shape": args.shape,
        "machine": machine(args.device),
        "stages": {},
    }
    deadline = time.perf_counter() + args.total_budget
    summary_path = out / "suite.json"
    with open(out / "suite.log", "a") as log:
        for stage in plan:
            left = deadline - time.perf_counter()
            budget = left if stage.budget_s == 0 else min(stage.budget_s, left)
            if budget < 5:
                summary["stages"][stage.name] = {"skipped": "no time left in --total-budget"}
                continue
            print(f"[gpu_suite] {stage.name}: up to {budget:.0f} s", flush=True)
            result = run_stage(stage, budget, log)
            if stage.name == "cuda_tests":
                result["tests"] = junit_summary(out / "cuda_tests.xml")
            elif stage.output:
                result["wrote"] = (out / stage.output).is_file()
            summary["stages"][stage.name] = result
            print(f"[gpu_suite] {stage.name}: {json.dumps(result)[:400]}", flush=True)
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")  # after every stage: a cut run keeps it
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    failed = [name for name, r in summary["stages"].items() if r.get("rc") not in (0, None) or r.get("timed_out")]
    print(f"[gpu_suite] done; failed or cut: {failed or 'none'}; results in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
