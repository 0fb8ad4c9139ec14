"""``hotlora bench sampler`` end to end at ``--quick`` size: the JSON's shape, sane numbers, and a small
train/inference logprob mismatch for vLLM in fp32.

Skipped only when vLLM does not import here, and never with ``HOTLORA_REQUIRE_VLLM=1`` (then it fails).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from hotlora.benchmarks.sampler import append_docs, markdown_section
from hotlora.cli import main
from tests.helpers import require_vllm


def positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_sampler_quick_compares_both_backends(
    rl_base_path: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    require_vllm()
    argv = ["bench", "sampler", "--quick", "--json", "--no-docs", "--model", str(rl_base_path)]
    assert main(argv) == 0
    out = capfd.readouterr().out
    result = json.loads(out)  # stdout carries the JSON object and nothing else

    assert result["commit"] and result["machine"]["cores"] >= 1
    assert result["command"].startswith("hotlora bench sampler") and "--quick" in result["command"]
    assert set(result["backends"]) == {"native", "vllm"}
    adapters = result["config"]["adapters"]
    assert adapters == [1, 2]
    for name, backend in result["backends"].items():
        assert positive(backend["start_s"]), name
        assert [row["adapters"] for row in backend["decode"]] == adapters
        for row in backend["decode"]:
            assert isinstance(row["tokens"], int) and row["tokens"] >= row["sequences"] > 0, (name, row)
            assert positive(row["seconds"]) and positive(row["tokens_per_s"]), (name, row)
            assert row["tokens_per_s_total"] == pytest.approx(row["tokens"] / row["seconds"])
            assert row["tokens_per_s"] == pytest.approx(statistics.median(row["round_tokens_per_s"]))
        rl = backend["rl_step"]
        assert rl["adapters"] == result["config"]["rl_adapters"] == 2
        assert rl["steps"] == rl["adapters"] * result["config"]["rl_steps"]
        assert positive(rl["step_s"]), name
        phases = rl["sample_s"] + rl["forward_backward_s"] + rl["optim_step_s"]
        assert phases == pytest.approx(rl["step_s"], rel=0.05), (name, rl)  # host-side scoring is the rest
        # A model whose sampled tokens are all certain would make any mismatch check vacuous.
        assert rl["sampler_logprob_mean"] < -0.01, (name, rl)
        assert math.isfinite(rl["logprob_mismatch"]) and 0 <= rl["logprob_mismatch"] <= rl["logprob_mismatch_max"]
    assert result["backends"]["native"]["rl_step"]["weight_sync_s"] is None
    vllm = result["backends"]["vllm"]
    assert positive(vllm["rl_step"]["weight_sync_s"])
    assert vllm["start_s"] > result["backends"]["native"]["start_s"]  # AsyncLLM's start-up is counted apart
    assert vllm["rl_step"]["logprob_mismatch_max"] < 1e-3, vllm["rl_step"]

    ratios = result["vllm_vs_native_decode"]
    assert set(ratios) == {str(k) for k in adapters}
    for k in adapters:
        expected = (
            vllm["decode"][adapters.index(k)]["tokens_per_s"]
            / (result["backends"]["native"]["decode"][adapters.index(k)]["tokens_per_s"])
        )
        assert ratios[str(k)] == pytest.approx(expected)
    rec = result["recommendation"]
    assert rec["decode"] == ("vllm" if result["vllm_vs_native_decode_gmean"] > 1 else "native")
    step = {b: result["backends"][b]["rl_step"]["step_s"] for b in ("native", "vllm")}
    assert rec["rl_step"] == min(step, key=step.__getitem__)

    docs = append_docs(result, tmp_path / "benchmarks.md")
    text = docs.read_text()
    assert "## `hotlora bench sampler`" in text and markdown_section(result) in text
