"""Task intents: one sentence per conversation, "You are a user chatting with an assistant ... to ...".

`read_intents` reads the {conversation_hash, intent} JSONL that `intents.path` names.
"""

from data_prep.intents.store import read_intents

__all__ = ["read_intents"]
