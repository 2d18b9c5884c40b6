"""WildChat-1M (allenai/WildChat-1M): parquet shards, or JSON Lines in the same schema.

The conversation key is `conversation_hash` (not unique in WildChat: duplicates are dropped by the
exact-duplicate filter); a row without one is malformed. Only conversation_hash and conversation
[{role, content}] are required, so one's own logs in this schema work too; language, toxic,
redacted, hashed_ip and country are read when present (top level, else the first user turn).
The user is (hashed_ip, country).
"""

from __future__ import annotations

from data_prep import schemas
from data_prep.chat_format import USER
from data_prep.conversations import make_record, records_batch
from data_prep.sources import Source

OPTIONAL = ("language", "toxic", "redacted", "hashed_ip", "country")


def records(batch: dict, filters_cfg, data_cfg, chat_format) -> dict:
    keys = batch[data_cfg.id_field]
    optional = {c: batch.get(c, [None] * len(keys)) for c in OPTIONAL}
    out = []
    for i, key in enumerate(keys):
        if key is None:
            out.append(make_record("", [], filters_cfg, chat_format, malformed=f"malformed:null_{data_cfg.id_field}"))
            continue
        conversation = batch["conversation"][i] or []
        first_user = next((t for t in conversation if t["role"] == USER), {})
        out.append(make_record(
            key, [{"role": t["role"], "content": t["content"]} for t in conversation], filters_cfg, chat_format,
            language=optional["language"][i],
            toxic=optional["toxic"][i] or any(t.get("toxic") for t in conversation),
            redacted=optional["redacted"][i] or any(t.get("redacted") for t in conversation),
            user_id=optional["hashed_ip"][i] or first_user.get("hashed_ip"),
            country=optional["country"][i] or first_user.get("country")))
    return records_batch(out)


SOURCE = Source("wildchat", reader="table", records=records, check=schemas.check_wildchat,
                columns=schemas.WILDCHAT_REQUIRED + schemas.WILDCHAT_OPTIONAL,
                nested_fields={"conversation": schemas.TURN_REQUIRED + schemas.TURN_OPTIONAL}, has_language=True,
                fixed_user_field="hashed_ip")
