"""data_prep at WildChat-1M scale on this machine, against its real limit: wall time per stage,
memory (anonymous apart from file-backed), inside a memory cap, and a warm rerun.

    python benchmarks/data_prep_scale.py                       # N = 837,989 (WildChat-1M's row count)
    python benchmarks/data_prep_scale.py --rows 100000         # a quicker run
    python benchmarks/data_prep_scale.py --memory-cap-gib 6    # inside a 6 GiB memory cgroup
    python benchmarks/data_prep_scale.py --flip-mode per_conversation --warm-rerun
    python benchmarks/data_prep_scale.py --tokenizer tiny      # the sample's 2k BPE instead of Llama-3's

Input: N synthetic conversations in WildChat-1M's exact parquet schema (14 shards, like the hub's),
an intent for each. Lengths follow WildChat-1M's published statistics: about 2.5 user turns per
conversation (geometric, and 1% long conversations of 10 to 60 turns, so a long tail that
max_seq_len truncates), user turns lognormal around 20 words with a tail of pastes, replies
around 150 words; 57% English; 3% exact duplicates; and 20% of conversations open with one of
N/500 pasted templates (Zipf-popular, the same first 10 words, then their own text), which the
near-duplicate step removes, as the paper's removed about 20% of English conversations.

The limit: the bare fast tokenizer (`backend_tokenizer.encode_batch`, all cores) on exactly the
text data_prep must tokenize, every message and intent of the kept conversations (read back from
the output's `conversations/`, as data_prep tokenizes them: "\\n" + text), timed in the same run
after data_prep has finished. data_prep's wall time and each stage's (from its `data_prep stage`
log lines) are reported as multiples of it. Goal: total <= 1.3x. `--limit-every K` times one chunk
of 1,000 kept conversations in K and scales by characters (the full-N runs use K=4: the exact limit
takes as long as data_prep's tokenizing).

Memory, sampled every second over data_prep's whole process tree from /proc/<pid>/smaps_rollup:
`anon` is the sum of Pss_Anon (anonymous pages, each shared page divided among the processes
sharing it: what cannot be reclaimed), `file` the sum of Pss_File (file-backed pages, mostly the
memory-mapped Arrow files, which the kernel drops under pressure), and the main process's own
anonymous memory. With --memory-cap-gib the run happens inside a cgroup v1 memory cgroup
(/sys/fs/cgroup/memory/<name>, root only) capped at that size; the benchmark reports whether it
completed and the cgroup's memory.max_usage_in_bytes (which also counts page cache), then removes
the cgroup. Where no cgroup can be created it says so and runs uncapped.

CPU: the machine's /proc/stat at the start and at each stage's end (the benchmark runs alone, so
the machine's CPU is data_prep's): each stage's share of all cores' time busy (user and kernel
apart), waiting on I/O, idle, and stolen by the VM's host; the same over the limit's run. A stage
busy near 1.0 is slower than the limit by work, not by waiting; steal shows the host's share of the
drift between runs.

--warm-rerun runs data_prep a second time with the same cache and output directory (its own
complete output, which it replaces) and reports that time as a fraction of the first (goal < 10%).

Figures go to stdout and --json (benchmarks/results/data_prep_scale.json by default; the README's
benchmark table quotes them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.utils.py_utils import convert_file_size_to_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import tokenizer_choice  # noqa: E402
from core.artifacts import write_json  # noqa: E402
from data_prep.pipeline import STAGE_LOG_PREFIX, STAGES  # noqa: E402
from scripts.make_sample import SAMPLE_DIR, WildChatWriter  # noqa: E402
from scripts.make_tiny_assets import sample_texts  # noqa: E402

LANGUAGES = [("English", 0.57), ("Chinese", 0.15), ("Russian", 0.12), ("French", 0.04), ("Spanish", 0.04),
             ("Portuguese", 0.03), ("German", 0.03), ("Arabic", 0.02)]
MEAN_USER_TURNS = 2.2        # of the short conversations; with the long ones, about 2.5 overall
LONG_CONVERSATIONS = 0.01    # share of conversations with 10 to 60 user turns
TEMPLATED = 0.20             # share of conversations opening with a pasted template
ROWS_PER_TEMPLATE = 500
ENCODE_BATCH = 10_000
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
MAX_ROW_GROUP_BYTES = convert_file_size_to_int(datasets.config.MAX_ROW_GROUP_SIZE)
SAMPLE_SECONDS = 1.0   # reading smaps_rollup walks the page tables of each process: not too often
GOALS = {"seconds_vs_limit": 1.3, "memory_cap_gib": 6, "warm_vs_cold": 0.1}


def _words(rng: random.Random, vocabulary: list[str], median: float, sigma: float, cap: int) -> str:
    n = max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))
    return " ".join(rng.choices(vocabulary, k=n))


def _user_turns(rng: random.Random) -> int:
    if rng.random() < LONG_CONVERSATIONS:
        return rng.randint(10, 60)
    p = 1 / MEAN_USER_TURNS  # geometric on 1, 2, ... with this mean
    return 1 + int(math.log(1 - rng.random()) / math.log(1 - p))


def write_shard(table: pa.Table, path: Path) -> None:
    """Write one shard as `datasets` writes the hub's parquet (push_to_hub, to_parquet): row groups
    of at most datasets.config.MAX_ROW_GROUP_SIZE (100 MB) of Arrow data. Reading decodes a whole
    row group at once, so its size, not N, bounds the load stage's memory (a shard written as one
    row group, pyarrow's default, made that grow with N at a fixed 14 shards)."""
    rows_per_group = max(1, int(MAX_ROW_GROUP_BYTES * table.num_rows / max(table.nbytes, 1)))
    pq.write_table(table, path, compression="zstd", row_group_size=rows_per_group)


