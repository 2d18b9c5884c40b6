"""Flipped examples as a `datasets` map: conversations (text + intent) -> token ids and labels.

Each batch's message bodies are tokenized in one batched call (each message once); the examples
are assembled from those token lists by chat_format.ChatEncoder, never by re-tokenizing prefixes.

Before flipping, `unusable_intents` finds the conversations whose intent cannot be a system
message: its text fails data_prep.intents.checks.intent_problem (funnel step `bad_intent`), or it
alone leaves no room for a user turn in max_seq_len (step `intent_too_long`). data_prep drops and
counts those conversations, so flipping never meets one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter
from datasets.table import MemoryMappedTable

from core import artifacts
from data_prep.chat_format import IGNORE_INDEX, SYSTEM, ChatEncoder, conversation_messages, pack_examples
from data_prep.conversations import rows_of
from data_prep.intents.checks import intent_problem

INTENT_TOKENIZE_BATCH = 10_000  # intents tokenized per call when measuring them
INSERTED_TOKENS_MARGIN = 8      # tokens beyond one per byte that a body may get (the end of turn, a prefix)
WRITER_BATCH_ROWS = 1000        # rows per Arrow record batch written (datasets' own default)
# Conversations gathered and written at a time by the intents join (10k held ~0.15 GiB of turns).
JOIN_ROWS = WRITER_BATCH_ROWS

TURN = {"role": datasets.Value("string"), "content": datasets.Value("string")}
CONVERSATION_FEATURES = datasets.Features({
    "conversation_hash": datasets.Value("string"),
    "intent": datasets.Value("string"),
    "turns": datasets.List(TURN),
    "ended": datasets.Value("bool"),
    "language": datasets.Value("string"),
    "num_user_turns": datasets.Value("int32"),
})
EXAMPLE_FEATURES = datasets.Features({
    "conversation_hash": datasets.Value("string"),
    "example_index": datasets.Value("int32"),
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "num_tokens": datasets.Value("int32"),
    "num_target_tokens": datasets.Value("int32"),
    "target_turns": datasets.List(datasets.Value("int32")),
    "truncated": datasets.Value("bool"),
})


def conversations_with_intents(records: datasets.Dataset, rows: Sequence[int], intents: pa.Array | Sequence[str],
                               fingerprint: str) -> datasets.Dataset:
    """The conversations at `rows` of `records`, each with its intent (`intents`, in the same order),
    as a dataset memory-mapped from one Arrow file beside records' cache files, named by
    `fingerprint` (which must cover the records, the rows and the intents): a file already there is
    reused, as datasets reuses a cached map. Written by Arrow alone, JOIN_ROWS rows at a time: the
    record columns gathered by row, the intent column appended after them; no row is converted to
    Python, and memory holds one chunk (datasets' flatten_indices + add_column would convert every
    row, and hold the intents column in memory)."""
    intents = intents if isinstance(intents, (pa.Array, pa.ChunkedArray)) else pa.array(intents, pa.string())
    columns = [c for c in CONVERSATION_FEATURES if c != "intent"]
    features = datasets.Features({c: CONVERSATION_FEATURES[c] for c in [*columns, "intent"]})
    path = Path(records.cache_files[0]["filename"]).parent / f"conversations-{fingerprint}.arrow"
    if not path.is_file():
        with artifacts.atomic_file(path) as partial, \
                ArrowWriter(features=features, path=str(partial), writer_batch_size=WRITER_BATCH_ROWS) as writer:
            for start in range(0, len(rows), JOIN_ROWS):
                chunk = rows_of(records, rows[start:start + JOIN_ROWS], columns)
                # The chunk's intents built again from their strings: a slice of a filtered or taken
                # array can carry value bytes past its last string, which the IPC writer keeps, and the
                # file is to be the same bytes whichever way the intents were gathered.
                own = pa.array(intents.slice(start, JOIN_ROWS).to_pylist(), pa.string())
                writer.write_table(chunk.append_column("intent", own))
            writer.finalize()
    info = records.info.copy()
    info.features = features
    # The fingerprint given, not one datasets derives from the file's path and mtime: outputs (their
    # state.json) stay the same bytes from any cache.
    return datasets.Dataset(MemoryMappedTable.from_file(str(path)), info=info, fingerprint=fingerprint)


def unusable_intents(intents: pa.Array, tokenizer, max_seq_len: int) -> dict[int, tuple[str, str]]:
    """index -> (funnel step, reason) for each of `intents` (an Arrow string array; null: no intent)
    that cannot be used. Read INTENT_TOKENIZE_BATCH intents at a time."""
    encoder = ChatEncoder(tokenizer)
    header = len(encoder.header_ids[SYSTEM])
    unusable: dict[int, tuple[str, str]] = {}
    for start in range(0, len(intents), INTENT_TOKENIZE_BATCH):
        chunk = intents.slice(start, INTENT_TOKENIZE_BATCH).to_pylist()
        to_tokenize = []
        for index, intent in enumerate(chunk, start):
            if intent is None:
                continue
            if problem := intent_problem(intent):
                unusable[index] = ("bad_intent", f"bad_intent:{problem}")
            # Every token of a body covers at least one byte of its text, so a body has at most its
            # UTF-8 length in tokens, plus its end of turn and a few a tokenizer may insert (a dummy
            # prefix): an intent that fits by that bound is never tokenized here (flip tokenizes it anyway).
            elif not encoder.system_fits(header + len(("\n" + intent).encode("utf-8")) + INSERTED_TOKENS_MARGIN,
                                         max_seq_len):
                to_tokenize.append(index)
        for index, body in zip(to_tokenize, encoder.encode_bodies([chunk[i - start] for i in to_tokenize])):
            if not encoder.system_fits(header + len(body), max_seq_len):
                unusable[index] = ("intent_too_long", "intent_too_long")
    return unusable


def flip_batch(batch: dict, tokenizer, mode: str, max_seq_len: int) -> pa.Table:
    """datasets.map (batched) function: conversations -> examples (one-to-many), returned as an
    Arrow table of EXAMPLE_FEATURES. The token columns come from the examples' spans packed by
    numpy (chat_format.pack_examples): per_turn writes ~1.7x the conversation's tokens, and a
    Python list of ints per example cost a fifth of flip's time."""
    encoder = ChatEncoder(tokenizer)
    conversations = [conversation_messages(intent, turns, ended)
                     for intent, turns, ended in zip(batch["intent"], batch["turns"], batch["ended"])]
    bodies = encoder.encode_body_arrays([m["content"] for messages in conversations for m in messages])
    examples, hashes, indices = [], [], []
    offset = 0
    for conversation_hash, messages in zip(batch["conversation_hash"], conversations):
        own_bodies, offset = bodies[offset:offset + len(messages)], offset + len(messages)
        flipped = encoder.flip(messages, mode, max_seq_len, bodies=own_bodies)
        examples += flipped
        hashes += [conversation_hash] * len(flipped)
        indices += range(len(flipped))
    offsets, input_ids, labels = pack_examples(examples)
    offsets = pa.array(offsets)
    columns = {
        "conversation_hash": hashes,
        "example_index": indices,
        "input_ids": pa.ListArray.from_arrays(offsets, input_ids),
        "labels": pa.ListArray.from_arrays(offsets, labels),
        "num_tokens": [e.num_tokens for e in examples],
        "num_target_tokens": [e.num_target_tokens for e in examples],
        "target_turns": [e.target_turns for e in examples],
        "truncated": [e.truncated for e in examples],
    }
    return pa.Table.from_pydict(columns, schema=EXAMPLE_FEATURES.arrow_schema)


