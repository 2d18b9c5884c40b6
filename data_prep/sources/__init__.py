"""Where conversations come from: one adapter per chat-log source, behind one registry.

    source = sources.get("sharegpt")      # a Source: how to read the rows and make records of them

A source is one module here that defines `SOURCE = Source(...)`, plus a dataset YAML
(conf/data_prep/dataset/<name>.yaml) and its name in `NAMES`. Each turns its raw rows into
data_prep.conversations records (turns [{role, content}] with user and assistant alternating, user
first; the conversation key; language, user and moderation fields where it has them); everything
after that (filters, split, intents, flipping) is the same for all sources.

    wildchat          WildChat-1M parquet (or JSON Lines in its schema): the paper's data
    prism             PRISM's branching conversations, linearised: an evaluation set
    lmsys             LMSYS-Chat-1M parquet: conversation_id, conversation [{role, content}], language
    sharegpt          ShareGPT JSON or JSON Lines: {id, conversations: [{from, value}]}
    openai_messages   OpenAI chat-format JSON Lines: {messages: [{role, content, tool_calls, ...}]}

This module imports nothing heavy: the config schema takes the names from it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

NAMES = ("wildchat", "prism", "lmsys", "sharegpt", "openai_messages")


@dataclass(frozen=True)
class Source:
    name: str
    # How rows are read. "table": parquet or JSON Lines through `datasets`, every file's Arrow schema
    # checked by `check` first. "json_rows": each JSON row kept whole as its text (rows of these
    # formats differ in shape, e.g. content as a string or a list of parts, which one Arrow schema
    # cannot hold), and parsed by `records`.
    reader: str
    # datasets.map (batched) function: raw rows -> records (data_prep.conversations.make_record),
    # called as records(batch, filters_cfg=..., data_cfg=..., chat_format=...) (a chat_format.ChatFormat:
    # whose control strings no turn may hold).
    records: Callable
    check: Callable | None = None          # table: raise naming the file and column of a bad schema
    json_field: str | None = None          # json_rows: the field every row holds (checked on each file's first row)
    columns: tuple[str, ...] | None = None  # table: the parquet columns read (None: all)
    has_language: bool = False             # rows carry a language: filters.languages can apply
    # table: of each list-of-structs column, the struct fields `records` reads (those a file has);
    # the others never become Python objects (WildChat's turns carry timestamps, browser headers and
    # ids besides role and content: converting all of them was half of normalise's time). A column
    # not named here is converted whole.
    nested_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The user field is fixed by the schema (WildChat: hashed_ip with country, PRISM: user_id):
    # data.user_field must name it. None: data.user_field is any top-level field, or null.
    fixed_user_field: str | None = None


def get(name: str) -> Source:
    if name not in NAMES:
        raise ValueError(f"unknown data source {name!r}: expected one of {', '.join(NAMES)}")
    return importlib.import_module(f"data_prep.sources.{name}").SOURCE
