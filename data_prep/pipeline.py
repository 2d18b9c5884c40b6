"""`python -m data_prep`: chat logs (WildChat-1M, PRISM, LMSYS, ShareGPT, OpenAI messages: data_prep.sources)
-> flipped, tokenized, loss-masked examples.

    python -m data_prep experiment=tiny                    # the embedded sample, seconds on CPU
    python -m data_prep experiment=tiny dataset=prism      # the PRISM sample, as an evaluation set
    python -m data_prep dataset=sharegpt data.source=my_logs.jsonl intents.path=...   # your own logs
    python -m data_prep experiment=paper intents.path=intents.jsonl   # WildChat-1M from the hub
    python -m data_prep experiment=paper intents.backend=openai ...    # generate the intents first
                                                                       # (see data_prep/intents/__main__.py)

Stages: load -> normalise -> filter (funnel) -> split by user -> intents -> flip + tokenize -> save.
Each logs one line when it ends, `data_prep stage {"stage": ..., "end_s": ..., "peak_main_gib": ...}`
(seconds since the run started; benchmarks/data_prep_scale.py reads them). The intents join is
written by Arrow into one cached file per split; flip maps over it, so a rerun with the same config
reuses every step's cache and only filters, splits, reads the intents and saves again.
Outputs in `output_dir`, written atomically (a COMPLETED marker last), under a lock held for the whole run.
`output_dir` must be empty, absent or data_prep's own complete earlier output (`overwrite=true` replaces
anything else, except a folder that holds an input of the run):
    train/ validation/ test/   examples: conversation_hash, input_ids, labels, ... (save_to_disk)
    conversations/<split>/     the same conversations as text with their intent (for evaluation)
    tokenizer/                 the tokenizer the examples were made with (chat template installed), in the
                               layout transformers 4.x and 5.x both load (chat_format.save_tokenizer)
    funnel.json  manifest.json  config.yaml  examples.txt  dropped.jsonl
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import logging
import resource
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import OmegaConf
from transformers import AutoTokenizer

import data_prep.chat_format
import data_prep.conversations
import data_prep.examples
import data_prep.sources.messages
from core import artifacts
from data_prep import sources
from data_prep.chat_format import ChatFormat, get_format, prepare_tokenizer, save_tokenizer
from data_prep.conversations import RECORD_FEATURES, column_of
from data_prep.examples import (EXAMPLE_FEATURES, conversations_with_intents, flip_batch, render_with_targets,
                                token_statistics, unusable_intents)
from data_prep.funnel import Dropped, Funnel, apply_filters
from data_prep.intents import get_intents
from core.llm_client import check_config_key_names
from data_prep.load import load_source, read_columns, records_of
from data_prep.split import assign_splits

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when the records or examples change meaning
# The code that makes records and examples: part of every cache key, so an edit never reuses stale
# cached map results.
CODE_VERSION = artifacts.source_hash(
    data_prep.chat_format, data_prep.conversations, data_prep.examples, data_prep.sources.messages,
    *(importlib.import_module(f"data_prep.sources.{name}") for name in sources.NAMES))


# The stages in order; each logs one line `data_prep stage {"stage", "end_s", "peak_main_gib"}` when it
# ends (seconds since the run started, the main process's peak RSS so far), which
# benchmarks/data_prep_scale.py reads. Timings go only to the log: the outputs stay the same bytes on
# every run.
STAGES = ("load", "normalise", "filter", "split", "intents", "flip + tokenize", "save")
STAGE_LOG_PREFIX = "data_prep stage "
_LIBC = ctypes.CDLL(None)
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)   # glibc's; None elsewhere (musl, macOS)
_MALLOPT = getattr(_LIBC, "mallopt", None)
_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 2**20


def log_stage(stage: str, start: float) -> None:
    """End a stage (one of STAGES): hand the memory freed in it back to the OS, then log one JSON
    line after STAGE_LOG_PREFIX. Both allocators keep freed pages for reuse, and the next stage
    needs none of them: Arrow's held 0.75 GiB after loading 400k rows; glibc's (Python's lists and
    larger strings) 0.2-0.3 GiB after each of filter, split and intents at WildChat-1M."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log.info("%s%s", STAGE_LOG_PREFIX, json.dumps({"stage": stage, "end_s": round(time.perf_counter() - start, 3),
                                                    "peak_main_gib": round(peak_gib, 2)}))


