"""The README's Python example runs as written (with the tiny model in place of a user's model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_engine_example_runs(
    tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = [b for b in python_blocks() if "Engine.from_pretrained" in b]
    assert blocks, "README.md lost its in-process Engine example"
    monkeypatch.chdir(tmp_path)
    code = blocks[0].replace('"path/to/any/hf/causal-lm"', repr(str(tiny_model_path)))
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "exp-1 sampled with version 2 now at 3" in out and "exp-2 sampled with version 2 now at 3" in out
    assert (tmp_path / "ckpt" / "exp-1" / "adapter_model.safetensors").is_file()


def test_readme_client_example_uses_real_verbs() -> None:
    """The Kafka fragment cannot run alone (it needs a broker and data), but its verbs must exist."""
    from hotlora.agents import HotLoraClient

    (block,) = [b for b in python_blocks() if "HotLoraClient(" in b]
    for verb in re.findall(r"client\.(\w+)\(", block):
        assert callable(getattr(HotLoraClient, verb, None)), verb
