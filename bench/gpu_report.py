"""Turn a device session's files (``bench/gpu_suite.sh --out DIR``) into sections of ``docs/benchmarks.md``.

The device machine returns files, not commits: this runs on the developer's machine over the returned
folder and appends one section per measurement, each naming the machine, the commit and the command
that produced it, exactly as the CPU benches do.

    python bench/gpu_report.py DIR [--docs docs/benchmarks.md] [--print]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hotlora.benchmarks import core, experiments

REPO = Path(__file__).resolve().parent.parent


def load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def suite_section(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    gpu = f"{m.get('gpu', 'no GPU')} ({m.get('gpu_memory_gib', 0):.0f} GiB)" if m.get("gpu") else "no GPU"
    lines = [
        f"### gpu suite: commit `{summary['commit']}`",
        "",
        f"- command: `{summary['command']}`",
        f"- machine: {gpu}, {m.get('cpus')} CPUs, torch {m.get('torch')}, transformers {m.get('transformers')}, "
        f"CUDA {m.get('cuda')}, Python {m.get('python')}",
        "",
        "| stage | exit | seconds | budget s | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for name, stage in summary["stages"].items():
        if "skipped" in stage:
            lines.append(f"| {name} | | | | skipped: {stage['skipped']} |")
            continue
        verdict = "TIMED OUT" if stage["timed_out"] else ("ok" if stage["rc"] == 0 else "FAILED")
        lines.append(f"| {name} | {stage['rc']} | {stage['seconds']:.0f} | {stage['budget_s']:.0f} | {verdict} |")
    tests = summary["stages"].get("cuda_tests", {}).get("tests", {})
    if tests.get("tests"):
        lines += ["", f"CUDA tests: {tests['counts']}.", "", "| test | outcome | measured |", "|---|---|---|"]
        for name, test in tests["tests"].items():
            measured = ", ".join(f"{k} = {float(v):.3g}" for k, v in test["properties"].items()) or ""
            outcome = test["outcome"] + (f" ({test['detail'][:120]})" if test["detail"] else "")
            lines.append(f"| `{name}` | {outcome} | {measured} |")
    return "\n".join(lines) + "\n"


def profiles_section(profiles: dict[str, Any]) -> str:
    lines = ["### gpu profiles", "", "| profile | figure | value |", "|---|---|---|"]
    for name, result in profiles.items():
        if "error" in result:
            lines.append(f"| {name} | error | {result['error'][:200]} |")
            continue
        for label, value in profile_figures(name, result):
            lines.append(f"| {name} | {label} | {value} |")
    return "\n".join(lines) + "\n"


def profile_figures(name: str, result: dict[str, Any]) -> list[tuple[str, str]]:
    """The few numbers of each profile that say where the time and memory go."""
    if name.startswith("decode"):
        cfg = result["config"]
        ms = result["ms_per_step"]["median"]
        return [
            ("batch", f"{cfg['rows']} rows, {cfg['adapters']} adapters, prompt ~{cfg['prompt']}"),
            ("ms per decode step (median)", f"{ms:.2f}"),
            ("tokens/s", f"{cfg['rows'] * 1000 / ms:,.0f}"),
            ("aten ops per step", f"{result['aten_ops_per_step']:.0f}"),
            ("host syncs per step (tolist / scalar)", f"{result['tolist_per_step']:.0f} / "
             f"{result['sync_ops_per_step'].get('aten::_local_scalar_dense', 0):.0f}"),
        ]  # fmt: skip
    if name == "train":
        figures = [
            ("step", f"{result['args']['adapters']} adapters, {result['args']['tokens']} tokens"),
            ("seconds per forward_backward (median)", f"{result['seconds']:.3f}"),
            ("tokens/s", f"{result['args']['tokens'] / result['seconds']:,.0f}"),
            ("aten ops per step", f"{result['aten_ops']}"),
        ]
        if "cuda_peak_bytes" in result:
            figures.append(("peak device memory (GiB)", f"{result['cuda_peak_bytes'] / 2**30:.1f}"))
        return figures
    if name == "adapter":
        figures = [
            ("bytes per adapter (weights, grads, 2 moments)", f"{result['bytes_per_adapter_measured']:,}"),
            ("optim_step ms / aten ops", f"{result['optim_step']['ms']:.2f} / {result['optim_step']['aten_ops']}"),
            (
                "offload / reload ms (with grads)",
                f"{result['swap_with_grads']['offload_ms']:.1f} / {result['swap_with_grads']['reload_ms']:.1f}",
            ),
        ]
        for key, value in result.items():
            if key.startswith(("peak", "resident")) and isinstance(value, (int, float)):
                figures.append((key, f"{value:,.3g}" if isinstance(value, float) else f"{value:,}"))
        return figures
    return []


def claim_section(claim: dict[str, Any]) -> str:
    if "skipped" in claim:
        return f"### gpu claim\n\nskipped: {claim['skipped']}.\n"
    verdicts = ", ".join(f"{k} {claim[k]}" for k in ("distinct_gpus", "extra_refused", "reclaimed_after_exit"))
    return f"### gpu claim\n\n{claim['gpus']} GPU(s): {verdicts}.\n"


def partial_section(partial: dict[str, Any]) -> str:
    done = {k: v for k, v in partial.items() if k.startswith("T")}
    return (
        "### experiments (cut short: phases measured before the time budget ran out)\n\n"
        f"- command: `{partial['command']}`\n- measured: {json.dumps(done)}; per-experiment cold seconds "
        f"{partial.get('cold_seconds', [])}\n"
    )


def sections(folder: Path) -> list[str]:
    out: list[str] = []
    summary = load(folder, "suite.json")
    if summary is not None:
        out.append(suite_section(summary))
    result = load(folder, "gpu_core.json")
    if result is not None:
        out.append(core.markdown_section(result))
    profiles = load(folder, "profiles.json")
    if profiles is not None:
        out.append(profiles_section(profiles))
    claim = load(folder, "gpu_claim.json")
    if claim is not None:
        out.append(claim_section(claim))
    result = load(folder, "gpu_experiments.json")
    if result is not None:
        out.append(experiments.markdown_section(result, None))
    elif (partial := load(folder, "gpu_experiments.partial.json")) is not None:
        out.append(partial_section(partial))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("folder", help="the folder a device call returned (the suite's --out)")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="the file to append to")
    parser.add_argument("--print", action="store_true", help="print the sections instead of appending them")
    args = parser.parse_args(argv)
    found = sections(Path(args.folder))
    if not found:
        print(f"nothing to report in {args.folder}", file=sys.stderr)
        return 1
    text = "\n".join(found)
    if args.print:
        print(text)
        return 0
    docs = Path(args.docs)
    existing = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    docs.write_text(existing.rstrip("\n") + "\n\n## GPU device session\n\n" + text)
    print(f"appended {len(found)} section(s) to {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