def load_tokenizer(tokenizer_cfg, chat_format: str):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_cfg.name_or_path,
                                              trust_remote_code=tokenizer_cfg.trust_remote_code)
    return prepare_tokenizer(tokenizer, get_format(chat_format), tokenizer_cfg.pad_token)


class Selection(NamedTuple):
    """The conversations data_prep keeps, per split, and how it got them."""
    records: datasets.Dataset
    split_rows: dict[str, list[int]]   # split -> rows of `records`
    funnel: Funnel
    dropped: Dropped
    events: Counter
    provenance: dict
    fingerprint: str
    map_args: dict

    def kept(self) -> datasets.Dataset:
        return self.records.select([r for rows in self.split_rows.values() for r in rows])


def select_conversations(cfg, start: float | None = None, chat_format: ChatFormat | None = None) -> Selection:
    """load -> normalise -> filter -> split by user (also used by `python -m data_prep.intents`).
    `start`: time.perf_counter() at the start of the run, for the stage timings logged.
    `chat_format`: whose control strings no turn may hold; default cfg.chat_format's (data_prep adds
    its tokenizer's special tokens: ChatFormat.with_tokenizer_specials)."""
    start = time.perf_counter() if start is None else start
    chat_format = chat_format or get_format(cfg.chat_format)
    # ---- load --------------------------------------------------------------------------------
    source = sources.get(cfg.data.kind)
    raw, provenance = load_source(cfg.data)
    if cfg.filters.languages is not None and not source.has_language:
        raise ValueError(f"{cfg.data.source}: {source.name} rows carry no language to filter on; set "
                         "filters.languages=null (its dataset YAML does)")
    if cfg.filters.languages is not None and "language" not in raw.column_names:
        raise ValueError(f"{cfg.data.source}: no 'language' column to filter on; set filters.languages=null")
    fingerprint = artifacts.config_hash(FORMAT_VERSION, CODE_VERSION, provenance, artifacts.resolved_config(cfg.filters),
                                        cfg.data.id_field, cfg.data.user_field, chat_format.name,
                                        chat_format.control_strings)
    map_args = dict(batched=True, batch_size=cfg.batch_size, num_proc=cfg.num_proc if len(raw) > cfg.batch_size else None)

    log_stage("load", start)
    # ---- normalise: one record per conversation, malformed rows flagged ------------------------
    # The records functions and the filter predicates read the filters and data settings for every
    # row: as the schema's dataclasses (OmegaConf.to_object), not DictConfigs, whose every attribute
    # read costs ~90 us.
    filters_cfg, data_cfg = OmegaConf.to_object(cfg.filters), OmegaConf.to_object(cfg.data)
    # The rows are read in Arrow format: only the columns and struct fields the source reads become
    # Python objects (data_prep.load.records_of).
    records = raw.with_format("arrow").map(
        records_of, fn_kwargs={"source_name": source.name, "columns": read_columns(source, cfg.data),
                               "filters_cfg": filters_cfg, "data_cfg": data_cfg, "chat_format": chat_format},
        remove_columns=raw.column_names, features=RECORD_FEATURES,
        new_fingerprint=f"normalise-{fingerprint}", desc="normalise", **map_args).with_format(None)

    log_stage("normalise", start)
    # ---- filter: every row lands in exactly one funnel bucket ----------------------------------
    funnel = Funnel(input=len(records))
    kept, dropped = apply_filters(records, filters_cfg, funnel)
    events = Counter({count["values"]: count["counts"]
                      for count in pc.value_counts(pc.list_flatten(column_of(records, kept, "events"))).to_pylist()})

    log_stage("filter", start)
    # ---- split by user -----------------------------------------------------------------------
    split_rows, anonymous = assign_splits(records, kept, cfg.split)
    if cfg.split.missing_user == "drop":
        funnel.remove("no_user_id", Counter({"no_user_id": len(anonymous)}))
        for row in anonymous:
            dropped.add(row, "no_user_id", "no_user_id")
    elif anonymous:
        events["no_user_id_own_user"] = len(anonymous)

    log_stage("split", start)
    return Selection(records, split_rows, funnel, dropped, events, provenance, fingerprint, map_args)


