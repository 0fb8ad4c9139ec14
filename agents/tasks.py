"""RL tasks with verifiable rewards, built on the pretraining corpus's prompt formats.

Each task draws problems from ``agents/corpus.py``'s generator of the same name, so the tiny base
starts RL knowing the format. A fixed slice of the prompt space (chosen by a hash of the prompt) is
held out: ``eval_set`` draws only from it and ``problems`` never does, for any seed.

The model is pretrained on ``prompt + " " + answer`` and then EOS, so a completion is expected to
be ``" answer"``; verifiers strip one leading space and trailing whitespace/EOS, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from hotlora.agents import corpus

EOS_TEXT = "</s>"
EVAL_SIZE = 64
# One prompt in HOLDOUT_MODULUS is held out. Five keeps the smallest prompt space ("format": 4 keys x
# 100 values = 400 prompts) with ~80 held-out prompts, enough for a 64-problem eval set.
HOLDOUT_MODULUS = 5
EVAL_SEED = "hotlora-eval"
_MAX_DRAWS_PER_PROBLEM = 10_000


@dataclass(frozen=True)
class Problem:
    prompt: str  # exactly the corpus prompt, e.g. "12+7="
    answer: str  # the reference answer, e.g. "19"


def render_prompt(problem: Problem) -> str:
    """What the agent feeds the model: the pretraining prompt, no trailing space."""
    return problem.prompt


def is_held_out(prompt: str) -> bool:
    """Stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HOLDOUT_MODULUS == 0


def clean_completion(completion: str) -> str:
    """Drop ONE leading space (the model's separator) and trailing whitespace/EOS markers."""
    if completion.startswith(" "):
        completion = completion[1:]
    while True:
        stripped = completion.rstrip()
        if stripped.endswith(EOS_TEXT):
            stripped = stripped[: -len(EOS_TEXT)]
        if stripped == completion:
            return completion
        completion = stripped


def exact_match(problem: Problem, completion: str) -> float:
    return 1.0 if clean_completion(completion) == problem.answer else 0.0


def json_format_reward(problem: Problem, completion: str) -> float:
    """1.0 for the exact text; 0.5 for any other valid JSON object (right shape, wrong value or
    spacing), so the format itself is rewarded; 0.0 otherwise."""
    text = clean_completion(completion)
    if text == problem.answer:
        return 1.0
    try:
        parsed = json.loads(text)
    except ValueError:
        return 0.0
    return 0.5 if isinstance(parsed, dict) else 0.0


def digit_share(problem: Problem, completion: str) -> float:
    """The share of the completion's characters that are digits: a dense reward, so nearly every group of
    samples differs and trains, even on a random-init base whose text is noise (throughput runs on the
    real shapes of ``hotlora.models.shapes``, whose filler tokens decode to ``<12345>``)."""
    text = clean_completion(completion)
    return sum(ch.isdigit() for ch in text) / len(text) if text else 0.0


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[[random.Random], corpus.Example]
    verify: Callable[[Problem, str], float] = exact_match
    eval_size: int = EVAL_SIZE

    def problems(self, seed: int, n: int) -> list[Problem]:
        """``n`` training problems, determined by ``seed``; never a held-out prompt."""
        return self._draw(random.Random(f"{self.name}:{seed}"), n, held_out=False, unique=False)

    def eval_set(self) -> list[Problem]:
        """The fixed held-out set: ``eval_size`` distinct held-out problems."""
        return self._draw(random.Random(f"{self.name}:{EVAL_SEED}"), self.eval_size, held_out=True, unique=True)

    def reward(self, problem: Problem, completion: str) -> float:
        return self.verify(problem, completion)

    def _draw(self, rng: random.Random, n: int, *, held_out: bool, unique: bool) -> list[Problem]:
        out: list[Problem] = []
        seen: set[str] = set()
        for _ in range(n * _MAX_DRAWS_PER_PROBLEM):
            if len(out) == n:
                break
            prompt, answer = self.generate(rng)
            if is_held_out(prompt) != held_out or (unique and prompt in seen):
                continue
            seen.add(prompt)
            out.append(Problem(prompt, answer))
        if len(out) < n:
            raise RuntimeError(f"task {self.name!r}: could only draw {len(out)} of {n} problems")
        return out


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", corpus.arithmetic),
    "reverse": Task("reverse", corpus.reverse),
    "sort": Task("sort", corpus.sort_letters),
    "count": Task("count", corpus.count),
    "format": Task("format", corpus.key_value, verify=json_format_reward),
    "digits": Task("digits", corpus.arithmetic, verify=digit_share),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}") from None


@dataclass(frozen=True)
class ContinualSchedule:
    """A task distribution that shifts over time: each phase trains one task for some steps."""

    phases: tuple[tuple[str, int], ...]  # (task name, steps)

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a schedule needs at least one phase")
        for name, steps in self.phases:
            get_task(name)
            if steps <= 0:
                raise ValueError(f"phase {name!r} needs a positive step count, got {steps}")

    @classmethod
    def parse(cls, text: str) -> ContinualSchedule:
        """From a CLI string like ``"arithmetic:20,reverse:20,count:20"``."""
        phases = []
        for part in text.split(","):
            name, sep, steps = part.strip().partition(":")
            if not sep or not steps.strip().isdigit():
                raise ValueError(f"bad phase {part!r}; expected NAME:STEPS")
            phases.append((name.strip(), int(steps)))
        return cls(tuple(phases))

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.phases)

    def phase_index(self, step: int) -> int:
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} outside schedule of {self.total_steps} steps")
        end = 0
        for i, (_, steps) in enumerate(self.phases):
            end += steps
            if step < end:
                return i
        raise AssertionError("unreachable")

    def phase_ends_at(self, step: int) -> bool:
        """True when ``step`` is the last step of its phase (where a continual run checkpoints)."""
        index = self.phase_index(step)
        return step + 1 == sum(steps for _, steps in self.phases[: index + 1])

    def task_at(self, step: int) -> str:
        return self.phases[self.phase_index(step)][0]

    def seen_before(self, step: int) -> list[str]:
        """Tasks of earlier phases, first-seen order, without the current one: the forgetting set."""
        index = self.phase_index(step)
        current = self.phases[index][0]
        names = dict.fromkeys(name for name, _ in self.phases[:index] if name != current)
        return list(names)
