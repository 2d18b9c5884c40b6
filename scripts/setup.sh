#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies. Idempotent: reinstalls only
# when pyproject.toml or constraints.txt changed. torch is pinned (constraints.txt) first, so that
# deepspeed's dependency on torch does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
  touch "$stamp"
fi
