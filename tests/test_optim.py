"""Per-adapter AdamW on CPU fp32: bitwise what it computed before, and what torch's foreach AdamW computes."""

from __future__ import annotations

import pytest
import torch

from hotlora.engine.optim import AdapterOptimizer
from hotlora.engine.types import AdamParams

# A LoRA adapter's shapes in miniature: A is [rank, in], B is [out, rank].
SHAPES = [(8, 64), (96, 8), (8, 96), (64, 8), (4, 33), (17, 4)]
SETTINGS = [
    AdamParams(learning_rate=1e-2, weight_decay=0.01),
    AdamParams(learning_rate=3e-3, beta1=0.8, beta2=0.99, eps=1e-8, grad_clip_norm=0.0),
    AdamParams(learning_rate=1e-4, grad_clip_norm=1e-3),
]


def make_params(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).requires_grad_(True) for shape in SHAPES]


def set_grads(params: list[torch.Tensor], generator: torch.Generator, step: int) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 10.0 ** (step % 5 - 3)


def reference_step(optimizer: torch.optim.AdamW, params: list[torch.Tensor], hp: AdamParams) -> float:
    """What ``AdapterOptimizer.step`` did before: per-tensor norms for ``grad_norm``, then ``optimizer``."""
    for group in optimizer.param_groups:
        group.update(lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay)
    if hp.grad_clip_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, hp.grad_clip_norm))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_cpu_steps_are_bitwise_the_per_tensor_loop_and_foreach(foreach: bool) -> None:
    """The CPU keeps the per-tensor loop (``engine/optim.py`` says why); foreach would change no bits."""
    ours, theirs = make_params(0), make_params(0)
    optimizer = AdapterOptimizer(ours)
    assert not optimizer.fused and not optimizer.steps_on_device
    reference = torch.optim.AdamW(theirs, foreach=foreach)
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for step in range(12):
        hp = SETTINGS[step % len(SETTINGS)]
        set_grads(ours, gen_a, step)
        set_grads(theirs, gen_b, step)
        assert optimizer.grad_norm() == float(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in theirs]))
        )
        assert optimizer.step(hp) == reference_step(reference, theirs, hp)
        for p, q in zip(ours, theirs, strict=True):
            assert torch.equal(p, q)
            mine, ref = optimizer.torch_optimizer.state[p], reference.state[q]
            assert torch.equal(mine["exp_avg"], ref["exp_avg"]) and torch.equal(mine["exp_avg_sq"], ref["exp_avg_sq"])
            assert mine["step"].device.type == "cpu" and float(mine["step"]) == float(ref["step"]) == step + 1


def test_grad_norm_without_gradients_is_zero() -> None:
    assert AdapterOptimizer(make_params(0)).grad_norm() == 0.0


def test_moments_round_trip_through_load_moments() -> None:
    params = make_params(0)
    optimizer = AdapterOptimizer(params)
    assert optimizer.moments() is None
    generator = torch.Generator().manual_seed(2)
    for step in range(3):
        set_grads(params, generator, step)
        optimizer.step(SETTINGS[0])
    saved = [(m.clone(), v.clone(), s) for m, v, s in optimizer.moments() or []]
    assert [s for _, _, s in saved] == [3.0] * len(params)
    copy = make_params(0)
    restored = AdapterOptimizer(copy)
    restored.load_moments(saved)
    for (m1, v1, s1), (m2, v2, s2) in zip(saved, restored.moments() or [], strict=True):
        assert torch.equal(m1, m2) and torch.equal(v1, v2) and s1 == s2
    assert all(restored.torch_optimizer.state[p]["step"].device.type == "cpu" for p in copy)


def test_fused_when_steps_run_on_cuda() -> None:
    """The choice follows the device the steps run on, not where the parameters are at creation."""
    optimizer = AdapterOptimizer(make_params(0), device=torch.device("cuda"))
    assert optimizer.fused and optimizer.steps_on_device
    assert optimizer.torch_optimizer.defaults["fused"] and not optimizer.torch_optimizer.defaults["foreach"]
