"""UserLM-8b's chat format: the one module that renders, tokenizes and masks it.

data_prep, train and evaluate all import this module; nothing else spells out the format.

The format (UserLM-8b's published chat template; docs/reproduction.md, section 3):
- no BOS token;
- each message is  <|start_header_id|>ROLE<|end_header_id|> + "\\n" + content + <|eot_id|>,
  with the real roles: system (the task intent), user, assistant;
- a prompt always ends with  <|start_header_id|>user<|end_header_id|>  (no newline), so a
  generated user turn is "\\n" + text + <|eot_id|> and the end of a conversation is
  "\\n<|endconversation|><|eot_id|>".

Two renderings exist of necessity: the Jinja template that tokenizers carry (for inference with
`apply_chat_template`, as in UserLM-8b's published snippet) and the token-level assembly below (for
data preparation at scale, where each message is tokenized once). Both are built from the same
constants, and tests/test_chat_format.py proves that they agree token for token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum, auto
from pathlib import Path
from typing import Callable, Sequence

from tokenizers import AddedToken

from core import artifacts

START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
END_CONVERSATION = "<|endconversation|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
# Strings that must never occur inside message content: tokenizing them would create control
# tokens, and the text would no longer round-trip. data_prep drops (and counts) such rows.
CONTROL_STRINGS = (START_HEADER, END_HEADER, EOT, END_CONVERSATION, BEGIN_OF_TEXT, END_OF_TEXT)
IGNORE_INDEX = -100  # label of a token that carries no loss
# The pad token prepare_tokenizer installs: a token Llama-3's vocabulary reserves, never the EOS.
PAD_TOKEN = "<|reserved_special_token_0|>"
# Every task intent opens with this (data_prep's intent checks, evaluate's overlap and repetition
# rules, the adherence intents); conf/ refers to it as ${chat_format:INTENT_PREFIX}.
INTENT_PREFIX = "You are a user chatting with an assistant language model to"


class FlipMode(StrEnum):
    """How a conversation becomes training (or scoring) examples: ChatEncoder.examples."""
    per_turn = auto()           # one example per user turn, its history before it (the paper's)
    per_conversation = auto()   # every user turn of a conversation in one sequence (windows when long)


# Llama-3's other special tokens (3.0 reserves 251, 3.1 and 3.2 name some): text holding one is
# tokenized as that token, and <|reserved_special_token_0|> is the pad.
LLAMA3_SPECIAL_TOKEN = re.compile(r"<\|(?:reserved_special_token_\d+|finetune_right_pad_id|eom_id|python_tag|"
                                  r"step_id|image)\|>")


def find_control_string(text: str) -> str | None:
    """The first of CONTROL_STRINGS (or of Llama-3's other special tokens) that `text` holds, or
    None: the one check for every message content, turns and intents alike (an intent holding
    <|eot_id|><|start_header_id|>... would otherwise become real header tokens in the system
    message, and a turn holding the pad token's text would train on the pad id)."""
    found = next((s for s in CONTROL_STRINGS if s in text), None)
    if found is None and "<|" in text:
        match = LLAMA3_SPECIAL_TOKEN.search(text)
        found = match.group() if match else None
    return found


CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '" + START_HEADER + "' + message['role'] + '" + END_HEADER + "\\n' + message['content'] + '"
    + EOT + "' -}}"
    "{%- endfor -%}"
    # UserLM-8b's template ends every prompt with the user header, whatever add_generation_prompt says.
    "{{- '" + START_HEADER + USER + END_HEADER + "' -}}"
)


def prepare_tokenizer(tokenizer, pad_token: str):
    """Make a (Llama-3 style) tokenizer speak UserLM-8b's format, in place, and return it.

    Adds <|endconversation|> as one non-special token (so `skip_special_tokens` keeps it), installs
    the chat template, makes <|eot_id|> the EOS and sets a pad token that is not the EOS. Idempotent.
    Adding tokens grows the vocabulary: the model's embeddings must be resized to match
    (train.model.load_model does that).
    """
    vocab = tokenizer.get_vocab()
    for required in (START_HEADER, END_HEADER, EOT):
        if required not in vocab:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no {required} token: "
                             "UserLM's format needs a Llama-3 tokenizer")
    if END_CONVERSATION not in vocab:
        tokenizer.add_tokens([AddedToken(END_CONVERSATION, special=False, normalized=False)])
    if pad_token == EOT:
        raise ValueError("pad_token must differ from the EOS token <|eot_id|>")
    if pad_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": pad_token})
    tokenizer.pad_token = pad_token
    tokenizer.eos_token = EOT
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer, directory: Path) -> None:
    """Write a (fast) tokenizer into `directory` so that transformers 4.x and 5.x load the same one.

    transformers 5's own save_pretrained writes `"tokenizer_class": "TokenizersBackend"`, a class
    4.x does not have ("Tokenizer class TokenizersBackend does not exist"), omits the added tokens'
    table and adds machine-dependent keys (`is_local`, `local_files_only`). UserLM-8b was written by
    transformers 4.52, and vLLM and many users load with 4.x, so every tokenizer the pipeline
    saves (data_prep's `tokenizer/`, train's `model/`) is written here instead, in 4.x's layout:
    - tokenizer.json: the tokenizers model itself (read alike by tokenizers 0.22 and 0.23);
    - tokenizer_config.json: `PreTrainedTokenizerFast` (5.x's alias of its backend class), the
      added tokens by id as 4.x writes them, the special tokens, `model_max_length`, the chat
      template, and `clean_up_tokenization_spaces: false` (5.x never cleans up a BPE's decoded
      spaces; 4.x would if a base tokenizer said true, so the two would decode differently);
    - special_tokens_map.json, which 4.x reads;
    - chat_template.jinja, the same template: 4.x before 4.47 reads only the config's
      `chat_template`; later 4.x and 5.x prefer the file; either way the same template renders.
    Only these files and keys are written, sorted, so the same tokenizer gives the same bytes on
    every machine and rerun (and a tokenizer loaded back from them saves to the same bytes).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: save_tokenizer writes "
                        "tokenizer.json only")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(directory / "tokenizer.json", tokenizer.backend_tokenizer.to_str(pretty=True))
    special = {name: str(token) for name, token in tokenizer.special_tokens_map.items()
               if name != "additional_special_tokens"}
    additional = [str(token) for token in getattr(tokenizer, "extra_special_tokens", None) or []]
    if additional:
        special["additional_special_tokens"] = additional
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): token.__getstate__() for i, token in tokenizer.added_tokens_decoder.items()},
        "clean_up_tokenization_spaces": False,
        "model_max_length": tokenizer.model_max_length,
        **special,
    }
    if tokenizer.chat_template is not None:
        if not isinstance(tokenizer.chat_template, str):
            raise TypeError("save_tokenizer writes one chat template; this tokenizer has several")
        config["chat_template"] = tokenizer.chat_template
        artifacts.write_text(directory / "chat_template.jinja", tokenizer.chat_template)
    artifacts.write_json(directory / "tokenizer_config.json", config)
    artifacts.write_json(directory / "special_tokens_map.json", special)


def conversation_messages(intent: str | None, turns: Sequence[dict], ended: bool) -> list[dict]:
    """The message list of a flipped conversation: intent as system, the turns, then the end token.

    `turns` alternate user/assistant starting with user. `ended` appends the user's final
    <|endconversation|> turn (only for conversations whose last turn was answered).
    """
    messages = [] if intent is None else [{"role": SYSTEM, "content": intent}]
    messages += [{"role": t["role"], "content": t["content"]} for t in turns]
    if ended:
        messages.append({"role": USER, "content": END_CONVERSATION})
    return messages


def is_user_turn(message: dict) -> bool:
    """The user LM's training predicate: loss on user turns (and the end token), nothing else."""
    return message["role"] == USER


