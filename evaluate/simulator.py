"""Simulating users with a user LM: the importable API behind `python -m evaluate.simulate`.

    from evaluate.simulator import UserSimulator, SamplingSettings, GuardrailSettings
    sim = UserSimulator.from_pretrained("microsoft/UserLM-8b", SamplingSettings.card())
    turn = sim.first_turn("You are a user chatting with an assistant language model to ...")
    turn.text                                   # the user's message
    turn = sim.next_turn(intent, [{"role": "user", "content": turn.text},
                                  {"role": "assistant", "content": "..."}], allow_end=True)
    turn.ended                                  # True: the user sent <|endconversation|> (turn.text is None)
    sim.generate([TurnRequest(intent, turns, allow_end), ...])   # many conversations in one batch

`simulate_conversations(sim, assistant, items, ...)` runs whole conversations against an assistant
(evaluate.assistants), many at once: every round draws the next user turn of all running
conversations in one batch and asks the assistant for all replies at once; a finished conversation
makes room for the next one.

Generation goes through a `TurnSampler` backend: `sample(prompts, forbid_end, ban_first_word) ->
[Sample]`. `HFTurnSampler` (transformers, left-padded batches, pad != EOS) is the one here; a vLLM
backend implements the same method with vLLM logits processors (evaluate.guardrails holds the
token analysis it needs). Guardrails: evaluate.guardrails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

from data_prep.chat_format import (END_CONVERSATION, END_OF_TEXT, EOT, USER, ChatEncoder, conversation_messages,
                                   prepare_tokenizer)
from evaluate.guardrails import FirstWordBan, LengthRule, RowRecord, TurnGuard, TurnGuardrails, turn_violations


# ---- settings ------------------------------------------------------------------------------------
@dataclass
class SamplingSettings:
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.8
    top_k: int = 0                 # 0: off (transformers would otherwise not apply one either)
    max_new_tokens: int = 64

    @classmethod
    def card(cls) -> "SamplingSettings":
        """microsoft/UserLM-8b's model card snippet: top_p 0.8, temperature 1.0."""
        return cls(temperature=1.0, top_p=0.8)

    @classmethod
    def generation_config(cls) -> "SamplingSettings":
        """microsoft/UserLM-8b's generation_config.json defaults: temperature 0.6, top_p 0.9."""
        return cls(temperature=0.6, top_p=0.9)

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens}


@dataclass
class GuardrailSettings:
    """The four guardrails (evaluate.guardrails), each switchable, and the retry budget per turn."""
    first_word: bool = True
    first_words: Sequence[str] = ("I", "You", "Here")
    end_conversation: bool = True
    length: bool = True
    min_words: int = 3
    max_words: int = 25
    repetition: bool = True
    intent_prefix: str = "You are a user chatting with an assistant language model to"
    max_retries: int = 5           # resamples of one turn before its failure is recorded (paper: not known)

    def enabled(self) -> dict[str, bool]:
        return {"first_word": self.first_word, "end_conversation": self.end_conversation,
                "length": self.length, "repetition": self.repetition}


# ---- what a user turn is -------------------------------------------------------------------------
@dataclass
class TurnRequest:
    """Generate the next user turn of a conversation. `turns` alternate user/assistant from user."""
    intent: str | None
    turns: Sequence[dict]
    allow_end: bool


@dataclass
class UserTurn:
    """A generated user turn: text, or the explicit end of the conversation (`ended`, text None)."""
    text: str | None
    ended: bool
    truncated: bool                # the kept sample hit max_new_tokens before <|eot_id|>
    guardrails: TurnGuardrails = field(default_factory=TurnGuardrails)


@dataclass
class Sample:
    """One sampled turn from a backend."""
    text: str
    ended: bool
    truncated: bool
    guard: RowRecord


class TurnSampler(Protocol):
    def sample(self, prompts: Sequence[list[int]], forbid_end: Sequence[bool], ban_first_word: bool) -> list[Sample]:
        ...


