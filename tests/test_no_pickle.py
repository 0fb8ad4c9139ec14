"""No pickle anywhere a tenant's bytes could reach: checkpoints are safetensors + JSON, messages MessagePack.

Unpickling runs arbitrary code, so a checkpoint or record from one tenant could take over the engine that
serves all of them. This scans hotlora's own sources (not tests, not third-party code) for the ways in.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "agents", "schemas", "hotlora")

# Textual patterns, checked on the source with comments and docstrings still in: cheap and strict.
_ALLOW_PICKLE = re.compile(r"allow_pickle\s*=\s*True")
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib"}


def _sources() -> list[Path]:
    files = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)
    assert len(files) > 20, "the scan found too few sources; did the layout change?"
    return files


def _weights_only_true(call: ast.Call) -> bool:
    return any(
        kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def pickle_uses(source: str) -> list[str]:
    """Each pickle entry point in ``source``, as ``line: what``."""
    found: list[str] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in _PICKLE_MODULES:
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLE_MODULES:
            found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if (name == "torch.load" or name.endswith(".torch.load")) and not _weights_only_true(node):
                found.append(f"{node.lineno}: {name}( without weights_only=True")
            if name.split(".")[0] in _PICKLE_MODULES or name.endswith(("pickle.load", "pickle.loads")):
                found.append(f"{node.lineno}: {name}(")
            if name.endswith(("numpy.load", "np.load")) and any(
                kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)
                for kw in node.keywords
            ):
                found.append(f"{node.lineno}: {name}( with allow_pickle")
    for lineno, line in enumerate(source.splitlines(), 1):
        if _ALLOW_PICKLE.search(line):
            found.append(f"{lineno}: allow_pickle=True")
        if re.search(r"\bpickle\.loads?\(", line) and not line.lstrip().startswith("#"):
            found.append(f"{lineno}: pickle.load")
    return sorted(set(found))


def test_sources_never_unpickle() -> None:
    offenders = {str(path.relative_to(ROOT)): uses for path in _sources() if (uses := pickle_uses(path.read_text()))}
    assert not offenders, f"pickle entry points in hotlora's sources: {offenders}"


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\n",
        "import pickle as p\n",
        "from pickle import loads\n",
        "import cloudpickle\n",
        "import torch\nstate = torch.load(path)\n",
        "import torch\nstate = torch.load(path, weights_only=False)\n",
        "import torch\nstate = torch.load(path, map_location='cpu')\n",
        "import numpy as np\na = np.load(path, allow_pickle=True)\n",
        "x = pickle.loads(data)\n",
    ],
)
def test_the_scan_catches(source: str) -> None:
    assert pickle_uses(source), source


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nstate = torch.load(path, weights_only=True)\n",
        "import numpy as np\na = np.load(path)\n",
        "from safetensors.torch import load_file\nstate = load_file(path)\n",
        "# pickling is never used here\n",
    ],
)
def test_the_scan_allows(source: str) -> None:
    assert not pickle_uses(source), source
