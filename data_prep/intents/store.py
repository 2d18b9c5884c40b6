"""The intents store: an append-only JSONL of {conversation_hash, intent[, prompt_version, model, ...]}.

data_prep reads it (`intents.path`); generation appends to it, one line per finished intent,
handed to the operating system (one write call) the moment it arrives, so a run killed at any
moment (kill -9, out of memory) loses at most the line being written; fsync runs at most every
FSYNC_INTERVAL_S and on close, so a power cut loses at most that long of work (an fsync per line
costs milliseconds and would cap a run at a few hundred intents per second). Such a torn last line (no newline at the end) is detected: readers skip it, the writer cuts
it off before appending. Generated lines carry the cache key (prompt_version, model) and the prompt
fingerprint; a hand-written file may hold only {conversation_hash, intent}.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)
FSYNC_INTERVAL_S = 0.5


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None]]:
    """(line number, row) for each non-empty line; row None for a torn last line."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if line_number == len(lines):  # the last line, with no newline after it: a write cut short
                log.warning("%s:%d: torn last line (an interrupted write), ignored", path, line_number)
                yield line_number, None
                continue
            raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None


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


class IntentWriter:
    """Appends rows: one write call per row, fsync every FSYNC_INTERVAL_S and on close. Cuts a
    torn last line on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.torn_lines_removed = self._cut_torn_tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._synced = time.monotonic()

    def _cut_torn_tail(self) -> int:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0
        with open(self.path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return 0
            keep = data.rfind(b"\n") + 1
            try:  # cut exactly between the row and its newline: the row is whole, keep it
                json.loads(data[keep:])
                f.write(b"\n")
                return 0
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
            log.warning("%s: cutting a torn last line of %d bytes (an interrupted write)", self.path,
                        len(data) - keep)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return 1

    def append(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        while line:  # O_APPEND: each write lands at the end; a regular file takes it in one call
            line = line[os.write(self._fd, line):]
        if time.monotonic() - self._synced >= FSYNC_INTERVAL_S:
            os.fsync(self._fd)
            self._synced = time.monotonic()

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)

    def __enter__(self) -> "IntentWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