# ---- the transformers backend --------------------------------------------------------------------
class HFTurnSampler:
    """Batched sampling with transformers' generate: left padding, pad != EOS, TurnGuard installed."""

    def __init__(self, model, tokenizer, sampling: SamplingSettings, batch_size: int,
                 first_words: FirstWordBan | None, end_token_id: int | None, stop_token_ids: Sequence[int]):
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stop_token_ids:
            raise ValueError("the user LM's tokenizer needs a pad token that is not a stop token")
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.batch_size = batch_size
        self.first_words, self.end_token_id, self.stop_token_ids = first_words, end_token_id, list(stop_token_ids)

    @torch.no_grad()
    def sample(self, prompts, forbid_end, ban_first_word):
        # Similar lengths share a batch (less padding); results come back in the caller's order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        samples: list[Sample | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, sample in zip(chunk, self._sample_batch([prompts[i] for i in chunk],
                                                           [forbid_end[i] for i in chunk], ban_first_word)):
                samples[i] = sample
        return samples

    def _sample_batch(self, prompts, forbid_end, ban_first_word) -> list[Sample]:
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=self.model.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        guard = TurnGuard(width, self.first_words if ban_first_word else None, forbid_end, self.end_token_id,
                          self.stop_token_ids, self.sampling.temperature,
                          self.sampling.top_p if self.sampling.do_sample else 0.0)
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     logits_processor=LogitsProcessorList([guard]), eos_token_id=self.stop_token_ids,
                                     pad_token_id=pad, **self.sampling.generate_kwargs())
        samples = []
        for row, record in zip(output[:, width:].tolist(), guard.records):
            stop = next((k for k, token in enumerate(row) if token in self.stop_token_ids), None)
            text = self.tokenizer.decode(row[:stop], skip_special_tokens=True)
            samples.append(Sample(text=text.strip(), ended=END_CONVERSATION in text, truncated=stop is None,
                                  guard=record))
        return samples


