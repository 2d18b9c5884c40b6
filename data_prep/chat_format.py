"""The chat formats of a user LM: the one module that renders, tokenizes and masks them.

data_prep, train and evaluate all import this module; nothing else spells out a format. Two
formats share one flipped layout (docs/reproduction.md, section 3; `chat_format=userlm|chatml`):
- no BOS token;
- each message is a header (ROLE between the format's header strings), "\\n" + content, the
  format's end-of-turn token, and the format's separator; the roles are the real ones: system
  (the task intent), user, assistant;
- a prompt always ends with the user header (no newline), so a generated user turn is
  "\\n" + text + end-of-turn, and the end of a conversation is "\\n<|endconversation|>" + end-of-turn,
  <|endconversation|> being one added, non-special token.

`userlm`: UserLM-8b's published Llama-3 format, byte for byte:
    <|start_header_id|>system<|end_header_id|>\\nINTENT<|eot_id|><|start_header_id|>user<|end_header_id|>
`chatml`: the same layout in the ChatML convention of Qwen2.5/Qwen3 (and many others), every message
    exactly as Qwen's own template writes it, and the prompt ending in the bare user header:
    <|im_start|>system\\nINTENT<|im_end|>\\n<|im_start|>user
  (the user LM writes the newline after its header, as in `userlm`). Its pad is <|endoftext|>;
  a base tokenizer that lacks <|im_start|>, <|im_end|> or <|endoftext|> gets them as special tokens.

Two renderings exist of necessity: the Jinja template that tokenizers carry (for inference with
`apply_chat_template`, as in UserLM-8b's published snippet) and the token-level assembly below (for
data preparation at scale, where each message is tokenized once). Both are built from the same
strings, and tests/test_chat_format.py proves that they agree token for token, for both formats.
A prepared tokenizer names its format by the template it carries (`format_of`): train and evaluate
read the format from data_prep's saved tokenizer, never from a setting of their own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import sys
from dataclasses import dataclass, field
from enum import StrEnum, auto
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tokenizers import AddedToken

from core import artifacts

log = logging.getLogger(__name__)

START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
END_CONVERSATION = "<|endconversation|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
IM_START, IM_END, IM_END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
IGNORE_INDEX = -100  # label of a token that carries no loss
CONTROL_MARK = "<|"  # the start of both formats' control strings and of every other_special match
# The pad token the userlm format installs: a token Llama-3's vocabulary reserves, never the EOS.
PAD_TOKEN = "<|reserved_special_token_0|>"
# Every task intent opens with this (data_prep's intent checks, evaluate's overlap and repetition
# rules, the adherence intents); conf/ refers to it as ${chat_format:INTENT_PREFIX}.
INTENT_PREFIX = "You are a user chatting with an assistant language model to"


class FlipMode(StrEnum):
    """How a conversation becomes training (or scoring) examples: ChatEncoder.examples."""
    per_turn = auto()           # one example per user turn, its history before it (the paper's)
    per_conversation = auto()   # every user turn of a conversation in one sequence (windows when long)


@dataclass(frozen=True)
class ChatFormat:
    """One chat format's strings; everything else (template, assembly, checks) is built from them."""
    name: str
    header_start: str          # a message's header is header_start + role + header_end
    header_end: str
    end_of_turn: str           # closes every message; the EOS of a prepared tokenizer
    separator: str             # text after end_of_turn, before the next header (no loss on it)
    pad_token: str             # the default pad: never the EOS
    stop_tokens: tuple[str, ...]   # the turn ends a generation stops at (end_of_turn first)
    # Tokens a base tokenizer must already have (a userlm base is a Llama-3 tokenizer), and tokens
    # prepare_tokenizer adds as special ones when missing (chatml suits any base model).
    required_tokens: tuple[str, ...]
    added_special_tokens: tuple[str, ...]
    # Strings that must never occur inside message content: tokenizing them would create control
    # tokens, and the text would no longer round-trip. data_prep drops (and counts) such rows.
    control_strings: tuple[str, ...]
    # The family's other special tokens, which a tokenizer would also read as one control token
    # (every match begins with CONTROL_MARK).
    other_special: re.Pattern

    @functools.cached_property
    def _unmarked_control_strings(self) -> tuple[str, ...]:
        """The control strings without CONTROL_MARK (another family's special tokens, as Gemma's
        <start_of_turn>): the only ones a text without the mark can hold."""
        return tuple(s for s in self.control_strings if CONTROL_MARK not in s)

    @property
    def chat_template(self) -> str:
        """The Jinja template prepare_tokenizer installs: the messages, then the user header,
        whatever add_generation_prompt says (as UserLM-8b's template)."""
        separator = self.separator.replace("\n", "\\n")
        return ("{%- for message in messages -%}"
                "{{- '" + self.header_start + "' + message['role'] + '" + self.header_end + "\\n' + "
                "message['content'] + '" + self.end_of_turn + separator + "' -}}"
                "{%- endfor -%}"
                "{{- '" + self.header_start + USER + self.header_end + "' -}}")

    def with_tokenizer_specials(self, tokenizer) -> ChatFormat:
        """This format, its control strings extended by every special token of `tokenizer` that it
        does not catch already (a base of another family: Gemma's <start_of_turn>, say): data_prep's
        check of the turns, where the tokenizer is known (`python -m data_prep.intents` needs none)."""
        specials = sorted({token.content for token in tokenizer.added_tokens_decoder.values() if token.special})
        extra = tuple(token for token in specials if self.find_control_string(token) is None)
        return dataclasses.replace(self, control_strings=self.control_strings + extra) if extra else self

    def find_control_string(self, text: str) -> str | None:
        """The first control string (or other special token of the family) that `text` holds, or None."""
        if CONTROL_MARK not in text:   # one scan of the text rules out every string holding the mark
            return next((s for s in self._unmarked_control_strings if s in text), None)
        found = next((s for s in self.control_strings if s in text), None)
        if found is None and "<|" in text:
            match = self.other_special.search(text)
            found = match.group() if match else None
        return found


