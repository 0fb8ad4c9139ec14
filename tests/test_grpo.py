"""The GRPO agent: advantages and datums by hand, then a few real steps through the in-process Engine."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hotlora.agents.grpo import (
    GrpoConfig,
    group_advantages,
    logprob_mismatch,
    make_schedule,
    rl_datum,
    run_grpo,
    tokenizer_codec,
)
from hotlora.agents.metrics import MetricsSink, read_jsonl, read_topic, to_json_line
from hotlora.agents.tasks import ContinualSchedule, Problem
from hotlora.cli import build_parser, grpo_config
from hotlora.cli import main as cli_main
from hotlora.engine.core import Engine, EngineConfig
from hotlora.engine.kafka.admin import ensure_topics
from hotlora.engine.kafka.broker import EmbeddedBroker
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.scheduler import SchedulerPolicy
from hotlora.engine.types import ForwardBackwardOutput, LoraSpec
from hotlora.schemas import Metrics, Topics, decode, encode

# ----- advantages and datums, by hand -----


def test_advantage_is_reward_minus_group_mean() -> None:
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([3.0, 0.0, 0.0]) == [2.0, -1.0, -1.0]


def test_std_normalized_advantage() -> None:
    # rewards 1,0,0,1: mean 0.5, population std 0.5 -> +-0.5 / (0.5 + 1e-6)
    got = group_advantages([1.0, 0.0, 0.0, 1.0], std_normalize=True)
    assert got == pytest.approx([0.5 / 0.500001, -0.5 / 0.500001, -0.5 / 0.500001, 0.5 / 0.500001])


def test_equal_rewards_give_exactly_zero_advantages() -> None:
    assert group_advantages([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]  # no float noise: the group is skipped
    assert group_advantages([1.0, 1.0], std_normalize=True) == [0.0, 0.0]


def test_rl_datum_masks_the_prompt_and_shifts_by_one() -> None:
    datum = rl_datum(prompt=[1, 10, 11], tokens=[20, 21, 2], logprobs=[-0.5, -1.0, -2.0], advantage=0.25)
    assert datum.input_tokens.tolist() == [1, 10, 11, 20, 21]
    assert datum.target_tokens.tolist() == [10, 11, 20, 21, 2]
    assert datum.weights.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert datum.logprobs is not None and datum.logprobs.tolist() == [0.0, 0.0, -0.5, -1.0, -2.0]
    assert datum.advantages is not None and datum.advantages.tolist() == [0.0, 0.0, 0.25, 0.25, 0.25]


def test_logprob_mismatch_reads_generated_positions_only() -> None:
    datum = rl_datum([1, 10], [20, 2], [-1.0, -2.0], advantage=1.0)
    trainer = torch.tensor([-9.0, -1.5, -2.0])  # position 0 is the prompt: ignored
    fb = ForwardBackwardOutput(adapter_id="a", losses=[0.0], logprobs=[trainer], num_tokens=2)
    assert logprob_mismatch([datum], fb) == pytest.approx(0.25)


# ----- the loop, end to end on the in-process Engine -----


@dataclass(frozen=True)
class FakeTask:
    """Problem 0 of every batch always scores 0 (a skipped group); the others score the completion's parity."""

    name: str

    def problems(self, seed: int, n: int) -> list[Problem]:
        return [Problem(f"{self.name} {seed} {i}:", "const" if i == 0 else "parity") for i in range(n)]

    def eval_set(self) -> list[Problem]:
        return [Problem(f"{self.name} eval {i}:", "parity") for i in range(3)]

    def reward(self, problem: Problem, completion: str) -> float:
        return 0.0 if problem.answer == "const" else float(len(completion) % 2)


