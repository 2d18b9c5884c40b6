"""A real OpenAI-compatible chat-completions server on 127.0.0.1 (aiohttp), for tests and benchmarks.

It speaks the protocol over real HTTP, answers with a reply function of the request, counts what it
sees, and can be told to misbehave:

    with OpenAIServer(reply=lambda body: "You are a user ... to x.", latency_s=0.05) as server:
        client_cfg.base_url = server.base_url           # http://127.0.0.1:<port>/v1
        server.faults.extend(["429", "500"])          # the next two requests fail, in order
        server.rules.append((lambda body: "poison" in str(body), "malformed"))   # always, for these
        server.hang_after = 10                        # after 10 replies, hold new requests (None: stop)
        ...
        server.stats.replies, server.stats.max_in_flight, server.stats.answered (prompt -> replies)

Faults: "429" (with Retry-After: retry_after_s), "500", "503", "400", "401", "slow" (sleeps slow_s
before answering), "malformed" (200 with a body that is not a chat completion), "disconnect"
(closes the connection without a response), "bad_intent" (200 whose text is two paragraphs), "huge"
(a 200 whose text is `huge_bytes` long, streamed in chunks without a Content-Length; what was sent
before the client hung up is counted in stats.huge_bytes_sent), "echo_key" (a 200 whose intent
text repeats the request's Authorization header, as a careless proxy might).
`api_key`: when set, requests without "Authorization: Bearer <api_key>" get 401.

Run alone (for benchmarks, in its own process so it does not share the client's GIL):
    python -m scripts.openai_server --latency 0.2      # prints the base URL, serves until killed;
                                                     # GET /stats returns the counters as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from aiohttp import web

from data_prep.chat_format import INTENT_PREFIX
from scripts.local_server import LocalServer, serve_printing_url


def prompt_digest(body: dict) -> str:
    """Identifies a prompt (its messages) across requests."""
    return hashlib.sha1(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()[:16]


def intent_reply(body: dict) -> str:
    """A well-formed intent, distinct per prompt."""
    return f"{INTENT_PREFIX} get help with request {prompt_digest(body)}."


@dataclass
class ServerStats:
    requests: int = 0                 # requests received (any outcome)
    replies: int = 0                  # 200 chat completions sent
    faults: Counter = field(default_factory=Counter)        # fault -> times served
    answered: Counter = field(default_factory=Counter)      # prompt digest -> completions sent
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    huge_bytes_sent: int = 0          # bytes of "huge" replies written before the client went away


class OpenAIServer(LocalServer):
    def __init__(self, reply: Callable[[dict], str] = intent_reply, latency_s: float = 0.0, slow_s: float = 5.0,
                 retry_after_s: float = 0.05, api_key: Optional[str] = None, port: int = 0,
                 huge_bytes: int = 256 << 20):
        self.reply, self.latency_s, self.slow_s, self.retry_after_s = reply, latency_s, slow_s, retry_after_s
        self.api_key, self.port, self.huge_bytes = api_key, port, huge_bytes
        self.faults: deque[str] = deque()
        self.rules: list[tuple[Callable[[dict], bool], str]] = []
        self.hang_after: Optional[int] = None
        self.stats = ServerStats()

    # ---- the protocol ------------------------------------------------------------------------
    def _fault(self, body: dict) -> Optional[str]:
        if self.faults:
            return self.faults.popleft()
        return next((fault for matches, fault in self.rules if matches(body)), None)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """/v1/completions: `n` choices of reply(body) (the reply function sees "prompt", not "messages")."""
        return await self._counted(request, "text")

    async def _counted(self, request: web.Request, kind: str) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await self._answer(request, kind)
        finally:
            stats.in_flight -= 1

    async def _answer(self, request: web.Request, kind: str) -> web.StreamResponse:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            # like some providers, echo what was sent: the client must not pass it on
            return web.json_response({"error": {"message": f"Incorrect API key: {request.headers.get('Authorization')}"}},
                                     status=401)
        raw = await request.read()
        body = json.loads(raw)
        fault = self._fault(body)
        if fault:
            self.stats.faults[fault] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.hang_after is not None and self.stats.replies >= self.hang_after:
            await asyncio.Event().wait()  # held until the server stops; never counted as answered
        if fault == "429":
            return web.json_response({"error": {"message": "rate limited"}}, status=429,
                                     headers={"Retry-After": str(self.retry_after_s)})
        if fault in ("500", "503", "400", "401"):
            return web.json_response({"error": {"message": f"injected {fault}"}}, status=int(fault))
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        if fault == "malformed":
            return web.Response(text='{"choices": [{"message": ', content_type="application/json")
        if fault == "disconnect":
            request.transport.close()
            return web.Response()
        if fault == "huge":
            return await self._huge(request)
        if fault == "echo_key":
            text = f"{INTENT_PREFIX} get help; you sent {request.headers.get('Authorization')}."
        elif fault == "bad_intent":
            text = "First paragraph.\n\nSecond paragraph."
        else:
            text = self.reply(body)
        usage = {"prompt_tokens": len(raw) // 4, "completion_tokens": len(text) // 4 + 1}
        self.stats.replies += 1
        self.stats.answered[prompt_digest(body)] += 1
        self.stats.prompt_tokens += usage["prompt_tokens"]
        self.stats.completion_tokens += usage["completion_tokens"]
        if kind == "text":
            return web.json_response({
                "id": f"cmpl-{self.stats.replies}", "object": "text_completion", "model": body.get("model"),
                "choices": [{"index": i, "text": text, "finish_reason": "stop"} for i in range(body.get("n", 1))],
                "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}})
        return web.json_response({
            "id": f"chatcmpl-{self.stats.replies}", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        })

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        """A well-formed completion of huge_bytes characters, written in chunks as the client reads."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"x" * (1 << 16)
        try:
            await response.write(b'{"choices": [{"index": 0, "finish_reason": "stop", '
                                 b'"message": {"role": "assistant", "content": "')
            for _ in range(self.huge_bytes // len(chunk)):
                await response.write(chunk)   # waits while the client's socket is full
                self.stats.huge_bytes_sent += len(chunk)
            await response.write(b'"}}]}')
            await response.write_eof()
        except ConnectionError:               # the client hung up mid-body
            pass
        return response

    async def stats_json(self, request: web.Request) -> web.Response:
        return web.json_response({k: v for k, v in asdict(self.stats).items() if k != "answered"})

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/stats", self.stats_json)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every reply")
    args = parser.parse_args()
    serve_printing_url(OpenAIServer(latency_s=args.latency, port=args.port))
