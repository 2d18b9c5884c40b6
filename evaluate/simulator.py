"""Simulating users with a user LM: the importable API behind `python -m evaluate.simulate`.

    from evaluate.simulator import UserSimulator, SamplingSettings, GuardrailSettings
    sim = UserSimulator.from_pretrained("microsoft/UserLM-8b", SamplingSettings.card(), GuardrailSettings())
    turn = sim.first_turn("You are a user chatting with an assistant language model to ...")
    turn.text                                   # the user's message
    turn = sim.next_turn(intent, [{"role": "user", "content": turn.text},
                                  {"role": "assistant", "content": "..."}], allow_end=True)
    turn.ended                                  # True: the user sent <|endconversation|> (turn.text is None)
    sim.generate([TurnRequest(intent, turns, allow_end), ...])   # many conversations in one batch

`simulate_conversations(sim, assistant, items, ...)` runs whole conversations against an assistant
(evaluate.assistants), many at once, through the conversation runner (evaluate.conversation).

Generation goes through a `TurnSampler` backend: `sample(prompts, forbid_end, ban_first_word) ->
[Sample]`. `HFTurnSampler` (core.runtime's batched generation) is the one here; a vLLM
backend implements the same method with vLLM logits processors (evaluate.guardrails holds the
token analysis it needs). Prompts come from a prompting protocol (evaluate.protocols): `userlm`
(UserLM-8b's format, for user LMs and base models) or `flipped_chat` (an instruct model playing the
user). Guardrails: evaluate.guardrails.

Prompts are bounded by the user LM's context: at most `max_position_embeddings - max_new_tokens`
tokens. A longer one (a long conversation, or an assistant that answered with megabytes) is cut by
the protocols' rule: the intent stays, the oldest whole messages go, a newest message too long
even alone keeps its first tokens. Each turn records its prompt's length (`prompt_tokens`) and
whether it was cut; a conversation counts its cut prompts (`truncated_prompts`, summed in the
summary). An intent that alone leaves no room ends its conversation at once (`intent_too_long`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

from omegaconf import OmegaConf

from core import runtime
from data_prep.chat_format import END_CONVERSATION, INTENT_PREFIX, PAD_TOKEN, USER
from evaluate.guardrails import (FirstWordBan, LengthRule, RowRecord, TurnGuard, TurnGuardrails, first_word_rule,
                                 turn_violations)
from evaluate.protocols import make_protocol


# ---- settings ------------------------------------------------------------------------------------
# The values are written once, in conf/simulate/ (what `python -m evaluate.simulate` composes): the
# settings classes below take their defaults from there, so the API and the command cannot drift.
SIMULATE_CONF = Path(__file__).resolve().parents[1] / "conf" / "simulate"


def sampling_preset(name: str) -> dict:
    """conf/simulate/sampling/<name>.yaml: card (microsoft/UserLM-8b's model card snippet) or
    generation_config (its generation_config.json)."""
    return OmegaConf.to_container(OmegaConf.load(SIMULATE_CONF / "sampling" / f"{name}.yaml"))


CARD_SAMPLING = sampling_preset("card")
PAPER_GUARDRAILS = OmegaConf.load(SIMULATE_CONF / "config.yaml").guardrails   # the paper's (Appendix D.1)


@dataclass
class SamplingSettings:
    """How user turns are sampled; defaults: conf/simulate/sampling/card.yaml."""
    do_sample: bool = CARD_SAMPLING["do_sample"]
    temperature: float = CARD_SAMPLING["temperature"]
    top_p: float = CARD_SAMPLING["top_p"]
    top_k: int = CARD_SAMPLING["top_k"]                 # 0: no top-k filtering
    max_new_tokens: int = CARD_SAMPLING["max_new_tokens"]

    @classmethod
    def card(cls) -> "SamplingSettings":
        """microsoft/UserLM-8b's model card snippet: top_p 0.8, temperature 1.0 (the defaults)."""
        return cls(**CARD_SAMPLING)

    @classmethod
    def generation_config(cls) -> "SamplingSettings":
        """microsoft/UserLM-8b's generation_config.json defaults: temperature 0.6, top_p 0.9."""
        return cls(**sampling_preset("generation_config"))

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens}


