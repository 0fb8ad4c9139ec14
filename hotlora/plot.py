"""``hotlora plot``: training and held-out reward curves per experiment, from the metrics topic, a JSON-lines
file or a recording (``.hlr``, ``hotlora record``)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from hotlora.schemas import Metrics


def plot_metrics(metrics: Sequence[Metrics], out: str | Path) -> Path:
    """Two panels, one line per experiment: training reward per step, and held-out reward per eval
    (solid) with greedy held-out accuracy (dotted, same colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_experiment: dict[str, list[Metrics]] = defaultdict(list)
    for m in metrics:
        by_experiment[m.experiment].append(m)
    fig, (reward_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in sorted(by_experiment.items()):
        rows.sort(key=lambda m: m.step)
        rewards = [(m.step, m.reward_mean) for m in rows if m.reward_mean is not None]
        evals = [(m.step, m.eval_reward) for m in rows if m.eval_reward is not None]
        greedy = [(m.step, m.accuracy) for m in rows if m.accuracy is not None]
        if rewards:
            reward_ax.plot(*zip(*rewards, strict=True), label=name)
        if evals:
            (line,) = acc_ax.plot(*zip(*evals, strict=True), marker="o", label=name)
            if greedy:
                acc_ax.plot(*zip(*greedy, strict=True), linestyle=":", color=line.get_color())
    reward_ax.set(title="training reward (group mean)", xlabel="step", ylabel="reward")
    acc_ax.set(title="held-out reward (dotted: greedy accuracy)", xlabel="step", ylabel="reward")
    for ax in (reward_ax, acc_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def read_hlr(path: str | Path) -> list[Metrics]:
    """The ``Metrics`` events of a recording (``hotlora record``), in the order they were recorded."""
    from hotlora.replay.format import iter_records
    from hotlora.replay.messages import decode_record

    return [m for m in map(decode_record, iter_records(path)) if isinstance(m, Metrics)]


def main(bootstrap: str | None, topic_prefix: str, jsonl: str | None, out: str, hlr: str | None = None) -> int:
    from hotlora.agents.metrics import read_jsonl, read_topic

    if hlr:
        metrics = read_hlr(hlr)
    elif jsonl:
        metrics = read_jsonl(jsonl)
    elif bootstrap:
        metrics = asyncio.run(read_topic(bootstrap, topic_prefix))
    else:
        raise SystemExit("error: pass --hlr FILE, --jsonl FILE, or --bootstrap HOST:PORT (or set HOTLORA_BOOTSTRAP)")
    if not metrics:
        raise SystemExit("error: no metrics found")
    path = plot_metrics(metrics, out)
    print(f"{len({m.experiment for m in metrics})} experiment(s), {len(metrics)} records -> {path}")
    return 0
