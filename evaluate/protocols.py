"""Prompting protocols: how a model is shown a conversation whose user turns it must predict.

Two protocols, one API, for scoring (evaluate.perplexity) and for generation (user simulation):

    protocol = make_protocol("userlm", tokenizer, end_token="token")
    protocol.examples(intent, turns, ended, mode="per_conversation", max_seq_len=2048)  # scoring
    protocol.build_prompt(intent, turns)   # token ids after which the model writes the next user turn
    protocol.prompt_within(intent, turns, max_tokens)   # the same, cut to a context: (ids, truncated)

A prompt over `max_tokens` (the user LM's context less the tokens it may generate) is cut by one
rule in both protocols, the rule of data_prep's per_turn history: the system message (the intent)
stays, the oldest whole messages go first, and a newest message that does not fit even alone keeps
its first tokens. An intent that alone leaves no room is a ValueError.

- `userlm`: the user LM's flipped layout (data_prep.chat_format), in UserLM-8b's own Llama-3 format
  or in ChatML, whichever the tokenizer carries: the intent as system message, the real roles, the
  user header last. For user LMs, and for base models, which get the same text.
- `flipped_chat`: an instruct model's OWN chat template with the roles swapped: our user turns are
  its `assistant` turns (the turns it is good at writing), our assistant turns are its `user` turns,
  and a system prompt asks it to play the user (with the intent, when there is one). The label mask
  comes from the template's own output: the tokens of an assistant turn are the text that rendering
  the messages up to that turn adds to the rendering of the messages before it with the
  generation prompt (trailing whitespace between turns is template glue, not scored).

`turns` are data_prep's conversation turns ({role, content}, alternating, user first); `intent` is
a sentence or None (no system message for userlm; the intent-free system prompt for flipped_chat).

The end of a conversation is the user turn <|endconversation|> (after the last answered turn).
`end_token` says how it is scored: "token" (the model's vocabulary has it: one token, as UserLM-8b),
"plain_text" (a vocabulary without it, such as Llama-3 base or an instruct model: the string is
scored as the text pieces the tokenizer splits it into) or "exclude" (no end-of-conversation target).
"""

from __future__ import annotations

from typing import Sequence

from data_prep.chat_format import (ASSISTANT, END_CONVERSATION, SYSTEM, USER, USERLM, ChatEncoder, Example,
                                   conversation_messages, format_of, prepare_tokenizer)

END_TOKEN_HANDLING = ("token", "plain_text", "exclude")
FLIP_MODES = ("per_turn", "per_conversation")


def make_protocol(name: str, tokenizer, *, end_token: str, pad_token: str | None = None,
                  system_prompt: str | None = None, system_prompt_with_intent: str | None = None,
                  template_kwargs: dict | None = None):
    """The protocol `name` for `tokenizer`.

    userlm: the flipped layout of data_prep.chat_format, in the format `tokenizer` carries (a user
        LM's or data_prep's saved tokenizer: userlm or chatml); any other tokenizer (a base model's,
        a Llama-3 one) is prepared in place for UserLM's format, with `pad_token`.
    flipped_chat: `tokenizer` must carry a chat template; the system prompts are configuration
        (system_prompt_with_intent contains "{intent}"); template_kwargs are passed to the template
        (Llama-3.1/3.2 templates print today's date unless given date_string: fix it, for the same
        bytes every day).
    """
    if end_token not in END_TOKEN_HANDLING:
        raise ValueError(f"end_token={end_token!r}: expected one of {END_TOKEN_HANDLING}")
    if name == "userlm":
        return UserLMProtocol(tokenizer if format_of(tokenizer) else prepare_tokenizer(tokenizer, USERLM, pad_token),
                              end_token)
    if name == "flipped_chat":
        return FlippedChatProtocol(tokenizer, end_token, system_prompt, system_prompt_with_intent, template_kwargs)
    raise ValueError(f"protocol={name!r}: expected userlm or flipped_chat")