@dataclass
class Example:
    """One tokenized training/scoring sequence.

    `target_turn[i]` is the index (0-based, among the user messages of the conversation, the end
    token counting as the last) of the user turn that label i belongs to, or -1 for context.
    """
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    target_turn: list[int] = field(default_factory=list)
    truncated: bool = False

    def add_cut(self, part: "_Part", budget: int) -> None:
        """Add a message that alone exceeds `budget` tokens, keeping the beginning of its body."""
        self.add(part.header, None)
        self.add(part.body[:max(budget - len(part.header), 0)], part.target)
        self.truncated = True

    def add(self, ids: Sequence[int], turn: int | None) -> None:
        self.input_ids += ids
        if turn is None:
            self.labels += [IGNORE_INDEX] * len(ids)
            self.target_turn += [-1] * len(ids)
        else:
            self.labels += ids
            self.target_turn += [turn] * len(ids)

    @property
    def num_target_tokens(self) -> int:
        return len(self.target_turn) - self.target_turn.count(-1)

    @property
    def target_turns(self) -> list[int]:
        return sorted(set(self.target_turn) - {-1})


class ChatEncoder:
    """Token-level assembly of the chat format for one tokenizer.

    Each message is tokenized once as its *body*, "\\n" + content + <|eot_id|>; the header before
    it is a fixed token list per role. Headers and bodies are split at special tokens, which every
    HF tokenizer treats as hard boundaries, so the concatenation equals tokenizing the rendered text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.header_ids = {role: self._encode(START_HEADER + role + END_HEADER) for role in ROLES}
        self.eot_id = tokenizer.convert_tokens_to_ids(EOT)

    def system_fits(self, system_tokens: int, max_seq_len: int) -> bool:
        """Whether a system message of `system_tokens` tokens (header included) leaves room in
        max_seq_len for at least one user turn: its header, a newline and <|eot_id|>, twice."""
        return system_tokens + 2 * (len(self.header_ids[USER]) + 1) <= max_seq_len

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_bodies(self, contents: Sequence[str]) -> list[list[int]]:
        """Body token ids ("\\n" + content + <|eot_id|>) of many messages in one batched call.

        Straight to the fast tokenizer's backend (tokenizers.Tokenizer.encode_batch), the ids
        `tokenizer(texts, add_special_tokens=False)` returns without building its BatchEncoding
        (a quarter of data_prep's tokenizing time). Like that call, it first turns off any
        truncation or padding set on the backend."""
        backend = self.tokenizer.backend_tokenizer
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        return [[*encoding.ids, self.eot_id]
                for encoding in backend.encode_batch(["\n" + c for c in contents], add_special_tokens=False)]

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of `apply_chat_template(messages)`: the messages, then the user header."""
        bodies = self.encode_bodies([m["content"] for m in messages])
        ids: list[int] = []
        for message, body in zip(messages, bodies):
            ids += self.header_ids[message["role"]] + body
        return ids + self.header_ids[USER]

    def prompt_ids_within(self, messages: Sequence[dict], max_tokens: int) -> tuple[list[int], bool]:
        """(prompt_ids(messages) cut to at most max_tokens, whether anything was cut).

        The rule of flip's per_turn history: the system message (the intent) stays, the oldest
        whole messages go first; a newest message that does not fit even alone keeps the beginning
        of its body, closed by <|eot_id|> (nothing of it when not even its header fits). ValueError
        when the system message and the user header alone exceed max_tokens.
        """
        bodies = self.encode_bodies([m["content"] for m in messages])
        parts = [self.header_ids[m["role"]] + body for m, body in zip(messages, bodies)]
        has_system = bool(messages) and messages[0]["role"] == SYSTEM
        system, turns = (parts[0], parts[1:]) if has_system else ([], parts)
        budget = max_tokens - len(system) - len(self.header_ids[USER])
        if budget < 0:
            raise ValueError(f"the system message ({len(system)} tokens) with the user header leaves no room in "
                             f"{max_tokens} tokens")
        start = oldest_kept([len(t) for t in turns], budget)
        kept = [token for part in turns[start:] for token in part]
        if start == len(turns) and turns:
            header = self.header_ids[messages[-1]["role"]]
            room = budget - len(header) - 1  # the cut body's own <|eot_id|>
            if room > 0:
                kept = header + bodies[-1][:-1][:room] + [self.eot_id]
        return system + kept + self.header_ids[USER], start > 0

    def flip(self, messages: Sequence[dict], mode: FlipMode, max_seq_len: int,
             train_on: Callable[[dict], bool] = is_user_turn,
             bodies: Sequence[list[int]] | None = None) -> list[Example]:
        """Flip one conversation into examples whose labels are the `train_on` messages.

        messages: from `conversation_messages` (an optional leading system message, then turns).
        mode "per_turn": one example per target message (the paper's K+1 samples), its context
            the messages before it. Over max_seq_len the system message stays, the oldest whole
            messages of history are dropped, and a target that alone does not fit is cut (keeping
            its beginning, without <|eot_id|>).
        mode "per_conversation": one sequence with every target message labelled (the same loss
            terms in one forward pass). Over max_seq_len it is split at message boundaries into
            windows; each restarts with the system message, then the message just before its first
            target as context (when that fits in half the window), then whole messages; a message
            that fills a window alone is cut like a per_turn target.
        Examples that lost anything to max_seq_len are marked `truncated`.
        bodies: precomputed `encode_bodies` of the messages' contents (batched by the caller).
        """
        if bodies is None:
            bodies = self.encode_bodies([m["content"] for m in messages])
        parts, number = [], 0
        for message, body in zip(messages, bodies):
            target = None
            if message["role"] != SYSTEM and train_on(message):
                target, number = number, number + 1
            parts.append(_Part(self.header_ids[message["role"]], list(body), target))
        has_system = bool(messages) and messages[0]["role"] == SYSTEM
        system = parts[0].ids if has_system else []
        turns = parts[1:] if has_system else parts
        if not self.system_fits(len(system), max_seq_len):
            raise ValueError(f"the system message ({len(system)} tokens) leaves no room in "
                             f"max_seq_len={max_seq_len}")
        if mode == "per_turn":
            return [self._with_history(system, turns, i, max_seq_len)
                    for i, part in enumerate(turns) if part.target is not None]
        if mode == "per_conversation":
            return self._windows(system, turns, max_seq_len)
        raise ValueError(f"unknown flip mode {mode!r}: expected one of {', '.join(FlipMode)}")

    @staticmethod
    def _with_history(system: list[int], turns: list[_Part], index: int, max_seq_len: int) -> Example:
        example = Example()
        example.add(system, None)
        target = turns[index]
        budget = max_seq_len - len(system) - len(target.ids)
        if budget < 0:
            example.add_cut(target, max_seq_len - len(system))
            return example
        start = oldest_kept([len(part.ids) for part in turns[:index]], budget)
        example.truncated = start > 0
        for part in turns[start:index]:
            example.add(part.ids, None)
        example.add(target.header, None)
        example.add(target.body, target.target)
        return example

    @staticmethod
    def _windows(system: list[int], turns: list[_Part], max_seq_len: int) -> list[Example]:
        windows: list[Example] = []
        position = 0
        while position < len(turns):
            if turns[position].target is None:
                position += 1  # windows begin at a target; what comes before is context
                continue
            example = Example()
            example.add(system, None)
            budget = max_seq_len - len(system)
            context = turns[position - 1].ids if position > 0 else []
            # The previous message as context only if it takes at most half the window and leaves
            # the first target room to fit whole.
            if context and len(context) <= budget // 2 and len(context) + len(turns[position].ids) <= budget:
                example.add(context, None)
                budget -= len(context)
            placed = False
            while position < len(turns):
                part = turns[position]
                if len(part.ids) > budget:
                    if not placed:
                        example.add_cut(part, budget)
                        position += 1
                    break
                example.add(part.header, None)
                example.add(part.body, part.target)
                budget -= len(part.ids)
                placed = True
                position += 1
            windows.append(example)
        if len(windows) > 1:
            for example in windows:
                example.truncated = True
        return windows


def oldest_kept(lengths: Sequence[int], budget: int) -> int:
    """Index of the oldest message kept when history of these token lengths is cut to `budget`:
    whole messages are taken newest first, up to the first one that no longer fits."""
    start = len(lengths)
    while start > 0 and lengths[start - 1] <= budget:
        start -= 1
        budget -= lengths[start]
    return start


@dataclass
class _Part:
    """One message as token ids: its header, its body, and its target number (None: context)."""
    header: list[int]
    body: list[int]
    target: int | None
    # header + body, built once: per_turn reads every earlier message's ids for each target.
    ids: list[int] = field(init=False)

    def __post_init__(self):
        self.ids = self.header + self.body