def join_intents(cfg, selection: Selection, tokenizer) -> dict[str, datasets.Dataset]:
    """The intents stage: each split's usable conversations with their intents (conversations_with_intents).
    Every kept conversation lands in one funnel bucket: no intent, an intent that cannot be a system
    message (bad text, or too long for max_seq_len: data_prep.examples.unusable_intents), or kept.
    The intents are one Arrow array, aligned with the kept rows (split after split), and go when it
    returns: flip and save hold none of them."""
    records, funnel, dropped = selection.records, selection.funnel, selection.dropped
    split_rows = {split: np.asarray(rows, dtype=np.int64) for split, rows in selection.split_rows.items()}
    kept_rows = np.concatenate([np.zeros(0, dtype=np.int64), *split_rows.values()])
    intents = get_intents(cfg.intents, selection.kept(), column_of(records, kept_rows, "conversation_hash"))
    unusable = unusable_intents(intents, tokenizer, cfg.max_seq_len)
    unused = np.array(intents.is_null().to_numpy(zero_copy_only=False))   # a writable copy
    unused[list(unusable)] = True
    reasons = {step: Counter() for step in ("missing_intent", "bad_intent", "intent_too_long")}
    conversations, start = {}, 0
    for split, rows in split_rows.items():
        own = slice(start, start + len(rows))
        for index in np.flatnonzero(unused[own]) + start:
            step, reason = unusable.get(int(index), ("missing_intent", "missing_intent"))
            reasons[step][reason] += 1
            dropped.add(int(kept_rows[index]), step, reason)
        usable, own_intents = ~unused[own], intents.slice(start, len(rows))
        usable_rows = rows[usable]
        usable_intents = own_intents if usable.all() else own_intents.filter(pa.array(usable))   # no copy when all are
        conversations[split] = conversations_with_intents(
            records, usable_rows, usable_intents, join_fingerprint(selection.fingerprint, usable_rows, usable_intents))
        funnel.kept[split] = len(usable_rows)
        start += len(rows)
    for step, counts in reasons.items():
        funnel.remove(step, counts)
    return conversations