@dataclass
class GuardrailSettings:
    """The four guardrails (evaluate.guardrails), each switchable, and the retry budget per turn;
    defaults: the `guardrails` section of conf/simulate/config.yaml."""
    first_word: bool = PAPER_GUARDRAILS.first_word.enabled
    first_words: Sequence[str] = tuple(PAPER_GUARDRAILS.first_word.words)
    end_conversation: bool = PAPER_GUARDRAILS.end_conversation.enabled
    length: bool = PAPER_GUARDRAILS.length.enabled
    min_words: int = PAPER_GUARDRAILS.length.min_words
    max_words: int = PAPER_GUARDRAILS.length.max_words
    repetition: bool = PAPER_GUARDRAILS.repetition.enabled
    intent_prefix: str = INTENT_PREFIX   # conf/ writes it as ${chat_format:INTENT_PREFIX}, the same constant
    max_retries: int = PAPER_GUARDRAILS.max_retries   # resamples of one turn before its failure is recorded

    @classmethod
    def from_config(cls, cfg) -> "GuardrailSettings":
        """From a `guardrails` config node (conf/simulate/config.yaml)."""
        return cls(first_word=cfg.first_word.enabled, first_words=tuple(cfg.first_word.words),
                   end_conversation=cfg.end_conversation.enabled, length=cfg.length.enabled,
                   min_words=cfg.length.min_words, max_words=cfg.length.max_words,
                   repetition=cfg.repetition.enabled, intent_prefix=cfg.repetition.intent_prefix,
                   max_retries=cfg.max_retries)

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
    conversation_id: str | None = None   # which conversation (users that keep state per conversation)


@dataclass
class UserTurn:
    """A generated user turn: text, or the explicit end of the conversation (`ended`, text None)."""
    text: str | None
    ended: bool
    truncated: bool                # the kept sample hit max_new_tokens before <|eot_id|>
    tokens: int                    # tokens the kept sample generated (its stop token not counted)
    guardrails: TurnGuardrails = field(default_factory=TurnGuardrails)
    prompt_tokens: int = 0         # length of the prompt it was generated from
    prompt_truncated: bool = False  # that prompt was cut to the context (see the module docstring)
    error: str | None = None       # a served user LM's request that failed for good (text None)
    error_reason: str | None = None

    def metadata(self) -> dict:
        """What a transcript records of the turn beside its role and content."""
        return {"tokens": self.tokens, "truncated": self.truncated, "prompt_tokens": self.prompt_tokens,
                "guardrails": self.guardrails.to_dict()}


@dataclass
class Sample:
    """One sampled turn from a backend."""
    text: str
    ended: bool
    truncated: bool
    tokens: int
    guard: RowRecord
    error: str | None = None          # the request failed for good (served backends): no text
    error_reason: str | None = None


class TurnSampler(Protocol):
    # True: the first-word ban masks tokens while sampling (transformers); False: a sample whose first
    # word is banned is rejected and drawn again, like the length rule (a served model).
    masks_first_word: bool

    def sample(self, prompts: Sequence[list[int]], forbid_end: Sequence[bool],
               ban_first_word: bool) -> list[list[Sample]]:
        """Candidates for each prompt (one or more), in the order they are to be judged."""


# ---- the transformers backend --------------------------------------------------------------------
class HFTurnSampler:
    """Batched sampling with transformers' generate, with TurnGuard installed: one candidate a prompt."""
    masks_first_word = True

    def __init__(self, model, tokenizer, sampling: SamplingSettings, batch_size: int,
                 first_words: FirstWordBan | None, end_token_id: int | None, stop_token_ids: Sequence[int],
                 pad_token_id: int):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.batch_size, self.pad_token_id = batch_size, pad_token_id
        self.first_words, self.end_token_id, self.stop_token_ids = first_words, end_token_id, list(stop_token_ids)

    def sample(self, prompts, forbid_end, ban_first_word):
        def generate(indices):
            batch = [prompts[i] for i in indices]
            guard = TurnGuard(max(len(p) for p in batch), self.first_words if ban_first_word else None,
                              [forbid_end[i] for i in indices], self.end_token_id, self.stop_token_ids,
                              self.sampling.temperature, self.sampling.top_p if self.sampling.do_sample else 0.0)
            outputs = runtime.generate_batch(self.model, self.pad_token_id, batch, self.stop_token_ids,
                                             self.sampling.generate_kwargs(), guard)
            samples = []
            for (ids, stopped), record in zip(outputs, guard.records):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                samples.append([Sample(text.strip(), END_CONVERSATION in text, not stopped, len(ids), record)])
            return samples
        return runtime.in_length_batches(prompts, self.batch_size, generate)


def context_size(config) -> int:
    """The positions a causal LM can attend over (its config's max_position_embeddings)."""
    size = getattr(config, "max_position_embeddings", None)
    if not size:
        raise ValueError(f"{config.name_or_path}: its config has no max_position_embeddings, so prompts "
                         "cannot be bounded to its context")
    return size