USERLM = ChatFormat(
    "userlm", START_HEADER, END_HEADER, EOT, "", PAD_TOKEN, (EOT, END_OF_TEXT),
    required_tokens=(START_HEADER, END_HEADER, EOT), added_special_tokens=(),
    control_strings=(START_HEADER, END_HEADER, EOT, END_CONVERSATION, BEGIN_OF_TEXT, END_OF_TEXT),
    # Llama-3's other special tokens (3.0 reserves 251, 3.1 and 3.2 name some): text holding one is
    # tokenized as that token, and <|reserved_special_token_0|> is the pad.
    other_special=re.compile(r"<\|(?:reserved_special_token_\d+|finetune_right_pad_id|eom_id|python_tag|"
                             r"step_id|image)\|>"))
CHATML = ChatFormat(
    "chatml", IM_START, "", IM_END, "\n", IM_END_OF_TEXT, (IM_END, IM_END_OF_TEXT),
    required_tokens=(), added_special_tokens=(IM_START, IM_END, IM_END_OF_TEXT),
    control_strings=(IM_START, IM_END, IM_END_OF_TEXT, END_CONVERSATION),
    # Any other <|name|>: Qwen's special tokens (<|fim_prefix|>, <|vision_start|>, ...), Llama-3's
    # (<|reserved_special_token_7|>), Phi's, when chatml runs on such a base.
    other_special=re.compile(r"<\|[a-z0-9_]+\|>"))
FORMATS = {f.name: f for f in (USERLM, CHATML)}


