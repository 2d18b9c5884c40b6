"""One conversation record per input row, whatever the source (data_prep.sources), malformed rows flagged.

A record is {conversation_hash, turns: [{role, content}], ended, language, malformed, exact_key,
near_key, toxic, redacted, num_user_turns, num_chars, user_key, country, events}. `malformed` is
"" or the reason the row cannot be used ("malformed:<what>"); `events` lists counted, non-fatal
decisions (a trimmed turn, a PRISM tie, characters removed, a system message dropped). user_key is
a one-way hash used only to split by user; it never reaches the saved outputs.

Characters that are not text are removed from every turn before anything else looks at it:
control characters (Unicode category Cc: NUL, ESC, DEL, the C1 range; tab, newline and carriage
return stay), and ANSI escape sequences whole (ESC [ ... : colours and cursor moves pasted from a
terminal). A user never meant to write them and a user LM should not learn to emit them (event
`control_characters_removed`, one per conversation). Invisible format characters (category Cf:
zero-width space U+200B, bidirectional overrides such as U+202E, the zero-width joiner of emoji
sequences and of Persian script) are part of real text and are kept, but counted (event
`format_characters`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import sys
import unicodedata
from collections import defaultdict
from typing import Sequence

import datasets
import numpy as np
import pyarrow as pa

from data_prep.chat_format import ASSISTANT, USER, ChatFormat

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")   # Cc but \t \n \r
_C0_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0b, 0x0c, *range(0x0e, 0x20), 0x7f])   # its ASCII part
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")                           # CSI: ESC [ params final


@functools.cache
def _format_character() -> re.Pattern:
    """Any character of Unicode category Cf (built on first use: Python's re has no \\p{Cf}).
    The class is written as ranges of consecutive code points (21, not 163 single characters):
    re searches it about 15 times faster."""
    ranges: list[list[int]] = []
    for c in range(sys.maxunicode + 1):
        if unicodedata.category(chr(c)) == "Cf":
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    return re.compile("[" + "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "")
                                    for a, b in ranges) + "]")


def has_control_character(text: str) -> bool:
    """Whether `text` holds a control character (_CONTROL_CHARACTER): its UTF-8 bytes are checked
    by bytes.translate, three times faster than the regular expression, which runs only where a
    C1 control (U+0080-U+009F, bytes C2 80-C2 9F) may be."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data.translate(None, _C0_CONTROL_BYTES)) != len(data):
        return True
    return b"\xc2" in data and _CONTROL_CHARACTER.search(text) is not None


def remove_control_characters(turns: list[dict]) -> tuple[list[dict], list[str]]:
    """The turns with control characters removed (see the module docstring), and the events."""
    removed = has_format = False
    cleaned = []
    for turn in turns:
        content = turn["content"]
        if content is not None:
            if has_control_character(content):  # ESC is one, so this finds ANSI sequences too
                content = _CONTROL_CHARACTER.sub("", _ANSI_ESCAPE.sub("", content))
                removed = True
            # Every Cf character is outside ASCII, and str.isascii() costs nothing (CPython keeps the flag).
            has_format = has_format or (not content.isascii() and _format_character().search(content) is not None)
        cleaned.append({"role": turn["role"], "content": content})
    return cleaned, ["control_characters_removed"] * removed + ["format_characters"] * has_format


def exact_key(turns: list[dict]) -> str:
    digest = hashlib.sha1()
    for turn in turns:
        digest.update(f"{turn['role']}\x1e{turn['content']}\x1f".encode())
    return digest.hexdigest()


def near_key(turns: list[dict], ngram: int) -> str:
    """The first `ngram` words of the normalised first user turn; "" when it has fewer words."""
    # Only the first `ngram` words are matched: a first turn can be a paste of thousands of words.
    words = [m.group() for m in itertools.islice(_WORD.finditer(turns[0]["content"].lower()), ngram)] if turns else []
    return " ".join(words) if len(words) == ngram else ""


def user_key(hashed_ip: str | None, country: str | None) -> str | None:
    if not hashed_ip:
        return None
    return hashlib.sha256(f"{hashed_ip}\x1f{country}".encode()).hexdigest()


def check_turns(turns: list[dict], unanswered_last_turn: str, chat_format: ChatFormat
                ) -> tuple[str, list[dict], bool, list[str]]:
    """Validate a linear dialogue. Returns (malformed reason or "", turns, ended, events).

    unanswered_last_turn: a data_prep.config.UnansweredLastTurn (the schema refuses other values).
    chat_format: the format the examples are made in, whose control strings no turn may hold (a
    turn holding the pad token's text would train on the pad id)."""
    events: list[str] = []
    if not any(t["role"] == USER for t in turns):
        return "malformed:no_user_turn", turns, False, events
    for i, turn in enumerate(turns):
        if turn["role"] not in (USER, ASSISTANT):
            return "malformed:unknown_role", turns, False, events
        if turn["content"] is None:
            return "malformed:null_content", turns, False, events
        if turn["role"] != (USER if i % 2 == 0 else ASSISTANT):
            return "malformed:roles_out_of_order", turns, False, events
        if turn["role"] == USER and not turn["content"].strip():
            return "malformed:empty_user_turn", turns, False, events
        if chat_format.find_control_string(turn["content"]):
            return "malformed:control_token_in_text", turns, False, events
    ended = turns[-1]["role"] == ASSISTANT
    if not ended:
        if unanswered_last_turn == "drop":
            return "malformed:unanswered_last_turn", turns, False, events
        if unanswered_last_turn == "trim":
            turns = turns[:-1]
            events.append("trimmed_unanswered_last_turn")
            if not turns:
                return "malformed:no_user_turn", turns, False, events
            ended = True
        else:  # keep_no_end
            events.append("unanswered_last_turn_no_end")
    return "", turns, ended, events


def make_record(key: str | None, turns: list[dict], filters_cfg, chat_format: ChatFormat, *, language: str | None = None, toxic=False,
                redacted=False, user_id: str | None = None, country: str | None = None, events=(),
                malformed: str = "") -> dict:
    """The record of one conversation (data_prep.sources' adapters call this): its turns cleaned and
    checked. `key` is the source's own conversation id; None derives it from the cleaned turns
    (exact_key, event id_from_turns). `user_id` (with `country`) identifies the user for the split.
    `malformed`: the adapter already knows the row cannot be used (its reason); the turns are not checked."""
    turns, removal_events = remove_control_characters(turns)
    if malformed:
        ended, check_events = False, []
    else:
        malformed, turns, ended, check_events = check_turns(turns, filters_cfg.unanswered_last_turn, chat_format)
    ok = not malformed
    content_key = exact_key(turns)
    return {
        "conversation_hash": content_key if key is None else key,
        "turns": turns,
        "ended": ended,
        "language": language or "",
        "malformed": malformed,
        "exact_key": content_key if ok else "",
        "near_key": near_key(turns, filters_cfg.near_duplicates.ngram) if ok else "",
        "toxic": bool(toxic),
        "redacted": bool(redacted),
        "num_user_turns": sum(1 for t in turns if t["role"] == USER),
        "num_chars": sum(len(t["content"] or "") for t in turns),
        "user_key": user_key(user_id, country),
        "country": country or "",
        "events": list(events) + ["id_from_turns"] * (key is None) + removal_events + check_events,
    }


def records_batch(records: list[dict]) -> dict:
    """Records as the column dict a batched datasets.map function returns."""
    out = defaultdict(list)
    for record in records:
        for column, value in record.items():
            out[column].append(value)
    return out


RECORD_FEATURES = datasets.Features({
    "conversation_hash": datasets.Value("string"),
    "turns": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "ended": datasets.Value("bool"),
    "language": datasets.Value("string"),
    "malformed": datasets.Value("string"),
    "exact_key": datasets.Value("string"),
    "near_key": datasets.Value("string"),
    "toxic": datasets.Value("bool"),
    "redacted": datasets.Value("bool"),
    "num_user_turns": datasets.Value("int32"),
    "num_chars": datasets.Value("int64"),
    "user_key": datasets.Value("string"),
    "country": datasets.Value("string"),
    "events": datasets.List(datasets.Value("string")),
})


def rows_of(records: datasets.Dataset, rows: Sequence[int], columns: Sequence[str]) -> pa.Table:
    """These rows (in the order given) of these columns, gathered by Arrow from each record batch
    of the memory-mapped table. Not through datasets' own indexing: `select(rows)[...]` gathers one
    single-row record batch per row (~1 KB each: 0.5 GiB for 478k rows), and iterating a Column
    converts row by row (seconds per 100k rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    if records._indices is not None:   # a selection of records: its rows of the underlying table
        rows = records._indices.column(0).to_numpy()[rows].astype(np.int64)
    table = records.data.table.select(list(columns))
    batches = table.to_batches()
    starts = np.cumsum([0] + [batch.num_rows for batch in batches])
    batch_of = np.searchsorted(starts, rows, side="right") - 1
    order = np.argsort(batch_of, kind="stable")
    in_order = batch_of[order]
    gathered = pa.Table.from_batches([
        batches[b].take(pa.array(rows[order[np.searchsorted(in_order, b):np.searchsorted(in_order, b, side="right")]]
                                 - starts[b])) for b in np.unique(batch_of)], schema=table.schema)
    if np.any(order != np.arange(len(rows))):   # rows not in table order: put them back in theirs
        gathered = gathered.take(pa.array(np.argsort(order, kind="stable")))
    return gathered


def column_of(records: datasets.Dataset, rows: Sequence[int], column: str) -> pa.ChunkedArray:
    """One column of these rows (rows_of)."""
    return rows_of(records, rows, [column])[column]
