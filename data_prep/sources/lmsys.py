"""LMSYS-Chat-1M (lmsys/lmsys-chat-1m, gated; or local parquet/JSON Lines in its schema).

{conversation_id, model, conversation: [{content, role}], turn, language, openai_moderation,
redacted}. The key is conversation_id (data.id_field); language feeds filters.languages (names
like "English", as WildChat's); a conversation is toxic when any of its messages was flagged by
OpenAI's moderation; redacted as given. No user id: each conversation is its own user unless
data.user_field names a column.
"""

from __future__ import annotations

import pyarrow as pa

from data_prep import schemas
from data_prep.conversations import make_record, records_batch
from data_prep.sources import Source

TURN = pa.struct([("content", pa.string()), ("role", pa.string())])
SCHEMA = pa.schema([("conversation_id", pa.string()), ("conversation", pa.list_(TURN)),
                    ("language", pa.string()), ("redacted", pa.bool_())])
REQUIRED, OPTIONAL = ("conversation_id", "conversation"), ("language", "redacted")


def check(schema: pa.Schema, source: str) -> None:
    schemas.check_columns(schema, source, REQUIRED, OPTIONAL, "conversation", ("content", "role"), (), SCHEMA, TURN)


def records(batch: dict, filters_cfg, data_cfg, chat_format) -> dict:
    keys = batch[data_cfg.id_field]
    column = {c: batch.get(c, [None] * len(keys)) for c in ("language", "redacted", "openai_moderation")}
    users = batch[data_cfg.user_field] if data_cfg.user_field else [None] * len(keys)
    out = []
    for i, key in enumerate(keys):
        conversation = batch["conversation"][i] or []
        flagged = any((m or {}).get("flagged") for m in column["openai_moderation"][i] or [])
        out.append(make_record(
            None if key is None else str(key), [{"role": t["role"], "content": t["content"]} for t in conversation],
            filters_cfg, chat_format, language=column["language"][i], toxic=flagged, redacted=column["redacted"][i],
            user_id=None if users[i] is None else str(users[i])))
    return records_batch(out)


SOURCE = Source("lmsys", reader="table", records=records, check=check,
                columns=(*REQUIRED, *OPTIONAL, "openai_moderation"),
                nested_fields={"conversation": ("content", "role"), "openai_moderation": ("flagged",)}, has_language=True)
