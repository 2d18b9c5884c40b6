"""ShareGPT-style JSON or JSON Lines: {"id", "conversations": [{"from", "value"}]} (many SFT sets).

Roles by the names these files use: human/user -> user; gpt/assistant/chatgpt/bing/bard/model ->
assistant; system -> the assistant's instructions (dropped, counted); tool/function/observation ->
tool results and function_call -> a tool call (assistant side, not shown: data_prep.sources.messages).
The key is `id` (data.id_field); no language column, no user id (data.user_field names one if
your files have it).
"""

from __future__ import annotations

from data_prep.chat_format import ASSISTANT, USER
from data_prep.sources import Source
from data_prep.sources.messages import SYSTEM, TOOL, Malformed, message_records

ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "chatgpt": ASSISTANT,
         "bing": ASSISTANT, "bard": ASSISTANT, "model": ASSISTANT, "system": SYSTEM, "tool": TOOL,
         "function": TOOL, "observation": TOOL}


def message(entry: dict) -> tuple[str, object, bool]:
    speaker = entry.get("from")
    if speaker == "function_call":
        return ASSISTANT, None, True
    if speaker not in ROLES:
        raise Malformed("malformed:unknown_role")
    value = entry.get("value")
    if not (value is None or isinstance(value, str)):
        raise Malformed("malformed:bad_content")
    return ROLES[speaker], value, False


def records(batch: dict, filters_cfg, data_cfg, chat_format) -> dict:
    return message_records(batch, filters_cfg, data_cfg, chat_format, SOURCE.json_field, message)


SOURCE = Source("sharegpt", reader="json_rows", records=records, json_field="conversations")