def stop_token_ids(protocol, model) -> list[int]:
    """The runtime's stop set; userlm adds its chat format's turn ends (<|eot_id|> and <|end_of_text|>,
    or <|im_end|> and <|endoftext|>)."""
    return runtime.stop_token_ids(protocol.tokenizer, model,
                                  protocol.encoder.format.stop_tokens if protocol.name == "userlm" else ())


# ---- the simulator -------------------------------------------------------------------------------
class UserSimulator:
    """A user LM that writes user turns from an intent and the conversation so far, with guardrails.

    `protocol` (evaluate.protocols.make_protocol) renders prompts; its tokenizer is the model's.
    The end of a conversation is <|endconversation|> in the generated text. Where it is one token of
    the vocabulary the end_conversation guardrail masks it; otherwise (an instruct model writing it
    as text) a sample that ends too early is resampled instead.
    """

    def __init__(self, model, protocol, sampling: SamplingSettings, guardrails: GuardrailSettings,
                 batch_size: int = 32, sampler: TurnSampler | None = None, pad_token: str | None = None,
                 context: int | None = None):
        """`model`: a local causal LM, or None with a `sampler` (a served one) and its `context`."""
        self.protocol = protocol
        self.tokenizer = protocol.tokenizer
        self.guardrails = guardrails
        context = context or context_size(model.config)
        self.max_prompt_tokens = context - sampling.max_new_tokens
        if self.max_prompt_tokens <= 0:
            raise ValueError(f"sampling.max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in "
                             f"the user LM's context of {context} tokens")
        vocabulary = self.tokenizer.get_vocab()
        self.end_token_id = vocabulary.get(END_CONVERSATION)
        first_words = FirstWordBan(self.tokenizer, guardrails.first_words) if guardrails.first_word else None
        if sampler is None:
            stops = stop_token_ids(protocol, model)
            sampler = HFTurnSampler(model, self.tokenizer, sampling, batch_size, first_words, self.end_token_id,
                                    stops, runtime.generation_pad_id(self.tokenizer, stops, pad_token))
        self.sampler = sampler

    @classmethod
    def from_config(cls, user_model, sampling, guardrails, seed: int = 0) -> "UserSimulator":
        """From the `user_model`, `sampling` and `guardrails` config nodes (conf/simulate/config.yaml):
        a local model (backend hf), or one served over /v1/completions (backend openai, evaluate.served)."""
        if user_model.get("backend", "hf") == "openai":
            return cls.served(user_model, SamplingSettings(**sampling), GuardrailSettings.from_config(guardrails), seed)
        return cls.from_pretrained(
            user_model.name_or_path, SamplingSettings(**sampling), GuardrailSettings.from_config(guardrails),
            user_model.batch_size, user_model.protocol, user_model.pad_token, user_model.flipped_chat,
            user_model.dtype, user_model.device, user_model.trust_remote_code)

    @classmethod
    def served(cls, user_model, sampling: SamplingSettings, guardrails: GuardrailSettings, seed: int = 0
               ) -> "UserSimulator":
        """A user LM behind an OpenAI-compatible completions endpoint (`user_model.openai`); the
        tokenizer and context come from `user_model.name_or_path` (no weights are loaded)."""
        from transformers import AutoConfig

        from evaluate.served import ServedTurnSampler
        if user_model.protocol != "userlm":
            raise ValueError("user_model.backend=openai serves user LMs in UserLM's format (protocol userlm); an "
                             "instruct model playing the user (flipped_chat) runs with backend hf")
        tokenizer = runtime.load_tokenizer(user_model.name_or_path, trust_remote_code=user_model.trust_remote_code)
        protocol = make_protocol("userlm", tokenizer, end_token="token", pad_token=user_model.pad_token)
        config = AutoConfig.from_pretrained(user_model.name_or_path, trust_remote_code=user_model.trust_remote_code)
        return cls(None, protocol, sampling, guardrails, sampler=ServedTurnSampler(user_model.openai, tokenizer, sampling, seed),
                   context=context_size(config))

    @classmethod
    def from_pretrained(cls, name_or_path: str, sampling: SamplingSettings | None = None,
                        guardrails: GuardrailSettings | None = None, batch_size: int = 32, protocol: str = "userlm",
                        pad_token: str = PAD_TOKEN, flipped_chat=None, dtype: str = "auto",
                        device: str = "auto", trust_remote_code: bool = False) -> "UserSimulator":
        """Load a user LM (hub id or local path) and its tokenizer. protocol userlm prepares the
        tokenizer for UserLM's format (and gives a base model an <|endconversation|> row);
        flipped_chat needs `flipped_chat` {system_prompt, system_prompt_with_intent, template_kwargs}
        (evaluate.config.FlippedChatConfig has the defaults)."""
        tokenizer = runtime.load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        model = runtime.load_causal_lm(name_or_path, dtype, device, trust_remote_code=trust_remote_code)
        chat = flipped_chat or {}
        prompts = make_protocol(protocol, tokenizer, end_token="token" if protocol == "userlm" else "plain_text",
                                pad_token=pad_token, system_prompt=chat.get("system_prompt"),
                                system_prompt_with_intent=chat.get("system_prompt_with_intent"),
                                template_kwargs=chat.get("template_kwargs"))
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))  # a base model that never saw <|endconversation|>
        return cls(model, prompts, sampling or SamplingSettings.card(), guardrails or GuardrailSettings(), batch_size,
                   pad_token=pad_token)

    def first_turn(self, intent: str | None) -> UserTurn:
        return self.generate([TurnRequest(intent, [], allow_end=False)])[0]

    def next_turn(self, intent: str | None, conversation: Sequence[dict], allow_end: bool = True) -> UserTurn:
        return self.generate([TurnRequest(intent, conversation, allow_end)])[0]

    def check_intent_fits(self, intent: str | None) -> None:
        """ValueError when the intent's prompt alone exceeds the user LM's context."""
        self.protocol.prompt_within(intent, [], self.max_prompt_tokens)

    def generate(self, requests: Sequence[TurnRequest]) -> list[UserTurn]:
        """The next user turn of every request, sampled in batches. A sample that breaks a resampling
        guardrail (length, repetition; end_conversation without an end token; the first word where
        the sampler cannot mask it) is rejected and the next candidate judged, drawing again only for
        those requests, until `max_retries` samples were rejected; then the last sample is kept and
        marked failed. A request that failed for good (a served model) ends with its error."""
        g = self.guardrails
        length = LengthRule(g.min_words, g.max_words) if g.length else None
        prefix = g.intent_prefix if g.repetition else None
        first_words = (first_word_rule(g.first_words)
                       if g.first_word and not self.sampler.masks_first_word else None)
        built = [self.protocol.prompt_within(r.intent, r.turns, self.max_prompt_tokens) for r in requests]
        prompts = [ids for ids, _ in built]
        forbid_end = [g.end_conversation and not r.allow_end for r in requests]
        records = [TurnGuardrails() for _ in requests]
        turns: list[UserTurn | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:
            candidates = self.sampler.sample([prompts[i] for i in pending], [forbid_end[i] for i in pending],
                                             g.first_word)
            retry = []
            for i, samples in zip(pending, candidates):
                request = requests[i]
                for sample in samples:
                    if sample.error is not None:
                        turns[i] = UserTurn(None, False, False, 0, records[i], len(prompts[i]), built[i][1],
                                            sample.error, sample.error_reason)
                        break
                    if sample.ended:
                        violations = ["end_conversation"] if forbid_end[i] else []
                    else:
                        earlier = [t["content"] for t in request.turns if t["role"] == USER]
                        violations = turn_violations(sample.text, earlier, request.intent, length, prefix)
                        if first_words is not None and first_words(sample.text):
                            violations.insert(0, "first_word")
                    records[i].add_sample(sample.guard, violations)
                    if violations and records[i].attempts <= g.max_retries:
                        continue
                    records[i].failed = violations
                    turns[i] = UserTurn(None if sample.ended else sample.text, sample.ended, sample.truncated,
                                        sample.tokens, records[i], len(prompts[i]), built[i][1])
                    break
                else:
                    retry.append(i)
            pending = retry
        return turns


# ---- whole conversations -------------------------------------------------------------------------
def simulate_conversations(simulator: UserSimulator, assistant, items: Iterable[dict],
                           max_user_turns: int, end_allowed_after: int, pool_size: int) -> Iterator[dict]:
    """evaluate.simulate's conversations for `items` ({id, intent}) with `assistant`
    (evaluate.conversation.Assistant), up to `pool_size` at once: the conversation runner (its end
    reasons) stopped after `max_user_turns` answered user turns; yields each finished one's
    transcript record (Conversation.transcript).
    """
    from evaluate import conversation  # not at the top: evaluate.conversation imports this module
    for finished in conversation.run_conversations(simulator, assistant, ((i["id"], i["intent"]) for i in items),
                                                   conversation.max_user_turns(max_user_turns), end_allowed_after,
                                                   pool_size):
        yield finished.transcript()
