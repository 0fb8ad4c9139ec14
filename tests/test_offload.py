"""Adapter offload: more adapters than resident slots, with results bit-identical to all-resident.

Offloading moves an adapter's weights, gradients and AdamW moments to the host device and detaches
it from every layer's slot table; ``acquire`` reloads it into a free (or LRU-evicted) slot.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hotlora.engine import adapters as adapters_module
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.types import AdamParams, Datum, ForwardBackward, LoraSpec
from hotlora.schemas.errors import CapacityExceeded, InvalidRequest
from tests.helpers import perturb_b

SPECS = [
    LoraSpec(rank=4, targets="all-linear", seed=1),
    LoraSpec(rank=8, targets="attention", seed=2),
    LoraSpec(rank=2, targets="mlp", seed=3),
    LoraSpec(rank=16, alpha=8.0, targets=("q_proj", "v_proj"), seed=4),
    LoraSpec(rank=6, targets="all-linear", seed=5),
]
IDS = [f"a{i}" for i in range(len(SPECS))]
# forward_backward rounds (adapter indices per mixed call), then an optim_step of everything touched:
# gradients accumulate across rounds, so evicted adapters carry gradients through the host.
STEPS = [
    [[0, 1, 2], [3, 4], [0, 3]],
    [[4, 2, 1, 0], [1]],
    [[3], [0, 1, 2, 3, 4]],
]
HP = AdamParams(learning_rate=1e-2, weight_decay=0.01)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture
def copying_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    """On one device, make every move a real copy that poisons its source with NaN.

    Host and device are both the CPU here, so a plain move would be a no-op; copying and poisoning
    makes any tensor left behind (a lost gradient, a stale moment, a layer still holding old
    storage) show up as a mismatch, as it would after a real device-to-host transfer. The copy is
    the engine's own (``copy_group``: packing, flat buffers), so this runs the real move's code.
    """

    def copy_and_poison(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        moved = adapters_module.copy_group(tensors, device)
        for tensor in tensors:
            tensor.fill_(float("nan"))
        return moved

    monkeypatch.setattr(adapters_module, "transfer", copy_and_poison)


def make_runner(path: Path, device: str, resident_slots: int | None, host_device: str = "cpu") -> ModelRunner:
    config = RunnerConfig(resident_slots=resident_slots, host_device=host_device, max_adapters=16)
    runner = ModelRunner.from_pretrained(path, dtype="float32", device=device, config=config)
    for adapter_id, spec in zip(IDS, SPECS, strict=True):
        runner.create_adapter(adapter_id, spec)
    return runner


def make_datums(generator: torch.Generator, count: int) -> list[Datum]:
    datums = []
    for _ in range(count):
        length = int(torch.randint(6, 24, (1,), generator=generator))
        tokens = torch.randint(3, 200, (length,), generator=generator).tolist()
        datums.append(Datum.from_sequence(tokens, prompt_len=3))
    return datums


def drive(runner: ModelRunner, split_like: ModelRunner | None = None) -> list[list[float]]:
    """Run STEPS on ``runner``; returns every call's per-datum losses in order.

    With ``split_like``, each mixed call is sent as that runner's ``resident_groups``: repacking
    changes micro-batch widths, and padding width moves results by an ulp, so an exact reference
    must see the same packs.
    """
    generator = torch.Generator().manual_seed(7)
    losses: list[list[float]] = []
    for rounds in STEPS:
        touched: list[str] = []
        for mix in rounds:
            calls = [ForwardBackward(IDS[i], make_datums(generator, 2)) for i in mix]
            groups = split_like.resident_groups(calls) if split_like else [list(range(len(calls)))]
            outputs = [out for group in groups for out in runner.forward_backward_many([calls[i] for i in group])]
            losses.extend(out.losses for out in outputs)
            touched.extend(call.adapter_id for call in calls if call.adapter_id not in touched)
        for adapter_id in touched:
            runner.optim_step(adapter_id, HP)
    return losses


def assert_same_state(a: ModelRunner, b: ModelRunner) -> None:
    for adapter_id in IDS:
        x, y = a.adapters.get(adapter_id), b.adapters.get(adapter_id)
        assert x.version == y.version
        for p, q in zip(x.parameters(), y.parameters(), strict=True):
            assert torch.equal(p.detach().cpu(), q.detach().cpu()), adapter_id
        mx, my = x.optimizer.moments(), y.optimizer.moments()
        assert (mx is None) == (my is None)
        for (m1, v1, s1), (m2, v2, s2) in zip(mx or [], my or [], strict=True):
            assert torch.equal(m1.cpu(), m2.cpu()) and torch.equal(v1.cpu(), v2.cpu()) and s1 == s2, adapter_id


def assert_offloaded_cleanly(runner: ModelRunner) -> None:
    registry = runner.adapters
    resident = set(registry.resident_ids())
    assert len(resident) <= registry.resident_slots
    live_pairs = [pair for layer in runner.lora.layers.values() for pair in layer.slots.values()]
    used_slots = {slot for layer in runner.lora.layers.values() for slot in layer.slots}
    assert used_slots <= {registry.get(i).slot for i in resident}
    for adapter_id in IDS:
        adapter = registry.get(adapter_id)
        assert adapter.resident == (adapter_id in resident)
        if adapter.resident:
            continue
        assert adapter.slot is None
        assert not any(pair is mine for mine in adapter.pairs.values() for pair in live_pairs)
        state = adapter.optimizer.torch_optimizer.state
        for p in adapter.parameters():
            assert p.device == registry.host_device
            assert p.grad is None or p.grad.device == registry.host_device
            for value in state.get(p, {}).values():
                assert value.dim() == 0 or value.device == registry.host_device


@pytest.mark.parametrize("device", DEVICES)
def test_offload_is_bit_identical_to_all_resident(tiny_model_path: Path, device: str, request) -> None:
    reference = make_runner(tiny_model_path, device, resident_slots=None)
    if device == "cpu":
        request.getfixturevalue("copying_transfer")
    offloading = make_runner(tiny_model_path, device, resident_slots=2)
    assert drive(offloading) == drive(reference, split_like=offloading)
    assert_same_state(offloading, reference)
    assert_offloaded_cleanly(offloading)
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(3))
    for adapter_id in IDS:
        got = offloading.logits(ids, [adapter_id])
        assert torch.equal(got.cpu(), reference.logits(ids, [adapter_id]).cpu()), adapter_id
        assert offloading.adapters.resident_ids()[-1] == adapter_id
    both = torch.cat([ids, ids])
    assert torch.equal(offloading.logits(both, ["a0", None]).cpu(), reference.logits(both, ["a0", None]).cpu())
    assert_offloaded_cleanly(offloading)


def test_identity_kept_across_offload(tiny_model_path: Path, copying_transfer: None) -> None:
    runner = make_runner(tiny_model_path, "cpu", resident_slots=2)
    adapter = runner.adapters.get("a0")
    params = adapter.parameters()
    runner.forward_backward("a0", make_datums(torch.Generator().manual_seed(0), 2))
    runner.optim_step("a0", HP)
    runner.adapters.acquire(["a1", "a2"])
    assert not adapter.resident
    runner.adapters.acquire(["a0"])
    assert all(p is q for p, q in zip(params, adapter.parameters(), strict=True))
    assert all(p in adapter.optimizer.torch_optimizer.state for p in params)
    assert adapter.optimizer.torch_optimizer.param_groups[0]["params"] == params
    assert all(runner.lora.layers[name].slots[adapter.slot] is pair for name, pair in adapter.pairs.items())


def test_groups_split_packs_to_fit_the_slots(tiny_model_path: Path) -> None:
    runner = make_runner(tiny_model_path, "cpu", resident_slots=2)
    calls = [ForwardBackward(IDS[i], make_datums(torch.Generator().manual_seed(i), 1)) for i in (0, 1, 0, 2, 3)]
    assert runner.resident_groups(calls) == [[0, 1, 2], [3, 4]]
    runner.adapters.pin("a4")
    assert runner.resident_groups(calls) == [[0], [1], [2], [3], [4]]
    runner.adapters.unpin("a4")
    everyone = make_runner(tiny_model_path, "cpu", resident_slots=None)
    assert everyone.resident_groups(calls) == [[0, 1, 2, 3, 4]]


def test_pinned_adapters_are_never_evicted(tiny_model_path: Path) -> None:
    runner = make_runner(tiny_model_path, "cpu", resident_slots=2)
    registry = runner.adapters
    slot = registry.pin("a0").slot
    for adapter_id in ("a1", "a2", "a3", "a4"):
        runner.forward_backward(adapter_id, make_datums(torch.Generator().manual_seed(0), 1))
        assert registry.get("a0").resident and registry.get("a0").slot == slot
        assert registry.resident_ids()[-1] == adapter_id
    with pytest.raises(InvalidRequest):
        runner.delete_adapter("a0")
    registry.unpin("a0")
    registry.acquire(["a1", "a2"])
    assert not registry.get("a0").resident
    assert {info.adapter_id for info in runner.list_adapters() if info.resident} == {"a1", "a2"}
    with pytest.raises(RuntimeError):
        registry.unpin("a0")


def test_capacity_exceeded_when_all_slots_are_pinned(tiny_model_path: Path) -> None:
    runner = make_runner(tiny_model_path, "cpu", resident_slots=2)
    registry = runner.adapters
    registry.pin("a0")
    free_later = registry.pin("a1").slot
    registry.pin("a1")  # pins count
    before = registry.resident_ids()
    with pytest.raises(CapacityExceeded):
        registry.acquire(["a2"])
    with pytest.raises(CapacityExceeded):
        runner.forward_backward("a2", make_datums(torch.Generator().manual_seed(0), 1))
    with pytest.raises(CapacityExceeded):
        runner.logits(torch.ones(3, 4, dtype=torch.long), ["a0", "a1", "a2"])
    assert registry.resident_ids() == before and not registry.get("a2").resident
    registry.acquire(["a1", "a0"])  # already resident: fine
    registry.unpin("a1")
    with pytest.raises(CapacityExceeded):
        registry.acquire(["a2"])
    registry.unpin("a1")
    assert registry.acquire(["a2"])["a2"].slot == free_later
    assert set(registry.resident_ids()) == {"a0", "a2"}


def test_lifecycle_with_offloaded_adapters(tiny_model_path: Path, tmp_path: Path) -> None:
    runner = make_runner(tiny_model_path, "cpu", resident_slots=2)
    registry = runner.adapters
    assert registry.resident_ids() == ["a3", "a4"]  # creation takes the LRU slot
    runner.forward_backward("a0", make_datums(torch.Generator().manual_seed(0), 2))
    runner.optim_step("a0", HP)
    registry.acquire(["a1", "a2"])
    saved = runner.save_state("a0", tmp_path / "a0")  # read from the host: evicts nobody
    assert registry.resident_ids() == ["a1", "a2"]
    runner.load_state("copy", saved)
    assert registry.get("copy").resident and not registry.get("a1").resident
    assert_offloaded_cleanly(runner)
    runner.delete_adapter("a0")
    runner.delete_adapter("copy")
    assert len(registry) == 4 and registry.resident_ids() == ["a2"]
    with pytest.raises(CapacityExceeded):
        registry.acquire(["a1", "a2", "a3"])


def test_sampling_with_two_slots_matches_all_resident(tiny_model_path: Path, copying_transfer: None) -> None:
    """Five adapters' samples through a 2-slot runner: the sampler pins admitted adapters, the rest wait."""
    from hotlora.engine.sampler import NativeSampler
    from hotlora.engine.types import Sample, SamplingParams

    reference = make_runner(tiny_model_path, "cpu", resident_slots=None)
    offloading = make_runner(tiny_model_path, "cpu", resident_slots=2)
    drive(offloading)
    drive(reference, split_like=offloading)
    for i, adapter_id in enumerate(IDS):  # a few steps barely move a random base; make adapters differ
        perturb_b(reference, adapter_id, seed=i, std=0.5)
        perturb_b(offloading, adapter_id, seed=i, std=0.5)
    results = {}
    for name, runner in (("ref", reference), ("off", offloading)):
        sampler = NativeSampler(runner, max_rows=32)
        for i, adapter_id in enumerate(IDS * 2):
            params = SamplingParams(max_tokens=8, temperature=1.5 if i % 2 else 0.0, seed=i)
            sampler.add(Sample(adapter_id, [1, 5 + i, 9, 12], n=2, params=params, request_id=f"r{i}"))
        done: dict[str, list] = {}
        for _ in range(200):
            if name == "off":
                assert len(offloading.adapters.pinned_ids()) <= 2
            done.update(sampler.step())
            if not sampler.has_unfinished():
                break
        assert not sampler.has_unfinished()
        assert runner.adapters.pinned_ids() == set(), "every finished request gave its pin back"
        results[name] = {rid: [(s.tokens, s.adapter_version) for s in seqs] for rid, seqs in done.items()}
    assert results["off"] == results["ref"]
    assert len({str(v) for v in results["ref"].values()}) > len(IDS), "adapters and seeds gave distinct outputs"
    assert_offloaded_cleanly(offloading)
