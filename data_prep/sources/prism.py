"""PRISM (HannahRoseKirk/prism-alignment, config conversations): branching conversations, linearised.

The key is conversation_id, the user user_id. Each turn has one user entry and up to four model
replies; the linear dialogue keeps, per turn, the user entry and the chosen reply. Ties (several
chosen replies in one turn): identical ones collapse (event prism_tie_identical); different ones
are resolved by the highest score, then the lowest within_turn_id (event prism_tie_resolved_by_score).
PRISM has no language column.
"""

from __future__ import annotations

from collections import defaultdict

from data_prep import schemas
from data_prep.chat_format import ASSISTANT, USER
from data_prep.conversations import make_record, records_batch
from data_prep.sources import Source


def linearize(history: list[dict]) -> tuple[str, list[dict], list[str]]:
    """PRISM's history (entries in any order) -> (malformed reason or "", linear turns, events)."""
    by_turn: dict[int, dict[str, list]] = defaultdict(lambda: {"user": [], "model": []})
    for entry in history:
        if entry["role"] not in ("user", "model") or entry["turn"] is None:
            return "malformed:prism_bad_entry", [], []
        by_turn[entry["turn"]][entry["role"]].append(entry)
    if sorted(by_turn) != list(range(len(by_turn))):
        return "malformed:prism_turns_not_contiguous", [], []
    turns, events = [], []
    for t in range(len(by_turn)):
        users, chosen = by_turn[t]["user"], [e for e in by_turn[t]["model"] if e["if_chosen"]]
        if len({e["content"] for e in users}) != 1:
            return "malformed:prism_user_entries", [], []
        if len({e["content"] for e in chosen}) > 1:
            events.append("prism_tie_resolved_by_score")
            chosen.sort(key=lambda e: (-(e["score"] or 0), e["within_turn_id"] or 0))
        elif len(chosen) > 1:
            events.append("prism_tie_identical")
        turns.append({"role": USER, "content": users[0]["content"]})
        if chosen:
            turns.append({"role": ASSISTANT, "content": chosen[0]["content"]})
    return "", turns, events


def records(batch: dict, filters_cfg, data_cfg, chat_format) -> dict:
    out = []
    for i, key in enumerate(batch[data_cfg.id_field]):
        malformed, turns, events = linearize(batch["conversation_history"][i] or [])
        out.append(make_record(key, turns, filters_cfg, chat_format, user_id=batch["user_id"][i], country="PRISM", events=events,
                               malformed=malformed))
    return records_batch(out)


SOURCE = Source("prism", reader="table", records=records, check=schemas.check_prism, fixed_user_field="user_id",
                nested_fields={"conversation_history": ("turn", "role", "content", "if_chosen", "score",
                                                        "within_turn_id")})
