"""The OpenAI-compatible client against a real HTTP server (scripts/openai_server.py): overlap,
retries of every fault kind, Retry-After, rate limits, configuration errors, the key's handling."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from core.llm_client import LLMClient, LLMConfigError, RequestFailed
from tests.conftest import compose_config
from scripts.openai_server import OpenAIServer

RETRIED_FAULTS = ["429", "500", "503", "malformed", "disconnect", "slow"]


def client_config(base_url: str, *overrides: str):
    """The endpoint block of the data_prep config (values from YAML), with quick retries."""
    return compose_config("data_prep", [
        "experiment=tiny", f"intents.openai.base_url={base_url}", "intents.openai.model=test-model",
        "intents.openai.backoff_base_s=0.01", "intents.openai.backoff_max_s=0.05", "intents.openai.timeout_s=1",
        "intents.openai.max_retries=3", *overrides]).intents.openai


def run(client_cfg, requests, **params):
    async def main():
        async with LLMClient(client_cfg) as client:
            return await client.complete_all(requests, **params)
    return asyncio.run(main())


def messages(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"request {i}"}] for i in range(n)]


def test_requests_overlap_up_to_the_concurrency():
    with OpenAIServer(latency_s=0.2) as server:
        results = run(client_config(server.base_url, "intents.openai.concurrency=8"), messages(24), max_tokens=5)
    assert all(r.text.startswith("You are a user") for r in results)
    assert server.stats.max_in_flight == 8 and server.stats.replies == 24


@pytest.mark.parametrize("fault", RETRIED_FAULTS)
def test_each_fault_is_retried_then_succeeds(fault):
    with OpenAIServer(slow_s=3.0) as server:
        server.faults.extend([fault, fault])
        [result] = run(client_config(server.base_url), messages(1))
    assert result.attempts == 3 and result.text.startswith("You are a user")
    assert server.stats.faults[fault] == 2 and server.stats.replies == 1


@pytest.mark.parametrize("fault,reason", [("429", "http_429"), ("500", "http_500"), ("malformed", "malformed"),
                                          ("disconnect", "connection_error"), ("slow", "timeout")])
def test_a_fault_that_persists_is_reported_after_the_retries(fault, reason):
    with OpenAIServer(slow_s=3.0) as server:
        server.rules.append((lambda body: "request 1" in str(body), fault))
        ok, failed = run(client_config(server.base_url, "intents.openai.max_retries=2"), messages(2))
    assert ok.text and isinstance(failed, RequestFailed)
    assert (failed.reason, failed.attempts) == (reason, 3) and server.stats.faults[fault] == 3


def test_a_client_error_is_not_repeated():
    with OpenAIServer() as server:
        server.faults.append("400")
        [failed] = run(client_config(server.base_url), messages(1))
    assert (failed.reason, failed.attempts, server.stats.requests) == ("http_400", 1, 1)


def test_retry_after_pauses_the_client():
    with OpenAIServer(retry_after_s=0.5) as server:
        server.faults.append("429")
        started = time.monotonic()
        [result] = run(client_config(server.base_url), messages(1))
    assert result.attempts == 2 and time.monotonic() - started >= 0.5


def test_requests_per_minute_limit():
    # 120/min: a bucket of 2, refilled at 2/s: 6 requests need at least 2 s.
    with OpenAIServer() as server:
        started = time.monotonic()
        results = run(client_config(server.base_url, "intents.openai.requests_per_minute=120"), messages(6))
    assert len(results) == 6 and time.monotonic() - started >= 1.9


def test_tokens_per_minute_limit():
    # Each request is charged its estimate (payload/4 + max_tokens 100) before it is sent: with 6000
    # tokens/min (a bucket of 100, refilled at 100/s) three requests cannot all go in the first second.
    with OpenAIServer() as server:
        started = time.monotonic()
        run(client_config(server.base_url, "intents.openai.tokens_per_minute=6000"), messages(3), max_tokens=100)
    assert time.monotonic() - started >= 1.0


def test_unreachable_server_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound, not listening: connections are refused
        [failed] = run(client_config(f"http://127.0.0.1:{port}/v1", "intents.openai.max_retries=1"), messages(1))
    assert (failed.reason, failed.attempts) == ("connection_error", 2)


def test_api_key_comes_from_the_named_variable_and_a_wrong_one_stops(monkeypatch):
    secret = "sk-test-0123456789"
    monkeypatch.setenv("TEST_LLM_KEY", secret)
    with OpenAIServer(api_key=secret) as server:
        cfg = client_config(server.base_url, "intents.openai.api_key_env=TEST_LLM_KEY")
        [ok] = run(cfg, messages(1))
        assert ok.text
        monkeypatch.setenv("TEST_LLM_KEY", "sk-wrong")
        with pytest.raises(LLMConfigError) as error:
            run(cfg, messages(3))
    assert "sk-wrong" not in str(error.value) and "TEST_LLM_KEY" in str(error.value)
    monkeypatch.delenv("TEST_LLM_KEY")
    with pytest.raises(LLMConfigError, match="TEST_LLM_KEY"):
        run(cfg, messages(1))


def test_completions_endpoint_returns_every_choice_and_is_retried_like_chat():
    prompts = []

    def reply(body):
        prompts.append(body["prompt"])
        return f"continuation of {len(body['prompt'])} ids"

    async def main(client_cfg):
        async with LLMClient(client_cfg) as client:
            return await client.complete_prompt([128006, 882, 128007], n=3, max_tokens=8, logit_bias={"5": -100})
    with OpenAIServer(reply=reply) as server:
        server.faults.extend(["503", "malformed"])   # the first two attempts fail: retried
        choices = asyncio.run(main(client_config(server.base_url)))
    assert [c.text for c in choices] == ["continuation of 3 ids"] * 3
    assert [c.attempts for c in choices] == [3] * 3 and prompts == [[128006, 882, 128007]]   # ids as sent
    with OpenAIServer(reply=reply) as server:
        server.faults.append("400")                    # e.g. a logit_bias id out of the vocabulary
        with pytest.raises(RequestFailed, match="http_400 after 1 attempt"):
            asyncio.run(main(client_config(server.base_url)))