def generate(out: Path, rows: int, shards: int, seed: int) -> None:
    """Write `shards` parquet files of synthetic WildChat rows into out/shards/ (data_prep refuses a
    folder mixing parquet and JSON Lines) and an intents JSONL into out/."""
    rng = random.Random(seed)
    vocabulary = sorted({w for text in sample_texts(SAMPLE_DIR) for w in text.split() if w.isascii() and "<|" not in w})
    templates = [" ".join(rng.choices(vocabulary, k=10)) for _ in range(max(10, rows // ROWS_PER_TEMPLATE))]
    popularity = [1 / (rank + 1) for rank in range(len(templates))]
    names, weights = zip(*LANGUAGES)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    with open(out / "intents.jsonl", "w") as intents:
        for shard in range(shards):
            writer = WildChatWriter(rng)
            n = rows // shards + (shard < rows % shards)
            previous = None
            for _ in range(n):
                if previous is not None and rng.random() < 0.03:
                    turns = previous  # an exact duplicate
                else:
                    turns = []
                    for k in range(_user_turns(rng)):
                        text = _words(rng, vocabulary, 20, 1.3, 6000)
                        if k == 0 and rng.random() < TEMPLATED:
                            text = rng.choices(templates, popularity)[0] + " " + text
                        turns.append(("user", text))
                        turns.append(("assistant", _words(rng, vocabulary, 150, 0.9, 3000)))
                row = writer.add(turns, language=rng.choices(names, weights)[0])
                if turns is previous:
                    continue  # a duplicate shares its original's hash, and so its intent
                previous = turns
                intents.write(json.dumps({"conversation_hash": row["conversation_hash"],
                                          "intent": "You are a user chatting with an assistant language "
                                                    "model to " + _words(rng, vocabulary, 10, 0.3, 20)}) + "\n")
            path = out / "shards" / f"train-{shard:05d}-of-{shards:05d}.parquet"
            write_shard(writer.table(), path)
            print(f"  shard {shard + 1}/{shards}: {n} rows", flush=True)


def tokenizer_limit(conversations_dir: Path, tokenizer_dir: Path, every: int = 1) -> dict:
    """Seconds the bare fast tokenizer (batched, all cores) takes on exactly what data_prep tokenizes:
    "\\n" + every intent and turn of the kept conversations. Only the encode calls are timed; the
    texts are read 1,000 conversations at a time, so memory stays flat. every > 1 times one chunk
    in `every` and scales the seconds by the characters of all chunks over those of the timed ones
    (for full-N runs, where the exact limit would take as long as data_prep itself)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer
    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    seconds = 0.0
    texts = tokens = timed_chars = all_chars = chunk = 0
    pending: list[str] = []

    def encode():
        nonlocal seconds, texts, tokens
        start = time.perf_counter()
        encoded = backend.encode_batch(pending, add_special_tokens=False)
        seconds += time.perf_counter() - start
        texts, tokens = texts + len(pending), tokens + sum(len(e.ids) for e in encoded)
        pending.clear()

    for split_dir in sorted(p for p in conversations_dir.iterdir() if p.is_dir()):
        split = datasets.load_from_disk(str(split_dir)).select_columns(["intent", "turns"]).with_format("arrow")
        for batch in split.iter(batch_size=1000):
            contents = pc.list_flatten(batch["turns"]).combine_chunks().field("content")
            chars = (pc.sum(pc.utf8_length(contents)).as_py() or 0) + (pc.sum(pc.utf8_length(batch["intent"])).as_py() or 0)
            all_chars += chars
            if chunk % every == 0:
                timed_chars += chars
                for intent, turns in zip(batch["intent"].to_pylist(), batch["turns"].to_pylist()):
                    pending.append("\n" + intent)
                    pending.extend("\n" + turn["content"] for turn in turns)
                if len(pending) >= ENCODE_BATCH:
                    encode()
            chunk += 1
    if pending:
        encode()
    scale = all_chars / timed_chars
    return {"seconds": round(seconds * scale, 1), "timed_seconds": round(seconds, 1), "timed_share": round(1 / scale, 4),
            "texts_timed": texts, "tokens_timed": tokens, "tokens_per_s": round(tokens / seconds),
            "tokens_estimated": round(tokens * scale)}


def rollup(pid: int) -> dict[str, int]:
    """Pss_Anon, Pss_File and Anonymous of one process, in bytes (/proc/<pid>/smaps_rollup)."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss_Anon", "Pss_File", "Anonymous"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def machine_cpu() -> dict[str, float]:
    """This machine's CPU seconds so far, all cores (/proc/stat): user (and nice), kernel (system,
    irq, softirq: page-cache reclaim and writeback under the memory cap land here), iowait, idle,
    and steal (taken by the VM's host: the drift between runs)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return {"user": (user + nice) / tick, "kernel": (system + irq + softirq) / tick, "iowait": iowait / tick,
            "idle": idle / tick, "steal": steal / tick}


class MemoryCgroup:
    """A cgroup v1 memory cgroup capped at `gib`, for one child process tree; None where the
    machine does not allow one (not root, no cgroup v1 memory controller)."""

    def __init__(self, name: str, gib: float):
        self.path = CGROUP_ROOT / name
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(int(gib * 2**30)))

    @classmethod
    def create(cls, name: str, gib: float | None) -> MemoryCgroup | None:
        if gib is None:
            return None
        try:
            return cls(name, gib)
        except OSError as e:
            print(f"no memory cgroup ({CGROUP_ROOT / name}: {e}): running without the {gib} GiB cap", flush=True)
            return None

    def enter(self) -> None:  # in the child, before exec: it and everything it starts are inside
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def report(self) -> dict:
        return {"max_usage_gib": round(int((self.path / "memory.max_usage_in_bytes").read_text()) / 2**30, 2),
                "failcnt": int((self.path / "memory.failcnt").read_text()),
                "limit_gib": round(int((self.path / "memory.limit_in_bytes").read_text()) / 2**30, 2)}

    def remove(self) -> None:
        self.path.rmdir()


def run_data_prep(files_dir: Path, intents: Path, tokenizer_dir: Path, output_dir: Path, args,
                  cgroup: MemoryCgroup | None, log_path: Path) -> dict:
    """Run `python -m data_prep` in a subprocess, sampling its process tree's memory; return the
    wall time, each stage's end time (from its log), the memory peaks and the exit code."""
    command = [sys.executable, "-m", "data_prep", "experiment=tiny", f"data.source={files_dir}",
               f"intents.path={intents}", f"tokenizer.name_or_path={tokenizer_dir}", f"output_dir={output_dir}",
               "max_seq_len=2048", f"num_proc={args.num_proc}", "batch_size=1000", "filters.write_dropped=true",
               f"flip.mode={args.flip_mode}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_CACHE=str(args.workdir / "hf_cache"))
    peaks = {"anon": 0, "file": 0, "total": 0, "main_anon": 0}
    stages: dict[str, float] = {}
    cpu_at_stage_end = {"start": machine_cpu()}   # the benchmark runs alone: the machine's CPU is data_prep's
    # The main process's peak anonymous memory in each stage: a sample counts for the first stage
    # whose log line has not arrived yet (to within SAMPLE_SECONDS).
    main_anon_by_stage = dict.fromkeys(STAGES, 0)
    done = threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=cgroup.enter if cgroup else None)

    def sample():
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                values = [rollup(p.pid) for p in tree]
            except (psutil.Error, OSError):
                values = []
            if values:
                anon, file = sum(v["Pss_Anon"] for v in values), sum(v["Pss_File"] for v in values)
                for key, value in (("anon", anon), ("file", file), ("total", anon + file),
                                   ("main_anon", values[0]["Anonymous"])):
                    peaks[key] = max(peaks[key], value)
                stage = next((s for s in STAGES if s not in stages), STAGES[-1])
                main_anon_by_stage[stage] = max(main_anon_by_stage[stage], values[0]["Anonymous"])
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open(log_path, "w") as log:
        for line in process.stdout:
            log.write(line)
            print(line, end="", flush=True)
            if line.startswith(STAGE_LOG_PREFIX):
                record = json.loads(line[len(STAGE_LOG_PREFIX):])
                stages[record["stage"]] = record["end_s"]
                cpu_at_stage_end[record["stage"]] = machine_cpu()
    returncode = process.wait()
    done.set()
    sampler.join()
    return {"seconds": time.perf_counter() - start, "returncode": returncode, "stage_end_s": stages,
            "cpu_by_stage": cpu_by_stage(cpu_at_stage_end),
            "main_anon_gib_by_stage": {s: round(v / 2**30, 2) for s, v in main_anon_by_stage.items()},
            **{f"peak_{key}_gib": round(value / 2**30, 2) for key, value in peaks.items()}}


def cpu_by_stage(cpu_at_stage_end: dict[str, dict[str, float]], stages=STAGES) -> dict[str, dict[str, float]]:
    """Each stage's share of the machine's cores (all cores' seconds in it): user, kernel, waiting
    on I/O, idle, stolen by the host, and busy (user + kernel). Busy near 1.0 says the stage's gap to
    the limit is work, not waiting; kernel, how much of that work is the kernel's."""
    out, previous = {}, cpu_at_stage_end["start"]
    for stage in stages:
        if stage in cpu_at_stage_end:
            spent = {k: cpu_at_stage_end[stage][k] - previous[k] for k in previous}
            total = sum(spent.values()) or 1.0
            out[stage] = {k: round(v / total, 3) for k, v in spent.items()}
            out[stage]["busy"] = round((spent["user"] + spent["kernel"]) / total, 3)
            previous = cpu_at_stage_end[stage]
    return out


def per_stage(stage_end_s: dict, limit_seconds: float) -> dict:
    """Each stage's own seconds (from the cumulative end times) and its multiple of the limit."""
    out, previous = {}, 0.0
    for stage in STAGES:
        if stage in stage_end_s:
            seconds = stage_end_s[stage] - previous
            previous = stage_end_s[stage]
            out[stage] = {"seconds": round(seconds, 1), "vs_limit": round(seconds / limit_seconds, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=837_989)
    parser.add_argument("--shards", type=int, default=14)
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench" / "data_prep_scale")
    tokenizer_choice.add_tokenizer_argument(parser)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--flip-mode", default="per_turn", choices=["per_turn", "per_conversation"])
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="run data_prep inside a memory cgroup capped at this many GiB (root, cgroup v1)")
    parser.add_argument("--warm-rerun", action="store_true", help="run data_prep again on the warm cache and time it")
    parser.add_argument("--cold", action="store_true", help="empty the benchmark's datasets cache first")
    parser.add_argument("--limit-every", type=int, default=1,
                        help="time the limit on one chunk of 1,000 kept conversations in this many, scaled by characters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None, help="a name for this run in the JSON (default: rows and mode)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "data_prep_scale.json")
    args = parser.parse_args()
    tokenizer = tokenizer_choice.tokenizer_dir(args.tokenizer)

    input_dir = args.workdir / f"input-{args.rows}-{args.seed}"
    start = time.perf_counter()
    if not input_dir.is_dir():  # generated beside it, renamed into place when complete
        print(f"generating {args.rows} synthetic conversations in {args.shards} shards ...", flush=True)
        partial = input_dir.with_name(input_dir.name + f".partial-{os.getpid()}")
        generate(partial, args.rows, args.shards, args.seed)
        partial.rename(input_dir)
    intents = input_dir / "intents.jsonl"
    generate_seconds = time.perf_counter() - start
    if args.cold and (args.workdir / "hf_cache").exists():
        shutil.rmtree(args.workdir / "hf_cache")

    output_dir = args.workdir / f"output-{args.rows}-{args.flip_mode}"
    cgroup = MemoryCgroup.create(f"userlm-data-prep-scale-{os.getpid()}", args.memory_cap_gib)
    try:
        prep = run_data_prep(input_dir / "shards", intents, tokenizer, output_dir, args, cgroup,
                             args.workdir / f"log-{args.rows}-{args.flip_mode}.txt")
        capped = dict(cgroup.report(), completed=prep["returncode"] == 0) if cgroup else None
    finally:
        if cgroup:
            cgroup.remove()
    if prep["returncode"]:
        print(json.dumps({"memory_cgroup": capped}, indent=2))
        raise SystemExit(f"data_prep failed with exit code {prep['returncode']}")
    warm = None
    if args.warm_rerun:
        warm = run_data_prep(input_dir / "shards", intents, tokenizer, output_dir, args, None,
                             args.workdir / f"log-{args.rows}-{args.flip_mode}-warm.txt")
        if warm["returncode"]:
            raise SystemExit(f"the warm rerun failed with exit code {warm['returncode']}")

    cpu_before_limit = machine_cpu()
    limit = tokenizer_limit(output_dir / "conversations", tokenizer, args.limit_every)
    limit["cpu_share"] = cpu_by_stage({"start": cpu_before_limit, "limit": machine_cpu()}, ("limit",))["limit"]
    manifest = json.loads((output_dir / "manifest.json").read_text())
    load = os.getloadavg()
    result = {
        "rows": args.rows, "tokenizer": args.tokenizer, "flip_mode": args.flip_mode, "num_proc": args.num_proc,
        "cpu_count": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in load],
        "generate_seconds": round(generate_seconds, 1),
        "limit": limit,
        "data_prep_seconds": round(prep["seconds"], 1),
        "data_prep_vs_limit": round(prep["seconds"] / limit["seconds"], 3),
        "stages": per_stage(prep["stage_end_s"], limit["seconds"]),
        "memory_gib": {key[len("peak_"):-len("_gib")]: prep[key] for key in prep if key.startswith("peak_")},
        "main_anon_gib_by_stage": prep["main_anon_gib_by_stage"],
        "cpu_share_by_stage": prep["cpu_by_stage"],
        "memory_cgroup": capped,
        "warm_rerun": None if warm is None else {
            "seconds": round(warm["seconds"], 1), "vs_cold": round(warm["seconds"] / prep["seconds"], 3),
            "stages": per_stage(warm["stage_end_s"], limit["seconds"])},
        "kept_conversations": manifest["counts"]["kept_total"],
        "example_tokens_written": sum(s["tokens"] for s in manifest["token_statistics"].values()),
        "funnel_steps": {s["step"]: s["removed"] for s in manifest["counts"]["steps"]},
        "goals": GOALS,
    }
    print(json.dumps(result, indent=2))
    # One JSON file holds every run, keyed by its label, so the runs the README quotes sit side by side.
    label = args.label or f"{args.rows}-{args.flip_mode}"
    runs = json.loads(args.json.read_text()) if args.json.is_file() else {}
    runs[label] = result
    write_json(args.json, runs)
    print(f"wrote {label} into {args.json}")


if __name__ == "__main__":
    main()
