"""Checking a model's reply before it becomes an intent: clean what can be cleaned, reject the rest.

Cleaned: surrounding whitespace, quotes and backticks, a label ("Intent:", "Summary -") and a
preamble line ending in a colon ("Here is the summary:"). Rejected, with the reason recorded:
truncated (cut by max_tokens), any reason of `intent_problem`, too_long (max_words / max_chars),
missing_prefix (does not start with checks.require_prefix). A rejected reply is counted in the
report and asked again by the next run.

`intent_problem` is the rule every intent must pass however it arrives, a generated reply or a
line of a hand-written intents file (data_prep drops, and counts as `bad_intent`, a conversation
whose intent fails it): not empty (`empty`), no control-token string of any chat format such as
<|eot_id|> or <|im_end|> (`control_token`: it would become real tokens in the system message; one
intents file serves every format), and one line
(`multi_paragraph`: more than one non-empty line; an intent is one sentence, and a line break is
never folded away, since what follows it may be an injected instruction).
"""

from __future__ import annotations

import re
from typing import Optional

from data_prep.chat_format import find_any_control_string

_LABEL = re.compile(r"^\s*(?:\*\*)?(?:task\s+)?(?:intent|summary|answer|output|response)(?:\*\*)?\s*[:\-–]\s*",
                    re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"


def clean_reply(text: str) -> str:
    text = text.strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):   # "Here is the summary:\n..."
        text = "\n".join(lines[1:]).strip()
    previous = None
    while text != previous:
        previous = text
        text = _LABEL.sub("", text).strip().strip(_QUOTES).strip()
    return text


def intent_problem(intent: str) -> Optional[str]:
    """None when `intent` (already stripped) may be a system message, else the reason it may not."""
    if not intent:
        return "empty"
    if find_any_control_string(intent):
        return "control_token"
    if len([line for line in intent.splitlines() if line.strip()]) > 1:
        return "multi_paragraph"
    return None


def check_reply(text: str, finish_reason: Optional[str], checks_cfg) -> tuple[Optional[str], Optional[str]]:
    """(intent, None) when the reply is acceptable, else (None, reason)."""
    if finish_reason == "length" and checks_cfg.reject_truncated:
        return None, "truncated"
    intent = clean_reply(text)
    problem = intent_problem(intent)
    if problem:
        return None, problem
    if len(intent) > checks_cfg.max_chars or len(intent.split()) > checks_cfg.max_words:
        return None, "too_long"
    prefix = checks_cfg.require_prefix
    if prefix and not intent.lower().startswith(prefix.lower()):
        return None, "missing_prefix"
    return intent, None
