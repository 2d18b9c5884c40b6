"""A user LM served over an OpenAI-compatible completions API (vLLM, SGLang, or any /v1/completions).

    python -m evaluate.simulate ... user_model.backend=openai user_model.name_or_path=microsoft/UserLM-8b \\
        user_model.openai.base_url=http://localhost:8000/v1 user_model.openai.model=microsoft/UserLM-8b

Our chat format renders every prompt locally, with the tokenizer of `user_model.name_or_path` (no
BOS; it ends with the user header), and the prompt goes to /v1/completions as token ids
(`prompt_format: token_ids`, which vLLM and SGLang take as they are) or as text (`text`, with
`add_special_tokens: false` so that vLLM adds no BOS). Requests run concurrently, up to the client's
`concurrency`, through core.llm_client (retries, Retry-After, limits, a dead endpoint stops the run).

The four guardrails over the API, with the config and the counted interventions of the local backend:
    end_conversation  exact: <|endconversation|>'s id (from the tokenizer) gets logit_bias -100 while
                      the conversation may not end. The server decodes with special tokens skipped;
                      <|endconversation|> is not special, so a produced one stays in the text and
                      ends the conversation. Whether the ban changed a draw is not visible over the
                      API: its interventions are not counted (the local backend counts them).
    first_word        rejection sampling: a candidate opening with a banned word is rejected and the
                      next judged (the local backend masks the word's tokens while sampling).
    length, repetition  rejection sampling, as in the local backend.
Each request draws `candidates` samples (`n`); they are judged in order, and a turn whose candidates
all fail is drawn again, until `guardrails.max_retries` samples were rejected (then the last is kept
and marked failed, as locally). Generation stops at the chat format's turn ends, as locally
(<|eot_id|> and <|end_of_text|>, or <|im_end|> and <|endoftext|> for chatml: `stop`, and the
server's EOS).

Server faults (429 with Retry-After, 5xx, timeouts, malformed bodies) are retried by the client; a
request that fails for good (a 400 for an out-of-vocabulary logit_bias, retries exhausted) ends that
conversation as `user_error` with its reason; the others go on.

Each request's seed is derived from `seed`, the prompt and how often this process drew that prompt
(so two conversations with the same prompt, such as runs of one task, draw differently), and a
server that honours `seed` gives the same conversations on an uninterrupted rerun; a resumed run
draws what is left with other seeds, as the local backend draws it in other batches.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from typing import Sequence

from omegaconf import OmegaConf

from core.llm_client import LLMClient, RequestFailed, bounded_map
from data_prep.chat_format import END_CONVERSATION, format_of
from evaluate.guardrails import RowRecord
from evaluate.simulate_config import ServedUserConfig
from evaluate.simulator import Sample


class ServedTurnSampler:
    """evaluate.simulator's TurnSampler over /v1/completions."""
    masks_first_word = False

    def __init__(self, served_cfg, tokenizer, sampling, seed: int = 0):
        # typed even from a saved config.yaml read without the schema (evaluate.intrinsic reads the simulation's)
        self.cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ServedUserConfig), served_cfg))
        self.tokenizer, self.sampling, self.seed = tokenizer, sampling, seed
        self.end_token_id = tokenizer.get_vocab().get(END_CONVERSATION)
        self.stop = list(format_of(tokenizer).stop_tokens)   # make_protocol prepared the tokenizer
        self.drawn = Counter()   # prompt digest -> requests made for it (a fresh seed each time)

    def request_params(self, prompt: Sequence[int], forbid_end: bool) -> dict:
        digest = hashlib.blake2b(repr((self.seed, list(prompt))).encode(), digest_size=8).hexdigest()
        self.drawn[digest] += 1
        seed = int(hashlib.blake2b(f"{digest}:{self.drawn[digest]}".encode(), digest_size=4).hexdigest(), 16)
        greedy = not self.sampling.do_sample   # then n candidates would be one candidate n times
        params = {"n": 1 if greedy else self.cfg.candidates, "max_tokens": self.sampling.max_new_tokens,
                  "temperature": 0.0 if greedy else self.sampling.temperature,
                  "top_p": 1.0 if greedy else self.sampling.top_p, "seed": seed, "stop": self.stop}
        if forbid_end and self.end_token_id is not None:
            params["logit_bias"] = {str(self.end_token_id): -100}
        if self.cfg.prompt_format == "text":
            params["add_special_tokens"] = False
        return params

    def prompt_of(self, ids: Sequence[int]):
        return self.tokenizer.decode(ids) if self.cfg.prompt_format == "text" else list(ids)

    def sample(self, prompts, forbid_end, ban_first_word) -> list[list[Sample]]:
        requests = [(self.prompt_of(p), self.request_params(p, f)) for p, f in zip(prompts, forbid_end)]

        async def draw():
            results: list = [None] * len(requests)
            async with LLMClient(self.cfg) as client:
                async for index, result in bounded_map(lambda r: client.complete_prompt(r[0], **r[1]), requests,
                                                       self.cfg.concurrency):
                    results[index] = result
            return results
        return [self.samples(result) for result in asyncio.run(draw())]

    def samples(self, result) -> list[Sample]:
        if isinstance(result, RequestFailed):
            return [Sample("", False, False, 0, RowRecord(), error=str(result), error_reason=result.reason)]
        return [Sample(c.text.strip(), END_CONVERSATION in c.text, c.finish_reason == "length",
                       len(self.tokenizer(c.text, add_special_tokens=False)["input_ids"]), RowRecord())
                for c in result]
