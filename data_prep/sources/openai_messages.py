"""OpenAI chat-format JSON Lines: {"messages": [{"role", "content", "tool_calls", "name"}], "id"?}
(API exports, fine-tuning files, most logging proxies).

Roles: user; assistant (its `tool_calls` or legacy `function_call` are not shown to the user:
dropped, counted); system and developer -> the assistant's instructions (dropped, counted); tool
and legacy function -> tool results (assistant side, dropped, counted). Content: a string, null,
or a list of parts, of which the text parts are kept (data_prep.sources.messages). The key is `id`
(data.id_field) when rows carry one, else derived from the turns.
"""

from __future__ import annotations

from data_prep.chat_format import ASSISTANT, USER
from data_prep.sources import Source
from data_prep.sources.messages import SYSTEM, TOOL, Malformed, message_records

ROLES = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM, "developer": SYSTEM, "tool": TOOL,
         "function": TOOL}


def message(entry: dict) -> tuple[str, object, bool]:
    if entry.get("role") not in ROLES:
        raise Malformed("malformed:unknown_role")
    role = ROLES[entry["role"]]
    return role, entry.get("content"), role == ASSISTANT and bool(entry.get("tool_calls") or entry.get("function_call"))


def records(batch: dict, filters_cfg, data_cfg, chat_format) -> dict:
    return message_records(batch, filters_cfg, data_cfg, chat_format, SOURCE.json_field, message)


SOURCE = Source("openai_messages", reader="json_rows", records=records, json_field="messages")
