"""The reference GRPO agent: the Tinker cookbook's ``rl_loop`` in hotlora's client verbs.

Per step: sample a group of completions per prompt (all prompts at once: the engine batches them),
score them with the task's verifier, advantage = reward - group mean, skip groups with no signal,
``forward_backward`` with ``importance_sampling`` or ``ppo`` on the sampler's logprobs, ``optim_step``.
The loop takes any ``engine.verbs.Verbs``: a ``HotLoraClient`` over Kafka or the in-process
``Engine``. Metrics go to an ``emit`` callback (``agents.metrics.MetricsSink`` prints and publishes).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hotlora.agents.client import HotLoraClient
from hotlora.agents.metrics import MetricsSink, read_topic
from hotlora.agents.tasks import TASKS, ContinualSchedule, render_prompt
from hotlora.agents.tokenizer import TextTokenizer
from hotlora.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraSpec,
    SamplingParams,
)
from hotlora.engine.verbs import Verbs
from hotlora.schemas import Metrics

CONTINUAL_TASKS = ("sort", "format", "reverse")
# Every eval samples prompt j with seed EVAL_SEED + j: evals before and after training (and across
# experiments) share their random numbers, so a change in eval reward is the policy's, not the dice's.
EVAL_SEED = 7_000_000_000


@dataclass
class GrpoConfig:
    adapter_id: str
    task: str = "arithmetic"  # a name in agents.tasks.TASKS, or "continual"
    steps: int = 30
    group_size: int = 8
    batch_size: int = 4
    learning_rate: float = 3e-3
    # Set here, not left to AdamParams: its default is the Tinker SDK's 0.0 (no clipping), and these
    # runs were tuned with the sum-reduced gradient clipped to norm 1.0.
    grad_clip_norm: float = 1.0
    loss: str = "importance_sampling"  # or "ppo"
    std_normalize: bool = False
    eval_every: int = 10  # 0: no held-out evals at all (throughput runs on random-init shapes)
    eval_samples: int = 4  # completions per held-out prompt for the eval reward
    temperature: float = 1.0
    max_tokens: int = 16
    rank: int = 8
    seed: int = 0
    # Where a continual run saves each phase's state; relative paths land under the engine's --checkpoint-dir.
    checkpoint_dir: str = "continual"


# ----- the pure parts, tested by hand -----


def group_advantages(rewards: Sequence[float], std_normalize: bool = False) -> list[float]:
    """Reward minus the group mean, optionally divided by the group's (population) std + 1e-6."""
    if max(rewards) == min(rewards):  # exactly zero, not float noise around the mean: the group is skipped
        return [0.0] * len(rewards)
    mean = sum(rewards) / len(rewards)
    scale = statistics.pstdev(rewards) + 1e-6 if std_normalize else 1.0
    return [(r - mean) / scale for r in rewards]


def step_seed(cfg: GrpoConfig, step: int) -> int:
    """The seed of one training step's problems; its samples derive from it (``sample_seed``)."""
    return cfg.seed * 1_000_003 + step


def sample_seed(cfg: GrpoConfig, step: int, prompt_index: int) -> int:
    """Seeded sampling makes a run reproducible whatever else shares the engine's batches."""
    return step_seed(cfg, step) * 1_000 + prompt_index


def rl_datum(prompt: Sequence[int], tokens: Sequence[int], logprobs: Sequence[float], advantage: float) -> Datum:
    """One sampled sequence as a training datum: loss, sampler logprobs and advantage on generated tokens only."""
    p, g = len(prompt), len(tokens)
    return Datum.create(
        input_tokens=[*prompt, *tokens[:-1]],
        target_tokens=[*prompt[1:], *tokens],
        weights=[0.0] * (p - 1) + [1.0] * g,
        logprobs=[0.0] * (p - 1) + list(logprobs),
        advantages=[0.0] * (p - 1) + [advantage] * g,
    )


def logprob_mismatch(datums: Sequence[Datum], fb: ForwardBackwardOutput) -> float:
    """Mean |sampler logprob - trainer logprob| over the generated (weighted) tokens of a step."""
    total, count = 0.0, 0
    for datum, trainer in zip(datums, fb.logprobs, strict=True):
        mask = datum.weights > 0
        assert datum.logprobs is not None
        total += float((trainer.detach().float().cpu()[mask] - datum.logprobs[mask]).abs().sum())
        count += int(mask.sum())
    return total / max(count, 1)


# ----- the loop -----


