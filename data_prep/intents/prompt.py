"""The intent prompt: instruction + three few-shot examples + the conversation, from configuration.

The text lives in conf/data_prep/intents/prompt/<version>.yaml. Messages sent to the model:
    system     the instruction
    user       example 1's conversation      assistant  example 1's intent     (x3)
    user       the conversation to summarise
A conversation is rendered as tagged turns (`turn_format`, e.g. "<user>\n...\n</user>").

Very long conversations are cut to a token budget. Tokens are *estimated* as characters /
`chars_per_token` (about 4 for English with GPT-4o's and Llama-3's tokenizers); the budget is a
cost and context guard, not an exact count. How a conversation is cut:
  1. every turn is capped: the first user turn (which usually states the task) at
     `first_user_turn_tokens`, later user turns at `user_turn_tokens`, assistant turns (context the
     intent does not depend on much) at `assistant_turn_tokens`; an over-long turn loses its
     *middle* (head and tail kept, joined by `cut_marker`), since requests and questions tend to sit
     at the start and end of a pasted text;
  2. turns are then taken in order while the total stays within `conversation_tokens`; the later
     turns that do not fit are dropped and replaced by one line saying how many were left out.
The first user turn is always kept (cut to the whole budget if that is smaller than its cap).
"""

from __future__ import annotations

from core.artifacts import config_hash, resolved_config


def estimate_tokens(text: str, chars_per_token: float) -> int:
    return int(len(text) / chars_per_token) + 1


def cut_middle(text: str, max_tokens: int, chars_per_token: float, marker: str) -> str:
    """`text` if it fits in max_tokens, else its first 2/3 and last 1/3 around `marker`."""
    max_chars = int(max_tokens * chars_per_token)
    if len(text) <= max_chars:
        return text
    keep = max(0, max_chars - len(marker))
    head = keep * 2 // 3
    return text[:head] + marker + text[len(text) - (keep - head):]


def render_conversation(turns: list[dict], prompt: dict) -> str:
    """`turns` as tagged lines, cut to the budget (`prompt`: the prompt config as plain data)."""
    budget = prompt["budget"]
    rendered, used = [], 0
    for i, turn in enumerate(turns):
        cap = (min(budget["first_user_turn_tokens"], budget["conversation_tokens"]) if i == 0 else
               budget["user_turn_tokens"] if turn["role"] == "user" else budget["assistant_turn_tokens"])
        content = cut_middle(turn["content"].strip(), cap, budget["chars_per_token"], prompt["cut_marker"])
        text = prompt["turn_format"].format(role=turn["role"], content=content)
        cost = estimate_tokens(text, budget["chars_per_token"])
        if i > 0 and used + cost > budget["conversation_tokens"]:
            rendered.append(prompt["omitted_format"].format(count=len(turns) - i))
            break
        rendered.append(text)
        used += cost
    return "\n".join(rendered)


class IntentPrompt:
    """The prompt of one version, read from its config once (config nodes are slow to read in a
    loop over millions of conversations): the instruction and few-shot turns are rendered here."""

    def __init__(self, prompt_cfg):
        self.config = resolved_config(prompt_cfg)
        self.version = self.config["version"]
        self.fingerprint = config_hash(self.config)  # intents made with an edited text are told apart
        self.few_shot = [{"role": "system", "content": self.config["instruction"].strip()}]
        for example in self.config["examples"]:
            self.few_shot.append({"role": "user", "content": render_conversation(example["conversation"], self.config)})
            self.few_shot.append({"role": "assistant", "content": example["intent"].strip()})

    def messages(self, turns: list[dict]) -> list[dict]:
        """The chat messages asking for the intent of the conversation `turns` ([{role, content}])."""
        return [*self.few_shot, {"role": "user", "content": render_conversation(turns, self.config)}]
