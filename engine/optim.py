"""Per-adapter AdamW: each adapter owns its optimizer, its moments and its own settings per step.

An adapter's optimizer only ever sees that adapter's tensors, which is what makes an ``optim_step``
on one tenant leave every other tenant bit-identical.
"""

from __future__ import annotations

import torch

from hotlora.engine.types import AdamParams


class AdapterOptimizer:
    """``torch.optim.AdamW`` over one adapter's LoRA factors, re-configured by every ``optim_step``."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        defaults = AdamParams()
        self.torch_optimizer = torch.optim.AdamW(
            params,
            lr=defaults.learning_rate,
            betas=(defaults.beta1, defaults.beta2),
            eps=defaults.eps,
            weight_decay=defaults.weight_decay,
            foreach=False,
        )
        self.last_params: AdamParams | None = None

    def has_gradients(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def grad_norm(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def step(self, hp: AdamParams) -> float:
        """Clip, apply one AdamW update and clear the gradients; returns the pre-clip norm."""
        for group in self.torch_optimizer.param_groups:
            group["lr"] = hp.learning_rate
            group["betas"] = (hp.beta1, hp.beta2)
            group["eps"] = hp.eps
            group["weight_decay"] = hp.weight_decay
        grads_present = [p for p in self.params if p.grad is not None]
        if hp.grad_clip_norm > 0 and grads_present:
            norm = float(torch.nn.utils.clip_grad_norm_(grads_present, hp.grad_clip_norm))
        else:
            norm = self.grad_norm()
        self.torch_optimizer.step()
        self.zero_grad()
        self.last_params = hp
        return norm

    def zero_grad(self) -> None:
        self.torch_optimizer.zero_grad(set_to_none=True)

    def moments(self) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
        """(exp_avg, exp_avg_sq, step) per parameter, in ``self.params`` order; None before step 1."""
        state = self.torch_optimizer.state
        if not all(p in state for p in self.params):
            return None
        return [(state[p]["exp_avg"], state[p]["exp_avg_sq"], float(state[p]["step"])) for p in self.params]

    def load_moments(self, moments: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        if len(moments) != len(self.params):
            raise ValueError(f"got moments for {len(moments)} tensors, adapter has {len(self.params)}")
        for p, (exp_avg, exp_avg_sq, step) in zip(self.params, moments, strict=True):
            self.torch_optimizer.state[p] = {
                "step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": exp_avg.to(device=p.device, dtype=p.dtype).clone(),
                "exp_avg_sq": exp_avg_sq.to(device=p.device, dtype=p.dtype).clone(),
            }