@dataclass(frozen=True)
class Evaluation:
    reward: float  # mean verifier reward of ``eval_samples`` completions per held-out prompt, at training temperature
    accuracy: float  # greedy exact-match rate on the same prompts


async def evaluate_task(client: Verbs, cfg: GrpoConfig, task: Any, encode: Callable, decode: Callable) -> Evaluation:
    """The policy's expected reward on the task's held-out set, and its greedy accuracy (every request at once).

    The reward is what RL optimises (samples at the training temperature), so it is the curve that must
    rise; greedy accuracy shows whether the mode moved too.
    """
    problems = task.eval_set()
    greedy = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0)
    sampled = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    prompts = [encode(p) for p in problems]
    outs = await asyncio.gather(
        *(client.sample(cfg.adapter_id, pr, 1, greedy) for pr in prompts),
        *(
            client.sample(cfg.adapter_id, pr, cfg.eval_samples, replace(sampled, seed=EVAL_SEED + j))
            for j, pr in enumerate(prompts)
        ),
    )
    greedy_outs, sampled_outs = outs[: len(problems)], outs[len(problems) :]
    hits = [task.reward(p, decode(o.sequences[0].tokens)) >= 1.0 for p, o in zip(problems, greedy_outs, strict=True)]
    rewards = [
        task.reward(p, decode(s.tokens)) for p, o in zip(problems, sampled_outs, strict=True) for s in o.sequences
    ]
    return Evaluation(reward=sum(rewards) / len(rewards), accuracy=sum(hits) / len(hits))


async def run_grpo(
    client: Verbs,
    cfg: GrpoConfig,
    schedule: ContinualSchedule,  # which task each step trains, and which came before (forgetting)
    tasks: Mapping[str, Any],  # name -> task (.problems, .eval_set, .reward), as agents.tasks.TASKS
    encode: Callable[[Any], list[int]],  # problem -> prompt tokens
    decode: Callable[[list[int]], str],  # generated tokens -> completion text
    emit: Callable[[Metrics], Awaitable[None]],
    start_step: int = 0,  # > 0: resume (``resume_point``); step 0's base evaluation is not repeated
    start_version: int = 0,
) -> None:
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature)

    async def evaluate(step: int, **fields: Any) -> dict[str, Any]:
        current = schedule.task_at(max(step - 1, 0))  # the task the last step trained on
        names = [*schedule.seen_before(max(step - 1, 0)), current]  # earlier tasks show forgetting
        if step == 0:  # the base on every task of the schedule: the reference for gains and forgetting
            names = list(dict.fromkeys([current, *(name for name, _ in schedule.phases)]))
        by_task = {name: await evaluate_task(client, cfg, tasks[name], encode, decode) for name in names}
        return {
            "eval_reward": by_task[current].reward,
            "eval_reward_by_task": {name: e.reward for name, e in by_task.items()},
            "accuracy": by_task[current].accuracy,
            "accuracy_by_task": {name: e.accuracy for name, e in by_task.items()},
            **fields,
        }

    async def report(step: int, task: str, **fields: Any) -> None:
        await emit(Metrics(adapter_id=cfg.adapter_id, experiment=cfg.adapter_id, task=task, step=step, **fields))

    version = start_version
    if start_step == 0 and cfg.eval_every > 0:
        await report(0, schedule.task_at(0), **await evaluate(0))
    for step in range(start_step, cfg.steps):
        start = time.perf_counter()
        task = tasks[schedule.task_at(step)]
        problems = task.problems(step_seed(cfg, step), cfg.batch_size)
        prompts = [encode(p) for p in problems]
        groups = await asyncio.gather(
            *(
                client.sample(cfg.adapter_id, pr, cfg.group_size, replace(params, seed=sample_seed(cfg, step, j)))
                for j, pr in enumerate(prompts)
            )
        )
        datums, rewards, skipped = [], [], 0
        for problem, prompt, group in zip(problems, prompts, groups, strict=True):
            group_rewards = [task.reward(problem, decode(s.tokens)) for s in group.sequences]
            rewards += group_rewards
            advantages = group_advantages(group_rewards, cfg.std_normalize)
            if all(a == 0.0 for a in advantages):
                skipped += 1  # no signal: every completion scored the same
                continue
            datums += [
                rl_datum(prompt, s.tokens, s.logprobs, a) for s, a in zip(group.sequences, advantages, strict=True)
            ]
        loss = mismatch = sync = None
        if datums:
            fb = await client.forward_backward(cfg.adapter_id, datums, cfg.loss)
            stepped = await client.optim_step(
                cfg.adapter_id, AdamParams(learning_rate=cfg.learning_rate, grad_clip_norm=cfg.grad_clip_norm)
            )
            version, sync = stepped.version, stepped.weight_sync_s
            loss, mismatch = fb.loss, logprob_mismatch(datums, fb)
        fields = dict(
            reward_mean=sum(rewards) / len(rewards),
            step_seconds=time.perf_counter() - start,
            loss=loss,
            logprob_mismatch=mismatch,
            weight_sync_s=sync,
            groups=len(groups),
            skipped_groups=skipped,
            version=version,
        )
        if schedule.phase_ends_at(step) and len(schedule.phases) > 1:  # a continual run keeps each phase's adapter
            path = f"{cfg.checkpoint_dir}/{cfg.adapter_id}/phase-{schedule.phase_index(step)}-{task.name}"
            fields["checkpoint"] = (await client.save_state(cfg.adapter_id, path)).path
        evals = cfg.eval_every > 0
        if evals and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps or "checkpoint" in fields):
            fields = await evaluate(step + 1, **fields)
        await report(step + 1, task.name, **fields)