def token_statistics(examples: datasets.Dataset) -> dict:
    n = len(examples)
    if n == 0:
        return {"examples": 0, "tokens": 0, "target_tokens": 0, "mean_tokens": 0.0, "max_tokens": 0,
                "truncated_examples": 0}
    # Summed by Arrow: three Python ints per example were ~0.1 GiB at WildChat's 1M+ examples.
    columns = examples.select_columns(["num_tokens", "num_target_tokens", "truncated"]).with_format("arrow")[:]
    tokens = pc.sum(columns["num_tokens"]).as_py()
    return {
        "examples": n,
        "tokens": tokens,
        "target_tokens": pc.sum(columns["num_target_tokens"]).as_py(),
        "mean_tokens": round(tokens / n, 2),
        "max_tokens": pc.max(columns["num_tokens"]).as_py(),
        "truncated_examples": pc.sum(pc.cast(columns["truncated"], pa.int64())).as_py(),
    }


def render_with_targets(tokenizer, input_ids, labels) -> str:
    """Decode an example, wrapping each trained-on span in ⟦ ⟧."""
    pieces, run, run_is_target = [], [], None
    for token, label in zip(input_ids, labels):
        is_target = label != IGNORE_INDEX
        if run and is_target != run_is_target:
            pieces.append(_span(tokenizer, run, run_is_target))
            run = []
        run.append(token)
        run_is_target = is_target
    if run:
        pieces.append(_span(tokenizer, run, run_is_target))
    return "".join(pieces)


def _span(tokenizer, ids, is_target) -> str:
    text = tokenizer.decode(ids)
    return f"⟦{text}⟧" if is_target else text
