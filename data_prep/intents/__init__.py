"""Task intents: one sentence per conversation, "You are a user chatting with an assistant ... to ...".

data_prep asks `get_intents` for the intents of the conversations it kept. The `file` backend reads
them from the {conversation_hash, intent} JSONL at `intents.path`.
"""

from __future__ import annotations

from data_prep.intents.store import read_intents


def get_intents(intents_cfg, conversations) -> dict[str, str]:
    """conversation_hash -> intent for `conversations` (a Dataset with conversation_hash and turns).

    Conversations without an intent are left out of the mapping; data_prep drops and counts them.
    """
    if intents_cfg.backend == "file":
        return read_intents(intents_cfg.path)
    raise ValueError(f"intents.backend={intents_cfg.backend!r}: expected file")


__all__ = ["get_intents", "read_intents"]
