"""Append-only JSON Lines: the durable appender and the reader every stage uses (the intents store,
simulation transcripts, training metrics).

A row is handed to the operating system in one write call the moment it is appended, so a run
killed at any moment (kill -9, out of memory) loses at most the line being written; fsync runs at
most every FSYNC_INTERVAL_S and on close, so a power cut loses at most that long of work (an fsync
per line costs milliseconds and would cap a run at a few hundred rows per second). Such a torn
last line (no newline at the end) is detected: readers skip it, the writer cuts it off before
appending.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)
FSYNC_INTERVAL_S = 0.5
TAIL_BLOCK_BYTES = 1 << 16   # read back from the end of a file to find its last line


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None]]:
    """(line number, row) for each non-empty line; row None for a torn last line. Read a line at a
    time: memory holds one line, not the file (an intents store of WildChat-1M is 160 MB, and its
    lines as bytes objects twice that)."""
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if not line.endswith(b"\n"):  # the last line, with no newline after it: a write cut short
                    log.warning("%s:%d: torn last line (an interrupted write), ignored", path, line_number)
                    yield line_number, None
                    continue
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None


class JsonlWriter:
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
            size = f.seek(0, os.SEEK_END)
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            # Only the last line is read: back from the end, a block at a time, to its start.
            start = size
            while start > 0:
                step = min(TAIL_BLOCK_BYTES, start)
                f.seek(start - step)
                block = f.read(step)
                start -= step
                if (newline := block.rfind(b"\n")) >= 0:
                    start += newline + 1
                    break
            f.seek(start)
            tail = f.read()
            try:  # cut exactly between the row and its newline: the row is whole, keep it
                json.loads(tail)
                f.write(b"\n")
                return 0
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
            log.warning("%s: cutting a torn last line of %d bytes (an interrupted write)", self.path, len(tail))
            f.truncate(start)
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

    def sync(self) -> None:
        """Put every row appended so far on disk now."""
        os.fsync(self._fd)
        self._synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        os.close(self._fd)

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
