"""``hotlora bench hop`` runs end to end (a few requests) and reports the fields users rely on."""

from __future__ import annotations

import json
from pathlib import Path

from hotlora.cli import main


def test_bench_hop_writes_its_json(tmp_path: Path, tiny_model_path: Path) -> None:
    out = tmp_path / "hop.json"
    argv = ["bench", "hop", "-n", "20", "--no-docs", "--json", str(out), "--model", str(tiny_model_path)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 20
    assert 0 < result["inprocess_p50_ms"] < result["hop_p50_ms"] <= result["hop_p99_ms"]
    assert result["commit"] and result["machine"]["cores"]
