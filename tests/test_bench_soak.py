"""``hotlora bench soak`` runs end to end (2 tenants, a few seconds) and prints one JSON object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotlora.cli import main

pytestmark = pytest.mark.timeout(240)


def test_bench_soak_prints_its_json(tiny_model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "soak", "--tenants", "2", "--minutes", "0.1", "--no-docs", "--json"]
    assert main([*argv, "--model", str(tiny_model_path), "--sample-every", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tenants"] == 2 and result["minutes"] == 0.1
    for key in ("rss_start_mib", "rss_end_mib", "rss_peak_mib"):
        assert result[key] > 0, key
    assert result["rss_growth_mib"] == pytest.approx(result["rss_end_mib"] - result["rss_start_mib"], abs=0.11)
    assert isinstance(result["rss_growth_pct"], float) and isinstance(result["rss_slope_mib_per_min"], float)
    assert result["rss_samples"] >= 2 and len(result["rss_timeline"]) == result["rss_samples"]
    assert result["answered"] > 0 and result["errors"] == 0 and result["requests_per_s"] > 0
    assert result["by_verb"].get("sample", 0) > 0
    assert result["engine_exit_code"] == 0
    assert result["commit"] and result["machine"]["cores"] and result["command"].startswith("hotlora bench soak")
