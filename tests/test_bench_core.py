"""Smoke test of ``hotlora bench core``: it runs end to end and records what it measured."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hotlora.benchmarks.core import KS, append_docs, git_commit
from hotlora.cli import main


def test_bench_core_quick_writes_json_and_docs(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "core.json"
    argv = ["bench", "core", "--model", str(tiny_model_path), "--quick", "--repeats", "1", "--no-docs"]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["k"] for row in result["forward_backward"]] == list(KS)
    for name in ("mixed_over_single", "loop_over_mixed", "decode_mixed_over_single"):
        assert result[name] > 0
    assert result["decode"]["rows"] == 16 and result["decode"]["single_tokens_per_s"] > 0
    assert {"cpu", "cores", "torch", "device"} <= set(result["machine"])
    assert "bench core" in result["command"] and result["commit"]

    docs = tmp_path / "benchmarks.md"
    append_docs(result, docs)
    append_docs(result, docs)
    text = docs.read_text()
    assert text.count("# Benchmarks") == 1 and text.count("### core:") == 2
    assert "`mixed_over_single`" in text and result["commit"] in text


def test_git_commit_reads_head_without_git() -> None:
    commit = git_commit()
    assert commit == "unknown" or re.fullmatch(r"[0-9a-f]{40}|unborn \(.+\)", commit)
