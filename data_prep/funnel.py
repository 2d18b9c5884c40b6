"""The data funnel: ordered filter steps over conversation records, every row accounted for.

Each input conversation lands in exactly one bucket: removed by one named step (the first that
applies, in the configured order), or kept in a split. `Funnel.check()` proves the sums.
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.conversations import column_of, rows_of

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

    def __init__(self, first_turns: Iterable[str], ngram: int, threshold: int):
        self.ngram, self.threshold = ngram, threshold
        hashes, offsets = array("q"), array("q", [0])  # 8 bytes an n-gram: no Python int or array per row
        for text in first_turns:
            hashes.extend(self.hashes(text))
            offsets.append(len(hashes))
        self.row_hashes, self.offsets = np.frombuffer(hashes, dtype=np.int64), np.frombuffer(offsets, dtype=np.int64)
        self.unique, self.counts = np.unique(self.row_hashes, return_counts=True)

    def hashes(self, text: str) -> list[int]:
        words = text.split()
        return [int.from_bytes(hashlib.blake2b("\x1f".join(words[i:i + self.ngram]).encode(), digest_size=8).digest(),
                               "little", signed=True) for i in range(len(words) - self.ngram + 1)]

    def is_duplicate(self, position: int) -> bool:
        """Whether the conversation at this position of `first_turns` is a near-duplicate."""
        mine = self.row_hashes[self.offsets[position]:self.offsets[position + 1]]
        return bool(mine.size) and int(self.counts[np.searchsorted(self.unique, mine)].max()) > self.threshold


class Dropped:
    """The dropped conversations, in the order dropped.jsonl lists them, as a compact index: each
    one's row of the records and a code for its (step, reason); the conversation hashes are read
    from the records only when written (a dict per dropped row held ~0.5 KB, at WildChat's
    460k drops a quarter GiB)."""

    def __init__(self):
        self.rows, self.codes = array("q"), array("h")
        self.kinds: list[tuple[str, str]] = []
        self._code_of: dict[tuple[str, str], int] = {}

    def add(self, row: int, step: str, reason: str) -> None:
        code = self._code_of.get((step, reason))
        if code is None:
            code = self._code_of[(step, reason)] = len(self.kinds)
            self.kinds.append((step, reason))
        self.rows.append(row)
        self.codes.append(code)

    def sort_by_row(self) -> None:
        order = np.argsort(np.frombuffer(self.rows, dtype=np.int64), kind="stable")
        self.rows = array("q", np.frombuffer(self.rows, dtype=np.int64)[order].tobytes())
        self.codes = array("h", np.frombuffer(self.codes, dtype=np.int16)[order].tobytes())

    def write_jsonl(self, path: Path, records, chunk_rows: int = 10_000) -> None:
        """One JSON line per dropped conversation: {conversation_hash, reason, row, step}."""
        with open(path, "w") as f:
            for start in range(0, len(self.rows), chunk_rows):
                rows = self.rows[start:start + chunk_rows].tolist()
                hashes = values(records, rows, "conversation_hash")
                for row, code, conversation_hash in zip(rows, self.codes[start:start + chunk_rows], hashes):
                    step, reason = self.kinds[code]
                    f.write(json.dumps({"row": row, "conversation_hash": conversation_hash, "step": step,
                                        "reason": reason}, sort_keys=True) + "\n")


# A step: (name, decide), where decide(records, rows) returns one reason per row of `rows` (the
# rows reaching the step, in row order; "" keeps it). Each reads only its own columns at those rows
# (`column_of`), and lets them go when it ends. Steps that look at the whole corpus, such as
# ngram_count, see exactly the conversations the earlier steps kept.
Step = tuple[str, Callable[[datasets.Dataset, np.ndarray], list[str]]]


def values(records: datasets.Dataset, rows, column: str) -> list:
    """A column at these rows as Python objects."""
    return column_of(records, rows, column).to_pylist()


def codes(records: datasets.Dataset, rows, column: str) -> tuple[list[int], pa.Array]:
    """A column at these rows as small ints, equal values equal codes (a null the code len(values)),
    and the values by code. Encoded by Arrow: a Python string per row, and sets of them, were
    ~0.2 GiB at WildChat-1M's 478k English conversations."""
    encoded = pc.dictionary_encode(column_of(records, rows, column).combine_chunks())
    return pc.fill_null(encoded.indices, len(encoded.dictionary)).to_pylist(), encoded.dictionary


