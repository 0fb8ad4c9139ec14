"""``hotlora bench experiments``: the band, ratio and argument rules by hand, and one tiny run end to end."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from hotlora.benchmarks.experiments import (
    Plan,
    add_arguments,
    band_low,
    parse_sweep,
    plan_from_args,
    run_bench,
    samples_per_eval,
    speedup,
    sweep_ratio,
    within_band,
    write_outputs,
)
from hotlora.cli import build_parser
from hotlora.engine.kafka.broker import EmbeddedBroker


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_band_low_is_min_solo_minus_two_binomial_standard_errors() -> None:
    # p = 0.5, m = 256: SE = sqrt(0.25 / 256) = 1/32
    assert band_low([0.4, 0.5, 0.6], 256) == pytest.approx(0.4 - 2 / 32)
    # p is clipped to 0.05 before the SE, so an all-zero solo band is not zero-width
    assert band_low([0.0, 0.0], 100) == pytest.approx(-2 * math.sqrt(0.05 * 0.95 / 100))
    assert band_low([1.0], 100) == pytest.approx(1.0 - 2 * math.sqrt(0.95 * 0.05 / 100))


def test_within_band_is_one_sided() -> None:
    low = band_low([0.4, 0.5, 0.6], 256)
    assert within_band(0.9, low)  # better than solo is no regression
    assert within_band(low, low)
    assert not within_band(low - 1e-9, low)


def test_ratios() -> None:
    assert speedup(80.0, 20.0) == 4.0
    assert sweep_ratio(1, 10.0, 10.0) == 1.0
    assert sweep_ratio(4, 10.0, 20.0) == 2.0  # 4 experiments in twice the time of one: 2x throughput
    with pytest.raises(ValueError):
        speedup(1.0, 0.0)


def test_parse_sweep() -> None:
    assert parse_sweep("8,1,2,2, 4") == (1, 2, 4, 8)
    for bad in ("", "0,1", "1,x", "-2"):
        with pytest.raises(SystemExit, match="--sweep"):
            parse_sweep(bad)


def test_plan_defaults_and_validation() -> None:
    full, quick = plan_from_args(parse()), plan_from_args(parse("--quick"))
    assert (full.experiments, full.steps, full.solo_seeds, full.sweep) == (8, 30, 3, (1, 2, 4, 8, 16))
    assert (quick.experiments, quick.steps, quick.solo_seeds, quick.sweep) == (4, 3, 3, (1, 2, 4))
    assert quick.quick and quick.configs()[0].eval_samples == 1 and not full.overrides
    flagged = plan_from_args(parse("--quick", "--experiments", "8", "--steps", "6", "--sweep", "1,3"))
    assert (flagged.experiments, flagged.steps, flagged.sweep) == (8, 6, (1, 3))
    for flags, message in (
        (("--experiments", "0"), "--experiments"),
        (("--steps", "0"), "--steps"),
        (("--solo-seeds", "0"), "--solo-seeds"),
        (("--sweep", "a"), "--sweep"),
    ):
        with pytest.raises(SystemExit, match=message):
            plan_from_args(parse(*flags))


def test_cli_wires_the_subcommand() -> None:
    args = build_parser().parse_args(["bench", "experiments", "--quick", "--no-docs"])
    assert args.func.__name__ == "_cmd_bench_experiments" and args.quick and args.no_docs


def test_configs_eval_only_at_start_and_end() -> None:
    cfg = plan_from_args(parse("--steps", "5")).configs()[0]
    assert cfg.eval_every == cfg.steps == 5
    assert samples_per_eval(cfg) == 64 * cfg.eval_samples


def test_bench_experiments_end_to_end(tmp_path: Path, tiny_model_path: Path, broker: EmbeddedBroker) -> None:
    # Every phase (two cold engines, the warm one, concurrent, sweep), each experiment as small as it gets.
    small = {"eval_samples": 1, "max_tokens": 4, "group_size": 2, "batch_size": 2}
    plan = Plan(experiments=2, steps=1, solo_seeds=1, sweep=(1, 2), overrides=small)
    command = "hotlora bench experiments (test)"
    # One engine thread: a 2-thread torch region on a busy 2-core machine waits for a time slice per op.
    console = Console(stderr=True)
    result = run_bench(plan, str(tiny_model_path), broker.bootstrap, command, console, engine_threads=1)
    out = tmp_path / "experiments.json"
    write_outputs(result, parse("--no-docs", "--json", str(out)), console)
    result = json.loads(out.read_text())
    for key in ("cold_ratio", "warm_ratio"):
        assert isinstance(result[key], float) and result[key] > 0
    assert isinstance(result["no_reward_regression"], bool)
    assert result["T1_seconds"] > result["T2_seconds"] > 0  # cold includes two engine start-ups
    assert [row["concurrency"] for row in result["sweep"]] == [1, 2]
    assert [len(row["solo_final_rewards"]) for row in result["experiments"]] == [1, 1]
    assert result["commit"] and result["machine"]["cores"] and result["n_experiments"] == 2


@pytest.mark.parametrize("script", ["gpu_experiments", "gpu_vllm", "gpu_claim"])
def test_gpu_script_skips_cleanly_without_cuda(script: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import importlib.util

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the skip path does not apply")
    spec = importlib.util.spec_from_file_location(script, Path(__file__).parents[1] / f"bench/{script}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "unused.json")]) == 0
    assert "skipped: no CUDA" in capsys.readouterr().out
