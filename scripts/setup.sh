#!/usr/bin/env bash
# Create .venv and install hotlora with its test tools. Idempotent: a second run is quick.
# torch is pinned to 2.13.0 first: on this kind of machine that is the CPU wheel lying on disk,
# where a looser spec could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
pip_install -e ".[dev]"
.venv/bin/python -c "import torch, hotlora.engine; print('hotlora ready: torch', torch.__version__)"