def get_format(name: str) -> ChatFormat:
    if name not in FORMATS:
        raise ValueError(f"chat_format={name!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of(tokenizer) -> ChatFormat | None:
    """The format whose template `tokenizer` carries (one prepare_tokenizer made), or None."""
    return next((f for f in FORMATS.values() if tokenizer.chat_template == f.chat_template), None)


def find_any_control_string(text: str) -> str | None:
    """A control string of any format, or None: the rule for intents, which serve every format alike
    (an intent holding <|eot_id|><|start_header_id|>... would otherwise become real header tokens
    in the system message)."""
    return next((found for f in FORMATS.values() if (found := f.find_control_string(text))), None)


def prepare_tokenizer(tokenizer, chat_format: ChatFormat, pad_token: str | None = None):
    """Make a tokenizer speak `chat_format`, in place, and return it.

    Adds <|endconversation|> as one non-special token (so `skip_special_tokens` keeps it), and the
    format's missing special tokens; installs the chat template, makes the format's end of turn the
    EOS and sets a pad token (default: the format's) that is not the EOS. Idempotent.
    Adding tokens grows the vocabulary: the model's embeddings must be resized to match
    (train.model.load_model does that).
    """
    vocab = tokenizer.get_vocab()
    for required in chat_format.required_tokens:
        if required not in vocab:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no {required} token: the "
                             f"{chat_format.name} format needs a Llama-3 tokenizer (chat_format=chatml suits any base)")
    missing = [token for token in chat_format.added_special_tokens if token not in vocab]
    if missing:
        log.info("adding %s to tokenizer %s as special tokens (new embedding rows)", missing, tokenizer.name_or_path)
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing],
                             special_tokens=True)
    if END_CONVERSATION not in vocab:
        tokenizer.add_tokens([AddedToken(END_CONVERSATION, special=False, normalized=False)])
    pad_token = pad_token or chat_format.pad_token
    if pad_token == chat_format.end_of_turn:
        raise ValueError(f"pad_token must differ from the EOS token {chat_format.end_of_turn}")
    if pad_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": pad_token})
    tokenizer.pad_token = pad_token
    tokenizer.eos_token = chat_format.end_of_turn
    tokenizer.chat_template = chat_format.chat_template
    check_assembly(tokenizer)
    return tokenizer


# Content that a tokenizer could merge across a header, body or separator boundary if the assembly
# were wrong for it: leading spaces and newlines, trailing whitespace, a character outside ASCII.
_PROBE_TURNS = [{"role": USER, "content": "  hi\nthere "}, {"role": ASSISTANT, "content": "\n\nHello 🙂\n"},
                {"role": USER, "content": "ok"}, {"role": ASSISTANT, "content": " sure"}]


def check_assembly(tokenizer) -> None:
    """Raise unless ChatEncoder's token assembly equals tokenizing the installed template's text, on a
    probe conversation: a base tokenizer whose pre-tokenizer merges across those boundaries (one that
    adds a dummy prefix to every piece, say) cannot be prepared by token-level assembly."""
    messages = conversation_messages(INTENT_PREFIX + " check the format.", _PROBE_TURNS, ended=True)
    rendered = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    if ChatEncoder(tokenizer).prompt_ids(messages) != rendered:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: the {format_of(tokenizer).name} format assembled "
                         "message by message does not tokenize like its rendered text; this tokenizer cannot be used")


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


