"""Arrow schemas of the datasets we read (WildChat-1M's parquet columns as its hub release has
them), and their validation.

The sample generator writes WildChat rows with `WILDCHAT_SCHEMA`; the loader checks every input
file against the columns it reads, so a missing column or a wrong type fails with the file and
column named, before any work is done.
"""

from __future__ import annotations

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")
HEADER = pa.struct([("accept-language", pa.string()), ("user-agent", pa.string())])
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "self-harm",
    "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)
DETOXIFY_FIELDS = ("identity_attack", "insult", "obscene", "severe_toxicity", "sexual_explicit",
                   "threat", "toxicity")
TURN = pa.struct([
    ("content", pa.string()),
    ("country", pa.string()),
    ("hashed_ip", pa.string()),
    ("header", HEADER),
    ("language", pa.string()),
    ("redacted", pa.bool_()),
    ("role", pa.string()),
    ("state", pa.string()),
    ("timestamp", TIMESTAMP),
    ("toxic", pa.bool_()),
    ("turn_identifier", pa.int64()),
])
OPENAI_MODERATION = pa.struct([
    ("categories", pa.struct([(c, pa.bool_()) for c in MODERATION_CATEGORIES])),
    ("category_scores", pa.struct([(c, pa.float64()) for c in MODERATION_CATEGORIES])),
    ("flagged", pa.bool_()),
])
DETOXIFY_MODERATION = pa.struct([(f, pa.float64()) for f in DETOXIFY_FIELDS])

WILDCHAT_SCHEMA = pa.schema([
    ("conversation_hash", pa.string()),
    ("model", pa.string()),
    ("timestamp", TIMESTAMP),
    ("conversation", pa.list_(TURN)),
    ("turn", pa.int64()),
    ("language", pa.string()),
    ("openai_moderation", pa.list_(OPENAI_MODERATION)),
    ("detoxify_moderation", pa.list_(DETOXIFY_MODERATION)),
    ("toxic", pa.bool_()),
    ("redacted", pa.bool_()),
    ("state", pa.string()),
    ("country", pa.string()),
    ("hashed_ip", pa.string()),
    ("header", HEADER),
])

# What data_prep reads of a WildChat row. The required columns are all that one's own chat logs
# need (as parquet or JSON Lines); the optional ones feed the language filter, the toxic/redacted
# filters and the user-level split, and are type-checked when present. Strings may be large_string.
WILDCHAT_REQUIRED = ("conversation_hash", "conversation")
WILDCHAT_OPTIONAL = ("language", "toxic", "redacted", "country", "hashed_ip")
TURN_REQUIRED = ("content", "role")
TURN_OPTIONAL = ("toxic", "redacted", "hashed_ip", "country")

PRISM_HISTORY_ENTRY = pa.struct([
    ("turn", pa.int64()), ("role", pa.string()), ("content", pa.string()),
    ("model_provider", pa.string()), ("model_name", pa.string()), ("score", pa.int64()),
    ("if_chosen", pa.bool_()), ("within_turn_id", pa.int64()),
])
PRISM_REQUIRED = ("conversation_id", "user_id", "conversation_history")


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if _is_string(expected):
        return _is_string(actual) or pa.types.is_null(actual)
    if pa.types.is_timestamp(expected):
        return pa.types.is_timestamp(actual) or pa.types.is_null(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual) or pa.types.is_null(actual)
    if pa.types.is_boolean(expected):
        return pa.types.is_boolean(actual) or pa.types.is_null(actual)
    return actual.equals(expected)


def _list_value_type(t: pa.DataType) -> pa.DataType | None:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return t.value_type
    return None


def check_columns(schema: pa.Schema, source: str, required, optional, list_column: str,
                  entry_required, entry_optional, expected_schema: pa.Schema, expected_entry: pa.StructType) -> None:
    """Raise a ValueError naming `source` and the column if `schema` lacks or mistypes a column."""
    for name in (*required, *optional):
        if name not in schema.names:
            if name in optional:
                continue
            raise ValueError(f"{source}: missing column {name!r} (columns present: {schema.names})")
        actual = schema.field(name).type
        if name == list_column:
            entry = _list_value_type(actual)
            if entry is None or not pa.types.is_struct(entry):
                raise ValueError(f"{source}: column {name!r} has type {actual}, expected a list of structs")
            for field_name in (*entry_required, *entry_optional):
                index = entry.get_field_index(field_name)
                if index < 0:
                    if field_name in entry_optional:
                        continue
                    raise ValueError(f"{source}: column {name!r} lacks the field {field_name!r}")
                field_type = entry.field(index).type
                expected = expected_entry.field(field_name).type
                if not _compatible(field_type, expected):
                    raise ValueError(f"{source}: field {name}.{field_name} has type {field_type}, "
                                     f"expected {expected}")
        elif not _compatible(actual, expected_schema.field(name).type):
            raise ValueError(f"{source}: column {name!r} has type {actual}, "
                             f"expected {expected_schema.field(name).type}")


def check_wildchat(schema: pa.Schema, source: str) -> None:
    check_columns(schema, source, WILDCHAT_REQUIRED, WILDCHAT_OPTIONAL, "conversation", TURN_REQUIRED,
                  TURN_OPTIONAL, WILDCHAT_SCHEMA, TURN)


PRISM_SCHEMA = pa.schema([("conversation_id", pa.string()), ("user_id", pa.string()),
                          ("conversation_history", pa.list_(PRISM_HISTORY_ENTRY))])


def check_prism(schema: pa.Schema, source: str) -> None:
    check_columns(schema, source, PRISM_REQUIRED, (), "conversation_history",
                  ("turn", "role", "content", "if_chosen"), ("score", "within_turn_id"), PRISM_SCHEMA,
                  PRISM_HISTORY_ENTRY)
