"""The catalogue of reference RL experiments that ``hotlora demo`` and ``hotlora bench experiments`` run.

Each entry is a different experiment (a task, a learning rate), as a sweep or a set of tenants would
be. Asking for more experiments than the catalogue holds cycles through it with new seeds, so every
experiment stays distinct and deterministic.
"""

from __future__ import annotations

import dataclasses

from hotlora.agents.grpo import GrpoConfig

# (task, learning rate): chosen so each one's held-out reward rises within a few dozen steps on the
# pretrained tiny base (numbers in README.md and docs/benchmarks.md).
CATALOGUE: tuple[tuple[str, float], ...] = (
    ("format", 1e-3),
    ("sort", 1e-3),
    ("format", 3e-4),
    ("sort", 3e-4),
    ("reverse", 1e-3),
    ("sort", 3e-3),  # too high: rises, then swings (the demo's first four all rise steadily)
    ("format", 3e-3),
    ("reverse", 3e-3),
)


def experiment_configs(n: int, steps: int, seed: int = 0, **overrides: object) -> list[GrpoConfig]:
    """``n`` distinct experiments named ``exp-<i>-<task>``; ``seed`` shifts every experiment's seed."""
    if n < 1:
        raise ValueError(f"need at least one experiment, got {n}")
    configs = []
    for i in range(n):
        task, lr = CATALOGUE[i % len(CATALOGUE)]
        task = str(overrides.get("task", task))
        configs.append(
            GrpoConfig(
                adapter_id=f"exp-{i}-{task}",
                task=task,
                learning_rate=lr,
                steps=steps,
                seed=seed + i // len(CATALOGUE),
            )
        )
    return [dataclasses.replace(c, **overrides) for c in configs]  # type: ignore[arg-type]