def join_fingerprint(fingerprint: str, rows: Sequence[int], intents: pa.Array, chunk: int = 10_000) -> str:
    """A hash of the records' fingerprint, the rows and their intents, fed a chunk at a time (the
    JSON of every row and intent at once, as config_hash would build, is ~0.1 GiB at WildChat-1M's
    kept conversations, and as much again while encoded)."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(np.asarray(rows, dtype=np.int64).tobytes())
    for start in range(0, len(intents), chunk):
        digest.update(json.dumps(intents.slice(start, chunk).to_pylist()).encode())
    return digest.hexdigest()[:16]


def run(cfg) -> Path:
    """Prepare `cfg.output_dir`, holding its lock throughout: one data_prep per output directory."""
    check_config_key_names(cfg)  # before the config is written anywhere
    with artifacts.output_lock(cfg.output_dir, "data_prep"):
        return prepare(cfg)


def prepare(cfg) -> Path:
    output_dir = Path(cfg.output_dir)
    # Refused before any work when output_dir holds anything but data_prep's own earlier output, or an input.
    inputs = [cfg.data.source, cfg.intents.path, cfg.tokenizer.name_or_path]
    artifacts.check_replaceable(output_dir, "data_prep", cfg.overwrite, inputs)
    start = time.perf_counter()
    if _MALLOPT is not None:
        # Blocks of 1 MiB and more are mapped, and unmapped when freed. glibc otherwise raises that
        # threshold to the largest block freed (up to 32 MiB), and parquet's decoded pages, read
        # through Python, then stayed in its heap: 0.17 GiB of the load stage's peak at WildChat-1M.
        _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.chat_format)
    selection = select_conversations(cfg, start, get_format(cfg.chat_format).with_tokenizer_specials(tokenizer))
    records, split_rows, funnel, dropped, events, provenance, fingerprint, map_args = selection

    # ---- intents: one per kept conversation (read or generated; see data_prep.intents) --------
    conversations = join_intents(cfg, selection, tokenizer)
    funnel.events = dict(sorted(events.items()))
    funnel.check()

    log_stage("intents", start)
    # ---- flip + tokenize ---------------------------------------------------------------------
    tokenizer_hash = artifacts.config_hash(tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template)
    examples = {}
    for split, dataset in conversations.items():
        examples[split] = dataset.map(
            flip_batch, fn_kwargs={"tokenizer": tokenizer, "mode": cfg.flip.mode, "max_seq_len": cfg.max_seq_len},
            remove_columns=dataset.column_names, features=EXAMPLE_FEATURES,
            # The conversations' own fingerprint covers the records, which rows this split holds and
            # their intents; a different split or intent can never reuse another's cached examples.
            new_fingerprint=f"flip-{split}-" + artifacts.config_hash(
                dataset._fingerprint, tokenizer_hash, cfg.flip.mode, cfg.max_seq_len),
            desc=f"flip {split}", **dict(map_args, num_proc=cfg.num_proc if len(dataset) > cfg.batch_size else None))
        funnel.examples[split] = len(examples[split])
    stats = {split: token_statistics(ds) for split, ds in examples.items()}

    log_stage("flip + tokenize", start)
    # ---- save --------------------------------------------------------------------------------
    with artifacts.atomic_directory(output_dir, "data_prep", overwrite=cfg.overwrite, inputs=inputs) as tmp:
        # An empty split is not saved (datasets cannot load one back); funnel.json still counts it.
        for split in [s for s, ds in examples.items() if len(ds) == 0]:
            log.warning("split %r is empty and is not written", split)
        datasets.DatasetDict({s: ds for s, ds in examples.items() if len(ds)}).save_to_disk(str(tmp))
        datasets.DatasetDict({s: ds for s, ds in conversations.items() if len(ds)}).save_to_disk(
            str(tmp / "conversations"))
        save_tokenizer(tokenizer, tmp / "tokenizer")
        artifacts.write_json(tmp / "funnel.json", funnel.to_dict())
        artifacts.write_text(tmp / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        artifacts.write_json(tmp / "manifest.json", {
            "format_version": FORMAT_VERSION,
            "config": artifacts.resolved_config(cfg),
            "input": provenance,
            "intents": {"path": cfg.intents.path, "sha256": artifacts.sha256_of(cfg.intents.path),
                        "used": sum(funnel.kept.values())},
            "tokenizer": {"name_or_path": cfg.tokenizer.name_or_path, "fingerprint": tokenizer_hash,
                          "vocab_size": len(tokenizer)},
            "packages": artifacts.package_versions(),
            "counts": funnel.to_dict(),
            "token_statistics": stats,
        })
        preview_split = next(iter(examples))
        preview = examples[preview_split].select(range(min(cfg.preview_examples, len(examples[preview_split]))))
        artifacts.write_text(tmp / "examples.txt", "".join(
            f"=== {preview_split} example {i}: conversation {ex['conversation_hash']}, "
            f"{ex['num_tokens']} tokens, {ex['num_target_tokens']} trained on (between ⟦ ⟧)\n"
            f"{render_with_targets(tokenizer, ex['input_ids'], ex['labels'])}\n\n"
            for i, ex in enumerate(preview)))
        if cfg.filters.write_dropped:
            dropped.write_jsonl(tmp / "dropped.jsonl", records)

    log_stage("save", start)
    print(funnel.table())
    for split, s in stats.items():
        print(f"{split}: {s['examples']} examples, {s['tokens']} tokens ({s['target_tokens']} targets), "
              f"{s['truncated_examples']} truncated")
    print(f"wrote {output_dir} in {time.perf_counter() - start:.1f} s")
    return output_dir
