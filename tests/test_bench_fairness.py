"""``hotlora bench fairness`` runs end to end in its quick mode (smaller still) and prints one JSON object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotlora.cli import main

pytestmark = pytest.mark.timeout(600)


def test_bench_fairness_prints_its_json(tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "fairness", "--quick", "--steps", "2", "--tenants", "1", "--flood-requests", "8"]
    assert main([*argv, "--no-docs", "--json", "--model", str(tiny_model_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["workload"]["flood_requests"] == 8 and result["workload"]["tenants"] == 1  # flags over --quick
    for phase in ("solo", "flood", "train_flood", "tenants_phase"):
        assert result[phase]["steps"] == 2 and 0 < result[phase]["median_s"] <= result[phase]["p90_s"], phase
    assert result["slowdown_flood"] > 0 and result["slowdown_tenants"] > 0 and result["slowdown_train_flood"] > 0
    # The training flood trained while the victim ran (each loop's calls span several 8192-token slices).
    w = result["workload"]
    per_call = w["train_flood_datums"] * w["train_flood_tokens"]
    assert result["train_flooder"]["tokens"] >= w["train_flood_loops"] * per_call
    assert per_call > 8192 and result["train_flooder"]["tokens_per_s"] > 0
    assert result["engine_train_slice_tokens"] is None
    flooder = result["flooder"]
    assert flooder["answered"] == 8 and flooder["quota_refused"] == 0 and flooder["other_errors"] == {}
    assert 0 < flooder["tokens"] <= 8 * result["workload"]["flood_n"] * result["workload"]["flood_tokens"]
    assert flooder["tokens_per_s"] > 0
    if flooder["row_share"] is not None:  # both decoded in some step: the flooder kept its share
        assert flooder["row_share"] >= 1 / 3
    for key in ("rss_before_flood_mib", "rss_peak_mib", "rss_after_flood_mib", "rss_end_mib"):
        assert result[key] > 0, key
    assert result["rss_peak_mib"] >= result["rss_before_flood_mib"]
    assert result["engine_exit_code"] == 0 and result["machine"]["cores"]