def test_grpo_loop_runs_through_the_engine(tiny_model_path: Path) -> None:
    encode_problem, decode_tokens = tokenizer_codec(str(tiny_model_path))
    tasks = {"arithmetic": FakeTask("arithmetic"), "reverse": FakeTask("reverse")}
    schedule = ContinualSchedule((("arithmetic", 2), ("reverse", 2)))
    # A random-init model is near-greedy at temperature 1: every group would score the same and be skipped.
    cfg = GrpoConfig(adapter_id="g", steps=4, group_size=4, batch_size=3, eval_every=2, max_tokens=6, temperature=5.0)
    cfg = dataclasses.replace(cfg, checkpoint_dir=str(tiny_model_path.parent / "grpo-test-continual"))
    out = io.StringIO()

    async def main() -> list[Metrics]:
        runner = ModelRunner.from_pretrained(tiny_model_path, dtype="float32", device="cpu", config=RunnerConfig())
        config = EngineConfig(max_decode_rows=16, scheduler=SchedulerPolicy(decode_steps_per_slice=2))
        async with Engine(runner, config) as engine, MetricsSink(out=out) as sink:
            await engine.create_adapter("g", LoraSpec(rank=4, seed=0))
            await asyncio.wait_for(run_grpo(engine, cfg, schedule, tasks, encode_problem, decode_tokens, sink), 120)
            assert (await engine.list_adapters())[0].version == sink.sent[-1].version
        return sink.sent

    metrics = asyncio.run(main())
    assert [m.step for m in metrics] == [0, 1, 2, 3, 4]
    assert [m.task for m in metrics] == ["arithmetic", "arithmetic", "arithmetic", "reverse", "reverse"]
    trained = [m for m in metrics[1:] if m.logprob_mismatch is not None]
    assert trained, "no step had a group with signal"
    assert [m.version for m in metrics[1:]] == sorted(m.version for m in metrics[1:])
    assert metrics[-1].version == len(trained)  # one optim_step per step that had signal
    for m in trained:
        assert m.logprob_mismatch < 1e-3  # sampled and trained on the same version: the same numbers
        assert m.loss is not None
    for m in metrics[1:]:
        assert m.groups == 3 and m.skipped_groups >= 1  # the constant-reward group never trains
        assert m.reward_mean is not None and 0.0 <= m.reward_mean <= 1.0 and m.step_seconds > 0
    # evals at step 0, every 2 steps and at the end; forgetting: the earlier task is evaluated too
    assert [m.step for m in metrics if m.accuracy is not None] == [0, 2, 4]
    assert [m.step for m in metrics if m.eval_reward is not None] == [0, 2, 4]
    # each phase's end saves the adapter (a continual run's checkpoints), and evaluates every task seen
    assert [m.step for m in metrics if m.checkpoint] == [2, 4]
    assert metrics[2].checkpoint.endswith("g/phase-0-arithmetic") and Path(metrics[2].checkpoint).is_dir()
    assert set(metrics[0].accuracy_by_task) == set(metrics[0].eval_reward_by_task) == {"arithmetic", "reverse"}
    assert metrics[0].eval_reward == metrics[0].eval_reward_by_task["arithmetic"]  # step 0: the base on every task
    assert set(metrics[-1].accuracy_by_task) == set(metrics[-1].eval_reward_by_task) == {"arithmetic", "reverse"}
    assert metrics[-1].accuracy == metrics[-1].accuracy_by_task["reverse"]
    assert metrics[-1].eval_reward == metrics[-1].eval_reward_by_task["reverse"]
    assert all(0.0 <= m.eval_reward <= 1.0 for m in metrics if m.eval_reward is not None)
    # the JSON lines read back as the same messages, and each is a wire message for the metrics topic
    path = tiny_model_path.parent / "grpo-test-metrics.jsonl"
    path.write_text(out.getvalue() + '{"done": true}\n')
    assert read_jsonl(path) == metrics
    assert decode(encode(metrics[-1])) == metrics[-1]
    assert Topics("p").topic_for(metrics[-1]) == "p.metrics"


def test_plot_from_jsonl_writes_a_png(tmp_path: Path) -> None:
    lines = [
        Metrics(experiment=name, task="arithmetic", step=s, reward_mean=s / 10 + k, accuracy=s / 20 if s % 2 else None)
        for k, name in enumerate(("a", "b"))
        for s in range(5)
    ]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(to_json_line(m) for m in lines) + "\nnot json\n")
    out = tmp_path / "rewards.png"
    assert cli_main(["plot", "--jsonl", str(jsonl), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_travel_on_the_metrics_topic_and_plot_reads_them(
    broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path
) -> None:
    sent = [Metrics(adapter_id="k", experiment="k", task="count", step=s, reward_mean=s / 4) for s in range(4)]

    async def main() -> list[Metrics]:
        await ensure_topics(broker.bootstrap, Topics(topic_prefix))
        async with MetricsSink(broker.bootstrap, topic_prefix, out=io.StringIO()) as sink:
            for m in sent:
                await sink(m)
        return await asyncio.wait_for(read_topic(broker.bootstrap, topic_prefix), 30)

    assert sorted(asyncio.run(main()), key=lambda m: m.step) == sent  # one key per adapter: one partition, in order
    out = tmp_path / "rewards.png"
    assert cli_main(["plot", "--bootstrap", broker.bootstrap, "--topic-prefix", topic_prefix, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- configuration -----


def test_agent_config_flags_override_the_toml_file(tmp_path: Path) -> None:
    toml = tmp_path / "exp.toml"
    toml.write_text('task = "reverse"\ngroup_size = 4\nlearning_rate = 0.01\nloss = "ppo"\nadapter_id = "x"\n')
    args = build_parser().parse_args(
        ["agent", "--config", str(toml), "--group-size", "6", "--std-normalize", "--adapter", "y"]
    )
    cfg = grpo_config(args)
    assert (cfg.task, cfg.group_size, cfg.learning_rate, cfg.loss) == ("reverse", 6, 0.01, "ppo")
    assert cfg.std_normalize and cfg.adapter_id == "y"
    assert cfg.batch_size == GrpoConfig("z").batch_size  # untouched fields keep the dataclass default
    with pytest.raises(SystemExit, match="unknown task"):
        grpo_config(build_parser().parse_args(["agent", "--task", "nope"]))
    toml.write_text("grop_size = 4\n")
    with pytest.raises(SystemExit, match="unknown key"):
        grpo_config(argparse.Namespace(**{**vars(args), "config": str(toml)}))


def test_continual_schedule_splits_the_steps_over_three_tasks() -> None:
    schedule = make_schedule(GrpoConfig("c", task="continual", steps=10))
    assert schedule.phases == (("sort", 3), ("format", 3), ("reverse", 4))
    assert make_schedule(GrpoConfig("c", task="sort", steps=5)).phases == (("sort", 5),)