def load_causal_lm(name_or_path: str, dtype: str, device: str, trust_remote_code: bool):
    """A causal LM for inference. dtype auto: bfloat16 on GPU, float32 on CPU; device auto: cuda if present."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype),
                                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()


# ---- the simulator -------------------------------------------------------------------------------
class UserSimulator:
    """A user LM that writes user turns from an intent and the conversation so far, with guardrails."""

    def __init__(self, model, tokenizer, sampling: SamplingSettings, guardrails: GuardrailSettings,
                 batch_size: int = 32, sampler: TurnSampler | None = None):
        if END_CONVERSATION not in tokenizer.get_vocab():
            raise ValueError("the user LM's tokenizer has no <|endconversation|>: prepare it with "
                             "data_prep.chat_format.prepare_tokenizer (UserSimulator.from_pretrained does)")
        self.tokenizer = tokenizer
        self.encoder = ChatEncoder(self.tokenizer)
        self.guardrails = guardrails
        self.end_token_id = self.tokenizer.convert_tokens_to_ids(END_CONVERSATION)
        first_words = FirstWordBan(self.tokenizer, guardrails.first_words) if guardrails.first_word else None
        stops = [self.tokenizer.convert_tokens_to_ids(t) for t in (EOT, END_OF_TEXT)]
        self.sampler = sampler or HFTurnSampler(model, self.tokenizer, sampling, batch_size, first_words,
                                                self.end_token_id, stops)

    @classmethod
    def from_pretrained(cls, name_or_path: str, sampling: SamplingSettings | None = None,
                        guardrails: GuardrailSettings | None = None, batch_size: int = 32,
                        pad_token: str = "<|reserved_special_token_0|>", dtype: str = "auto", device: str = "auto",
                        trust_remote_code: bool = False) -> "UserSimulator":
        """Load a user LM (hub id or local path) and its tokenizer, prepared for UserLM's chat format."""
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code),
                                      pad_token)
        model = load_causal_lm(name_or_path, dtype, device, trust_remote_code)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))  # a base model that never saw <|endconversation|>
        return cls(model, tokenizer, sampling or SamplingSettings.card(), guardrails or GuardrailSettings(), batch_size)

    def prompt_ids(self, intent: str | None, turns: Sequence[dict]) -> list[int]:
        return self.encoder.prompt_ids(conversation_messages(intent, turns, ended=False))

    def first_turn(self, intent: str | None) -> UserTurn:
        return self.generate([TurnRequest(intent, [], allow_end=False)])[0]

    def next_turn(self, intent: str | None, conversation: Sequence[dict], allow_end: bool = True) -> UserTurn:
        return self.generate([TurnRequest(intent, conversation, allow_end)])[0]

    def generate(self, requests: Sequence[TurnRequest]) -> list[UserTurn]:
        """The next user turn of every request, sampled in batches; turns that break the length or
        repetition guardrail are resampled (only those) up to `max_retries` times, then kept and
        marked `failed`."""
        g = self.guardrails
        length = LengthRule(g.min_words, g.max_words) if g.length else None
        prefix = g.intent_prefix if g.repetition else None
        prompts = [self.prompt_ids(r.intent, r.turns) for r in requests]
        forbid_end = [g.end_conversation and not r.allow_end for r in requests]
        records = [TurnGuardrails() for _ in requests]
        turns: list[UserTurn | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        for attempt in range(g.max_retries + 1):
            samples = self.sampler.sample([prompts[i] for i in pending], [forbid_end[i] for i in pending],
                                          g.first_word)
            retry = []
            for i, sample in zip(pending, samples):
                request = requests[i]
                earlier = [t["content"] for t in request.turns if t["role"] == USER]
                violations = [] if sample.ended else turn_violations(sample.text, earlier, request.intent,
                                                                      length, prefix)
                records[i].add_sample(sample.guard, violations)
                if violations and attempt < g.max_retries:
                    retry.append(i)
                    continue
                records[i].failed = violations
                turns[i] = UserTurn(None if sample.ended else sample.text, sample.ended, sample.truncated, records[i])
            pending = retry
            if not pending:
                break
        return turns


# ---- whole conversations -------------------------------------------------------------------------
class Assistant(Protocol):
    def reply(self, conversations: Sequence[Sequence[dict]]) -> list[str]:
        """The assistant's next message for each conversation (user/assistant turns, user last)."""


def plain(turns: Sequence[dict]) -> list[dict]:
    """Turns without their metadata: what the user LM and the assistant see."""
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def simulate_conversations(simulator: UserSimulator, assistant: Assistant, items: Iterable[dict],
                           max_user_turns: int, end_allowed_after: int, pool_size: int) -> Iterator[dict]:
    """Run conversations for `items` ({id, intent}), up to `pool_size` at once; yield each finished one.

    A conversation ends when the user sends <|endconversation|> (end_reason user_ended; allowed
    once `end_allowed_after` user turns were sent) or after `max_user_turns` answered user turns
    (max_turns). Yielded record: id, intent, turns (user turns carry their guardrail metadata),
    ended, end_reason, end_turn (the guardrail metadata of the ending sample, or None).
    """
    queue = iter(items)
    active: list[dict] = []
    while True:
        while len(active) < pool_size and (item := next(queue, None)) is not None:
            active.append({"id": item["id"], "intent": item["intent"], "turns": [], "ended": False,
                           "end_reason": None, "end_turn": None})
        if not active:
            return
        user_turns = simulator.generate([
            TurnRequest(c["intent"], plain(c["turns"]), allow_end=_user_turns(c) >= end_allowed_after)
            for c in active])
        waiting = []
        for conversation, turn in zip(active, user_turns):
            if turn.ended:
                conversation.update(ended=True, end_reason="user_ended", end_turn=turn.guardrails.to_dict())
                yield conversation
                continue
            conversation["turns"].append({"role": USER, "content": turn.text, "truncated": turn.truncated,
                                          "guardrails": turn.guardrails.to_dict()})
            waiting.append(conversation)
        replies = assistant.reply([plain(c["turns"]) for c in waiting]) if waiting else []
        active = []
        for conversation, reply in zip(waiting, replies):
            conversation["turns"].append({"role": "assistant", "content": reply})
            if _user_turns(conversation) >= max_user_turns:
                conversation["end_reason"] = "max_turns"
                yield conversation
            else:
                active.append(conversation)


def _user_turns(conversation: dict) -> int:
    return sum(t["role"] == USER for t in conversation["turns"])
