"""Task intents: one sentence per conversation, "You are a user chatting with an assistant ... to ...".

data_prep asks `get_intents` for the intents of the conversations it kept:
- backend `file` reads the {conversation_hash, intent} JSONL at `intents.path` as it is;
- backends `openai` and `hf` first generate the intents missing from that store for the current
  (prompt version, model) (data_prep.intents.generate), then read those.
`python -m data_prep.intents` runs the generation alone.
"""

from __future__ import annotations

from data_prep.intents.generate import backend_model, generate_intents
from data_prep.intents.store import read_intents


def get_intents(intents_cfg, conversations) -> dict[str, str]:
    """conversation_hash -> intent for `conversations` (a Dataset with conversation_hash and turns).

    Conversations without an intent are left out of the mapping; data_prep drops and counts them.
    A failed generation stage raises (a dead endpoint, or not one intent generated:
    data_prep.intents.generate), so data_prep never writes an output built on it.
    """
    if intents_cfg.backend == "file":
        return read_intents(intents_cfg.path)
    generate_intents(intents_cfg, conversations)
    return read_intents(intents_cfg.path, intents_cfg.prompt.version, backend_model(intents_cfg))


__all__ = ["generate_intents", "get_intents", "read_intents"]
