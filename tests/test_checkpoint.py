"""PEFT-format checkpoints that PEFT itself loads, and training state that resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hotlora.engine.digest import directory_sha256
from hotlora.engine.runner import ModelRunner, RunnerConfig
from hotlora.engine.types import AdamParams, Datum, LoraSpec
from hotlora.schemas.errors import CheckpointError
from tests.helpers import random_datum


def train(runner: ModelRunner, adapter_id: str, datums: list[Datum], steps: int, lr: float = 1e-2) -> list[float]:
    losses = []
    for _ in range(steps):
        losses.append(runner.forward_backward(adapter_id, datums).loss)
        runner.optim_step(adapter_id, AdamParams(learning_rate=lr, weight_decay=0.01))
    return losses


def fresh_runner(path: Path) -> ModelRunner:
    return ModelRunner.from_pretrained(path, dtype="float32", device="cpu", config=RunnerConfig())


@pytest.mark.parametrize(
    "spec",
    [LoraSpec(rank=4, alpha=8, targets="attention", seed=1), LoraSpec(rank=6, alpha=3, targets=("up_proj", "v_proj"))],
)
def test_peft_loads_our_checkpoint_and_agrees_on_logits(
    runner: ModelRunner, tiny_model_path: Path, tmp_path: Path, spec: LoraSpec
) -> None:
    gen = torch.Generator().manual_seed(0)
    runner.create_adapter("tenant", spec)
    runner.create_adapter("other", LoraSpec(rank=2, seed=5))
    train(runner, "tenant", [random_datum(gen, runner.base.vocab_size, 20) for _ in range(3)], steps=5)
    out = runner.save_weights("tenant", tmp_path / "ckpt")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == spec.rank and config["lora_alpha"] == spec.alpha
    assert set(config["target_modules"]) == set(spec.target_modules())

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.randint(3, runner.base.vocab_size, (2, 17), generator=gen)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    ours = runner.logits(ids, ["tenant", "tenant"])
    assert (ours - expected).abs().max().item() <= 1e-4
    base_logits = runner.logits(ids, [None, None])
    assert (ours - base_logits).abs().max().item() > 1e-2, "the adapter must matter, or the test is empty"


def test_we_load_an_adapter_that_peft_wrote(runner: ModelRunner, tiny_model_path: Path, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    runner.load_state("from-peft", tmp_path / "peft")
    ids = torch.randint(3, runner.base.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
    assert (runner.logits(ids, ["from-peft"]) - expected).abs().max().item() <= 1e-4


def test_save_is_safetensors_and_json_only(runner: ModelRunner, tmp_path: Path) -> None:
    runner.create_adapter("a", LoraSpec(rank=2))
    gen = torch.Generator().manual_seed(0)
    train(runner, "a", [random_datum(gen, runner.base.vocab_size, 8)], steps=1)
    out = runner.save_state("a", tmp_path / "state")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_state.json",
        "training_state.safetensors",
    ]
    state = load_file(str(out / "training_state.safetensors"))
    assert "rng_state" in state and any(k.endswith(".exp_avg_sq") for k in state)
    assert len(directory_sha256(out)) == 64


def test_resume_gives_the_same_next_losses(runner: ModelRunner, tiny_model_path: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    datums = [random_datum(gen, runner.base.vocab_size, 24) for _ in range(4)]
    runner.create_adapter("run", LoraSpec(rank=8, seed=3))
    train(runner, "run", datums, steps=3)
    runner.save_state("run", tmp_path / "step3")
    runner.save_weights("run", tmp_path / "step3-weights")
    uninterrupted = train(runner, "run", datums, steps=3)

    resumed_runner = fresh_runner(tiny_model_path)
    adapter = resumed_runner.load_state("run", tmp_path / "step3")
    assert adapter.version == 3
    resumed = train(resumed_runner, "run", datums, steps=3)
    assert resumed == uninterrupted  # exact: same weights, moments, step counts and settings

    # Weights without the optimizer state resume differently, so the comparison above can fail.
    weights_only = fresh_runner(tiny_model_path)
    assert weights_only.load_state("run", tmp_path / "step3-weights").version == 0
    assert train(weights_only, "run", datums, steps=3) != uninterrupted


def test_load_state_reproduces_logits_and_rng(runner: ModelRunner, tiny_model_path: Path, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    runner.create_adapter("a", LoraSpec(rank=4, targets="mlp", seed=9))
    train(runner, "a", [random_datum(gen, runner.base.vocab_size, 12)], steps=2)
    runner.adapters.get("a").generator.manual_seed(1234)
    runner.save_state("a", tmp_path / "a")
    other = fresh_runner(tiny_model_path)
    other.load_state("b", tmp_path / "a")
    ids = torch.randint(3, runner.base.vocab_size, (1, 9), generator=gen)
    assert torch.equal(runner.logits(ids, ["a"]), other.logits(ids, ["b"]))
    assert torch.equal(runner.adapters.get("a").generator.get_state(), other.adapters.get("b").generator.get_state())
    assert other.adapters.get("b").optimizer.last_params == AdamParams(learning_rate=1e-2, weight_decay=0.01)


def test_corrupt_or_foreign_checkpoints_are_clear_errors(runner: ModelRunner, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        runner.load_state("x", tmp_path / "nothing")
    runner.create_adapter("a", LoraSpec(rank=2))
    out = runner.save_weights("a", tmp_path / "a")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        runner.load_state("x", out)
    (out / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(CheckpointError, match="shapes"):
        runner.load_state("x", out)
    assert "x" not in runner.adapters, "a failed load leaves no half-built adapter behind"
    (out / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        runner.load_state("x", out)