def plain_text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as ordinary text, even where the tokenizer has <|endconversation|> as an
    added token: the base-model reading of the string (Llama-3 splits "\n<|endconversation|>" into
    7 pieces: "\n", "<", "|", "end", "conversation", "|", ">"). The tokenizer's own normalizer,
    pre-tokenizer and model, which never see added tokens: what encoding gives for text holding none
    (rebuilding the tokenizer without the token instead took 10 s for Llama-3's vocabulary)."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
    return [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]


class UserLMProtocol:
    """The user LM's flipped layout; examples and prompts come from data_prep.chat_format.ChatEncoder."""
    name = "userlm"

    def __init__(self, tokenizer, end_token: str):
        self.tokenizer = tokenizer
        self.end_token = end_token
        self.encoder = ChatEncoder(tokenizer)
        # "\n" + <|endconversation|> + end of turn, with the end string read as plain text.
        self.plain_end_body = plain_text_ids(tokenizer, "\n" + END_CONVERSATION) + [self.encoder.eot_id]

    def messages(self, intent: str | None, turns: Sequence[dict], ended: bool) -> list[dict]:
        return conversation_messages(intent, turns, ended and self.end_token != "exclude")

    def examples(self, intent: str | None, turns: Sequence[dict], ended: bool, mode: str,
                 max_seq_len: int) -> list[Example]:
        messages = self.messages(intent, turns, ended)
        bodies = self.encoder.encode_bodies([m["content"] for m in messages])
        if ended and self.end_token == "plain_text":
            bodies[-1] = self.plain_end_body
        return self.encoder.flip(messages, mode, max_seq_len, bodies=bodies)

    def build_prompt(self, intent: str | None, turns: Sequence[dict]) -> list[int]:
        return self.encoder.prompt_ids(self.messages(intent, turns, ended=False))

    def prompt_within(self, intent: str | None, turns: Sequence[dict], max_tokens: int) -> tuple[list[int], bool]:
        return self.encoder.prompt_ids_within(self.messages(intent, turns, ended=False), max_tokens)


class FlippedChatProtocol:
    """An instruct model's own chat template, roles swapped; masks derived from its rendering."""
    name = "flipped_chat"
    SWAP = {USER: ASSISTANT, ASSISTANT: USER}

    def __init__(self, tokenizer, end_token: str, system_prompt: str | None,
                 system_prompt_with_intent: str | None, template_kwargs: dict | None = None):
        if not tokenizer.chat_template:
            raise ValueError(f"protocol flipped_chat needs a chat template; tokenizer "
                             f"{tokenizer.name_or_path!r} has none")
        if not system_prompt or not system_prompt_with_intent or "{intent}" not in system_prompt_with_intent:
            raise ValueError("flipped_chat needs system_prompt and system_prompt_with_intent (with {intent})")
        self.tokenizer = tokenizer
        self.end_token = end_token
        self.system_prompt = system_prompt
        self.system_prompt_with_intent = system_prompt_with_intent
        self.template_kwargs = dict(template_kwargs or {})

    def messages(self, intent: str | None, turns: Sequence[dict], ended: bool) -> list[dict]:
        system = self.system_prompt if intent is None else self.system_prompt_with_intent.format(intent=intent)
        messages = [{"role": SYSTEM, "content": system}]
        messages += [{"role": self.SWAP[t["role"]], "content": t["content"]} for t in turns]
        if ended and self.end_token != "exclude":
            messages.append({"role": ASSISTANT, "content": END_CONVERSATION})
        return messages

    def build_prompt(self, intent: str | None, turns: Sequence[dict]) -> list[int]:
        return self._ids(self._render(self.messages(intent, turns, ended=False), generation_prompt=True))

    def prompt_within(self, intent: str | None, turns: Sequence[dict], max_tokens: int) -> tuple[list[int], bool]:
        """build_prompt cut to max_tokens (the module's rule), rendered by the template each time: the
        system message stays and the oldest others go first, the fewest that make it fit found by
        bisection (a rendering only shortens as messages go), so a long history costs log2 of its
        length in renderings."""
        messages = self.messages(intent, turns, ended=False)

        def from_message(first: int) -> list[int] | None:   # the system message and messages[first:], if it fits
            ids = self._ids(self._render(messages[:1] + messages[first:], generation_prompt=True))
            return ids if len(ids) <= max_tokens else None
        if (whole := from_message(1)) is not None:
            return whole, False
        too_long, fits, kept = 1, len(messages), None   # from_message(too_long) is None; fits: not yet known
        while fits - too_long > 1:
            middle = (too_long + fits) // 2
            if (ids := from_message(middle)) is None:
                too_long = middle
            else:
                fits, kept = middle, ids
        if kept is not None:
            return kept, True
        system_only = self._ids(self._render(messages[:1], generation_prompt=True))
        if len(system_only) > max_tokens:
            raise ValueError(f"the system prompt ({len(system_only)} tokens) leaves no room in {max_tokens} tokens")
        if len(messages) == 1:
            return system_only, False
        # The newest message alone does not fit: its first tokens, as many as the rendering leaves room for.
        newest = messages[-1]
        content_ids = self._ids(newest["content"])
        room = max_tokens - len(self._ids(self._render([messages[0], {**newest, "content": ""}], True)))
        while room > 0:
            cut = {**newest, "content": self.tokenizer.decode(content_ids[:room])}
            ids = self._ids(self._render([messages[0], cut], generation_prompt=True))
            if len(ids) <= max_tokens:
                return ids, True
            room -= len(ids) - max_tokens   # decoded text can tokenize longer at the seams
        return system_only, True

    def examples(self, intent: str | None, turns: Sequence[dict], ended: bool, mode: str,
                 max_seq_len: int) -> list[Example]:
        """per_conversation: the whole rendering with every assistant turn labelled; a conversation
        longer than max_seq_len falls back to per_turn examples. per_turn: one example per
        assistant turn, its history the messages before it; over max_seq_len the system message
        stays, the oldest messages go, and a turn that alone does not fit is cut."""
        if mode not in FLIP_MODES:
            raise ValueError(f"unknown flip mode {mode!r}: expected one of {FLIP_MODES}")
        messages = self.messages(intent, turns, ended)
        ids, spans = self._target_spans(messages)
        if mode == "per_conversation" and len(ids) <= max_seq_len:
            example = Example()
            position = 0
            for number, (start, end) in enumerate(spans):
                example.add(ids[position:start], None)
                example.add(ids[start:end], number)
                position = end
            return [example]
        targets = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
        return [self._turn_example(messages, ids, spans, number, index, max_seq_len)
                for number, index in enumerate(targets)]

    # ---- rendering and masks -------------------------------------------------------------------

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt, **self.template_kwargs)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _target_spans(self, messages: Sequence[dict]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of the whole rendering and, per assistant message, its [start, end) token span."""
        full = self._render(messages, generation_prompt=False)
        char_spans = []
        for index, message in enumerate(messages):
            if message["role"] != ASSISTANT:
                continue
            before = self._render(messages[:index], generation_prompt=True)
            through = self._render(messages[:index + 1], generation_prompt=False).rstrip()
            if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
                raise ValueError(f"the chat template of {self.tokenizer.name_or_path!r} does not render "
                                 f"message {index} as an extension of the messages before it, so its "
                                 "tokens cannot be told apart: flipped_chat cannot score this template")
            char_spans.append((len(before), len(through)))
        encoding = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        # A token belongs to a turn when its characters lie inside the turn's text.
        token_spans = []
        for start_char, end_char in char_spans:
            inside = [i for i, (a, b) in enumerate(offsets) if a >= start_char and b <= end_char and b > a]
            if not inside:
                raise ValueError(f"an assistant turn of {self.tokenizer.name_or_path!r}'s rendering has no "
                                 f"token of its own: {full[start_char:end_char]!r}")
            token_spans.append((inside[0], inside[-1] + 1))
        return list(encoding["input_ids"]), token_spans

    def _turn_example(self, messages, ids, spans, number, index, max_seq_len) -> Example:
        start, end = spans[number]
        example = Example()
        if end <= max_seq_len:
            example.add(ids[:start], None)
            example.add(ids[start:end], number)
            return example
        # Too long with its whole history: keep the system message, drop the oldest messages; a
        # turn that does not fit even alone is cut, keeping its beginning.
        histories = [messages[:1] + messages[first:index + 1] for first in range(2, index + 1)]
        for history in histories or [messages[:index + 1]]:
            short_ids, short_spans = self._target_spans(history)
            start, end = short_spans[-1]
            if end <= max_seq_len:
                break
        if start >= max_seq_len:
            raise ValueError(f"the system prompt leaves no room for a user turn in max_seq_len={max_seq_len}")
        example.add(short_ids[:start], None)
        example.add(short_ids[start:min(end, max_seq_len)], number)
        example.truncated = True
        return example