@dataclass(eq=False)
class Example:
    """One tokenized training/scoring sequence, kept as the spans it was assembled from: each a
    run of token ids and the user turn it is labelled with (None: context, not trained on).

    `input_ids`, `labels` and `target_turn` are built from the spans on first read (by
    `pack_examples`, the one place labels are made); data_prep packs a whole batch's spans into
    Arrow arrays without them (numpy, no Python int per token). `target_turn[i]` is the index
    (0-based, among the user messages of the conversation, the end token counting as the last)
    of the user turn that label i belongs to, or -1 for context.
    """
    spans: list[tuple[np.ndarray, int | None]] = field(default_factory=list)
    truncated: bool = False
    num_tokens: int = 0
    _lists: tuple[list[int], list[int], list[int]] | None = field(default=None, init=False, repr=False)

    def add_message(self, part: "_Part", separator: Sequence[int], context: bool = False) -> None:
        """Add a whole message: the separator when a message precedes it, its header, its body
        (labelled when the message is a target, unless it is `context` here)."""
        if self.num_tokens:
            self.add(separator, None)
        self.add(part.header, None)
        self.add(part.body, None if context else part.target)

    def add_cut(self, part: "_Part", budget: int, separator: Sequence[int]) -> None:
        """Add a message that alone exceeds `budget` tokens (its separator's included), keeping the
        beginning of its body."""
        budget -= len(separator)
        if self.num_tokens:
            self.add(separator, None)
        self.add(part.header, None)
        self.add(part.body[:max(budget - len(part.header), 0)], part.target)
        self.truncated = True

    def add(self, ids: Sequence[int], turn: int | None) -> None:
        self.spans.append((ids if isinstance(ids, np.ndarray) else np.asarray(ids, dtype=np.int32), turn))
        self.num_tokens += len(ids)
        self._lists = None

    def _as_lists(self) -> tuple[list[int], list[int], list[int]]:
        if self._lists is None:
            _, input_ids, labels = pack_examples([self])
            turns = [-1 if turn is None else turn for _, turn in self.spans]
            target_turn = np.repeat(np.array(turns, dtype=np.int64), [len(ids) for ids, _ in self.spans])
            self._lists = input_ids.tolist(), labels.tolist(), target_turn.tolist()
        return self._lists

    @property
    def input_ids(self) -> list[int]:
        return self._as_lists()[0]

    @property
    def labels(self) -> list[int]:
        return self._as_lists()[1]

    @property
    def target_turn(self) -> list[int]:
        return self._as_lists()[2]

    @property
    def num_target_tokens(self) -> int:
        return sum(len(ids) for ids, turn in self.spans if turn is not None)

    @property
    def target_turns(self) -> list[int]:
        return sorted({turn for ids, turn in self.spans if turn is not None and len(ids)})