# ----- the agent process (``hotlora agent --task NAME``) -----


def make_schedule(cfg: GrpoConfig) -> ContinualSchedule:
    """One phase of ``cfg.task``, or for ``continual`` the steps split over ``CONTINUAL_TASKS`` in order."""
    if cfg.task != "continual":
        return ContinualSchedule(phases=((cfg.task, cfg.steps),))
    n = len(CONTINUAL_TASKS)
    if cfg.steps < n:
        raise ValueError(f"a continual run needs at least {n} steps, got {cfg.steps}")
    steps = [cfg.steps // n] * (n - 1) + [cfg.steps - (n - 1) * (cfg.steps // n)]
    return ContinualSchedule(phases=tuple(zip(CONTINUAL_TASKS, steps, strict=True)))


def tokenizer_codec(model: str) -> tuple[Callable[[Any], list[int]], Callable[[list[int]], str]]:
    """``encode`` (problem -> prompt tokens) and ``decode`` (generated tokens -> text) from the model's tokenizer."""
    tokenizer = TextTokenizer.from_model_dir(model)

    def encode(problem: Any) -> list[int]:
        return tokenizer.with_bos(render_prompt(problem))

    return encode, tokenizer.decode


def resume_point(reported: list[Metrics], engine_version: int) -> tuple[int, int]:
    """(next step, adapter version) for a restarted agent, from its metrics and the engine's adapter.

    Each step reports its ``version`` after at most one ``optim_step``. If the engine's adapter is
    ahead of the last report, the agent died between that step's ``optim_step`` and its report: the
    step is done (its metrics are lost), so it is not redone.
    """
    steps = [m for m in reported if m.step > 0]
    if not steps:
        return 0, engine_version
    last = max(steps, key=lambda m: m.step)
    return last.step + (1 if engine_version > last.version else 0), engine_version


async def run_grpo_agent(
    cfg: GrpoConfig, bootstrap: str, model: str, topic_prefix: str = "hotlora", resume: bool = False
) -> int:
    encode, decode = tokenizer_codec(model)
    async with (
        HotLoraClient(bootstrap, topic_prefix=topic_prefix) as client,
        MetricsSink(bootstrap, topic_prefix) as sink,
    ):
        start_step = start_version = 0
        info = await client.resume(cfg.adapter_id) if resume else None
        if info is None:
            await client.create_adapter(cfg.adapter_id, LoraSpec(rank=cfg.rank, seed=cfg.seed))
        else:  # the engine kept the adapter (its durable snapshot): continue where the experiment stopped
            mine = [m for m in await read_topic(bootstrap, topic_prefix) if m.experiment == cfg.adapter_id]
            start_step, start_version = resume_point(mine, info.version)
            print(json.dumps({"adapter": cfg.adapter_id, "resumed_at_step": start_step, "version": info.version}))
        await run_grpo(client, cfg, make_schedule(cfg), TASKS, encode, decode, sink, start_step, start_version)
    return 0


def main(cfg: GrpoConfig, bootstrap: str, model: str, topic_prefix: str = "hotlora", resume: bool = False) -> int:
    from hotlora.engine.event_loop import run

    try:
        return run(run_grpo_agent(cfg, bootstrap, model, topic_prefix, resume))
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a parent reading stdout sees this line; the traceback goes to stderr
        print(json.dumps({"adapter": cfg.adapter_id, "error": f"{type(err).__name__}: {err}"}), flush=True)
        raise
