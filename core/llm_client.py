"""A client for any OpenAI-compatible endpoint (OpenAI, Azure's v1 API, vLLM, SGLang, TGI).

Shared by every stage that calls an LLM over HTTP (task intents, simulated assistants, judges,
served user LMs):

    async with LLMClient(client_cfg) as client:
        completion = await client.complete([{"role": "user", "content": "Hi"}], max_tokens=20)
        completion.text, completion.usage.prompt_tokens
        async for index, result in client.complete_many(list_of_message_lists, temperature=0.0):
            ...   # result is a Completion or a RequestFailed, in completion order
        choices = await client.complete_prompt([128006, 882, ...], n=4, max_tokens=64)   # /v1/completions

What it does for you:
- at most `concurrency` requests in flight (one aiohttp session, one connection per slot);
- retries with exponential backoff and full jitter on 429, 5xx, connection errors, timeouts and
  malformed replies; a Retry-After header is honoured and pauses *every* request of the client, so a
  rate-limited provider is not hammered by the other slots;
- optional requests-per-minute and tokens-per-minute limits (token buckets; a request is charged
  its estimated prompt tokens plus max_tokens, then corrected with the usage the server reports);
- 401/403/404 are configuration errors (wrong key, model or URL): they raise LLMConfigError at
  once instead of failing every request in turn;
- a dead endpoint stops the run: after `max_connection_failures` consecutive attempts that got no
  HTTP response at all (refused, reset, unreachable; over all requests in flight, any response in
  between resets the count) it raises EndpointUnreachable (an LLMConfigError) naming the URL,
  instead of retrying every request for its whole backoff budget and reporting them all failed;
- a reply body is read in chunks and abandoned past `max_response_bytes` (the connection is
  closed, so a hostile or broken server cannot make the client hold a 400 MB body): the request
  fails for good as `response_too_large`.

The API key is read from the environment variable *named* by `api_key_env`; the config holds only
that name, and the key is never logged, written or put in an exception message. A server that
echoes it (in an error body or inside a normal reply's text) does not get it stored: `redact`
replaces it in every text the client hands on. A key given by mistake as `api_key_env` is refused
without being echoed.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Sequence

import aiohttp
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
CONFIG_ERROR_STATUS = {401, 403, 404}
CHARS_PER_TOKEN = 4  # estimate of prompt tokens before the server reports usage (rate limiting only)
READ_CHUNK_BYTES = 1 << 16
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
VERDICT = re.compile(r"^\W*(YES|NO)\b", re.IGNORECASE)   # a judge's reply: YES or NO first
JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)   # the outermost braces of a reply
REDACTED = "<api key>"


@dataclass
class ClientConfig:
    """Structured-config schema of one endpoint, and the one place its defaults are written: every
    client block in conf/ (data_prep's intents.openai, simulate's assistant.openai, intrinsic's
    assistant.openai and judge.client) starts from these and lists only what it changes."""
    base_url: str = "http://localhost:8000/v1"  # the endpoint's /v1 root; this is `vllm serve <model>`'s
    model: str = MISSING
    api_key_env: Optional[str] = None           # NAME of the environment variable holding the key (e.g.
                                                # OPENAI_API_KEY); null: none
    concurrency: int = 32                       # requests in flight
    timeout_s: float = 120.0                    # per attempt
    max_retries: int = 6                        # retries after the first attempt
    backoff_base_s: float = 1.0                 # delay before retry k: uniform(0, min(max, base * 2**k))
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 300.0            # cap on a server's Retry-After
    max_connection_failures: int = 20           # consecutive attempts with no HTTP response: the endpoint
                                                # is down, stop (EndpointUnreachable)
    max_response_bytes: int = 4 * 1024 * 1024   # a longer reply body is abandoned unread: response_too_large
    requests_per_minute: Optional[float] = None   # null: no limit
    tokens_per_minute: Optional[float] = None     # null: no limit
    price_input_per_million: float = 0.0        # USD per million prompt tokens, for the cost estimate
    price_output_per_million: float = 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    usage: Usage
    attempts: int                   # HTTP attempts this reply took (1 = no retry)
    finish_reason: Optional[str] = None


@dataclass
class RequestFailed(Exception):
    """A request that failed for good: `reason` is a short label (http_429, timeout, malformed, ...)."""
    reason: str
    detail: str = ""
    attempts: int = 0

    def __str__(self) -> str:
        return f"{self.reason} after {self.attempts} attempt(s): {self.detail}"


@dataclass
class _Failure:
    """One failed attempt: why, and the least delay the server asked for before the next one."""
    reason: str
    detail: str
    delay: float = 0.0
    retryable: bool = True


class LLMConfigError(RuntimeError):
    """The endpoint refuses every request (bad key, model or URL): stop instead of failing them all."""


class EndpointUnreachable(LLMConfigError):
    """No HTTP response from the endpoint for `max_connection_failures` attempts in a row."""


class RateLimiter:
    """A token bucket refilled at `per_minute / 60` per second, holding at most one second's worth.

    `acquire(n)` takes n units; when the bucket runs dry the caller sleeps until the debt is repaid.
    Waiters queue on a lock, so they are served in order.
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.updated = time.monotonic()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self, n: float = 1.0) -> None:
        async with self.lock:
            self._refill()
            self.level -= n
            if self.level < 0:
                await asyncio.sleep(-self.level / self.rate)

    def refund(self, n: float) -> None:
        """Give back units charged in excess (negative n charges more)."""
        self._refill()
        self.level = min(self.capacity, self.level + n)


