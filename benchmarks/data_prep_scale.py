"""data_prep at WildChat-1M scale on this machine: wall time, throughput, peak memory.

    python benchmarks/data_prep_scale.py                  # N = 837,989 (WildChat-1M's row count)
    python benchmarks/data_prep_scale.py --rows 50000     # a quick run
    python benchmarks/data_prep_scale.py --tokenizer tiny # the sample's 2k BPE instead of Llama-3's

Generates N synthetic conversations in WildChat-1M's exact parquet schema (14 shards, like the
hub's) with a realistic length distribution (user turns per conversation geometric with mean ~2.5,
capped at 20; user turns lognormal around 20 words with a long tail of pastes; replies around 150
words; 57% English; a few percent exact duplicates), an intent for each, then runs the whole
`python -m data_prep` on them in a subprocess with `--tokenizer` (default llama3: Meta-Llama-3-8B's
real tokenizer, benchmarks/tokenizer_choice.py; tiny: the sample's 2k BPE), sampling the RSS of its
whole process tree. The limit it is compared with is the raw batched throughput of the same
tokenizer on the same text (all cores). Figures go to stdout and --json.
Goals (2 cores, full N): <= 10 minutes, <= 6 GiB peak, end-to-end tokens/s >= 50% of raw. Peak
memory is reported twice: the sum of RSS over the process tree (which counts pages shared by the
forked workers, and touched pages of memory-mapped Arrow files, several times) and the sum of PSS
(each shared page divided among its sharers: the memory actually in use).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.make_sample import SAMPLE_DIR, WildChatWriter  # noqa: E402
from benchmarks import tokenizer_choice  # noqa: E402
from scripts.make_tiny_assets import sample_texts  # noqa: E402

LANGUAGES = [("English", 0.57), ("Chinese", 0.15), ("Russian", 0.12), ("French", 0.04), ("Spanish", 0.04),
             ("Portuguese", 0.03), ("German", 0.03), ("Arabic", 0.02)]


def _words(rng: random.Random, vocabulary: list[str], median: float, sigma: float, cap: int) -> str:
    n = max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))
    return " ".join(rng.choices(vocabulary, k=n))


def generate(out: Path, rows: int, shards: int, seed: int) -> tuple[list[Path], Path]:
    """Write `shards` parquet files of synthetic WildChat rows into out/shards/ (data_prep refuses a
    folder mixing parquet and JSON Lines) and an intents JSONL into out/."""
    rng = random.Random(seed)
    vocabulary = sorted({w for text in sample_texts(SAMPLE_DIR) for w in text.split() if w.isascii() and "<|" not in w})
    names, weights = zip(*LANGUAGES)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    files = []
    with open(out / "intents.jsonl", "w") as intents:
        for shard in range(shards):
            writer = WildChatWriter(rng)
            n = rows // shards + (shard < rows % shards)
            previous = None
            for _ in range(n):
                if previous is not None and rng.random() < 0.03:
                    turns = previous  # an exact duplicate
                else:
                    k = min(20, 1 + int(rng.expovariate(1 / 1.5)))
                    turns = []
                    for _ in range(k):
                        turns.append(("user", _words(rng, vocabulary, 20, 1.3, 6000)))
                        turns.append(("assistant", _words(rng, vocabulary, 150, 0.9, 3000)))
                row = writer.add(turns, language=rng.choices(names, weights)[0])
                if turns is previous:
                    continue  # a duplicate shares its original's hash, and so its intent
                previous = turns
                intents.write(json.dumps({"conversation_hash": row["conversation_hash"],
                                          "intent": "You are a user chatting with an assistant language "
                                                    "model to " + _words(rng, vocabulary, 10, 0.3, 20)}) + "\n")
            path = out / "shards" / f"train-{shard:05d}-of-{shards:05d}.parquet"
            pq.write_table(writer.table(), path, compression="zstd")
            files.append(path)
            print(f"  shard {shard + 1}/{shards}: {n} rows", flush=True)
    return files, out / "intents.jsonl"


def raw_tokenizer_rate(files: list[Path], tokenizer_dir: Path, fraction: float) -> dict:
    """Batched tokens/s of the bare tokenizer (all cores) on the input's message text."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = []
    for path in files[:max(1, round(len(files) * fraction))]:
        for conversation in pq.read_table(path, columns=["conversation"]).column("conversation").to_pylist():
            texts += ["\n" + turn["content"] for turn in conversation]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 10_000):
        tokens += sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts[i:i + 10_000],
                                                                                  add_special_tokens=False))
    seconds = time.perf_counter() - start
    return {"texts": len(texts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "fraction_of_input": fraction}


def run_data_prep(files_dir: Path, intents: Path, tokenizer_dir: Path, output_dir: Path, num_proc: int) -> dict:
    command = [sys.executable, "-m", "data_prep", "experiment=tiny", f"data.source={files_dir}",
               f"intents.path={intents}", f"tokenizer.name_or_path={tokenizer_dir}", f"output_dir={output_dir}",
               "max_seq_len=2048", f"num_proc={num_proc}", "batch_size=1000", "filters.write_dropped=true"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_CACHE=str(output_dir.parent / "hf_cache"))
    peak = peak_pss = 0
    done = threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env)

    def sample():
        # RSS counts every page a process maps, so the pages that forked workers share with the main
        # process, and the touched pages of memory-mapped Arrow files, are counted several times. PSS
        # splits each shared page among its sharers: its sum over the tree is the memory in use.
        nonlocal peak, peak_pss
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in tree))
            except (psutil.Error, OSError):
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    returncode = process.wait()
    done.set()
    sampler.join()
    if returncode:
        raise SystemExit(f"data_prep failed with exit code {returncode}")
    return {"seconds": time.perf_counter() - start, "peak_rss_gib": peak / 2**30,
            "peak_pss_gib": peak_pss / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=837_989)
    parser.add_argument("--shards", type=int, default=14)
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "data_prep_scale")
    tokenizer_choice.add_tokenizer_argument(parser)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--raw-fraction", type=float, default=1 / 14, help="share of shards timed for the raw rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "data_prep_scale.json")
    args = parser.parse_args()
    tokenizer = tokenizer_choice.tokenizer_dir(args.tokenizer)

    input_dir = args.workdir / f"input-{args.rows}-{args.seed}"
    start = time.perf_counter()
    if (input_dir / "intents.jsonl").exists() and (input_dir / "shards").is_dir():
        files, intents = sorted((input_dir / "shards").glob("*.parquet")), input_dir / "intents.jsonl"
    else:
        print(f"generating {args.rows} synthetic conversations in {args.shards} shards ...", flush=True)
        files, intents = generate(input_dir, args.rows, args.shards, args.seed)
    generate_seconds = time.perf_counter() - start

    raw = raw_tokenizer_rate(files, tokenizer, args.raw_fraction)
    print(f"raw tokenizer: {raw['tokens_per_s']:,.0f} tokens/s on {raw['tokens']:,} tokens", flush=True)
    input_tokens = raw["tokens"] / raw["fraction_of_input"] if raw["fraction_of_input"] < 1 else raw["tokens"]

    output_dir = args.workdir / "output"
    prep = run_data_prep(input_dir / "shards", intents, tokenizer, output_dir, args.num_proc)
    manifest = json.loads((output_dir / "manifest.json").read_text())
    examples_tokens = sum(s["tokens"] for s in manifest["token_statistics"].values())
    result = {
        "rows": args.rows, "tokenizer": args.tokenizer, "num_proc": args.num_proc, "cpu_count": os.cpu_count(),
        "generate_seconds": round(generate_seconds, 1),
        "data_prep_seconds": round(prep["seconds"], 1),
        "conversations_per_s": round(args.rows / prep["seconds"], 1),
        "input_tokens_estimated": int(input_tokens),
        "end_to_end_input_tokens_per_s": round(input_tokens / prep["seconds"]),
        "raw_tokenizer_tokens_per_s": round(raw["tokens_per_s"]),
        "end_to_end_vs_raw": round(input_tokens / prep["seconds"] / raw["tokens_per_s"], 3),
        "example_tokens_written": examples_tokens,
        "peak_rss_gib": round(prep["peak_rss_gib"], 2),
        "peak_pss_gib": round(prep["peak_pss_gib"], 2),
        "funnel": manifest["counts"],
        "goals": {"seconds": 600, "peak_rss_gib": 6, "end_to_end_vs_raw": 0.5},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("rows", "data_prep_seconds", "conversations_per_s", "end_to_end_input_tokens_per_s",
                "raw_tokenizer_tokens_per_s", "end_to_end_vs_raw", "example_tokens_written", "peak_rss_gib",
                "peak_pss_gib"):
        print(f"{key:>32}: {result[key]:,}" if not isinstance(result[key], float) else f"{key:>32}: {result[key]}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
