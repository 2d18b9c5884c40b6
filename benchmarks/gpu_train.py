"""Training throughput of the real `accelerate launch train/run.py` path: tokens/s and MFU.

    # one H100/H200: a random Llama-3.2-1B-shaped model (1.24B parameters), rows of 2048 tokens,
    # bf16, ZeRO-3, packed synthetic conversations; ~3-5 minutes including setup
    python benchmarks/gpu_train.py
    python benchmarks/gpu_train.py --deepspeed conf/deepspeed/zero2.json --micro-batch-size 8 --gradient-checkpointing
    # the same path on CPU at a tiny size (2 processes, gloo): checks the script, no MFU
    python benchmarks/gpu_train.py --tiny

Builds everything offline under --work: the tiny BPE tokenizer (token ids stay below its ~2k
vocabulary; the model still computes all 128,256 logits, as Llama-3 does), the random model,
synthetic WildChat rows through data_prep (per_conversation), then runs train/run.py for --steps
optimizer steps (epochs repeat as needed) and reports the median tokens/s and MFU over the steps
after --skip. MFU counts 6 FLOPs per matmul parameter per token plus causal attention (see
train.metrics.training_flops), against the GPU's dense bf16 peak. Writes <work>/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (hidden, intermediate, layers, heads, kv heads, vocab or None for the tokenizer's, tied)
SHAPES = {"1b": (2048, 8192, 16, 32, 8, 128256, True),      # Llama-3.2-1B
          "tiny": (64, 172, 2, 4, 2, None, False)}


def build_assets(work: Path, shape: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from scripts.make_tiny_assets import build_tokenizer, sample_texts
    tokenizer = build_tokenizer(sample_texts(REPO / "data_prep/sample"), vocab_size=2048)
    tokenizer.save_pretrained(work / "tokenizer")
    hidden, intermediate, layers, heads, kv_heads, vocab, tied = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=tied,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if shape != "tiny" else torch.float32)
    model.save_pretrained(work / "model")
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters ({shape})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, 2 processes")
    parser.add_argument("--work", type=Path, default=REPO / "outputs/bench/gpu_train")
    parser.add_argument("--wildchat-rows", type=int, default=5000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the medians (warm-up)")
    parser.add_argument("--deepspeed", default="conf/deepspeed/zero3.json")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn", default="auto", help="model.attn_implementation (auto, sdpa, flash_attention_2, ...)")
    args = parser.parse_args()
    if args.tiny:
        args.seq_len, args.micro_batch_size, args.global_batch_size, args.steps, args.skip = 512, 2, 8, 4, 1
    work = args.work / ("tiny" if args.tiny else "1b")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    python = sys.executable

    # ---- assets: tokenizer, random model, packed synthetic data ---------------------------------
    if not (work / "model/config.json").exists():
        build_assets(work, "tiny" if args.tiny else "1b")
    data = work / f"data_{args.seq_len}"
    if not (data / "COMPLETED").exists():
        sample = work / "sample"
        rows = ["--wildchat-rows", str(300 if args.tiny else args.wildchat_rows)]
        subprocess.run([python, "scripts/make_sample.py", "--out", str(sample), *rows], cwd=REPO, env=env, check=True)
        subprocess.run([python, "-m", "data_prep", "experiment=tiny", f"data.source={sample / 'wildchat.parquet'}",
                        f"intents.path={sample / 'intents.jsonl'}", f"tokenizer.name_or_path={work / 'tokenizer'}",
                        "flip.mode=per_conversation", f"max_seq_len={args.seq_len}", f"output_dir={data}"],
                       cwd=REPO, env=env, check=True)

    # ---- train through the real entry point ------------------------------------------------------
    output_dir = work / "train"
    accelerate_config = "conf/accelerate/cpu.yaml" if args.tiny else "conf/accelerate/1gpu.yaml"
    command = [python, "-m", "accelerate.commands.launch", "--config_file", accelerate_config, "train/run.py",
               "experiment=tiny", f"data.path={data}", f"model.name_or_path={work / 'model'}",
               f"data.max_seq_len={args.seq_len}", "data.packing=true", f"train.global_batch_size={args.global_batch_size}",
               f"train.micro_batch_size={args.micro_batch_size}", f"train.max_steps={args.steps}", "train.eval_every=0",
               "train.save_every=0", "train.resume=null", "optimizer.lr=2e-5", f"deepspeed={args.deepspeed}",
               f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
               f"model.attn_implementation={args.attn}", "wandb.mode=disabled", f"output_dir={output_dir}"]
    subprocess.run(["rm", "-rf", str(output_dir)], check=True)
    print(" ".join(command))
    subprocess.run(command, cwd=REPO, env=env, check=True)

    # ---- report ---------------------------------------------------------------------------------
    run_info = json.loads((output_dir / "run_info.json").read_text())
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "loss" in r and r["step"] > args.skip]
    result = {
        "setup": run_info["setup"], "seq_len": args.seq_len, "deepspeed": args.deepspeed,
        "steps_measured": len(measured),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in measured),
        "tokens_per_s_per_device": statistics.median(r["tokens_per_s"] for r in measured) / run_info["setup"]["processes"],
        "mfu": statistics.median(r["mfu"] for r in measured) if all("mfu" in r for r in measured) else None,
        "packing_efficiency": statistics.median(r["packing_efficiency"] for r in measured),
        "step_seconds": statistics.median(r["step_seconds"] for r in measured),
    }
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no GPU peak known)"
    print(f"{run_info['setup']['parameters']:,} parameters, {run_info['setup']['device']}, "
          f"{run_info['setup']['attention']} attention, ZeRO-{run_info['setup']['deepspeed_zero_stage']}: "
          f"{result['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, packing {100 * result['packing_efficiency']:.1f}%, "
          f"{result['step_seconds']:.2f} s/step (median of {len(measured)} steps) -> {work / 'result.json'}")


if __name__ == "__main__":
    main()
