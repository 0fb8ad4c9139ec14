#!/usr/bin/env bash
# lint-imports over the layer contracts in pyproject.toml (docs/architecture.md); exits non-zero when one breaks.
#
# import-linter finds a package's modules by walking its folder, and hotlora's folders are mapped rather
# than nested (pyproject.toml's package-dir: hotlora.engine = engine/, ...). So it reads a tree of links
# that has the installed import names, the same tree bench/gpu_suite.sh builds. Arguments go to lint-imports.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
linter="${LINT_IMPORTS:-$root/.venv/bin/lint-imports}"
[ -x "$linter" ] || linter="$(command -v lint-imports)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/hotlora"
for entry in "$root"/hotlora/*; do ln -s "$entry" "$tree/hotlora/"; done
for layer in engine agents schemas; do ln -s "$root/$layer" "$tree/hotlora/$layer"; done
cd "$tree" # import-linter puts the working directory first on sys.path: the links, not the checkout
PYTHONPATH="$tree" "$linter" --no-cache "$root/pyproject.toml" "$@"