def looks_like_a_key(api_key_env: str) -> bool:
    """Whether an api_key_env value is more likely a key than a variable name: not a valid name
    (sk-..., with dashes or dots), or a long run of letters and digits that is not upper case
    (variable names are, by convention; OpenAI's and Azure's keys are not)."""
    return (not VARIABLE_NAME.fullmatch(api_key_env) or api_key_env.startswith("sk")
            or (len(api_key_env) >= 20 and any(c.isdigit() for c in api_key_env) and not api_key_env.isupper()))


def check_api_key_env(api_key_env: Optional[str]) -> None:
    """Refuse an api_key_env value that looks like a key itself, without repeating it (error
    messages end up in logs)."""
    named = bool(api_key_env) and VARIABLE_NAME.fullmatch(api_key_env) and os.environ.get(api_key_env)
    if api_key_env and not named and looks_like_a_key(api_key_env):
        raise LLMConfigError("api_key_env: that looks like a key, not a variable name. Put the key in an "
                             "environment variable and give its NAME (e.g. api_key_env=OPENAI_API_KEY); "
                             "and since the key was typed on a command line, consider replacing it")


def check_config_key_names(cfg) -> None:
    """Check every api_key_env in a stage's config before the config is written anywhere: a key
    typed in place of a variable name would otherwise be saved in config.yaml and the manifest."""
    def walk(node) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if name == "api_key_env" and isinstance(value, str):
                    check_api_key_env(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(OmegaConf.to_container(cfg, resolve=True))


def read_api_key(api_key_env: Optional[str]) -> Optional[str]:
    """The key held by the variable named `api_key_env` (None: no key)."""
    if not api_key_env:
        return None
    check_api_key_env(api_key_env)
    key = os.environ.get(api_key_env) if VARIABLE_NAME.fullmatch(api_key_env) else None
    if not key:
        raise LLMConfigError(f"environment variable {api_key_env} (named by api_key_env) is not set or empty")
    return key


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Parse a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_usage(reply: dict) -> Usage:
    usage = reply.get("usage") or {}
    return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


def parse_completion(body: bytes) -> tuple[list[tuple[str, Optional[str]]], Usage]:
    """([(text, finish_reason)], usage) of a chat-completions reply (its first choice); ValueError
    when it is malformed."""
    try:
        reply = json.loads(body)
        choice = reply["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat-completions reply ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(text, str):
        raise ValueError("message.content is not a string")
    return [(text, choice.get("finish_reason"))], parse_usage(reply)


def parse_text_completions(body: bytes, n: int) -> tuple[list[tuple[str, Optional[str]]], Usage]:
    """([(text, finish_reason)] in choice-index order, usage) of a /v1/completions reply with `n`
    choices; ValueError when it is malformed or holds another number of choices."""
    try:
        reply = json.loads(body)
        choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
        texts = [(choice["text"], choice.get("finish_reason")) for choice in choices]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a completions reply ({type(e).__name__}: {str(e)[:80]})") from None
    if len(texts) != n or not all(isinstance(text, str) for text, _ in texts):
        raise ValueError(f"a completions reply with {len(texts)} choices of text, {n} asked")
    return texts, parse_usage(reply)


class LLMClient:
    """One OpenAI-compatible endpoint; use as `async with LLMClient(cfg) as client:`."""

    def __init__(self, cfg: ClientConfig):
        # a plain dataclass: config nodes are slow to read on every request
        self.cfg = cfg = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.completions_url = cfg.base_url.rstrip("/") + "/completions"
        self._headers = {"Content-Type": "application/json"}
        self._key = read_api_key(cfg.api_key_env)
        if self._key:
            self._headers["Authorization"] = f"Bearer {self._key}"
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._requests = RateLimiter(cfg.requests_per_minute) if cfg.requests_per_minute else None
        self._tokens = RateLimiter(cfg.tokens_per_minute) if cfg.tokens_per_minute else None
        self._paused_until = 0.0  # set from Retry-After: every slot waits
        self._connection_failures = 0  # consecutive attempts without an HTTP response, over all requests
        self._session: Optional[aiohttp.ClientSession] = None

    async def __aenter__(self) -> "LLMClient":
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency)
        self._session = aiohttp.ClientSession(connector=connector, headers=self._headers,
                                              timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    def backoff(self, retry: int) -> float:
        return random.uniform(0.0, min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** retry))

    async def complete(self, messages: Sequence[dict], **params) -> Completion:
        """One chat completion; retried per the config. Raises RequestFailed or LLMConfigError."""
        return (await self._request(self.url, {"messages": list(messages), **params}, parse_completion))[0]

    async def complete_prompt(self, prompt: str | Sequence[int], **params) -> list[Completion]:
        """One /v1/completions request for a prompt (text, or token ids as vLLM and SGLang take
        them: nothing re-tokenized, no BOS added); one Completion per choice (`n`), each with the
        request's usage. Retried per the config. Raises RequestFailed or LLMConfigError."""
        n = params.get("n", 1)
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        return await self._request(self.completions_url, {"prompt": prompt, **params},
                                   lambda body: parse_text_completions(body, n))

    async def _request(self, url: str, body: dict, parse) -> list[Completion]:
        payload = json.dumps({"model": self.cfg.model, **body})
        estimate = len(payload) / CHARS_PER_TOKEN + (body.get("max_tokens") or 0) * body.get("n", 1)
        for attempt in range(1, self.cfg.max_retries + 2):
            outcome = await self._attempt(url, payload, estimate, parse)
            if not isinstance(outcome, _Failure):
                for completion in outcome:
                    completion.attempts = attempt
                return outcome
            if not outcome.retryable or attempt > self.cfg.max_retries:
                raise RequestFailed(outcome.reason, outcome.detail, attempt)
            await asyncio.sleep(max(outcome.delay, self.backoff(attempt - 1)))
        raise AssertionError("unreachable")

    async def _attempt(self, url: str, payload: str, estimate: float, parse) -> list[Completion] | _Failure:
        """One HTTP attempt."""
        if self._requests:
            await self._requests.acquire(1)
        if self._tokens:
            await self._tokens.acquire(estimate)
        async with self._slots:
            wait = self._paused_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                async with self._session.post(url, data=payload) as response:
                    self._connection_failures = 0
                    status, retry_after = response.status, response.headers.get("Retry-After")
                    body = await self._read_body(response)
            except asyncio.TimeoutError:
                return _Failure("timeout", f"no reply within {self.cfg.timeout_s} s")
            except aiohttp.ClientConnectionError as e:
                return self._connection_failure(url, e)
            except aiohttp.ClientError as e:
                return _Failure("connection_error", f"{type(e).__name__}: {str(e)[:120]}")
        if body is None:  # retrying would fetch the same oversized answer
            return _Failure("response_too_large", f"HTTP {status} reply over max_response_bytes="
                            f"{self.cfg.max_response_bytes}, abandoned", retryable=False)
        if status in CONFIG_ERROR_STATUS:
            raise LLMConfigError(f"{url} answered HTTP {status} ({self._shown(body)}): check base_url, "
                                 f"model and the key in ${self.cfg.api_key_env}")
        if status != 200:
            delay = min(retry_after_seconds(retry_after) or 0.0, self.cfg.max_retry_after_s)
            if delay:
                self._paused_until = max(self._paused_until, time.monotonic() + delay)
            # 400 and the like (context too long, content filter, a logit_bias id out of the
            # vocabulary): repeating the request cannot help
            return _Failure(f"http_{status}", self._shown(body), delay, retryable=status in RETRYABLE_STATUS)
        try:
            choices, usage = parse(body)
        except ValueError as e:
            return _Failure("malformed", self.redact(str(e)))
        if self._tokens and usage.prompt_tokens:
            self._tokens.refund(estimate - usage.prompt_tokens - usage.completion_tokens)
        return [Completion(self.redact(text), usage, 1, finish_reason) for text, finish_reason in choices]

    async def _read_body(self, response: aiohttp.ClientResponse) -> Optional[bytes]:
        """The body, read in chunks; None (and the connection closed) once it exceeds max_response_bytes."""
        limit = self.cfg.max_response_bytes
        if response.content_length is not None and response.content_length > limit:
            response.close()
            return None
        body = bytearray()
        async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                response.close()
                return None
        return bytes(body)

    def _connection_failure(self, url: str, error: aiohttp.ClientConnectionError) -> _Failure:
        """An attempt that got no HTTP response; the last of max_connection_failures in a row stops the run."""
        self._connection_failures += 1
        detail = self.redact(f"{type(error).__name__}: {str(error)[:120]}")
        if self._connection_failures >= self.cfg.max_connection_failures:
            raise EndpointUnreachable(
                f"{url} is unreachable: {self._connection_failures} connection attempts in a row got no "
                f"HTTP response (last: {detail}). Is the server running, and base_url right? Stopping instead "
                f"of failing every request; what finished is kept, run again once the endpoint answers "
                f"(max_connection_failures={self.cfg.max_connection_failures})")
        return _Failure("connection_error", detail)

    def redact(self, text: str) -> str:
        """`text` without the API key: applied to every text the client hands on (reply texts, error
        bodies and details), since some servers echo the key they were sent."""
        return text.replace(self._key, REDACTED) if self._key else text

    def _shown(self, body: bytes) -> str:
        """The start of an error body, fit for logs and reports."""
        return self.redact(body.decode("utf-8", "replace"))[:300]  # redacted before the cut: no half key

    async def complete_many(self, requests: Sequence[Sequence[dict]], **params
                            ) -> AsyncIterator[tuple[int, Completion | RequestFailed]]:
        """Complete every message list; yield (index, Completion or RequestFailed) as each finishes."""
        async for index, result in bounded_map(lambda messages: self.complete(messages, **params), requests,
                                               self.cfg.concurrency):
            yield index, result

    async def complete_all(self, requests: Sequence[Sequence[dict]], **params) -> list[Completion | RequestFailed]:
        """complete_many, collected in the order of `requests`."""
        results: list = [None] * len(requests)
        async for index, result in self.complete_many(requests, **params):
            results[index] = result
        return results


async def bounded_map(fn, items: Sequence, concurrency: int) -> AsyncIterator[tuple[int, object]]:
    """Run `await fn(item)` for every item, at most `concurrency` at once; yield (index, result or
    RequestFailed) in completion order. Other exceptions (LLMConfigError, bugs) cancel the rest and
    propagate. Only `concurrency` tasks exist at any time, so millions of items cost no memory."""
    iterator = iter(enumerate(items))
    running: dict[asyncio.Task, int] = {}

    def start_next() -> None:
        for index, item in iterator:
            running[asyncio.ensure_future(fn(item))] = index
            return

    for _ in range(concurrency):
        start_next()
    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = running.pop(task)
                try:
                    result = task.result()
                except RequestFailed as e:
                    result = e
                start_next()
                yield index, result
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


def parse_verdict(text: str) -> bool | None:
    """A YES/NO judge's reply: YES -> True, NO -> False, anything else (a malformed reply) -> None.
    Every judge asked through this client (evaluate.judges, evaluate.extrinsic.metrics) reads it so."""
    match = VERDICT.match(text)
    return None if match is None else match.group(1).upper() == "YES"


def json_object_in(text: str) -> dict | None:
    """The JSON object an LLM was asked to reply with, code fences or words around it ignored; None
    when the reply holds none (evaluate.extrinsic's judge and prompted user read replies so)."""
    found = JSON_OBJECT.search(text)
    try:
        value = json.loads(found.group(0)) if found else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
