"""Throughput of intent generation against a local OpenAI-compatible server with injected latency.

    python benchmarks/intents_throughput.py                       # 64 in flight, 200 ms per request
    python benchmarks/intents_throughput.py --requests 6000 --concurrency 128 --latency 0.2

The server (scripts/openai_server.py) runs in its own process and sleeps `latency` before each reply,
so the best possible rate is concurrency / latency (64 / 0.2 s = 320 requests/s). Measured:
  1. client:  LLMClient.complete_many alone (HTTP, JSON, concurrency control);
  2. stage:   the whole intents stage (generate_intents: prompts from conversations, requests,
              output checks, one fsynced store line per intent, progress bar, report) on copies of
              the sample's conversations with distinct hashes;
  3. store:   JsonlWriter.append alone, rows/s, as configured and with an fsync per row.
Prints the numbers and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets  # noqa: E402
import psutil  # noqa: E402

from core import jsonl  # noqa: E402
from core.jsonl import JsonlWriter  # noqa: E402
from core.llm_client import LLMClient  # noqa: E402
from data_prep.intents.generate import generate_intents  # noqa: E402
from scripts.hydra_compose import compose_config  # noqa: E402
from scripts.make_tiny_assets import SAMPLE_DIR as SAMPLE  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "scripts.openai_server", "--latency", str(latency)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    return server, server.stdout.readline().strip()


def intents_config(base_url: str, store: Path, concurrency: int):
    return compose_config("data_prep", [
        "experiment=tiny", f"intents.path={store}", "intents.backend=openai", f"intents.openai.base_url={base_url}",
        "intents.openai.model=bench-model", f"intents.openai.concurrency={concurrency}"]).intents


def synthetic_conversations(n: int) -> datasets.Dataset:
    """n conversations: the sample's, repeated, each with its own hash (so each is its own request)."""
    import pyarrow.parquet as pq
    sample = pq.read_table(SAMPLE / "wildchat.parquet", columns=["conversation"]).column("conversation").to_pylist()
    turns = [[{"role": t["role"], "content": t["content"]} for t in c] for c in sample]
    return datasets.Dataset.from_dict({"conversation_hash": [f"bench-{i:08d}" for i in range(n)],
                                       "turns": [turns[i % len(turns)] for i in range(n)]})


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def bench_client(client_cfg, requests: int) -> dict:
    async def main():
        async with LLMClient(client_cfg) as client:
            messages = [[{"role": "user", "content": f"request {i}"}] for i in range(requests)]
            started, cpu = time.monotonic(), time.process_time()
            failed = 0
            async for _, result in client.complete_many(messages, max_tokens=64):
                failed += not hasattr(result, "text")
            return time.monotonic() - started, time.process_time() - cpu, failed
    wall, cpu, failed = asyncio.run(main())
    return {"requests": requests, "failed": failed, "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 1),
            "client_cpu_ms_per_request": round(1000 * cpu / requests, 3)}


def store_rate(path: Path, rows: int) -> dict:
    row = {"conversation_hash": "x" * 32, "intent": "You are a user chatting with an assistant language model to "
           "get help planning a trip.", "prompt_version": "v1", "prompt_sha": "0" * 16, "model": "bench-model"}
    with JsonlWriter(path) as writer:
        started = time.monotonic()
        for i in range(rows):
            writer.append({**row, "conversation_hash": f"{i:032d}"})
        wall = time.monotonic() - started
    return {"rows": rows, "wall_s": round(wall, 3), "rows_per_s": round(rows / wall, 1),
            "ms_per_row": round(1000 * wall / rows, 3)}


def bench_store(directory: Path, rows: int) -> dict:
    """The store as configured (a write per row, fsync every FSYNC_INTERVAL_S), and for comparison
    with an fsync after every row."""
    results = {"fsync_interval_s": jsonl.FSYNC_INTERVAL_S, **store_rate(directory / "store_bench.jsonl", rows)}
    interval, jsonl.FSYNC_INTERVAL_S = jsonl.FSYNC_INTERVAL_S, 0.0
    try:
        results["fsync_every_row"] = store_rate(directory / "store_bench_fsync.jsonl", max(50, rows // 20))
    finally:
        jsonl.FSYNC_INTERVAL_S = interval
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--store-rows", type=int, default=5000)
    parser.add_argument("--out", default="outputs/benchmarks/intents_throughput.json")
    args = parser.parse_args()
    limit = args.concurrency / args.latency

    server, base_url = start_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = intents_config(base_url, Path(tmp) / "intents.jsonl", args.concurrency)
            client = bench_client(cfg.openai, args.requests)
            conversations = synthetic_conversations(args.requests)
            cpu, server_cpu = time.process_time(), cpu_seconds(server.pid)
            report = generate_intents(cfg, conversations)
            cpu, server_cpu = time.process_time() - cpu, cpu_seconds(server.pid) - server_cpu
            stage = {"conversations": report["conversations"], "done": report["done"],
                     "failed": report["failed_total"], "wall_s": report["wall_time_s"],
                     "requests_per_s": round(report["done"] / report["wall_time_s"], 1),
                     "client_cpu_ms_per_request": round(1000 * cpu / report["conversations"], 3),
                     "server_cpu_ms_per_request": round(1000 * server_cpu / report["conversations"], 3)}
            store_results = bench_store(Path(tmp), args.store_rows)
    finally:
        server.kill()
        server.wait()

    results = {
        "concurrency": args.concurrency, "latency_s": args.latency, "limit_requests_per_s": limit,
        "client": {**client, "fraction_of_limit": round(client["requests_per_s"] / limit, 3)},
        "stage": {**stage, "fraction_of_limit": round(stage["requests_per_s"] / limit, 3)},
        "store": store_results,
        "hours_for_384k_intents_at_stage_rate": round(384_336 / stage["requests_per_s"] / 3600, 2),
        "machine": {"cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(), "platform": platform.platform()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"limit {limit:.0f} requests/s ({args.concurrency} in flight / {args.latency} s latency)")
    print(f"client: {client['requests_per_s']} requests/s = {results['client']['fraction_of_limit']:.0%} of the limit")
    print(f"stage:  {stage['requests_per_s']} intents/s = {results['stage']['fraction_of_limit']:.0%} of the limit "
          f"({stage['done']} done, {stage['failed']} failed); 384,336 intents would take "
          f"{results['hours_for_384k_intents_at_stage_rate']} h at this rate")
    print(f"CPU per request: client {stage['client_cpu_ms_per_request']} ms, server {stage['server_cpu_ms_per_request']} ms "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"store:  {store_results['rows_per_s']} rows/s (fsync every {store_results['fsync_interval_s']} s); "
          f"with an fsync per row: {store_results['fsync_every_row']['rows_per_s']} rows/s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
