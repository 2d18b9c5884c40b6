"""The intents store: an append-only JSONL of {conversation_hash, intent[, prompt_version, model, ...]}.

data_prep reads it (`intents.path`); generation appends to it, one line per finished intent, the
moment it arrives (core.jsonl: durable appends, a torn last line skipped by readers and cut by the
writer). Generated lines carry the cache key (prompt_version, model) and the prompt fingerprint
(`prompt_sha`: a hash of the whole prompt config, data_prep.intents.prompt); a hand-written file may
hold only {conversation_hash, intent}.

Intents of one prompt version are never used for another: generation selects the rows of its own
(version, model); the `file` backend (`read_intents_of_prompt`) uses the hand-written rows and the
rows generated under the run's prompt version, leaves out (and logs) those of other versions, and
refuses a store that holds only other versions' intents (say, a v1 store read under prompt v2).
Either way, rows of the run's version made with a different prompt text are refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.jsonl import jsonl_rows

log = logging.getLogger(__name__)


def read_store(path: str | Path) -> Iterator[dict]:
    """Every well-formed row; a bad line is an error naming the file, line and field."""
    for line_number, row in jsonl_rows(Path(path)):
        if row is None:
            continue
        for key in ("conversation_hash", "intent"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}:{line_number}: field {key!r} must be a non-empty string")
        yield row


def read_intents(path: str | Path, prompt_version: Optional[str] = None, model: Optional[str] = None,
                 prompt_sha: Optional[str] = None, of: Optional[pa.Array] = None) -> dict[str, str] | pa.Array:
    """Map conversation_hash -> intent (with `of`: the intents of those conversations, AlignedIntents).

    With prompt_version and model: only the rows generated under that key (the newest row of a
    conversation wins), each checked against `prompt_sha` when given. Without: every row, and a
    conversation with two different intents (say, from two prompt versions) is an error, since
    which one to use cannot be guessed.
    of: the conversations wanted (data_prep's kept ones, their hashes as an Arrow string array):
    the result is their intents in that order, null where there is none. The rows of others are
    still checked for bad fields and prompt text, but not held nor compared, so memory follows the
    kept conversations, not the store.
    """
    if prompt_version is None:
        return intents_of_rows(path, read_store(path), one_intent_each=True, of=of)
    rows = (row for row in read_store(path) if (row.get("prompt_version"), row.get("model")) == (prompt_version, model))
    if prompt_sha is not None:
        rows = (check_prompt_unchanged(path, row, prompt_sha) for row in rows)
    return intents_of_rows(path, rows, one_intent_each=False, of=of)


def read_intents_of_prompt(path: str | Path, prompt_version: str, prompt_sha: str,
                           of: Optional[pa.Array] = None) -> dict[str, str] | pa.Array:
    """Map conversation_hash -> intent for a run whose prompt is (prompt_version, prompt_sha), from a
    store it does not generate into (the `file` backend): hand-written rows (no prompt_version) and
    rows generated under prompt_version, by any model; a conversation with two different intents
    among them is an error. Rows of other versions are left out and logged; a store with rows of
    other versions only is refused, naming them. of: as for read_intents."""
    other_versions, usable = Counter(), 0

    def usable_rows() -> Iterator[dict]:
        nonlocal usable
        for row in read_store(path):
            version = row.get("prompt_version")
            if version is None or version == prompt_version:
                usable += 1
                yield row if version is None else check_prompt_unchanged(path, row, prompt_sha)
            else:
                other_versions[version] += 1

    intents = intents_of_rows(path, usable_rows(), one_intent_each=True, of=of)
    if other_versions and not usable:
        raise ValueError(f"{path}: its intents were generated with prompt version(s) {sorted(other_versions)}, "
                         f"and this run's prompt is {prompt_version!r}: they are not mixed. Run with "
                         f"intents/prompt=<their version> to use them, or generate {prompt_version}'s "
                         "(intents.backend=openai|hf) into this or another store")
    if other_versions:
        log.warning("%s: %d intents of other prompt versions (%s) left out: this run's prompt is %s", path,
                    sum(other_versions.values()), ", ".join(f"{v} {n}" for v, n in sorted(other_versions.items())),
                    prompt_version)
    return intents


def check_prompt_unchanged(path: str | Path, row: dict, fingerprint: str) -> dict:
    """`row`, generated under the run's prompt version; refused if made with another prompt text."""
    if row.get("prompt_sha") != fingerprint:
        raise ValueError(f"{path}: intents of prompt version {row.get('prompt_version')!r} were made with a different "
                         f"prompt text (fingerprint {row.get('prompt_sha')}, now {fingerprint}): give the edited "
                         "prompt a new version (intents.prompt.version) instead of reusing them")
    return row


def intents_of_rows(path, rows: Iterable[dict], one_intent_each: bool,
                    of: Optional[pa.Array] = None) -> dict[str, str] | pa.Array:
    """The rows' intents by conversation: the newest row's, or (one_intent_each) the one intent a
    conversation may have, two different ones being an error. of: see read_intents."""
    if of is not None:
        aligned = AlignedIntents(path, of, one_intent_each)
        for row in rows:
            aligned.add(row["conversation_hash"], row["intent"].strip())
        return aligned.result()
    intents: dict[str, str] = {}
    for row in rows:
        intent, previous = row["intent"].strip(), intents.get(row["conversation_hash"])
        if previous is not None and previous != intent and one_intent_each:
            raise several_intents(path, row["conversation_hash"])
        intents[row["conversation_hash"]] = intent
    return intents


def several_intents(path, conversation_hash: str) -> ValueError:
    return ValueError(f"{path}: conversation {conversation_hash} has several intents (from several prompt "
                      "versions or models?): read it with the generating backend, which selects its own, or keep one")


class AlignedIntents:
    """The intents of the conversations `of` (an Arrow string array of hashes), in its order, null
    where there is none, collected from the store's rows CHUNK_ROWS at a time by Arrow: a row of
    another conversation is left at once, and nothing per conversation is a Python object (a dict
    of WildChat-1M's 377k kept conversations' intents was ~0.2 GiB). The rule is intents_of_rows'."""

    CHUNK_ROWS = 10_000

    def __init__(self, path, of: pa.Array, one_intent_each: bool):
        self.path, self.one_intent_each = path, one_intent_each
        self.of = of.combine_chunks() if isinstance(of, pa.ChunkedArray) else of
        self.wanted = pc.unique(self.of)   # a hash may be kept twice (an id the source repeats)
        self.pending: tuple[list[str], list[str]] = ([], [])
        self.positions: list[pa.Array] = []   # of each matching row: its conversation's index in `wanted`
        self.intents: list[pa.Array] = []

    def add(self, conversation_hash: str, intent: str) -> None:
        self.pending[0].append(conversation_hash)
        self.pending[1].append(intent)
        if len(self.pending[0]) >= self.CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        hashes, intents = self.pending
        positions = pc.index_in(pa.array(hashes, pa.string()), value_set=self.wanted)
        matching = positions.is_valid()
        self.positions.append(positions.filter(matching))
        self.intents.append(pa.array(intents, pa.string()).filter(matching))
        self.pending = ([], [])

    def result(self) -> pa.Array:
        self._flush()
        positions = pa.chunked_array(self.positions, pa.int32()).to_numpy()
        intents = pa.chunked_array(self.intents, pa.string()).combine_chunks()
        self.positions = self.intents = []
        order = np.argsort(positions, kind="stable")   # each conversation's rows together, in store order
        by_conversation = positions[order]
        repeats = np.flatnonzero(by_conversation[1:] == by_conversation[:-1])   # order[i + 1] repeats order[i]
        if self.one_intent_each and len(repeats):
            differ = pc.not_equal(intents.take(order[repeats]), intents.take(order[repeats + 1])).to_numpy(
                zero_copy_only=False)
            if differ.any():
                raise several_intents(self.path, self.wanted[int(by_conversation[repeats[differ.argmax()]])].as_py())
        newest = order[np.append(by_conversation[1:] != by_conversation[:-1], True)] if len(order) else order
        row_of_wanted = np.full(len(self.wanted), -1, dtype=np.int64)
        row_of_wanted[positions[newest]] = newest
        intent_of_wanted = intents.take(pa.array(row_of_wanted, mask=row_of_wanted < 0))
        del intents
        if len(self.wanted) == len(self.of):   # no hash twice: `wanted` is `of` (unique keeps first occurrences)
            return intent_of_wanted
        return intent_of_wanted.take(pc.index_in(self.of, value_set=self.wanted))
