"""The data funnel: ordered filter steps over conversation records, every row accounted for.

Each input conversation lands in exactly one bucket: removed by one named step (the first that
applies, in the configured order), or kept in a split. `Funnel.check()` proves the sums.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

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


def filter_steps(filters_cfg) -> list[tuple[str, callable]]:
    """(name, predicate) pairs; a predicate takes a record and its state and returns a reason or ""."""
    steps = [("malformed", lambda r, seen: r["malformed"])]
    if filters_cfg.languages is not None:
        languages = set(filters_cfg.languages)
        steps.append(("language", lambda r, seen: "" if r["language"] in languages else "language"))
    if filters_cfg.exact_duplicates:
        def exact(r, seen):
            keys = (("hash", r["conversation_hash"]), ("content", r["exact_key"]))
            if any(k in seen for k in keys):
                return "exact_duplicate"
            seen.update(keys)
            return ""
        steps.append(("exact_duplicate", exact))
    near = filters_cfg.near_duplicates
    if near.enabled:
        def near_duplicate(r, seen):
            if not r["near_key"]:
                return ""
            seen[r["near_key"]] += 1
            return "near_duplicate" if seen[r["near_key"]] > near.max_per_key else ""
        steps.append(("near_duplicate", near_duplicate))
    if filters_cfg.toxic:
        steps.append(("toxic", lambda r, seen: "toxic" if r["toxic"] else ""))
    if filters_cfg.redacted:
        steps.append(("redacted", lambda r, seen: "redacted" if r["redacted"] else ""))
    if filters_cfg.max_user_turns is not None:
        steps.append(("max_user_turns", lambda r, seen: "max_user_turns" if r["num_user_turns"] > filters_cfg.max_user_turns else ""))
    if filters_cfg.max_chars is not None:
        steps.append(("max_chars", lambda r, seen: "max_chars" if r["num_chars"] > filters_cfg.max_chars else ""))
    return steps


def apply_filters(records, filters_cfg, funnel: Funnel) -> tuple[list[int], list[dict]]:
    """Run the steps in order over all records (input order decides which duplicate is kept).

    Returns the kept row indices and the dropped rows as {row, conversation_hash, step, reason}.
    """
    steps = filter_steps(filters_cfg)
    columns = ["conversation_hash", "malformed", "language", "exact_key", "near_key", "toxic", "redacted",
               "num_user_turns", "num_chars"]
    rows = records.select_columns(columns).to_dict()
    state = {name: (Counter() if name == "near_duplicate" else set()) for name, _ in steps}
    reasons = {name: Counter() for name, _ in steps}
    kept, dropped = [], []
    for i in range(len(records)):
        record = {c: rows[c][i] for c in columns}
        for name, predicate in steps:
            reason = predicate(record, state[name])
            if reason:
                reasons[name][reason] += 1
                dropped.append({"row": i, "conversation_hash": record["conversation_hash"], "step": name,
                                "reason": reason})
                break
        else:
            kept.append(i)
    for name, _ in steps:
        funnel.remove(name, reasons[name])
    return kept, dropped