def first_turns(records: datasets.Dataset, rows, batch_rows: int = 1000) -> Iterator[str]:
    """The first turn of each of these rows, read a batch at a time (never all the text)."""
    for start in range(0, len(rows), batch_rows):
        for turns in rows_of(records, rows[start:start + batch_rows], ["turns"])["turns"].to_pylist():
            yield turns[0]["content"] if turns else ""


def filter_steps(filters_cfg) -> list[Step]:
    steps: list[Step] = [("malformed", lambda records, rows: values(records, rows, "malformed"))]
    if filters_cfg.languages is not None:
        # Matched by Arrow: a Python string per row was ~60 MB at WildChat-1M.
        languages = pa.array(sorted(filters_cfg.languages), pa.string())
        steps.append(("language", lambda records, rows: [
            "" if known else "language"
            for known in pc.is_in(column_of(records, rows, "language"), value_set=languages).to_pylist()]))
    if filters_cfg.exact_duplicates:
        def exact(records, rows):
            # A repeat of a kept conversation's hash or of its content.
            (hashes, hash_values), (contents, content_values) = (codes(records, rows, "conversation_hash"),
                                                                 codes(records, rows, "exact_key"))
            seen_hashes, seen_contents = bytearray(len(hash_values) + 1), bytearray(len(content_values) + 1)
            reasons = []
            for conversation_hash, content in zip(hashes, contents):
                duplicate = seen_hashes[conversation_hash] or seen_contents[content]
                if not duplicate:
                    seen_hashes[conversation_hash] = seen_contents[content] = 1
                reasons.append("exact_duplicate" if duplicate else "")
            return reasons
        steps.append(("exact_duplicate", exact))
    near = filters_cfg.near_duplicates
    if near.enabled and near.method == "prefix_key":
        def prefix_key(records, rows):
            keys, key_values = codes(records, rows, "near_key")
            no_key = {len(key_values), *np.flatnonzero(pc.equal(key_values, "").to_numpy(zero_copy_only=False)).tolist()}
            seen, reasons = [0] * (len(key_values) + 1), []
            for key in keys:
                if key not in no_key:
                    seen[key] += 1
                reasons.append("prefix_key" if key not in no_key and seen[key] > near.max_per_key else "")
            return reasons
        steps.append(("near_duplicate", prefix_key))
    elif near.enabled:
        def ngram_count(records, rows):
            counts = NgramCounts(first_turns(records, rows), near.ngram, near.threshold)
            return ["ngram_count" if counts.is_duplicate(i) else "" for i in range(len(rows))]
        steps.append(("near_duplicate", ngram_count))
    if filters_cfg.toxic:
        steps.append(("toxic", lambda records, rows: ["toxic" if x else "" for x in values(records, rows, "toxic")]))
    if filters_cfg.redacted:
        steps.append(("redacted", lambda records, rows: ["redacted" if x else "" for x in values(records, rows, "redacted")]))
    if filters_cfg.max_user_turns is not None:
        steps.append(("max_user_turns", lambda records, rows: [
            "max_user_turns" if n > filters_cfg.max_user_turns else "" for n in values(records, rows, "num_user_turns")]))
    if filters_cfg.max_chars is not None:
        steps.append(("max_chars", lambda records, rows: [
            "max_chars" if n > filters_cfg.max_chars else "" for n in values(records, rows, "num_chars")]))
    return steps


def apply_filters(records, filters_cfg, funnel: Funnel) -> tuple[list[int], Dropped]:
    """Run the steps in order over the records each earlier step kept (input order decides which
    duplicate is kept). Memory holds one step's columns at a time, not every column of every row,
    and the rows reaching a step as one int64 array (a list of Python ints, made while a step's
    strings come and go, also pinned the heap pages they shared: 0.2 GiB kept at WildChat-1M).

    Returns the kept row indices and the dropped rows (in row order).
    """
    kept, dropped = np.arange(len(records), dtype=np.int64), Dropped()
    for name, decide in filter_steps(filters_cfg):
        reasons = decide(records, kept)
        if len(reasons) != len(kept):
            raise AssertionError(f"filter step {name} decided {len(reasons)} of {len(kept)} rows")
        drops = [i for i, reason in enumerate(reasons) if reason]
        counts = Counter(reasons[i] for i in drops)
        for i in drops:
            dropped.add(int(kept[i]), name, reasons[i])
        kept = np.delete(kept, drops)
        funnel.remove(name, counts)
    dropped.sort_by_row()
    return kept.tolist(), dropped
