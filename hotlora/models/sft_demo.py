"""The in-process demo: two adapters learn two different answers to the same prompt, at once.

Each optimizer step runs ONE mixed micro-batch holding both adapters' rows, then one ``optim_step``
per adapter. It shows the core idea on a laptop: one frozen base, isolated tenants, shared compute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hotlora.engine.runner import ModelRunner
from hotlora.engine.types import AdamParams, Datum, ForwardBackward, LoraSpec
from hotlora.progress import progress_console

PROMPT = "favourite thing:"
TARGETS = {"tenant-a": " the sea at dawn", "tenant-b": " 12+30=42, always"}


@dataclass
class SftResult:
    adapter_id: str
    first_loss: float
    last_loss: float
    completion: str
    target: str

    @property
    def reduction(self) -> float:
        return 1.0 - self.last_loss / self.first_loss


def encode(runner: ModelRunner, text: str) -> list[int]:
    tokenizer = runner.base.tokenizer
    return tokenizer.encode(text, add_special_tokens=False)


def sft_datum(runner: ModelRunner, prompt: str, answer: str) -> Datum:
    """``<s> prompt answer </s>`` with loss on the answer and EOS only."""
    tokenizer = runner.base.tokenizer
    prompt_ids = [tokenizer.bos_token_id, *encode(runner, prompt)]
    answer_ids = [*encode(runner, answer), tokenizer.eos_token_id]
    return Datum.from_sequence(prompt_ids + answer_ids, prompt_len=len(prompt_ids))


@torch.no_grad()
def greedy_complete(runner: ModelRunner, adapter_id: str | None, prompt: str, max_tokens: int = 32) -> str:
    """Greedy decoding by full re-forward: slow but independent of any sampler, so tests can trust it."""
    tokenizer = runner.base.tokenizer
    ids = [tokenizer.bos_token_id, *encode(runner, prompt)]
    generated: list[int] = []
    for _ in range(max_tokens):
        logits = runner.logits(torch.tensor([ids + generated]), [adapter_id])
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
    return tokenizer.decode(generated)


def train_two_adapters(runner: ModelRunner, steps: int, seed: int = 0, lr: float = 3e-3) -> list[SftResult]:
    """Train both tenants in mixed micro-batches; return first/last loss and what each now says."""
    specs = {"tenant-a": LoraSpec(rank=8, targets="all-linear", seed=seed), "tenant-b": LoraSpec(rank=4, seed=seed + 1)}
    datums = {}
    for adapter_id, spec in specs.items():
        runner.create_adapter(adapter_id, spec)
        datums[adapter_id] = sft_datum(runner, PROMPT, TARGETS[adapter_id])
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for _ in range(steps):
        calls = [ForwardBackward(a, [datums[a]], "cross_entropy") for a in specs]
        for output in runner.forward_backward_many(calls):
            assert not isinstance(output, Exception)
            first.setdefault(output.adapter_id, output.loss)
            last[output.adapter_id] = output.loss
        for adapter_id in specs:
            runner.optim_step(adapter_id, AdamParams(learning_rate=lr, grad_clip_norm=1.0))
    return [
        SftResult(a, first[a], last[a], greedy_complete(runner, a, PROMPT, max_tokens=24), TARGETS[a]) for a in specs
    ]


def run_sft_demo(model_dir: str | None, steps: int, seed: int = 0) -> int:
    from hotlora.models.tiny_model import TinyModelRecipe, ensure_tiny_model

    console = Console()
    path = Path(model_dir) if model_dir else ensure_tiny_model(TinyModelRecipe(seed=seed))
    console.print(f"base model: {path}")
    runner = ModelRunner.from_pretrained(path)
    start = time.perf_counter()
    with progress_console().status(f"training 2 adapters for {steps} steps in mixed micro-batches"):
        results = train_two_adapters(runner, steps, seed)
    table = Table(title=f"SFT of two adapters on one base ({time.perf_counter() - start:.1f} s)")
    for column in ("adapter", "first loss", "last loss", "cut", "greedy completion", "target"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.adapter_id,
            f"{r.first_loss:.3f}",
            f"{r.last_loss:.3f}",
            f"{r.reduction:.1%}",
            repr(r.completion),
            repr(r.target),
        )
    console.print(table)
    base_says = greedy_complete(runner, None, PROMPT, max_tokens=24)
    console.print(f"the frozen base still says: {base_says!r}")
    return 0 if all(r.completion == r.target for r in results) else 1
