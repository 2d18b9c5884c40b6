"""Generate the missing intents of some conversations into the store, then report.

Cache key: (conversation_hash, prompt version, model). A conversation whose intent is already in
the store under the current key is not asked again; every finished intent is appended (and
fsynced) the moment it arrives, so a run killed at any point resumes where it stopped. Intents
stored under another prompt version or model are ignored (not reused); intents stored under the
current version but with a different prompt text are refused (bump the version).

The report (`<store>.report.json`, also printed) accounts for every conversation asked for:
cached + done + failed (by reason) + duplicate hashes, with tokens in/out, the estimated cost and
the wall time. Failures are listed with their reason and are asked again by the next run.

The stage fails (raises, so `python -m data_prep.intents` exits non-zero and `python -m data_prep`
writes nothing) when the endpoint is dead (no HTTP response for `openai.max_connection_failures`
attempts in a row: core.llm_client.EndpointUnreachable, naming the URL), or when not one of
the conversations asked for has an intent, cached or new (the report is written first). Some failures among
successes are a normal run: those conversations are dropped and counted downstream.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from core import artifacts
from data_prep.intents.backends import BACKENDS, Job, Outcome
from data_prep.intents.checks import intent_problem
from data_prep.intents.prompt import IntentPrompt
from core.jsonl import JsonlWriter
from data_prep.intents.store import read_intents

log = logging.getLogger(__name__)


def backend_model(intents_cfg) -> str:
    """The model identity of the cache key, known without loading anything."""
    return getattr(intents_cfg, intents_cfg.backend).model


def report_path(store_path) -> Path:
    return Path(store_path).with_suffix(".report.json")


def generate_intents(intents_cfg, conversations) -> dict:
    """Fill the store at intents_cfg.path for `conversations` (a Dataset with conversation_hash and
    turns). Returns the report."""
    if intents_cfg.backend not in BACKENDS:
        raise ValueError(f"intents.backend={intents_cfg.backend!r}: generation needs one of {sorted(BACKENDS)}")
    if not intents_cfg.path:
        raise ValueError("intents.path: set the store that generation fills (a .jsonl path)")
    with artifacts.output_lock(intents_cfg.path, "data_prep.intents"):  # one generation per store
        return fill_store(intents_cfg, conversations)


def fill_store(intents_cfg, conversations) -> dict:
    started = time.monotonic()
    path, prompt = Path(intents_cfg.path), IntentPrompt(intents_cfg.prompt)
    version, model, fingerprint = prompt.version, backend_model(intents_cfg), prompt.fingerprint

    # ---- what is left to do ------------------------------------------------------------------
    cached = {}
    if path.exists():
        # Rows of this (version, model) made with another prompt text are refused. An intent stored
        # before today's checks that fails them is asked again (the newest row wins).
        cached = {h: intent for h, intent in read_intents(path, version, model, fingerprint).items()
                  if not intent_problem(intent)}
    hashes = conversations["conversation_hash"]
    pending, seen = [], set()
    for i, h in enumerate(hashes):
        if h not in cached and h not in seen:
            pending.append(i)
        seen.add(h)
    asked = Counter(h in cached for h in set(hashes))
    log.info("intents: %d conversations, %d cached for (%s, %s), %d to generate", len(hashes), asked[True],
             version, model, len(pending))

    # ---- generate, storing each intent as it arrives -------------------------------------------
    backend = BACKENDS[intents_cfg.backend](intents_cfg)
    done, failed, failures = 0, Counter(), []
    tokens = Counter()
    writer = JsonlWriter(path)   # cuts a torn last line left by a killed run
    progress = tqdm(total=len(pending), desc="intents", unit="conv", disable=not intents_cfg.progress,
                    dynamic_ncols=True)

    def on_outcome(outcome: Outcome) -> None:
        nonlocal done
        tokens["prompt"] += outcome.usage.prompt_tokens
        tokens["completion"] += outcome.usage.completion_tokens
        if outcome.intent is not None:
            writer.append({"conversation_hash": outcome.conversation_hash, "intent": outcome.intent,
                           "prompt_version": version, "prompt_sha": fingerprint, "model": model,
                           "replies": outcome.replies, "prompt_tokens": outcome.usage.prompt_tokens,
                           "completion_tokens": outcome.usage.completion_tokens})
            done += 1
        else:
            failed[outcome.reason] += 1
            failures.append({"conversation_hash": outcome.conversation_hash, "reason": outcome.reason,
                             "detail": outcome.detail, "replies": outcome.replies})
            progress.set_postfix(failed=len(failures), refresh=False)
        progress.update()

    def jobs():
        rows = conversations.select(pending).select_columns(["conversation_hash", "turns"])
        for batch in rows.iter(batch_size=1000):
            for conversation_hash, turns in zip(batch["conversation_hash"], batch["turns"]):
                yield Job(conversation_hash, prompt.messages(turns))

    try:
        if pending:
            backend.run(jobs(), on_outcome)
    finally:
        progress.close()
        writer.close()

    # ---- report --------------------------------------------------------------------------------
    wall = time.monotonic() - started
    price_in, price_out = backend.prices
    report = {
        "backend": intents_cfg.backend, "model": model, "prompt_version": version, "prompt_sha": fingerprint,
        "store": str(path), **backend.describe(),
        "conversations": len(hashes), "duplicate_hashes": len(hashes) - len(set(hashes)),
        "cached": asked[True], "done": done, "failed": dict(sorted(failed.items())),
        "failed_total": sum(failed.values()), "torn_lines_removed": writer.torn_lines_removed,
        "tokens": {"prompt": tokens["prompt"], "completion": tokens["completion"]},
        "estimated_cost_usd": round((tokens["prompt"] * price_in + tokens["completion"] * price_out) / 1e6, 4),
        "wall_time_s": round(wall, 3), "generated_per_s": round((done + sum(failed.values())) / wall, 2),
        "failures": failures,
    }
    accounted = report["cached"] + done + report["failed_total"] + report["duplicate_hashes"]
    if accounted != len(hashes):
        raise AssertionError(f"intents report does not add up: {accounted} accounted for, {len(hashes)} asked")
    artifacts.write_json(report_path(path), report)
    print(summary(report))
    if pending and not done and not report["cached"]:  # (a resume whose few retries fail again is no failure)
        raise RuntimeError(f"intents: none of the {len(pending)} conversations asked for got an intent "
                           f"(failed: {report['failed']}), see {report_path(path)}: the intents stage failed")
    return report


def summary(report: dict) -> str:
    failed = ", ".join(f"{reason} {n}" for reason, n in report["failed"].items()) or "none"
    return (f"intents ({report['backend']} {report['model']}, prompt {report['prompt_version']}): "
            f"{report['conversations']} conversations = {report['cached']} cached + {report['done']} done + "
            f"{report['failed_total']} failed ({failed})"
            + (f" + {report['duplicate_hashes']} duplicate hashes" if report["duplicate_hashes"] else "") + "\n"
            f"  tokens in {report['tokens']['prompt']:,}, out {report['tokens']['completion']:,}, "
            f"estimated cost ${report['estimated_cost_usd']:.2f}, wall time {report['wall_time_s']:.1f} s, "
            f"report {report_path(report['store'])}")
