"""Backends that turn intent prompts into checked intents: `openai` (any OpenAI-compatible
endpoint, async) and `hf` (a local transformers model, batched).

A backend has `model` (its identity in the cache key) and `run(jobs, on_outcome)`, which calls
`on_outcome(Outcome)` once per job as soon as that job is finished, so the caller can store it at
once. A reply that fails the output checks is asked for again (sampled at retry_temperature) up to
`output_retries` times, then reported with the reason of its last rejection.

Another engine that generates many prompts in one call (vLLM's offline `LLM.chat`, for example)
subclasses BatchedBackend and implements `generate_texts`; an OpenAI-compatible server (`vllm
serve`, TGI) needs no code: use the openai backend.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Optional

from omegaconf import OmegaConf

from data_prep.intents.checks import check_reply
from core.llm_client import LLMClient, RequestFailed, Usage, bounded_map


@dataclass
class Job:
    conversation_hash: str
    messages: list[dict]


@dataclass
class Outcome:
    conversation_hash: str
    intent: Optional[str]       # None: failed, see reason
    reason: Optional[str]       # why it failed (an output check or a request failure)
    detail: str                 # the rejected reply or the error, shortened
    replies: int                # replies asked for (1 + output retries used)
    usage: Usage


def plain(node):
    """A config node as its dataclass: nodes are slow to read once per conversation."""
    return OmegaConf.to_object(node)


class OpenAIBackend:
    def __init__(self, intents_cfg):
        self.client_cfg, self.generation, self.checks = (plain(intents_cfg.openai), plain(intents_cfg.generation),
                                                         plain(intents_cfg.checks))
        self.model = self.client_cfg.model
        self.prices = (self.client_cfg.price_input_per_million, self.client_cfg.price_output_per_million)

    def describe(self) -> dict:
        """For the report: where requests went (the key's variable name, never the key)."""
        return {"base_url": self.client_cfg.base_url, "api_key_env": self.client_cfg.api_key_env,
                "concurrency": self.client_cfg.concurrency}

    def run(self, jobs: Iterable[Job], on_outcome: Callable[[Outcome], None]) -> None:
        asyncio.run(self._run(jobs, on_outcome))

    async def _run(self, jobs, on_outcome) -> None:
        async with LLMClient(self.client_cfg) as client:
            async for _, outcome in bounded_map(partial(self._one, client), jobs, self.client_cfg.concurrency):
                on_outcome(outcome)

    async def _one(self, client: LLMClient, job: Job) -> Outcome:
        generation, usage = self.generation, Usage()
        reason = detail = None
        for reply in range(1, generation.output_retries + 2):
            temperature = generation.temperature if reply == 1 else generation.retry_temperature
            try:
                completion = await client.complete(job.messages, max_tokens=generation.max_tokens,
                                                   temperature=temperature)
            except RequestFailed as e:
                return Outcome(job.conversation_hash, None, e.reason, e.detail[:200], reply, usage)
            usage.prompt_tokens += completion.usage.prompt_tokens
            usage.completion_tokens += completion.usage.completion_tokens
            intent, reason = check_reply(completion.text, completion.finish_reason, self.checks)
            if intent:
                return Outcome(job.conversation_hash, intent, None, "", reply, usage)
            detail = completion.text[:200]
        return Outcome(job.conversation_hash, None, reason, detail, generation.output_retries + 1, usage)


class BatchedBackend:
    """Generates `batch_size` prompts per call; each batch is finished (retries included) before the
    next starts, so outcomes reach the store batch by batch."""

    def __init__(self, intents_cfg, batch_size: int):
        self.generation, self.checks = plain(intents_cfg.generation), plain(intents_cfg.checks)
        self.batch_size = batch_size
        self.prices = (0.0, 0.0)

    def describe(self) -> dict:
        return {"batch_size": self.batch_size}

    def generate_texts(self, messages: list[list[dict]], temperature: float, seed: int
                       ) -> list[tuple[str, Usage, Optional[str]]]:
        """(text, usage, finish_reason "stop" | "length") per prompt; temperature 0 means greedy."""
        raise NotImplementedError

    def run(self, jobs: Iterable[Job], on_outcome: Callable[[Outcome], None]) -> None:
        generation, jobs = self.generation, iter(jobs)
        while batch := list(itertools.islice(jobs, self.batch_size)):
            usage = {job.conversation_hash: Usage() for job in batch}
            pending, rejected = batch, {}
            for reply in range(1, generation.output_retries + 2):
                temperature = generation.temperature if reply == 1 else generation.retry_temperature
                replies = self.generate_texts([job.messages for job in pending], temperature, generation.seed + reply)
                still_pending = []
                for job, (text, reply_usage, finish_reason) in zip(pending, replies):
                    total = usage[job.conversation_hash]
                    total.prompt_tokens += reply_usage.prompt_tokens
                    total.completion_tokens += reply_usage.completion_tokens
                    intent, reason = check_reply(text, finish_reason, self.checks)
                    if intent:
                        on_outcome(Outcome(job.conversation_hash, intent, None, "", reply, total))
                    else:
                        rejected[job.conversation_hash] = (reason, text[:200])
                        still_pending.append(job)
                pending = still_pending
                if not pending:
                    break
            for job in pending:
                reason, detail = rejected[job.conversation_hash]
                on_outcome(Outcome(job.conversation_hash, None, reason, detail, generation.output_retries + 1,
                                   usage[job.conversation_hash]))


class HFBackend(BatchedBackend):
    """A local transformers causal LM through core.runtime (its dtype and device vocabulary, stop
    tokens, a pad that is never one, left-padded batches): greedy first, sampled on retries. The
    prompt goes through the tokenizer's chat template when it has one, else a plain-text rendering."""

    def __init__(self, intents_cfg):
        super().__init__(intents_cfg, intents_cfg.hf.batch_size)
        self.hf = plain(intents_cfg.hf)
        self.model = self.hf.model
        self._model = self._tokenizer = self._stops = self._pad = None

    def describe(self) -> dict:
        return {"batch_size": self.batch_size, "device": self.hf.device, "dtype": self.hf.dtype}

    def load(self) -> None:
        from core import runtime
        hf = self.hf
        self._tokenizer = runtime.load_tokenizer(hf.model, trust_remote_code=hf.trust_remote_code)
        self._model = runtime.load_causal_lm(hf.model, hf.dtype, hf.device, trust_remote_code=hf.trust_remote_code)
        self._stops = runtime.stop_token_ids(self._tokenizer, self._model)
        self._pad = runtime.generation_pad_id(self._tokenizer, self._stops)

    def format_prompt(self, messages: list[dict]) -> str:
        if self._tokenizer.chat_template:
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(turns) + "\n\nAssistant:"

    def generate_texts(self, messages, temperature, seed):
        import torch
        from core import runtime
        if self._model is None:
            self.load()
        tokenizer = self._tokenizer
        # A chat template writes its own BOS; plain text gets the tokenizer's special tokens.
        prompts = [tokenizer(self.format_prompt(m), add_special_tokens=not tokenizer.chat_template)["input_ids"]
                   for m in messages]
        torch.manual_seed(seed)
        outputs = runtime.generate_batch(self._model, self._pad, prompts, self._stops,
                                         {"max_new_tokens": self.generation.max_tokens, "do_sample": temperature > 0,
                                          "temperature": temperature or None, "top_p": None, "top_k": None})
        return [(tokenizer.decode(new_tokens, skip_special_tokens=True),
                 Usage(len(prompt), len(new_tokens) + stopped), "stop" if stopped else "length")
                for prompt, (new_tokens, stopped) in zip(prompts, outputs)]


BACKENDS = {"openai": OpenAIBackend, "hf": HFBackend}
