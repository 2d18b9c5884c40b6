"""Perplexity throughput: per_turn (the paper's one sample per target) vs per_conversation.

    python benchmarks/ppl_throughput.py                                   # tiny model, Llama-3's tokenizer, CPU
    python benchmarks/ppl_throughput.py --tokenizer tiny                  # the sample's 2k BPE instead
    python benchmarks/ppl_throughput.py --model random-1b --device cuda   # a Llama-3.2-1B-shaped random model, bf16

The data is data_prep's output of the embedded sample made with `--tokenizer` (llama3 by default:
Meta-Llama-3-8B's real vocabulary, benchmarks/tokenizer_choice.py), or `--data-dir` (with its own
tokenizer). The default model, random-tiny, is make_tiny_assets' random tiny Llama over that
tokenizer's base vocabulary (no row for <|endconversation|>, as Llama-3-8B base: the end target
is scored as plain text). Scores the same conversations (`--split`) both ways with evaluate.protocols and
evaluate.scoring, and prints and writes (--out) per mode: examples, target tokens, forward tokens
(real and padded), seconds, target tokens/s, and the perplexity (the two agree when nothing is
truncated; a random model's perplexity is only a consistency check). Goal: per_conversation needs
<= 0.4x the forward tokens of per_turn. Timings are not assertions: tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from core import runtime
from core.prepared import load_conversations
from benchmarks.tokenizer_choice import add_tokenizer_argument, prepared_sample
from data_prep.chat_format import END_CONVERSATION, PAD_TOKEN
from evaluate.metrics import summary
from evaluate.protocols import make_protocol
from evaluate.scoring import score_examples
from scripts.make_tiny_assets import build_model

# Llama-3.2-1B's shape (its config.json), randomly initialised: the speed of a real 1B model.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=8192)


def load_model(name: str, dtype: torch.dtype, device: str, tokenizer):
    """random-1b, random-tiny (over `tokenizer`'s vocabulary before data_prep added
    <|endconversation|>, its last token), or a model directory."""
    if name in ("random-1b", "random-tiny"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)) if name == "random-1b" else build_model(
            tokenizer, hidden=64, layers=2, seed=0, vocab_size=tokenizer.convert_tokens_to_ids(END_CONVERSATION))
        return model.to(dtype).to(device).eval()
    return runtime.load_causal_lm(name, dtype, device)


def data_dir_and_tokenizer(args):
    """--data-dir with its tokenizer, or the sample prepared with --tokenizer (default llama3); and
    the tokenizer's name for the results file ("data" for --data-dir's)."""
    if args.data_dir is not None:
        if args.tokenizer is not None:
            raise SystemExit("--data-dir brings its own tokenizer (<data dir>/tokenizer): drop --tokenizer")
        data_dir, name = args.data_dir, "data"
    else:
        data_dir, name = prepared_sample(args.tokenizer or "llama3"), Path(args.tokenizer or "llama3").name
    return data_dir, AutoTokenizer.from_pretrained(data_dir / "tokenizer"), name


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_argument(parser, default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="a data_prep output (default: the sample, "
                        "prepared with --tokenizer)")
    parser.add_argument("--split", default="train", help="the sample's train split: the most conversations")
    parser.add_argument("--model", default="random-tiny", help="a model directory, random-tiny or random-1b")
    parser.add_argument("--device", default="auto", help="auto: cuda when present, else cpu (core.runtime)")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 (core.runtime)")
    parser.add_argument("--limit", type=int, default=None, help="first N conversations (a quick check)")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--max-tokens-per-batch", type=int, default=None,
                        help="padded tokens per forward pass (default: 16384 on a GPU, 4096 on CPU: the logits "
                             "of 16384 tokens over Llama-3's vocabulary are 8 GiB in float32)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/ppl_throughput-<model>-<tokenizer>-<device>.json")
    args = parser.parse_args()
    args.device = str(runtime.resolve_device(args.device))
    dtype = runtime.resolve_dtype(args.dtype, args.device)

    if args.max_tokens_per_batch is None:
        args.max_tokens_per_batch = 16384 if args.device.startswith("cuda") else 4096
    data_dir, tokenizer, tokenizer_name = data_dir_and_tokenizer(args)
    conversations = load_conversations(data_dir, args.split, args.limit).to_list()
    model = load_model(args.model, dtype, args.device, tokenizer)
    in_vocabulary = tokenizer.convert_tokens_to_ids(END_CONVERSATION) < model.get_input_embeddings().num_embeddings
    protocol = make_protocol("userlm", tokenizer, end_token="token" if in_vocabulary else "plain_text",
                             pad_token=PAD_TOKEN)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {parameters:,} parameters, {dtype} on {args.device}; {len(conversations)} conversations "
          f"of {data_dir}/{args.split} ({len(tokenizer)} tokens); max_seq_len {args.max_seq_len}, {args.max_tokens_per_batch} tokens/batch")

    report = {"model": args.model, "parameters": parameters, "device": args.device, "dtype": str(dtype),
              "data_dir": str(data_dir), "tokenizer_size": len(tokenizer), "conversations": len(conversations), "max_seq_len": args.max_seq_len,
              "max_tokens_per_batch": args.max_tokens_per_batch, "modes": {}}
    for mode in ("per_turn", "per_conversation"):
        examples = [e for c in conversations
                    for e in protocol.examples(c["intent"], c["turns"], c["ended"], mode, args.max_seq_len)]
        ids, labels = [e.input_ids for e in examples], [e.labels for e in examples]
        score_examples(model, ids[:2], labels[:2], args.max_tokens_per_batch, args.max_batch_size, progress=False)
        synchronize(args.device)
        start = time.perf_counter()
        scores = score_examples(model, ids, labels, args.max_tokens_per_batch, args.max_batch_size)
        synchronize(args.device)
        seconds = time.perf_counter() - start
        stats = summary(scores.nll)
        report["modes"][mode] = {
            "examples": len(examples), "truncated_examples": sum(e.truncated for e in examples),
            "target_tokens": stats["target_tokens"], "forward_tokens": scores.forward_tokens,
            "padded_tokens": scores.padded_tokens, "seconds": round(seconds, 3),
            "target_tokens_per_s": round(stats["target_tokens"] / seconds, 1),
            "forward_tokens_per_s": round(scores.forward_tokens / seconds, 1), "ppl": stats["ppl"]}
        print(f"{mode:>16}: {json.dumps(report['modes'][mode])}")
    turn, conversation = report["modes"]["per_turn"], report["modes"]["per_conversation"]
    report["forward_token_ratio"] = round(conversation["forward_tokens"] / turn["forward_tokens"], 3)
    report["speedup"] = round(turn["seconds"] / conversation["seconds"], 2)
    report["ppl_relative_difference"] = abs(conversation["ppl"] - turn["ppl"]) / turn["ppl"]
    print(f"per_conversation / per_turn forward tokens: {report['forward_token_ratio']} (goal <= 0.4); "
          f"speedup {report['speedup']}x; PPL relative difference {report['ppl_relative_difference']:.2e}")
    out = args.out or Path("benchmarks/results") / f"ppl_throughput-{Path(args.model).name}-{tokenizer_name}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
