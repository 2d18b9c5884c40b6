"""The intents store: an append-only JSONL of {conversation_hash, intent[, prompt_version, model, ...]}.

data_prep reads it (`intents.path`); generation appends to it, one line per finished intent, the
moment it arrives (core.jsonl: durable appends, a torn last line skipped by readers and cut by the
writer). Generated lines carry the cache key (prompt_version, model) and the prompt fingerprint; a
hand-written file may hold only {conversation_hash, intent}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

from core.jsonl import jsonl_rows


def read_store(path: str | Path) -> Iterator[dict]:
    """Every well-formed row; a bad line is an error naming the file, line and field."""
    for line_number, row in jsonl_rows(Path(path)):
        if row is None:
            continue
        for key in ("conversation_hash", "intent"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}:{line_number}: field {key!r} must be a non-empty string")
        yield row


def read_intents(path: str | Path, prompt_version: Optional[str] = None, model: Optional[str] = None
                 ) -> dict[str, str]:
    """Map conversation_hash -> intent.

    With prompt_version and model: only the rows generated under that key. Without: every row, and
    a conversation with two different intents (say, from two prompt versions) is an error, since
    which one to use cannot be guessed.
    """
    intents: dict[str, str] = {}
    for row in read_store(path):
        if prompt_version is not None and (row.get("prompt_version"), row.get("model")) != (prompt_version, model):
            continue
        intent, previous = row["intent"].strip(), intents.get(row["conversation_hash"])
        if previous is not None and previous != intent and prompt_version is None:
            raise ValueError(f"{path}: conversation {row['conversation_hash']} has several intents (from "
                             "several prompt versions or models?): read it with the generating backend, "
                             "which selects its own, or keep one")
        intents[row["conversation_hash"]] = intent
    return intents
