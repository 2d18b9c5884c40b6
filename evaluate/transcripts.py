"""Inputs and outputs of `python -m evaluate.simulate`: intents in, transcripts and a summary out.

Transcripts are an append-only JSONL, one finished conversation per line, each handed to the
operating system in one write as it finishes (core.jsonl.JsonlWriter),
so a killed run loses only the conversations in flight; a torn last line is cut off before
appending again. A record:
    id, intent, turns [{role, content, + for user turns: tokens, truncated, prompt_tokens, guardrails}],
    ended, end_reason (user_ended | max_turns | assistant_error | intent_too_long), end_turn
    (guardrails of the end sample), truncated_prompts (user-LM prompts cut to its context)
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from core import artifacts
from core.jsonl import jsonl_rows
from core.prepared import load_conversations
from data_prep.chat_format import USER
from data_prep.intents.store import read_intents
from evaluate.guardrails import guardrail_report

__all__ = ["read_intent_items", "read_transcripts", "summarise"]


def read_intent_items(path: str, split: str, limit: int | None) -> tuple[list[dict], dict]:
    """[{id, intent}] and their provenance, from an intents JSONL ({conversation_hash, intent}: the
    store data_prep reads) or from a data_prep output directory (its conversations/<split>)."""
    source = Path(path)
    if source.is_dir():
        rows = load_conversations(source, split).select_columns(["conversation_hash", "intent"]).to_list()
        pairs = [(row["conversation_hash"], row["intent"]) for row in rows]
        provenance = {"data_dir": str(source), "split": split,
                      "manifest_sha256": artifacts.sha256_of(source / "manifest.json")}
    else:
        pairs = list(read_intents(source).items())
        provenance = {"file": str(source), "sha256": artifacts.sha256_of(source)}
    seen = Counter()
    items = []
    for conversation_hash, intent in pairs[:limit]:
        seen[conversation_hash] += 1  # WildChat's hashes can repeat: later copies get a suffix
        suffix = f"#{seen[conversation_hash] - 1}" if seen[conversation_hash] > 1 else ""
        items.append({"id": conversation_hash + suffix, "intent": intent})
    return items, {**provenance, "intents": len(items)}


def read_transcripts(path: Path) -> list[dict]:
    """Every finished conversation in the transcripts file (none when it does not exist)."""
    if not path.exists():
        return []
    return [row for _, row in jsonl_rows(path) if row is not None]


def summarise(records: list[dict], enabled: dict[str, bool]) -> dict:
    """Turns per conversation, end reasons and the guardrails' intervention rates of a run."""
    user_turns = [sum(t["role"] == USER for t in r["turns"]) for r in records]
    generated = [t["guardrails"] for r in records for t in r["turns"] if t["role"] == USER]
    generated += [r["end_turn"] for r in records if r["end_turn"] is not None]
    kept = [t for r in records for t in r["turns"] if t["role"] == USER]
    return {
        "conversations": len(records),
        "user_turns_per_conversation": {
            "mean": round(statistics.fmean(user_turns), 6) if user_turns else 0.0,
            "median": statistics.median(user_turns) if user_turns else 0,
            "min": min(user_turns, default=0), "max": max(user_turns, default=0),
            "histogram": {str(k): v for k, v in sorted(Counter(user_turns).items())},
        },
        "end_reasons": dict(sorted(Counter(r["end_reason"] for r in records).items())),
        # (.get: transcripts written before these fields existed lack them; none of their prompts was cut)
        "assistant_errors": dict(sorted(Counter(r.get("assistant_error_reason", "unrecorded") for r in records
                                                if r["end_reason"] == "assistant_error").items())),
        "truncated_prompts": sum(r.get("truncated_prompts", 0) for r in records),
        "truncated_user_turns": sum(t["truncated"] for t in kept),
        "user_turn_tokens_mean": round(statistics.fmean(t["tokens"] for t in kept), 6) if kept else 0.0,
        "guardrails": guardrail_report(generated, enabled),
    }
