#!/usr/bin/env bash
# Install transformers 4.57.6 into a folder of its own, .venv/transformers-4.57.6/, and print its path.
# It holds only transformers and the two packages whose versions 4.57.6 needs and the project's
# venv does not have (tokenizers 0.22, huggingface-hub 0.x); everything else it imports (torch,
# numpy, safetensors, regex, requests, pyyaml, filelock, fsspec, hf-xet, tqdm) comes from the venv.
# Run the venv's python with PYTHONPATH=<that folder> and 4.57.6 shadows the venv's transformers 5:
# scripts/checkpoint_compat.py does, to check that exports load under both.
# Idempotent: a complete install is marked by .installed (holding the pins) and reused; an
# interrupted one is never taken for complete (it is built beside and renamed into place).
# PYTHON= the interpreter whose pip installs (default .venv/bin/python); needs PyPI (~20 s, 135 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
pins="transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.0"
target=.venv/transformers-4.57.6
if [ "$(cat "$target/.installed" 2>/dev/null)" != "$pins" ]; then
  mkdir -p .venv
  partial="$target.incomplete-$$"
  trap 'rm -rf "$partial"' EXIT
  # --no-deps: the venv provides the rest; --only-binary: never compile tokenizers' Rust sources.
  # shellcheck disable=SC2086
  "$python" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --target "$partial" $pins
  echo "$pins" > "$partial/.installed"
  rm -rf "$target"
  mv "$partial" "$target"
fi
echo "$(pwd)/$target"
