"""Chat logs as message lists (ShareGPT, OpenAI messages) -> the user/assistant turns a user LM learns from.

The rules, each counted as an event of the funnel (`funnel.json` "events") or a malformed reason:
- system and developer messages are the assistant's instructions: never a user turn, never the
  intent, never a target. Dropped (event `system_message_dropped`).
- Tool calls and tool results are the assistant's side of the conversation, and a person in a chat
  never sees them: the assistant's turn is the text it showed. A run of assistant messages, tool
  calls and tool results between two user turns becomes one assistant turn, its visible text parts
  joined by a blank line (events `tool_call_dropped`, `tool_message_dropped`); such a run with no
  visible text at all is `malformed:tool_only_assistant_turn` (we do not know what the user saw).
  Two assistant messages in a row with no tool between them stay roles out of order, as in WildChat.
- Content is a string, null, or a list of parts: the text parts (`text`, `input_text`,
  `output_text`) are joined by a newline; any other part (images, audio, files) is dropped (event
  `non_text_part_dropped`); a user turn left empty is `malformed:empty_user_turn`. Content of any
  other type is `malformed:bad_content`.
- A role this module does not know is `malformed:unknown_role`; roles out of order, empty user
  turns and control strings are then judged by data_prep.conversations.check_turns.
"""

from __future__ import annotations

import json
from typing import Callable

from data_prep.chat_format import ASSISTANT, SYSTEM, USER
from data_prep.conversations import make_record, records_batch

TOOL = "tool"   # a tool call's result (SYSTEM: chat_format's role name, the same string)
TEXT_PARTS = ("text", "input_text", "output_text")


class Malformed(ValueError):
    """A row that cannot be used: its message is the malformed reason."""


def content_text(content, events: list[str]) -> str | None:
    """A message's content (string, null or a list of parts) as text; None stays None."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Malformed("malformed:bad_content")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict):
            events.append("non_text_part_dropped")
        else:
            raise Malformed("malformed:bad_content")
    return "\n".join(texts)


def chat_turns(messages) -> tuple[list[dict], list[str]]:
    """(role, content, has_tool_calls) per message, roles already mapped to user | assistant |
    system | tool -> (turns [{role, content}], events). Raises Malformed."""
    turns, events = [], []
    shown = tools = False      # since the last user turn: visible assistant text; tool calls or results
    continues = False          # a tool call or result since the last assistant text: the next text joins it
    for role, content, has_tool_calls in messages:
        if role == SYSTEM:
            events.append("system_message_dropped")
            continue
        if role == TOOL:
            events.append("tool_message_dropped")
            tools = continues = True
            continue
        if role not in (USER, ASSISTANT):
            raise Malformed("malformed:unknown_role")
        text = content_text(content, events)
        if role == ASSISTANT and has_tool_calls:
            events.append("tool_call_dropped")
            tools = True
            if not text:       # only tool calls: nothing the user saw
                continues = True
                continue
        if role == USER:
            if tools and not shown:
                raise Malformed("malformed:tool_only_assistant_turn")
            turns.append({"role": USER, "content": text})
            shown = tools = continues = False
            continue
        if continues and turns and turns[-1]["role"] == ASSISTANT:
            turns[-1]["content"] = (turns[-1]["content"] or "") + "\n\n" + (text or "")
        else:
            turns.append({"role": ASSISTANT, "content": text})
        shown, continues = True, has_tool_calls
    if tools and not shown:
        raise Malformed("malformed:tool_only_assistant_turn")
    return turns, events


def json_object(text: str) -> dict:
    row = json.loads(text)   # the reader checked every row is JSON
    if not isinstance(row, dict):
        raise Malformed("malformed:row_not_an_object")
    return row


def top_level_string(row: dict, field: str | None) -> str | None:
    """A top-level field as a string (ids may be numbers), None when absent, null or unset."""
    value = row.get(field) if field else None
    return None if value is None or value == "" else str(value)


def message_records(batch: dict, filters_cfg, data_cfg, chat_format, list_field: str, message: Callable) -> dict:
    """datasets.map function for json_rows sources: each row's `list_field` through `message`
    (entry -> (role, content, has_tool_calls), raising Malformed) and chat_turns into a record.
    The key is data.id_field's value, else derived from the turns; the user is data.user_field's."""
    out = []
    for text in batch["json"]:
        key = user = None
        try:
            row = json_object(text)
            key, user = top_level_string(row, data_cfg.id_field), top_level_string(row, data_cfg.user_field)
            entries = row.get(list_field)
            if not isinstance(entries, list):
                raise Malformed(f"malformed:no_{list_field}_list")
            if not all(isinstance(e, dict) for e in entries):
                raise Malformed("malformed:message_not_an_object")
            turns, events = chat_turns([message(e) for e in entries])
        except Malformed as malformed:
            out.append(make_record(key, [], filters_cfg, chat_format, malformed=str(malformed)))
            continue
        out.append(make_record(key, turns, filters_cfg, chat_format, user_id=user, events=events))
    return records_batch(out)
