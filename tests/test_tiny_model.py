"""Tiny local models: deterministic, cached by recipe, loadable like any Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hotlora.agents.corpus import GENERATORS, examples, render
from hotlora.cli import main
from hotlora.models.tiny_model import TinyModelRecipe, build_tiny_model, ensure_tiny_model
from tests.conftest import TEST_RECIPE


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_same_seed_same_model_other_seed_other_model(tmp_path: Path) -> None:
    a = weights(build_tiny_model(TEST_RECIPE, tmp_path / "a"))
    b = weights(build_tiny_model(TEST_RECIPE, tmp_path / "b"))
    c = weights(build_tiny_model(TinyModelRecipe(**{**TEST_RECIPE.__dict__, "seed": 1}), tmp_path / "c"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_cache_reuses_a_built_model(tmp_path: Path) -> None:
    first = ensure_tiny_model(TEST_RECIPE, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = ensure_tiny_model(TEST_RECIPE, tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    other = ensure_tiny_model(TinyModelRecipe(**{**TEST_RECIPE.__dict__, "seed": 5}), tmp_path)
    assert other != first


def test_loads_through_from_pretrained_with_a_byte_tokenizer(tiny_model_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    text = "reverse abc: cba, 12+7=19 é"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == model.config.vocab_size == 259
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_corpus_is_seeded_and_covers_every_kind() -> None:
    first = [render(e) for e, _ in zip(examples(3), range(200), strict=False)]
    assert first == [render(e) for e, _ in zip(examples(3), range(200), strict=False)]
    assert first != [render(e) for e, _ in zip(examples(4), range(200), strict=False)]
    prefixes = {text.split()[0] for text in first}
    assert {"reverse", "sort", "count", "format"} <= prefixes and any("+" in t or "-" in t for t in first)
    assert set(GENERATORS) == {"arithmetic", "reverse", "sort", "count", "format"}


def test_pretraining_lowers_the_loss_and_reports_progress(tmp_path: Path) -> None:
    seen: list[tuple[int, int, float]] = []
    recipe = TinyModelRecipe(**{**TEST_RECIPE.__dict__, "pretrain_steps": 40, "pretrain_batch_size": 16})
    build_tiny_model(recipe, tmp_path / "pt", progress=lambda s, t, loss: seen.append((s, t, loss)))
    assert [s for s, _, _ in seen] == list(range(1, 41)) and seen[0][1] == 40
    assert sum(loss for *_, loss in seen[-5:]) / 5 < 0.5 * seen[0][2]


def test_cli_model_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOTLORA_CACHE", str(tmp_path / "cache"))
    assert main(["model", "init", str(tmp_path / "m"), "--seed", "2"]) == 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    assert "model ready" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not empty"):
        main(["model", "init", str(tmp_path / "m")])
    assert main(["model", "init", str(tmp_path / "m"), "--pretrain", "--steps", "3", "--force"]) == 0
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2
