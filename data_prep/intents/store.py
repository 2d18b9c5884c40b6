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
from typing import Container, Iterable, Iterator, Optional

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
                 prompt_sha: Optional[str] = None, only: Optional[Container[str]] = None) -> dict[str, str]:
    """Map conversation_hash -> intent.

    With prompt_version and model: only the rows generated under that key (the newest row of a
    conversation wins), each checked against `prompt_sha` when given. Without: every row, and a
    conversation with two different intents (say, from two prompt versions) is an error, since
    which one to use cannot be guessed.
    only: the conversations wanted (data_prep's kept ones): the rows of others are still checked
    for bad fields and prompt text, but not held nor compared, so memory follows the kept
    conversations, not the store.
    """
    if prompt_version is None:
        return intents_of_rows(path, read_store(path), one_intent_each=True, only=only)
    rows = (row for row in read_store(path) if (row.get("prompt_version"), row.get("model")) == (prompt_version, model))
    if prompt_sha is not None:
        rows = (check_prompt_unchanged(path, row, prompt_sha) for row in rows)
    return intents_of_rows(path, rows, one_intent_each=False, only=only)


def read_intents_of_prompt(path: str | Path, prompt_version: str, prompt_sha: str,
                           only: Optional[Container[str]] = None) -> dict[str, str]:
    """Map conversation_hash -> intent for a run whose prompt is (prompt_version, prompt_sha), from a
    store it does not generate into (the `file` backend): hand-written rows (no prompt_version) and
    rows generated under prompt_version, by any model; a conversation with two different intents
    among them is an error. Rows of other versions are left out and logged; a store with rows of
    other versions only is refused, naming them. only: as for read_intents."""
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

    intents = intents_of_rows(path, usable_rows(), one_intent_each=True, only=only)
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
                    only: Optional[Container[str]] = None) -> dict[str, str]:
    intents: dict[str, str] = {}
    for row in rows:
        if only is not None and row["conversation_hash"] not in only:
            continue
        intent, previous = row["intent"].strip(), intents.get(row["conversation_hash"])
        if previous is not None and previous != intent and one_intent_each:
            raise ValueError(f"{path}: conversation {row['conversation_hash']} has several intents (from "
                             "several prompt versions or models?): read it with the generating backend, "
                             "which selects its own, or keep one")
        intents[row["conversation_hash"]] = intent
    return intents
