"""``hotlora bench gateway`` runs end to end (a few calls each way) and reports the fields users rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotlora.cli import main

pytestmark = pytest.mark.timeout(600)


def test_bench_gateway_writes_its_json(tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "gateway.json"
    argv = ["bench", "gateway", "-n", "5", "--no-docs", "--json", str(out), "--model", str(tiny_model_path)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 5 and result["commit"] and result["machine"]["cores"]
    for call in ("info", "tiny", "rl_step"):
        for way in ("direct", "gateway"):
            assert 0 < result[f"{call}_{way}_p50_ms"] <= result[f"{call}_{way}_p99_ms"]
            assert len(result["samples_ms"][call][way]) == 5
        assert result[f"{call}_overhead_p50_ms"] == pytest.approx(
            result[f"{call}_gateway_p50_ms"] - result[f"{call}_direct_p50_ms"]
        )
