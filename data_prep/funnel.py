"""The data funnel: ordered filter steps over conversation records, every row accounted for.

Each input conversation lands in exactly one bucket: removed by one named step (the first that
applies, in the configured order), or kept in a split. `Funnel.check()` proves the sums.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Funnel:
    input: int
    steps: list[dict] = field(default_factory=list)   # [{step, removed, reasons}] in order
    kept: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)

    def remove(self, step: str, reasons: Counter) -> None:
        self.steps.append({"step": step, "removed": sum(reasons.values()), "reasons": dict(sorted(reasons.items()))})

    def check(self) -> None:
        total = sum(s["removed"] for s in self.steps) + sum(self.kept.values())
        if total != self.input:
            raise AssertionError(f"funnel does not add up: {total} accounted for, {self.input} read")

    def to_dict(self) -> dict:
        return {"input": self.input, "steps": self.steps, "kept": self.kept,
                "kept_total": sum(self.kept.values()), "examples": self.examples, "events": self.events}

    def table(self) -> str:
        lines = [f"{'step':<28}{'removed':>10}{'left':>10}", f"{'input':<28}{'':>10}{self.input:>10}"]
        left = self.input
        for s in self.steps:
            left -= s["removed"]
            lines.append(f"{s['step']:<28}{s['removed']:>10}{left:>10}")
            for reason, n in s["reasons"].items():
                if reason != s["step"]:
                    lines.append(f"  {reason:<26}{n:>10}")
        for split, n in self.kept.items():
            lines.append(f"kept: {split:<22}{'':>10}{n:>10}" + (f"   {self.examples[split]} examples"
                                                                  if split in self.examples else ""))
        return "\n".join(lines)


class NgramCounts:
    """near_duplicates.method=ngram_count: every whitespace n-gram of every first user turn that
    reaches the step, counted over those conversations (occurrences, case-sensitive); a
    conversation whose first turn holds an n-gram seen more than `threshold` times is a
    near-duplicate. Exact up to 64-bit hash collisions (about 1 in 10^5 runs at WildChat's
    ~30M n-grams, and one would only make two n-grams count together): n-grams are kept as 64-bit
    hashes (blake2b: the same in every process and run) in one sorted array, not as strings."""

    def __init__(self, records, rows: list[int], ngram: int, threshold: int):
        self.ngram, self.threshold = ngram, threshold
        hashes, self.offsets = [], [0]
        for batch in records.select(rows).select_columns(["turns"]).iter(batch_size=1000):
            for turns in batch["turns"]:
                found = self.hashes(turns[0]["content"] if turns else "")
                hashes.extend(found)
                self.offsets.append(self.offsets[-1] + len(found))
        self.row_hashes = np.array(hashes, dtype=np.int64)
        self.unique, self.counts = np.unique(self.row_hashes, return_counts=True)
        self.position = {row: i for i, row in enumerate(rows)}

    def hashes(self, text: str) -> list[int]:
        words = text.split()
        return [int.from_bytes(hashlib.blake2b("\x1f".join(words[i:i + self.ngram]).encode(), digest_size=8).digest(),
                               "little", signed=True) for i in range(len(words) - self.ngram + 1)]

    def is_duplicate(self, row: int) -> bool:
        i = self.position[row]
        mine = self.row_hashes[self.offsets[i]:self.offsets[i + 1]]
        return bool(mine.size) and int(self.counts[np.searchsorted(self.unique, mine)].max()) > self.threshold


def filter_steps(filters_cfg, records, t: dict[str, list]) -> list[tuple[str, callable]]:
    """(name, make_predicate) pairs over the record columns `t` (column -> values by row).
    make_predicate(rows reaching the step) -> a predicate that takes a row and returns a reason or ""
    (steps that look at the whole corpus, such as ngram_count, see exactly the conversations the
    earlier steps kept)."""
    steps = [("malformed", lambda rows: lambda i: t["malformed"][i])]
    if filters_cfg.languages is not None:
        languages = set(filters_cfg.languages)
        steps.append(("language", lambda rows: lambda i: "" if t["language"][i] in languages else "language"))
    if filters_cfg.exact_duplicates:
        def exact(rows):
            seen = set()

            def predicate(i):
                keys = (("hash", t["conversation_hash"][i]), ("content", t["exact_key"][i]))
                if any(k in seen for k in keys):
                    return "exact_duplicate"
                seen.update(keys)
                return ""
            return predicate
        steps.append(("exact_duplicate", exact))
    near = filters_cfg.near_duplicates
    if near.enabled and near.method == "prefix_key":
        def prefix_key(rows):
            seen = Counter()

            def predicate(i):
                key = t["near_key"][i]
                if not key:
                    return ""
                seen[key] += 1
                return "prefix_key" if seen[key] > near.max_per_key else ""
            return predicate
        steps.append(("near_duplicate", prefix_key))
    elif near.enabled:
        def ngram_count(rows):
            counts = NgramCounts(records, rows, near.ngram, near.threshold)
            return lambda i: "ngram_count" if counts.is_duplicate(i) else ""
        steps.append(("near_duplicate", ngram_count))
    if filters_cfg.toxic:
        steps.append(("toxic", lambda rows: lambda i: "toxic" if t["toxic"][i] else ""))
    if filters_cfg.redacted:
        steps.append(("redacted", lambda rows: lambda i: "redacted" if t["redacted"][i] else ""))
    if filters_cfg.max_user_turns is not None:
        steps.append(("max_user_turns", lambda rows: lambda i: "max_user_turns"
                      if t["num_user_turns"][i] > filters_cfg.max_user_turns else ""))
    if filters_cfg.max_chars is not None:
        steps.append(("max_chars", lambda rows: lambda i: "max_chars" if t["num_chars"][i] > filters_cfg.max_chars else ""))
    return steps


def apply_filters(records, filters_cfg, funnel: Funnel) -> tuple[list[int], list[dict]]:
    """Run the steps in order over the records each earlier step kept (input order decides which
    duplicate is kept).

    Returns the kept row indices and the dropped rows as {row, conversation_hash, step, reason},
    in row order.
    """
    columns = ["conversation_hash", "malformed", "language", "exact_key", "near_key", "toxic", "redacted",
               "num_user_turns", "num_chars"]
    table = records.select_columns(columns).to_dict()
    kept, dropped = list(range(len(records))), []
    for name, make_predicate in filter_steps(filters_cfg, records, table):
        predicate, reasons, survivors = make_predicate(kept), Counter(), []
        for i in kept:
            reason = predicate(i)
            if reason:
                reasons[reason] += 1
                dropped.append({"row": i, "conversation_hash": table["conversation_hash"][i], "step": name,
                                "reason": reason})
            else:
                survivors.append(i)
        kept = survivors
        funnel.remove(name, reasons)
    return kept, sorted(dropped, key=lambda d: d["row"])
