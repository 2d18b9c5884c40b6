"""The assistant side of simulated conversations: a local HF model, any OpenAI-compatible endpoint,
or a fixed script.

An assistant answers many conversations at once: `reply(conversations) -> [AssistantReply]`, each
conversation a list of {role, content} turns (user first, user last). It never sees the user's
intent; its own system prompt (config) comes first.
    hf        a local transformers model with its chat template (core.runtime: stop tokens, a pad that
              is never one, left-padded batches); `stop_tokens` replaces the runtime's stop set
    openai    any chat-completions endpoint through core.llm_client (the intents stage's client:
              concurrency, retries, Retry-After, rate limits, a cap on reply size); a request
              that fails for good (an HTTP error, a reply over max_response_bytes, ...) becomes a
              reply with `error` and `reason` set, and that conversation ends; a dead endpoint
              (EndpointUnreachable) or a refused key stops the run
    scripted  reply k is `replies[k]` (the last one repeated): the hedging and diverting assistants of
              the role- and intent-adherence metrics, deterministic and free
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from typing import Sequence

from core import runtime
from data_prep.chat_format import ASSISTANT, SYSTEM
from core.llm_client import LLMClient, RequestFailed
from evaluate.simulator import SamplingSettings


@dataclass
class AssistantReply:
    text: str | None
    error: str | None = None      # why there is no text (a request that failed for good)
    reason: str | None = None     # its short label (RequestFailed.reason: http_400, response_too_large, ...)


def with_system(system_prompt: str | None, turns: Sequence[dict]) -> list[dict]:
    return ([{"role": SYSTEM, "content": system_prompt}] if system_prompt else []) + list(turns)


class HFAssistant:
    def __init__(self, model, tokenizer, system_prompt: str | None, sampling: SamplingSettings, batch_size: int,
                 stop_token_ids: Sequence[int], pad_token_id: int):
        if not tokenizer.chat_template:
            raise ValueError(f"assistant {tokenizer.name_or_path!r} has no chat template: set assistant.hf.chat_template")
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.sampling, self.batch_size = sampling, batch_size
        self.stop_token_ids, self.pad_token_id = list(stop_token_ids), pad_token_id

    @classmethod
    def from_config(cls, cfg, system_prompt: str | None) -> "HFAssistant":
        """cfg: assistant.hf (name_or_path, chat_template, pad_token, stop_tokens, dtype, device,
        batch_size, trust_remote_code) with assistant.sampling."""
        hf = cfg.hf
        tokenizer = runtime.load_tokenizer(hf.name_or_path, trust_remote_code=hf.trust_remote_code)
        if hf.chat_template:
            tokenizer.chat_template = hf.chat_template
        model = runtime.load_causal_lm(hf.name_or_path, hf.dtype, hf.device, trust_remote_code=hf.trust_remote_code)
        stops = (runtime.token_ids(tokenizer, hf.stop_tokens, "assistant.hf.stop_tokens") if hf.stop_tokens
                 else runtime.stop_token_ids(tokenizer, model))
        pad = runtime.generation_pad_id(tokenizer, stops, hf.pad_token)
        sampling = SamplingSettings(**cfg.sampling)
        return cls(model, tokenizer, system_prompt, sampling, hf.batch_size, stops, pad)

    def reply(self, conversations: Sequence[Sequence[dict]]) -> list[AssistantReply]:
        prompts = [self.tokenizer.apply_chat_template(with_system(self.system_prompt, turns), tokenize=True,
                                                      add_generation_prompt=True, return_dict=False)
                   for turns in conversations]

        def generate(indices):
            outputs = runtime.generate_batch(self.model, self.pad_token_id, [prompts[i] for i in indices],
                                             self.stop_token_ids, self.sampling.generate_kwargs())
            return [AssistantReply(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
                    for ids, _ in outputs]
        return runtime.in_length_batches(prompts, self.batch_size, generate)


class OpenAIAssistant:
    def __init__(self, client_cfg, system_prompt: str | None, sampling: SamplingSettings):
        self.client_cfg, self.system_prompt = client_cfg, system_prompt
        self.params = {"max_tokens": sampling.max_new_tokens,
                       "temperature": sampling.temperature if sampling.do_sample else 0.0}
        if sampling.do_sample:
            self.params["top_p"] = sampling.top_p

    def reply(self, conversations: Sequence[Sequence[dict]]) -> list[AssistantReply]:
        return asyncio.run(self._reply(conversations))

    async def _reply(self, conversations) -> list[AssistantReply]:
        async with LLMClient(self.client_cfg) as client:
            results = await client.complete_all([with_system(self.system_prompt, turns) for turns in conversations],
                                                **self.params)
        return [AssistantReply(None, str(r), r.reason) if isinstance(r, RequestFailed) else AssistantReply(r.text.strip())
                for r in results]


class ScriptedAssistant:
    def __init__(self, replies: Sequence[str]):
        if not replies:
            raise ValueError("assistant.scripted.replies is empty")
        self.replies = list(replies)

    def reply(self, conversations: Sequence[Sequence[dict]]) -> list[AssistantReply]:
        return [AssistantReply(self.replies[min(sum(t["role"] == ASSISTANT for t in turns), len(self.replies) - 1)])
                for turns in conversations]


def make_assistant(cfg):
    """The assistant that `cfg` (an AssistantConfig: kind, system_prompt, sampling, hf, openai,
    scripted) describes."""
    if cfg.kind == "hf":
        return HFAssistant.from_config(cfg, cfg.system_prompt)
    if cfg.kind == "openai":
        return OpenAIAssistant(cfg.openai, cfg.system_prompt, SamplingSettings(**cfg.sampling))
    if cfg.kind == "scripted":
        return ScriptedAssistant(cfg.scripted.replies)
    raise ValueError(f"assistant.kind={cfg.kind!r}: expected hf, openai or scripted")


def with_system_prompt(assistant, system_prompt: str | None):
    """The same assistant under another system prompt, its model shared (not loaded again): the
    extrinsic evaluation's per-task-kind prompts. A scripted assistant has none: itself."""
    if isinstance(assistant, ScriptedAssistant):
        return assistant
    clone = copy.copy(assistant)
    clone.system_prompt = system_prompt
    return clone


def describe(cfg) -> dict:
    """Where the assistant's replies come from, for reports (an endpoint's key variable name, never the key)."""
    if cfg.kind == "hf":
        return {"kind": "hf", "model": cfg.hf.name_or_path}
    if cfg.kind == "openai":
        return {"kind": "openai", "base_url": cfg.openai.base_url, "model": cfg.openai.model,
                "api_key_env": cfg.openai.api_key_env}
    return {"kind": cfg.kind}
