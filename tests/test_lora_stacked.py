"""The stacked LoRA path (decode's): all adapters in two matmuls, masked per row, equal to the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hotlora.engine import lora as lora_module
from hotlora.engine.lora import LoraContext, LoraPair, MultiLoRALinear, lora_batch
from tests.helpers import max_rel_error

SLOTS = [1, 1, -1, 0, 2, 2, 2, 0, 3]  # several runs, a base row, an adapter twice, a slot this layer lacks


def make_layer() -> tuple[MultiLoRALinear, LoraContext, list[LoraPair]]:
    gen = torch.Generator().manual_seed(0)
    context = LoraContext()
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(32, 24), "model.layers.0.self_attn.q_proj", context)
    pairs = []
    for slot, rank in enumerate([2, 8, 5]):
        a = (torch.randn(rank, 32, generator=gen) * 0.1).requires_grad_(True)
        b = (torch.randn(24, rank, generator=gen) * 0.1).requires_grad_(True)
        pairs.append(LoraPair(A=a, B=b, scale=2.0 / rank))
        layer.attach(slot, pairs[-1])
    return layer, context, pairs


def forward_backward(backend: str, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    layer, context, pairs = make_layer()
    context.backend = backend
    x = x.clone().requires_grad_(True)
    with lora_batch(context, SLOTS):
        out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [t.grad for p in pairs for t in (p.A, p.B)], x.grad


@pytest.mark.parametrize("shape", [(len(SLOTS), 1, 32), (len(SLOTS), 5, 32), (len(SLOTS), 32)])
def test_stacked_matches_reference_forward_and_backward(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out_s, grads_s, gx_s = forward_backward("stacked", x)
    out_r, grads_r, gx_r = forward_backward("reference", x)
    assert max_rel_error(out_s, out_r) <= 1e-6
    assert max_rel_error(gx_s, gx_r) <= 1e-6
    for g_s, g_r in zip(grads_s, grads_r, strict=True):
        assert g_r.abs().max() > 0 and max_rel_error(g_s, g_r) <= 1e-5
    layer, _, _ = make_layer()
    base = layer.base(x).detach()
    assert torch.equal(out_s[2], base[2]) and torch.equal(out_s[8], base[8])  # exact for rows without a delta


def test_auto_stacks_few_tokens_and_segments_many(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[str] = []
    for name in ("_delta_stacked", "_add_delta_segments"):
        original = getattr(MultiLoRALinear, name)

        def spy(self, *args, _original=original, _name=name):
            chosen.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(MultiLoRALinear, name, spy)
    layer, context, _ = make_layer()
    small = torch.randn(len(SLOTS), 2, 32)
    large = torch.randn(len(SLOTS), lora_module.STACKED_MAX_TOKENS // len(SLOTS) + 1, 32)
    with torch.no_grad():
        for x in (small, large):
            with lora_batch(context, SLOTS):
                layer(x)
        with lora_batch(context, [1] * len(SLOTS)):
            layer(small)  # one adapter: nothing to stack
    with lora_batch(context, SLOTS):
        layer(small)  # recording gradients (training): never stacked, so partners cannot change a row's bits
    assert chosen == ["_delta_stacked", "_add_delta_segments", "_add_delta_segments", "_add_delta_segments"]


def test_stacked_factors_are_reused_until_a_weight_changes() -> None:
    """Decode reuses the concatenated factors across steps; any change to an adapter must rebuild them."""
    layer, context, pairs = make_layer()
    context.backend = "stacked"
    x = torch.randn(len(SLOTS), 1, 32, generator=torch.Generator().manual_seed(2))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            with lora_batch(context, SLOTS):
                context.backend = "stacked"
                stacked = layer(x)
            with lora_batch(context, SLOTS):
                context.backend = "reference"
                reference = layer(x)
        return stacked, reference

    first, _ = both()
    cached = layer._stack
    again, _ = both()
    assert layer._stack is cached and torch.equal(first, again), "unchanged weights: the stack is reused"
    with torch.no_grad():
        pairs[1].B.add_(0.5)  # what an optim_step does: in place
    stacked, reference = both()
    assert not torch.equal(stacked, first) and max_rel_error(stacked, reference) <= 1e-6
    pairs[0].A.data = pairs[0].A.data * 2.0  # an offload/reload-style storage swap
    stacked, reference = both()
    assert max_rel_error(stacked, reference) <= 1e-6
    gen = torch.Generator().manual_seed(5)
    layer.detach_slot(2)
    layer.attach(2, LoraPair(A=torch.randn(5, 32, generator=gen), B=torch.randn(24, 5, generator=gen), scale=0.3))
    stacked, reference = both()
    assert max_rel_error(stacked, reference) <= 1e-6
