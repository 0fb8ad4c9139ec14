"""``hotlora model init``: materialise a tiny base model into a directory, from the recipe cache."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from hotlora.models.tiny_model import COMPLETE_MARKER, TinyModelRecipe, default_cache_root, ensure_tiny_model
from hotlora.progress import progress_bar
from hotlora.schemas.errors import InvalidRequest

DEFAULT_PRETRAIN_STEPS = 1500
# A fifth of pretraining answers are another example's answer: the base then knows most answers but
# samples them only part of the time, the gap RL closes (docs/architecture.md, "The RL base").
DEFAULT_ANSWER_NOISE = 0.2


def recipe_for(pretrain: bool, seed: int = 0, steps: int | None = None) -> TinyModelRecipe:
    if steps is not None and steps < 0:
        raise InvalidRequest(f"--steps must be >= 0, got {steps}")
    if not pretrain:
        if steps:
            raise InvalidRequest("--steps only applies with --pretrain")
        return TinyModelRecipe(seed=seed)
    return TinyModelRecipe(
        seed=seed,
        pretrain_steps=DEFAULT_PRETRAIN_STEPS if steps is None else steps,
        pretrain_answer_noise=DEFAULT_ANSWER_NOISE,
    )


def init_model(
    out_dir: Path, pretrain: bool = False, seed: int = 0, steps: int | None = None, force: bool = False
) -> Path:
    """Build (or take from the cache) the recipe's model and copy it to ``out_dir``."""
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise SystemExit(f"error: {out_dir} exists and is not empty (use --force to overwrite)")
    recipe = recipe_for(pretrain, seed, steps)
    with progress_bar(
        TextColumn("pretraining"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        transient=False,  # the finished bar (steps, final loss) is the record of the build
    ) as progress:
        task = progress.add_task("pretrain", total=max(recipe.pretrain_steps, 1), loss=float("nan"), visible=False)

        def report(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, loss=loss, visible=True)

        cached = ensure_tiny_model(recipe, progress=report)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(cached, out_dir)
    return out_dir


def init_shape(
    out_dir: Path,
    shape_name: str,
    layers: int | None = None,
    vocab: int | None = None,
    dtype: str = "bfloat16",
    device: str = "auto",
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write a random-init model of a named real configuration (``hotlora.models.shapes``) into ``out_dir``."""
    from hotlora.engine.base_model import resolve_device, resolve_dtype
    from hotlora.models.shapes import get_shape, write_shape

    shape = get_shape(shape_name).with_overrides(layers=layers, vocab=vocab)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise SystemExit(f"error: {out_dir} exists and is not empty (use --force to overwrite)")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    size_gb = shape.parameters() * torch.tensor([], dtype=torch_dtype).element_size() / 1e9
    note = f"writing {shape.name}: {size_gb:.1f} GB of {torch_dtype} weights, random init on {torch_device}"
    print(note, file=sys.stderr)
    return write_shape(shape, out_dir, dtype=torch_dtype, device=torch_device, seed=seed)


def rl_base_model(progress: bool = True) -> str:
    """The pretrained tiny base that RL agents, the demo and ``bench experiments`` start from (built once, cached)."""
    recipe = recipe_for(pretrain=True)
    cached = default_cache_root() / recipe.cache_key() / COMPLETE_MARKER
    if not progress or cached.is_file():
        return str(ensure_tiny_model(recipe))
    columns = (TextColumn("pretraining the RL base (once)"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with progress_bar(*columns) as bar:
        task = bar.add_task("pretrain", total=max(recipe.pretrain_steps, 1))
        return str(ensure_tiny_model(recipe, progress=lambda step, total, loss: bar.update(task, completed=step)))