def pack_examples(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, input_ids, labels) of these examples laid end to end (int32): example i holds
    tokens offsets[i]:offsets[i + 1]; a label is its token where the span is a target, IGNORE_INDEX
    elsewhere."""
    pieces = [ids for example in examples for ids, _ in example.spans]
    lengths = np.fromiter((len(ids) for ids in pieces), dtype=np.int64, count=len(pieces))
    targeted = np.fromiter((turn is not None for example in examples for _, turn in example.spans), dtype=bool,
                           count=len(pieces))
    input_ids = np.concatenate(pieces).astype(np.int32, copy=False) if pieces else np.zeros(0, dtype=np.int32)
    labels = np.where(np.repeat(targeted, lengths), input_ids, np.int32(IGNORE_INDEX))
    offsets = np.zeros(len(examples) + 1, dtype=np.int32)
    np.cumsum([example.num_tokens for example in examples], out=offsets[1:])
    return offsets, input_ids, labels


class ChatEncoder:
    """Token-level assembly of a prepared tokenizer's chat format (format_of).

    Each message is tokenized once as its *body*, "\\n" + content + end of turn; the header before
    it is a fixed token list per role, and the separator between messages a fixed list too. Headers,
    bodies and separators are split at special tokens (or, for chatml's role names, where every
    byte-level pre-tokenizer splits letters from a newline), so their concatenation equals
    tokenizing the rendered text. Every message is budgeted with the separator before it; a
    sequence that starts without a system message gets its first message's separator back.
    """

    def __init__(self, tokenizer):
        chat_format = format_of(tokenizer)
        if chat_format is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} carries neither the userlm nor the chatml "
                             "chat template: use data_prep's saved tokenizer, or data_prep.chat_format.prepare_tokenizer")
        self.tokenizer = tokenizer
        self.format = chat_format
        self.header_ids = {role: self._encode(chat_format.header_start + role + chat_format.header_end)
                           for role in ROLES}
        self.eot_id = tokenizer.convert_tokens_to_ids(chat_format.end_of_turn)
        self.separator_ids = self._encode(chat_format.separator) if chat_format.separator else []
        # The same as arrays, for flip's spans (pack_examples joins arrays without a Python int per token).
        self._header_arrays = {role: np.array(ids, dtype=np.int32) for role, ids in self.header_ids.items()}
        self._separator_array = np.array(self.separator_ids, dtype=np.int32)

    def system_fits(self, system_tokens: int, max_seq_len: int) -> bool:
        """Whether a system message of `system_tokens` tokens (header included) leaves room in
        max_seq_len for at least one user turn: separator, header, a newline and the end of turn, twice."""
        return system_tokens + 2 * (len(self.separator_ids) + len(self.header_ids[USER]) + 1) <= max_seq_len

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_bodies(self, contents: Sequence[str]) -> list[list[int]]:
        """Body token ids ("\\n" + content + end of turn) of many messages in one batched call."""
        return [[*encoding.ids, self.eot_id] for encoding in self._encode_batch(contents)]

    def encode_body_arrays(self, contents: Sequence[str]) -> list[np.ndarray]:
        """encode_bodies as int32 arrays, for flip: each made from its token list in one call (a
        list, then an array of it, took twice as long: a fifth of flip's own time besides the tokenizer)."""
        end_of_turn = [self.eot_id]
        return [np.array(encoding.ids + end_of_turn, dtype=np.int32) for encoding in self._encode_batch(contents)]

    def _encode_batch(self, contents: Sequence[str]) -> list:
        """The encodings of "\\n" + each content, straight from the fast tokenizer's backend
        (tokenizers.Tokenizer.encode_batch): the ids `tokenizer(texts, add_special_tokens=False)`
        returns without building its BatchEncoding (a quarter of data_prep's tokenizing time). Like
        that call, it first turns off any truncation or padding set on the backend."""
        backend = self.tokenizer.backend_tokenizer
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        return backend.encode_batch(["\n" + c for c in contents], add_special_tokens=False)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of `apply_chat_template(messages)`: the messages, then the user header."""
        return self.prompt_ids_within(messages, sys.maxsize)[0]

    def prompt_ids_within(self, messages: Sequence[dict], max_tokens: int) -> tuple[list[int], bool]:
        """(prompt_ids(messages) cut to at most max_tokens, whether anything was cut).

        The rule of flip's per_turn history: the system message (the intent) stays, the oldest
        whole messages go first; a newest message that does not fit even alone keeps the beginning
        of its body, closed by its end of turn (nothing of it when not even its header fits).
        ValueError when the system message and the user header alone exceed max_tokens.
        """
        bodies = self.encode_bodies([m["content"] for m in messages])
        parts = [self.header_ids[m["role"]] + body + self.separator_ids for m, body in zip(messages, bodies)]
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
            room = budget - len(header) - 1 - len(self.separator_ids)  # the cut body's own end of turn
            if room > 0:
                kept = header + bodies[-1][:-1][:room] + [self.eot_id] + self.separator_ids
        return system + kept + self.header_ids[USER], start > 0

    def flip(self, messages: Sequence[dict], mode: FlipMode, max_seq_len: int,
             train_on: Callable[[dict], bool] = is_user_turn,
             bodies: Sequence[Sequence[int]] | None = None) -> list[Example]:
        """Flip one conversation into examples whose labels are the `train_on` messages.

        messages: from `conversation_messages` (an optional leading system message, then turns).
        mode "per_turn": one example per target message (the paper's K+1 samples), its context
            the messages before it. Over max_seq_len the system message stays, the oldest whole
            messages of history are dropped, and a target that alone does not fit is cut (keeping
            its beginning, without its end of turn).
        mode "per_conversation": one sequence with every target message labelled (the same loss
            terms in one forward pass). Over max_seq_len it is split at message boundaries into
            windows; each restarts with the system message, then the message just before its first
            target as context (when that fits in half the window), then whole messages; a message
            that fills a window alone is cut like a per_turn target.
        Every example ends with its last target's end of turn (no separator after it).
        Examples that lost anything to max_seq_len are marked `truncated`.
        bodies: precomputed `encode_body_arrays` (or `encode_bodies`) of the messages' contents
            (batched by the caller).
        """
        if bodies is None:
            bodies = self.encode_body_arrays([m["content"] for m in messages])
        parts, number = [], 0
        for message, body in zip(messages, bodies):
            target = None
            if message["role"] != SYSTEM and train_on(message):
                target, number = number, number + 1
            parts.append(_Part(self._header_arrays[message["role"]], np.asarray(body, dtype=np.int32), target))
        has_system = bool(messages) and messages[0]["role"] == SYSTEM
        system = parts[0] if has_system else None
        turns = parts[1:] if has_system else parts
        system_tokens = system.length if system else 0
        if not self.system_fits(system_tokens, max_seq_len):
            raise ValueError(f"the system message ({system_tokens} tokens) leaves no room in "
                             f"max_seq_len={max_seq_len}")
        if mode == "per_turn":
            return [self._with_history(system, turns, i, max_seq_len)
                    for i, part in enumerate(turns) if part.target is not None]
        if mode == "per_conversation":
            return self._windows(system, turns, max_seq_len)
        raise ValueError(f"unknown flip mode {mode!r}: expected one of {', '.join(FlipMode)}")

    def _cost(self, part: _Part) -> int:
        """The tokens a message takes after another: the separator, its header and its body."""
        return len(self.separator_ids) + part.length

    def _start(self, system: _Part | None, max_seq_len: int) -> tuple[Example, int]:
        """A new example holding the system message, and the budget left for the messages after it
        (each charged its separator: without a system message the first has none, so it is given back)."""
        example = Example()
        if system is None:
            return example, max_seq_len + len(self.separator_ids)
        example.add_message(system, self._separator_array)
        return example, max_seq_len - example.num_tokens

    def _with_history(self, system: _Part | None, turns: list[_Part], index: int, max_seq_len: int) -> Example:
        example, budget = self._start(system, max_seq_len)
        target = turns[index]
        if self._cost(target) > budget:
            example.add_cut(target, budget, self._separator_array)
            return example
        budget -= self._cost(target)
        start = oldest_kept([self._cost(part) for part in turns[:index]], budget)
        example.truncated = start > 0
        for part in turns[start:index]:
            example.add_message(part, self._separator_array, context=True)
        example.add_message(target, self._separator_array)
        return example

    def _windows(self, system: _Part | None, turns: list[_Part], max_seq_len: int) -> list[Example]:
        windows: list[Example] = []
        position = 0
        while position < len(turns):
            if turns[position].target is None:
                position += 1  # windows begin at a target; what comes before is context
                continue
            example, budget = self._start(system, max_seq_len)
            context = turns[position - 1] if position > 0 else None
            # The previous message as context only if it takes at most half the window and leaves
            # the first target room to fit whole.
            if context and self._cost(context) <= budget // 2 and \
                    self._cost(context) + self._cost(turns[position]) <= budget:
                example.add_message(context, self._separator_array, context=True)
                budget -= self._cost(context)
            placed = False
            while position < len(turns):
                part = turns[position]
                if self._cost(part) > budget:
                    if not placed:
                        example.add_cut(part, budget, self._separator_array)
                        position += 1
                    break
                example.add_message(part, self._separator_array)
                budget -= self._cost(part)
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
    header: Sequence[int]
    body: Sequence[int]
    target: int | None
    # The header's and body's tokens, counted once: per_turn reads every earlier message's for each target.
    length: int = field(init=False)

    def __post_init__(self):
        self.length = len(self.header) + len(self.body)
