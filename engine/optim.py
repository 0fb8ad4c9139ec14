"""Per-adapter AdamW: each adapter owns its optimizer, its moments and its own settings per step.

An adapter's optimizer only ever sees that adapter's tensors, which is what makes an ``optim_step``
on one tenant leave every other tenant bit-identical.

On CUDA the update is torch's fused AdamW: a few kernel launches for all of an adapter's tensors
instead of about ten per tensor. The CPU keeps the per-tensor loop. Its ``foreach`` variant is
bitwise the same there (``tests/test_optim.py``) but no faster: the CPU foreach kernels loop over the
tensors too, and they hold every temporary at once (45 MB for a 36-layer rank-16 adapter), which
glibc hands back to the kernel after each step and faults in again on the next: 60-80 ms a step
against the loop's 39 (one thread). The fused kernel rounds differently (about an ulp) from both.
"""

from __future__ import annotations

import torch

from hotlora.engine.types import AdamParams


class AdapterOptimizer:
    """``torch.optim.AdamW`` over one adapter's LoRA factors, re-configured by every ``optim_step``."""

    def __init__(self, params: list[torch.Tensor], device: torch.device | None = None) -> None:
        """``device``: where the steps run (the model's), default the parameters' own; an adapter created
        offloaded has its parameters on the host until its first step."""
        self.params = params
        device = params[0].device if device is None else torch.device(device)
        self.fused = device.type == "cuda" and all(p.is_floating_point() for p in params)
        foreach = device.type != "cpu" and not self.fused
        defaults = AdamParams()
        self.torch_optimizer = torch.optim.AdamW(
            params,
            lr=defaults.learning_rate,
            betas=(defaults.beta1, defaults.beta2),
            eps=defaults.eps,
            weight_decay=defaults.weight_decay,
            foreach=foreach,
            fused=self.fused,
        )
        self.last_params: AdamParams | None = None

    @property
    def steps_on_device(self) -> bool:
        """Whether AdamW keeps its 0-dim ``step`` tensors beside the parameters (fused) or on the CPU."""
        return self.fused

    def has_gradients(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def grad_norm(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

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
        steps = torch.stack([state[p]["step"] for p in self.params]).tolist()  # one device sync, not one each
        return [(state[p]["exp_avg"], state[p]["exp_avg_sq"], step) for p, step in zip(self.params, steps, strict=True)]

    def load_moments(self, moments: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        if len(moments) != len(self.params):
            raise ValueError(f"got moments for {len(moments)} tensors, adapter has {len(self.params)}")
        for p, (exp_avg, exp_avg_sq, step) in zip(self.params, moments, strict=True):
            self.torch_optimizer.state[p] = {
                "step": torch.tensor(step, dtype=torch.float32, device=p.device if self.steps_on_device else "cpu"),
                "exp_avg": exp_avg.to(device=p.device, dtype=p.dtype).clone(),
                "exp_avg_sq": exp_avg_sq.to(device=p.device, dtype=p.dtype).clone(),
            }
