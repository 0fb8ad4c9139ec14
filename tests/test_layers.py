"""The layers of docs/architecture.md hold: lint-imports keeps its contracts on this tree, and breaks
them when a forbidden import is planted in a copy of it, so a wrong import fails CI, not a review."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/lint-imports.sh"
LINTER = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LINT_IMPORTS": LINTER}
    return subprocess.run(["bash", str(root / SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_layer_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "broken"),
    [
        ("schemas/codec.py", "import torch", "The wire layer needs msgspec and the standard library only"),
        ("schemas/topics.py", "from hotlora.engine import types", "hotlora, one way down"),
        ("agents/tasks.py", "from hotlora.engine.runner import ModelRunner", "Agents use the engine's vocabulary"),
        ("agents/tasks.py", "import transformers", "Agents use the engine's vocabulary"),
        ("engine/runner.py", "from hotlora.engine.kafka import service", "The engine: the Kafka edge"),
        ("engine/types.py", "from hotlora.engine import core", "The engine: the Kafka edge"),
        ("engine/core.py", "from hotlora.agents import client", "hotlora, one way down"),
        ("engine/unplaced.py", "", "The engine: the Kafka edge"),  # a new module no layer names
    ],
)
def test_a_planted_import_breaks_its_contract(tmp_path: Path, module: str, planted: str, broken: str) -> None:
    copy = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("engine", "agents", "schemas", "hotlora", "scripts"):
        shutil.copytree(REPO / folder, copy / folder, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", copy)
    assert lint_imports(copy).returncode == 0  # the copy itself is clean
    target = copy / module
    target.write_text(f"{target.read_text() if target.exists() else ''}\n{planted}\n")
    result = lint_imports(copy)
    assert result.returncode != 0, result.stdout
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout


def test_importing_the_agents_loads_neither_transformers_nor_the_engine_core() -> None:
    probe = (
        "import sys, hotlora.agents, hotlora.agents.grpo, hotlora.agents.sft_agent, hotlora.agents.experiments\n"
        "heavy = ('transformers', 'peft', 'hotlora.engine.core', 'hotlora.engine.runner', 'hotlora.engine.sampler',"
        " 'hotlora.engine.lora', 'hotlora.engine.kafka.service')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout
