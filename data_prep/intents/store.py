"""The {conversation_hash, intent} JSONL store that data_prep reads."""

from __future__ import annotations

import json
from pathlib import Path


def read_intents(path: str | Path) -> dict[str, str]:
    """Map conversation_hash -> intent. A bad line is an error naming the file, line and field."""
    intents: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            for key in ("conversation_hash", "intent"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{line_number}: field {key!r} must be a non-empty string")
            intents[row["conversation_hash"]] = row["intent"].strip()
    return intents
