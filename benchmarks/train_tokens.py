"""Tokens one training epoch processes: per-turn samples (the paper's) vs whole conversations packed.

    python benchmarks/train_tokens.py                           # the embedded sample (seconds)
    python benchmarks/train_tokens.py --wildchat-rows 20000     # synthetic WildChat-scale rows (minutes)
    python benchmarks/train_tokens.py --tokenizer tiny          # the sample's 2k BPE instead of Llama-3's

Runs data_prep twice on the same conversations (flip.mode=per_turn and per_conversation, with
`--tokenizer`: llama3 by default, Meta-Llama-3-8B's real tokenizer, benchmarks/tokenizer_choice.py;
or tiny, the sample's BPE), then counts, for the train split, the tokens a model
processes in one epoch under train/run.py's batching:
    per_turn padded to max_seq_len   every sample a fixed-length row (as the paper's samples)
    per_turn, dynamic padding        one sample per row, rows padded to the longest of a micro batch
    per_turn packed                  per-turn samples packed into max_seq_len rows
    per_conversation packed          each conversation once (every user turn a target), packed
Same target tokens in every layout (checked). Goal: per_conversation packed <= 0.4x per_turn (even
with dynamic padding, the cheaper reading of "padded"), packing efficiency (non-pad / processed) >= 98%. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.tokenizer_choice import add_tokenizer_argument, tokenizer_dir  # noqa: E402
from data_prep.pipeline import run as run_data_prep  # noqa: E402
from scripts.hydra_compose import compose_config  # noqa: E402
from scripts.make_tiny_assets import SAMPLE_DIR as SAMPLE  # noqa: E402
from train.data import BatchArithmetic, Plan, load_split, make_rows  # noqa: E402


def prepare(source: Path, intents: Path, tokenizer: Path, mode: str, max_seq_len: int, out: Path) -> Path:
    cfg = compose_config("data_prep", [
        "experiment=tiny", f"data.source={source}", f"intents.path={intents}", f"tokenizer.name_or_path={tokenizer}",
        f"flip.mode={mode}", f"max_seq_len={max_seq_len}", f"output_dir={out}", "batch_size=1000"])
    return run_data_prep(cfg)


def epoch_tokens(data_dir: Path, max_seq_len: int, packing: bool, micro_batch_size: int, global_batch_size: int) -> dict:
    split = load_split(data_dir, "train", None, max_seq_len)
    rows = make_rows(split.lengths, max_seq_len, packing)
    plan = Plan(split, rows, BatchArithmetic(1, micro_batch_size, max(1, min(global_batch_size, len(rows)) // micro_batch_size)),
                seed=0, max_seq_len=max_seq_len)
    stats = plan.epoch_statistics()
    # Scale the planned (whole-batch) steps up to the full split, so a left-over partial batch does not
    # make one layout look cheaper: tokens per row planned x all rows.
    scale = len(rows) / (plan.steps_per_epoch * plan.arithmetic.global_batch_size)
    return {"examples": len(split.lengths), "rows": len(rows), "tokens": int(split.lengths.sum()),
            "target_tokens": int(split.targets.sum()), "processed_tokens": round(stats["padded_tokens_per_epoch"] * scale),
            "packing_efficiency": stats["packing_efficiency"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wildchat-rows", type=int, default=None,
                        help="generate this many synthetic WildChat rows (scripts/make_sample.py) instead of the sample")
    add_tokenizer_argument(parser)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=REPO / "results/train_tokens.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        source, intents = SAMPLE / "wildchat.parquet", SAMPLE / "intents.jsonl"
        if args.wildchat_rows:
            subprocess.run([sys.executable, str(REPO / "scripts/make_sample.py"), "--out", str(work / "sample"),
                            "--wildchat-rows", str(args.wildchat_rows)], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
            source, intents = work / "sample/wildchat.parquet", work / "sample/intents.jsonl"
        tokenizer = tokenizer_dir(args.tokenizer)
        data = {mode: prepare(source, intents, tokenizer, mode, args.max_seq_len, work / mode)
                for mode in ("per_turn", "per_conversation")}
        batching = (args.micro_batch_size, args.global_batch_size)
        turn_padded = epoch_tokens(data["per_turn"], args.max_seq_len, False, *batching)
        turn_packed = epoch_tokens(data["per_turn"], args.max_seq_len, True, *batching)
        conversation_packed = epoch_tokens(data["per_conversation"], args.max_seq_len, True, *batching)

    fixed = turn_padded["examples"] * args.max_seq_len
    layouts = {
        "per_turn padded to max_seq_len": {**turn_padded, "processed_tokens": fixed,
                                           "packing_efficiency": turn_padded["tokens"] / fixed},
        "per_turn, dynamic padding": turn_padded,
        "per_turn packed": turn_packed,
        "per_conversation packed": conversation_packed,
    }
    if len({v["target_tokens"] for v in layouts.values()}) != 1:
        print("note: target tokens differ between layouts (windows cut differently at max_seq_len)")
    print(f"source: {'synthetic ' + str(args.wildchat_rows) + ' rows' if args.wildchat_rows else 'embedded sample'}; "
          f"tokenizer {args.tokenizer}; max_seq_len {args.max_seq_len}; train split; processed tokens, and as a fraction of per_turn's")
    print(f"{'layout':32} {'examples':>9} {'rows':>7} {'processed':>11} {'x padded':>9} {'x dynamic':>9} "
          f"{'x unpadded':>10} {'efficiency':>10} {'targets':>9}")
    for name, v in layouts.items():
        v["vs_per_turn_padded"] = v["processed_tokens"] / fixed
        v["vs_per_turn_dynamic"] = v["processed_tokens"] / turn_padded["processed_tokens"]
        v["vs_per_turn_unpadded"] = v["processed_tokens"] / turn_padded["tokens"]
        print(f"{name:32} {v['examples']:>9} {v['rows']:>7} {v['processed_tokens']:>11} {v['vs_per_turn_padded']:>9.3f} "
              f"{v['vs_per_turn_dynamic']:>9.3f} {v['vs_per_turn_unpadded']:>10.3f} "
              f"{100 * v['packing_efficiency']:>9.1f}% {v['target_tokens']:>9}")
    goal = (conversation_packed["vs_per_turn_dynamic"] <= 0.4 and conversation_packed["packing_efficiency"] >= 0.98)
    print("goal (per_conversation packed <= 0.4x per_turn with dynamic padding, efficiency >= 98%): "
          f"{'met' if goal else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"wildchat_rows": args.wildchat_rows, "tokenizer": args.tokenizer,
                                    "max_seq_len": args.max_seq_len,
                                    "layouts": layouts, "goal_met": goal}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
