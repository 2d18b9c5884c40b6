"""Task intents: one sentence per conversation, "You are a user chatting with an assistant ... to ...".

data_prep asks `get_intents` for the intents of the conversations it kept:
- backend `file` reads the {conversation_hash, intent} JSONL at `intents.path`: its hand-written rows
  and those generated under the configured prompt version, never another version's
  (data_prep.intents.store.read_intents_of_prompt);
- backends `openai` and `hf` first generate the intents missing from that store for the current
  (prompt version, model) (data_prep.intents.generate), then read those.
`python -m data_prep.intents` runs the generation alone.
"""

from __future__ import annotations

import pyarrow as pa

from data_prep.intents.generate import backend_model, generate_intents
from data_prep.intents.prompt import IntentPrompt
from data_prep.intents.store import read_intents, read_intents_of_prompt


def get_intents(intents_cfg, conversations, of: pa.Array | None = None) -> pa.Array | dict[str, str]:
    """The intents of the conversations whose hashes are `of` (an Arrow string array: data_prep's
    kept ones), in its order, null where a conversation has none (data_prep drops and counts those);
    without `of`, the dict conversation_hash -> intent of every conversation the store has for
    this run. `conversations`: a Dataset with conversation_hash and turns, for the generating
    backends (a superset of `of` may be given). A failed generation stage raises (a dead endpoint,
    or not one intent generated: data_prep.intents.generate), so data_prep never writes an output
    built on it.
    """
    if intents_cfg.backend == "file":
        prompt = IntentPrompt(intents_cfg.prompt)
        return read_intents_of_prompt(intents_cfg.path, prompt.version, prompt.fingerprint, of=of)
    generate_intents(intents_cfg, conversations)
    return read_intents(intents_cfg.path, intents_cfg.prompt.version, backend_model(intents_cfg), of=of)


__all__ = ["generate_intents", "get_intents", "read_intents"]
