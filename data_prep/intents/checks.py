"""Checking a model's reply before it becomes an intent: clean what can be cleaned, reject the rest.

Cleaned: surrounding whitespace, quotes and backticks, a label ("Intent:", "Summary -") and a
preamble line ending in a colon ("Here is the summary:"). Rejected, with the reason recorded:
empty, multi_paragraph (more than one non-empty line), too_long (max_words / max_chars),
missing_prefix (does not start with checks.require_prefix), truncated (cut by max_tokens).
"""

from __future__ import annotations

import re
from typing import Optional

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


def check_reply(text: str, finish_reason: Optional[str], checks_cfg) -> tuple[Optional[str], Optional[str]]:
    """(intent, None) when the reply is acceptable, else (None, reason)."""
    if finish_reason == "length" and checks_cfg.reject_truncated:
        return None, "truncated"
    intent = clean_reply(text)
    if not intent:
        return None, "empty"
    if len([line for line in intent.splitlines() if line.strip()]) > 1:
        return None, "multi_paragraph"
    if len(intent) > checks_cfg.max_chars or len(intent.split()) > checks_cfg.max_words:
        return None, "too_long"
    prefix = checks_cfg.require_prefix
    if prefix and not intent.lower().startswith(prefix.lower()):
        return None, "missing_prefix"
    return intent, None
