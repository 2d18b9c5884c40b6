"""Perplexity throughput: per_turn (the paper's one sample per target) vs per_conversation.

    python benchmarks/ppl_throughput.py                                   # tiny model, CPU
    python benchmarks/ppl_throughput.py --model random-1b --device cuda   # a Llama-3.2-1B-shaped random model, bf16

Scores the same conversations (data_prep output, `--split`) both ways with evaluate.protocols and
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
from data_prep.chat_format import PAD_TOKEN
from evaluate.metrics import summary
from evaluate.protocols import make_protocol
from evaluate.scoring import score_examples

# Llama-3.2-1B's shape (its config.json), randomly initialised: the speed of a real 1B model.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                max_position_embeddings=8192)


def load_model(name: str, dtype: torch.dtype, device: str):
    if name == "random-1b":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(dtype)
        return model.to(device).eval()
    return runtime.load_causal_lm(name, dtype, device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("outputs/tiny/data/wildchat"))
    parser.add_argument("--split", default="train", help="the sample's train split: the most conversations")
    parser.add_argument("--model", default="outputs/tiny/model", help="a model directory, or random-1b")
    parser.add_argument("--device", default="auto", help="auto: cuda when present, else cpu (core.runtime)")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 (core.runtime)")
    parser.add_argument("--limit", type=int, default=None, help="first N conversations (a quick check)")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--max-tokens-per-batch", type=int, default=16384)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/ppl_throughput-<model>-<device>.json")
    args = parser.parse_args()
    args.device = str(runtime.resolve_device(args.device))
    dtype = runtime.resolve_dtype(args.dtype, args.device)

    conversations = load_conversations(args.data_dir, args.split, args.limit).to_list()
    tokenizer = AutoTokenizer.from_pretrained(args.data_dir / "tokenizer")
    model = load_model(args.model, dtype, args.device)
    in_vocabulary = tokenizer.convert_tokens_to_ids("<|endconversation|>") < model.get_input_embeddings().num_embeddings
    protocol = make_protocol("userlm", tokenizer, end_token="token" if in_vocabulary else "plain_text",
                             pad_token=PAD_TOKEN)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {parameters:,} parameters, {dtype} on {args.device}; {len(conversations)} conversations "
          f"of {args.data_dir}/{args.split}; max_seq_len {args.max_seq_len}, {args.max_tokens_per_batch} tokens/batch")

    report = {"model": args.model, "parameters": parameters, "device": args.device, "dtype": str(dtype),
              "conversations": len(conversations), "max_seq_len": args.max_seq_len,
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
    out = args.out or Path("benchmarks/results") / f"ppl_throughput-{Path(args.model).name}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
