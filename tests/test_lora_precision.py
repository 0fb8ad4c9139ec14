"""Mixed precision in the LoRA layer: fp32 master factors, the delta computed in the activations' dtype.

Every backend follows the same rule, so autograd keeps the (bf16) activations it already has and no
fp32 copy of them per module, while the factors' gradients still arrive in fp32. The grouped path
pads ranks to 16 bytes, as ``torch._grouped_mm`` needs on CUDA (its CPU kernel checks the same).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from hotlora.engine import lora as lora_module
from hotlora.engine.lora import LoraContext, LoraPair, MultiLoRALinear, grouped_mm_fast, lora_batch
from tests.helpers import max_rel_error

SLOTS = [1, 1, -1, 0, 2, 2, 2, 0]  # several runs, a base row, an adapter twice
BACKENDS = ["segment", "stacked", "grouped", "reference"]


def make_layer(dtype: torch.dtype, ranks: list[int]) -> tuple[MultiLoRALinear, LoraContext, list[LoraPair]]:
    """A ``dtype`` base with fp32 factors, as the engine keeps them."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    context = LoraContext()
    layer = MultiLoRALinear(nn.Linear(64, 48).to(dtype).requires_grad_(False), "model.layers.0.mlp.up_proj", context)
    pairs = []
    for slot, rank in enumerate(ranks):
        a = (torch.randn(rank, 64, generator=gen) * 0.1).requires_grad_(True)
        b = (torch.randn(48, rank, generator=gen) * 0.1).requires_grad_(True)
        pairs.append(LoraPair(A=a, B=b, scale=2.0 / rank))
        layer.attach(slot, pairs[-1])
    return layer, context, pairs


def run(
    backend: str, dtype: torch.dtype, ranks: list[int], x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Output, factor gradients, input gradient, and the tensors autograd saved for the backward."""
    layer, context, pairs = make_layer(dtype, ranks)
    context.backend = backend
    x = x.to(dtype).requires_grad_(True)
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), lora_batch(context, SLOTS):
        out = layer(x)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
    (out * weights).sum().backward()
    return out.detach(), [t.grad for p in pairs for t in (p.A, p.B)], x.grad, saved


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_activations_keep_no_fp32_copy_and_fp32_factor_grads(backend: str) -> None:
    x = torch.randn(len(SLOTS), 40, 64, generator=torch.Generator().manual_seed(1))
    out, grads, gx, saved = run(backend, torch.bfloat16, [4, 12, 8], x)
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads)
    big_fp32 = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel() // 4]
    assert big_fp32 == [], f"autograd kept activation-sized fp32 tensors: {big_fp32}"

    # Against the same layer in fp32 throughout: bf16 rounding only.
    out32, grads32, gx32, _ = run("reference", torch.float32, [4, 12, 8], x)
    assert max_rel_error(out.float(), out32) <= 2e-2
    assert max_rel_error(gx.float(), gx32) <= 2e-2
    for g, g32 in zip(grads, grads32, strict=True):
        assert g32.abs().max() > 0 and max_rel_error(g, g32) <= 3e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_is_unchanged_by_the_casts(backend: str) -> None:
    """With fp32 activations the casts are no-ops: every backend still equals the reference tightly."""
    x = torch.randn(len(SLOTS), 5, 64, generator=torch.Generator().manual_seed(2))
    out, grads, gx, _ = run(backend, torch.float32, [4, 12, 8], x)
    out_r, grads_r, gx_r, _ = run("reference", torch.float32, [4, 12, 8], x)
    assert max_rel_error(out, out_r) <= 1e-6 and max_rel_error(gx, gx_r) <= 1e-6
    for g, g_r in zip(grads, grads_r, strict=True):
        assert max_rel_error(g, g_r) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ranks", [[3, 5, 1], [7, 2, 6], [16, 24, 8]])
def test_grouped_pads_any_rank_to_16_bytes(dtype: torch.dtype, ranks: list[int]) -> None:
    """Ranks whose rows are not 16-byte multiples (3, 5, 7 in bf16) used to fail the kernel's stride check."""
    x = torch.randn(len(SLOTS), 6, 64, generator=torch.Generator().manual_seed(3))
    out, grads, gx, _ = run("grouped", dtype, ranks, x)
    out_r, grads_r, gx_r, _ = run("reference", dtype, ranks, x)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert max_rel_error(out.float(), out_r.float()) <= tol
    assert max_rel_error(gx.float(), gx_r.float()) <= tol
    for g, g_r in zip(grads, grads_r, strict=True):
        assert max_rel_error(g, g_r) <= 10 * tol
    layer, _, _ = make_layer(dtype, ranks)
    assert torch.equal(out[2], layer.base(x.to(dtype))[2].detach()), "a base-only row gets an exact zero delta"


def test_grouped_backward_takes_an_expanded_gradient() -> None:
    """``.sum()`` hands back an expanded gradient, which the grouped kernel's backward cannot read as is."""
    layer, context, pairs = make_layer(torch.bfloat16, [4, 12, 8])
    context.backend = "grouped"
    x = torch.randn(len(SLOTS), 3, 64, dtype=torch.bfloat16)
    with lora_batch(context, SLOTS):
        layer(x).sum().backward()
    assert all(p.A.grad is not None and p.B.grad is not None for p in pairs)


def test_auto_takes_the_grouped_kernel_only_for_cuda_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """By the activations (compute) dtype and device, not the factors'; CUDA tensors faked on a CPU build."""
    monkeypatch.setattr(lora_module, "cutlass_grouped_mm", lambda index: True)  # an sm90 device
    with FakeTensorMode():
        cuda_bf16 = torch.empty(8, 64, dtype=torch.bfloat16, device="cuda:0")
        cuda_fp32 = torch.empty(8, 64, dtype=torch.float32, device="cuda:0")
        odd_offset = torch.empty(8 * 64 + 1, dtype=torch.bfloat16, device="cuda:0").narrow(0, 1, 8 * 64).view(8, 64)
        assert grouped_mm_fast(cuda_bf16, 64, 48)
        assert not grouped_mm_fast(cuda_fp32, 64, 48)
        assert not grouped_mm_fast(cuda_bf16, 64, 36), "36 bf16 outputs are not a 16-byte row"
        assert not grouped_mm_fast(odd_offset, 64, 48), "a view 2 bytes into its storage is misaligned"
    assert not grouped_mm_fast(torch.empty(8, 64, dtype=torch.bfloat16), 64, 48), "CPU: a loop of mm, no gain"
    monkeypatch.setattr(lora_module, "cutlass_grouped_mm", lambda index: False)  # an A100: a loop there too
    with FakeTensorMode():
        assert not grouped_mm_fast(torch.empty(8, 64, dtype=torch.bfloat16, device="cuda:0"), 64, 48)
