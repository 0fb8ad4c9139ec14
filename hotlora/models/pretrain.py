"""Brief pretraining of the tiny base on the synthetic corpus, so RL starts from a non-trivial policy."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from hotlora.agents.corpus import examples, render

ProgressFn = Callable[[int, int, float], None]  # (step, steps, loss)


def encode_batch(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """``<s> text </s>`` rows, right-padded; labels are -100 on padding."""
    rows = [
        [tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id] for t in texts
    ]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return ids, labels


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    answer_noise: float = 0.0,
    progress: ProgressFn | None = None,
) -> list[float]:
    """AdamW with linear warmup and cosine decay over ``steps`` batches of the corpus; the loss per step."""
    torch.manual_seed(seed)
    stream = examples(seed=seed + 1, answer_noise=answer_noise)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item())
        ),
    )
    model.train()
    losses: list[float] = []
    for step in range(steps):
        texts = [render(next(stream)) for _ in range(batch_size)]
        ids, labels = encode_batch(texts, tokenizer)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    model.eval()
    return losses
