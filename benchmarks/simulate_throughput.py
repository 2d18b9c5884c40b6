"""User-simulation throughput: conversations per minute, batched vs one conversation at a time.

    python benchmarks/simulate_throughput.py                                   # tiny model, Llama-3's tokenizer, CPU
    python benchmarks/simulate_throughput.py --tokenizer tiny                  # the sample's 2k BPE instead
    python benchmarks/simulate_throughput.py --model random-1b --device cuda   # Llama-3.2-1B-shaped random model, bf16

The intents and the tokenizer come from data_prep's output of the sample made with `--tokenizer`
(llama3 by default: every step samples from Meta-Llama-3-8B's 128,257 logits), or `--data-dir`;
the models are benchmarks/ppl_throughput.py's (random-tiny by default).

The same conversations are simulated twice with evaluate.simulator: `--batch-size` conversations in
flight (one generate call per round for all of them), then one at a time (batch size 1). The user
LM is the workload: the assistant is scripted (a fixed reply, no model), every conversation runs
`--turns` user turns (ending is not allowed before), every turn samples `--max-new-tokens` tokens
(a random model rarely stops earlier) with the card's sampling, and all four guardrails are on
with no retries (their checks cost the same in both runs; a random model's turns would otherwise
be resampled a variable number of times). Prints and writes (--out) conversations per minute,
user turns and generated tokens per second, and the speedup. Goal: batched >= 5x one at a time at
batch 32. Timings are not assertions: tests never time anything.

The served backend (evaluate.served, `user_model.backend=openai`) runs the same conversations
against an OpenAI-compatible completions server in front of the same model, at 1, 8 and 32
conversations in flight (`--in-flight`), one candidate a request; each as a ratio to the local
batched run. Here the server is scripts/completions_server.py (a process of its own, batching the
requests that wait): the figure measures the HTTP path and our client, not vLLM. With a GPU:

    vllm serve <model dir> --port 8000 &
    python benchmarks/simulate_throughput.py --model <model dir> --device cuda --served-url http://localhost:8000/v1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.ppl_throughput import data_dir_and_tokenizer, load_model, synchronize  # the same models and data
from benchmarks.tokenizer_choice import add_tokenizer_argument
from core import runtime
from core.prepared import load_conversations
from data_prep.chat_format import PAD_TOKEN
from evaluate.assistants import ScriptedAssistant
from evaluate.protocols import make_protocol
from evaluate.served import ServedTurnSampler
from evaluate.simulate_config import ServedUserConfig
from evaluate.simulator import GuardrailSettings, SamplingSettings, UserSimulator, simulate_conversations

REPO = Path(__file__).resolve().parents[1]


def simulate(model, tokenizer, items, batch_size: int, turns: int, max_new_tokens: int, device: str,
             served_url: str | None = None) -> dict:
    """`batch_size` conversations in flight, on the local model, or on the server at `served_url`."""
    protocol = make_protocol("userlm", tokenizer, end_token="token", pad_token=PAD_TOKEN)
    sampling = SamplingSettings(max_new_tokens=max_new_tokens)
    sampler = None if served_url is None else ServedTurnSampler(
        ServedUserConfig(base_url=served_url, model="benchmark", concurrency=batch_size, candidates=1), tokenizer,
        sampling)
    simulator = UserSimulator(model, protocol, sampling, GuardrailSettings(max_retries=0), batch_size, sampler=sampler)
    torch.manual_seed(0)
    synchronize(device)
    start = time.perf_counter()
    records = list(simulate_conversations(simulator, ScriptedAssistant(["Sure, go on."]), items, max_user_turns=turns,
                                          end_allowed_after=turns + 1, pool_size=batch_size))
    synchronize(device)
    seconds = time.perf_counter() - start
    user_turns = [t for r in records for t in r["turns"] if t["role"] == "user"]
    tokens = sum(t["tokens"] for t in user_turns)
    return {"batch_size": batch_size, "conversations": len(records), "user_turns": len(user_turns),
            "seconds": round(seconds, 3), "conversations_per_minute": round(60 * len(records) / seconds, 2),
            "user_turns_per_s": round(len(user_turns) / seconds, 2), "generated_tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_argument(parser, default=None)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data_prep output: its tokenizer and its intents (default: the sample, prepared with --tokenizer)")
    parser.add_argument("--model", default="random-tiny", help="a model directory, random-tiny or random-1b")
    parser.add_argument("--device", default="auto", help="auto: cuda when present, else cpu (core.runtime)")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 (core.runtime)")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 avoids OpenMP stalls on a shared machine")
    parser.add_argument("--in-flight", default="1,8,32", help="served backend: conversations in flight, each a run")
    parser.add_argument("--served-url", default=None,
                        help="a running server's /v1 (vLLM); default: scripts/completions_server.py on the model")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/simulate_throughput-<model>-<tokenizer>-<device>.json")
    args = parser.parse_args()
    args.device = str(runtime.resolve_device(args.device))
    dtype = runtime.resolve_dtype(args.dtype, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    data_dir, tokenizer, tokenizer_name = data_dir_and_tokenizer(args)
    model = load_model(args.model, dtype, args.device, tokenizer)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    intents = load_conversations(data_dir, "train")["intent"]
    items = [{"id": str(i), "intent": intents[i % len(intents)]} for i in range(args.conversations)]
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {parameters:,} parameters, {dtype} on {args.device}; {len(items)} conversations x "
          f"{args.turns} user turns x {args.max_new_tokens} new tokens")

    simulate(model, tokenizer, items[:2], 2, 1, 4, args.device)  # warm-up
    report = {"model": args.model, "parameters": parameters, "device": args.device, "dtype": str(dtype),
              "data_dir": str(data_dir), "tokenizer_size": len(tokenizer), "threads": torch.get_num_threads(),
              "turns": args.turns, "max_new_tokens": args.max_new_tokens, "runs": {}}
    for name, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
        report["runs"][name] = simulate(model, tokenizer, items, batch_size, args.turns, args.max_new_tokens,
                                        args.device)
        print(f"{name:>14}: {json.dumps(report['runs'][name])}")
    report["speedup"] = round(report["runs"]["one_at_a_time"]["seconds"] / report["runs"]["batched"]["seconds"], 2)
    print(f"batched (batch {args.batch_size}) / one at a time: {report['speedup']}x (goal >= 5x)")
    with tempfile.TemporaryDirectory() as served_model:
        server = None
        if args.served_url is None:   # the same weights and tokenizer behind scripts/completions_server.py
            model.save_pretrained(served_model)
            tokenizer.save_pretrained(served_model)
            server = subprocess.Popen([sys.executable, "-m", "scripts.completions_server", "--model", served_model],
                                      cwd=REPO, stdout=subprocess.PIPE, text=True)
        url = args.served_url or server.stdout.readline().strip()
        try:
            simulate(model, tokenizer, items[:2], 2, 1, 4, args.device, url)  # warm-up (the model: its context only)
            for in_flight in map(int, args.in_flight.split(",")):
                run = simulate(model, tokenizer, items, in_flight, args.turns, args.max_new_tokens, args.device, url)
                run["vs_local_batched"] = round(run["conversations_per_minute"] /
                                                report["runs"]["batched"]["conversations_per_minute"], 3)
                report["runs"][f"served_{in_flight}_in_flight"] = run
                print(f"served, {in_flight:>2} in flight: {json.dumps(run)}")
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    out = args.out or (Path("benchmarks/results") /
                       f"simulate_throughput-{Path(args.model).name}-{tokenizer_name}-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
