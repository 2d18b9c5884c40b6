"""A real OpenAI-compatible /v1/completions server in front of a local transformers model (aiohttp),
for the tests and benchmarks of served user LMs (evaluate.served) where vLLM is not at hand.

    with CompletionsServer("outputs/tiny/train/model") as server:
        server.base_url                     # http://127.0.0.1:<port>/v1
        server.stats.requests, server.stats.prompts, server.stats.max_batch_rows
    python -m scripts.completions_server --model outputs/tiny/train/model   # prints the base URL

It honours `prompt` (token ids, or text tokenized with `add_special_tokens`, default true as in
vLLM), `n`, `max_tokens`, `temperature` (0: greedy), `top_p`, `seed` (each choice draws from its own
generator seeded with seed + index, so a choice does not depend on what else is in the batch),
`stop` (strings: the text is cut before the first) and `logit_bias` (an id outside the vocabulary is
a 400, as vLLM and OpenAI answer). Generation stops at the model's EOS ids (generation_config and
tokenizer); text is decoded with special tokens skipped, as vLLM does. Requests that arrive while
the model is busy are batched: the next step runs all of them as one left-padded batch.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass, field
from typing import Optional

import torch
from aiohttp import web

from core import runtime
from scripts.local_server import LocalServer, serve_printing_url


@dataclass
class Row:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    bias: dict[int, float]
    generator: torch.Generator
    stop: list[str]
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    text: str = ""


@dataclass
class ServerStats:
    requests: int = 0
    prompts: list = field(default_factory=list)   # every prompt received, as sent
    max_batch_rows: int = 0                       # most rows generated together


class CompletionsServer(LocalServer):
    def __init__(self, model_dir: str, port: int = 0, max_batch_rows: int = 64):
        self.tokenizer = runtime.load_tokenizer(model_dir)
        self.model = runtime.load_causal_lm(model_dir, "float32", "cpu")
        self.eos = set(runtime.stop_token_ids(self.tokenizer, self.model))
        self.pad = runtime.generation_pad_id(self.tokenizer, sorted(self.eos), self.tokenizer.pad_token)
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.port, self.max_batch_rows = port, max_batch_rows
        self.stats = ServerStats()
        self.queue: list[tuple[list[Row], asyncio.Future]] = []
        self.wake = asyncio.Event()

    # ---- the protocol ------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.stats.requests += 1
        self.stats.prompts.append(body.get("prompt"))
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = self.tokenizer(prompt, add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            return web.json_response({"error": {"message": "prompt: a string or a list of token ids"}}, status=400)
        bias = {int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()}
        outside = [i for i in list(bias) + prompt if not 0 <= i < self.vocab_size]
        if outside:
            return web.json_response({"error": {"message": f"token id {outside[0]} is out of vocabulary"}}, status=400)
        stop = body.get("stop") or []
        seed = body.get("seed")
        rows = [Row(list(prompt), int(body.get("max_tokens", 16)), float(body.get("temperature", 1.0)),
                    float(body.get("top_p", 1.0)), bias,
                    torch.Generator().manual_seed((seed if seed is not None else torch.seed()) + index),
                    [stop] if isinstance(stop, str) else list(stop))
                for index in range(int(body.get("n", 1)))]
        done = asyncio.get_running_loop().create_future()
        self.queue.append((rows, done))
        self.wake.set()
        await done
        return web.json_response({
            "id": f"cmpl-{self.stats.requests}", "object": "text_completion", "model": body.get("model"),
            "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason} for i, r in enumerate(rows)],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": sum(len(r.tokens) for r in rows),
                      "total_tokens": len(prompt) * len(rows) + sum(len(r.tokens) for r in rows)}})

    async def background(self) -> None:
        """Run what is queued as one batch, in a thread (the event loop keeps accepting requests)."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                taken, rows = [], []
                while self.queue and (not rows or len(rows) + len(self.queue[0][0]) <= self.max_batch_rows):
                    item = self.queue.pop(0)
                    taken.append(item)
                    rows += item[0]
                self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(rows))
                await asyncio.to_thread(self.generate, rows)
                for _, done in taken:
                    done.set_result(None)

    # ---- generation: one left-padded batch, each row with its own sampling and stop ----------------
    @torch.no_grad()
    def generate(self, rows: list[Row]) -> None:
        width = max(len(r.prompt) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt)) + r.prompt for r in rows])
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows])
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        running = [r.max_tokens > 0 for r in rows]
        for r, alive in zip(rows, running):
            r.finish_reason = None if alive else "length"
        while any(running):
            logits = out.logits[:, -1].float()
            next_ids = []
            for i, r in enumerate(rows):
                if not running[i]:
                    next_ids.append(self.pad)
                    continue
                token = self.draw(logits[i], r)
                r.tokens.append(token)
                stopped = token in self.eos or self.stop_in_tail(r)
                if stopped or len(r.tokens) >= r.max_tokens:
                    r.finish_reason, running[i] = ("stop" if stopped else "length"), False
                    if token in self.eos:
                        r.tokens.pop()
                    r.text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
                    cut = min((r.text.find(s) for s in r.stop if s and s in r.text), default=-1)
                    r.text = r.text[:cut] if cut >= 0 else r.text
                next_ids.append(token)
            if not any(running):
                break
            mask = torch.cat([mask, torch.tensor([[1 if alive else 0] for alive in running])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=torch.tensor(next_ids)[:, None], attention_mask=mask, position_ids=positions,
                             cache=out.cache, use_cache=True)

    def stop_in_tail(self, row: Row) -> bool:
        """Whether a stop string ends in the newest tokens: a window of them as long as the longest
        stop in characters (every token decodes to at least one byte), not the whole text again."""
        longest = max((len(s.encode("utf-8")) for s in row.stop if s), default=0)
        if not longest:
            return False
        tail = self.tokenizer.decode(row.tokens[-(longest + 1):], skip_special_tokens=True)
        return any(s and s in tail for s in row.stop)

    @staticmethod
    def draw(logits: torch.Tensor, row: Row) -> int:
        for token, bias in row.bias.items():
            logits[token] += bias
        if row.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / row.temperature, dim=-1)
        if row.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            keep = ordered.cumsum(0) - ordered < row.top_p   # the nucleus: the smallest head reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/completions", self.completions)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve_printing_url(CompletionsServer(args.model, args.port))
