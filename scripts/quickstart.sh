#!/usr/bin/env bash
# The whole pipeline on the embedded sample, on CPU, in minutes (the CPU-sized twin of
# scripts/reproduce_paper.sh). Every step's output lands under outputs/tiny/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
py=.venv/bin/python

# 1. Tiny assets (~10 s): a BPE tokenizer trained on the sample, a random 0.3M-parameter Llama.
$py scripts/make_tiny_assets.py --out outputs/tiny
# 2. data_prep (~10 s each): WildChat-schema sample -> funnel -> user split -> flipped examples;
#    and the PRISM-schema sample as an evaluation set.
$py -m data_prep experiment=tiny
$py -m data_prep experiment=tiny dataset=prism
