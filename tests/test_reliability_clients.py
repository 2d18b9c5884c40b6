"""Issue 9, items 6, 12 and 15: bounded replies and prompts, a dead endpoint, keys that leak back.

Against the real local server (scripts/openai_server.py) and the tiny models; no mocks."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.llm_client import EndpointUnreachable, LLMConfigError, RequestFailed
from tests.conftest import REPO, compose_config, run_data_prep
from scripts.openai_server import INTENT_PREFIX, OpenAIServer
from tests.test_intents import generate, intents_overrides, store_rows
from tests.test_llm_client import client_config, messages, run

SECRET = "sk-echo-0123456789abcdef"


@pytest.fixture
def dead_url():
    """A base URL on 127.0.0.1 where nothing listens (bound, not listening: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# ---- item 6 (b): the client reads at most max_response_bytes -----------------------------------

def test_a_reply_over_the_size_cap_is_abandoned_before_it_is_read_whole():
    with OpenAIServer(huge_bytes=256 << 20) as server:
        server.rules.append((lambda body: "request 1" in str(body), "huge"))
        ok, failed = run(client_config(server.base_url, "intents.openai.max_response_bytes=1048576"), messages(2))
        time.sleep(0.2)  # the server notices the closed connection
        sent = server.stats.huge_bytes_sent
    assert ok.text.startswith(INTENT_PREFIX)
    assert isinstance(failed, RequestFailed) and (failed.reason, failed.attempts) == ("response_too_large", 1)
    assert "max_response_bytes=1048576" in failed.detail
    # the client hung up after about 1 MiB: the server could not write more than the sockets' buffers
    assert sent < 32 << 20, f"{sent} bytes of a 256 MiB reply were sent: the client read it all"


# ---- item 12: a dead endpoint stops the client, the intents stage and data_prep -------------------

def test_a_dead_endpoint_stops_the_client_after_n_connection_failures(dead_url):
    started = time.monotonic()
    with pytest.raises(EndpointUnreachable) as error:
        run(client_config(dead_url, "intents.openai.max_connection_failures=5", "intents.openai.concurrency=2",
                          "intents.openai.max_retries=50"), messages(20))
    assert time.monotonic() - started < 10
    # the count is at least 5 (the other request in flight may have failed once more meanwhile)
    assert dead_url in str(error.value) and re.search(r"\b([5-9]|1\d) connection attempts in a row", str(error.value))


def test_connection_failures_interrupted_by_replies_do_not_stop_the_client():
    with OpenAIServer() as server:
        server.faults.extend(["disconnect", "disconnect", "500", "disconnect", "disconnect"])
        results = run(client_config(server.base_url, "intents.openai.max_connection_failures=3",
                                    "intents.openai.concurrency=1", "intents.openai.max_retries=5"), messages(2))
    assert all(r.text.startswith(INTENT_PREFIX) for r in results)


@pytest.mark.slow
def test_python_m_data_prep_intents_exits_non_zero_on_a_dead_endpoint(dead_url, tmp_path):
    """The real command with the YAML defaults (retries, backoff, max_connection_failures): it stops
    in seconds, non-zero, naming the endpoint; nothing is stored."""
    store = tmp_path / "intents.jsonl"
    overrides = ["experiment=tiny", f"data.source={REPO / 'data_prep' / 'sample' / 'wildchat.parquet'}",
                 "num_proc=1", f"intents.path={store}", "intents.backend=openai", f"intents.openai.base_url={dead_url}",
                 "intents.openai.model=test-model", "intents.progress=false"]
    started = time.monotonic()
    process = subprocess.run([sys.executable, "-m", "data_prep.intents", *overrides], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=180)
    output = process.stdout + process.stderr
    assert process.returncode != 0, output[-3000:]
    assert time.monotonic() - started < 120
    assert f"{dead_url}/chat/completions is unreachable" in output
    assert not store.exists() or not store.read_text().strip()


def test_data_prep_writes_nothing_when_its_intents_stage_fails(tiny_assets, tmp_path, dead_url):
    output = tmp_path / "data"
    with pytest.raises(EndpointUnreachable, match="unreachable"):
        run_data_prep(tiny_assets, output, *intents_overrides(tmp_path / "intents.jsonl", dead_url))
    assert not output.exists()
    # an endpoint that answers but gives no intent at all: the stage fails too (report written)
    with OpenAIServer() as server:
        server.rules.append((lambda body: True, "400"))
        with pytest.raises(RuntimeError, match="none of the .* got an intent"):
            run_data_prep(tiny_assets, output, *intents_overrides(tmp_path / "intents.jsonl", server.base_url))
    assert not output.exists()
    report = json.loads((tmp_path / "intents.report.json").read_text())
    assert report["done"] == 0 and report["failed"] == {"http_400": report["conversations"]}


# ---- item 15 (a, b): the key never comes back out -------------------------------------------------

def test_a_key_echoed_inside_a_normal_reply_is_never_stored(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", SECRET)
    store = tmp_path / "intents.jsonl"
    with OpenAIServer(api_key=SECRET) as server:
        server.rules.append((lambda body: True, "echo_key"))
        [completion] = run(client_config(server.base_url, "intents.openai.api_key_env=TEST_LLM_KEY"), messages(1))
        report = generate(store, server.base_url, "intents.openai.api_key_env=TEST_LLM_KEY", "data.limit=20")
    assert SECRET not in completion.text and "Bearer <api key>" in completion.text
    assert report["done"] > 0 and all("<api key>" in row["intent"] for row in store_rows(store))
    for path in (store, tmp_path / "intents.report.json"):
        assert SECRET not in path.read_text()


@pytest.mark.parametrize("mistake", [SECRET, "3f2a9c0b7d6e4f1a8b5c2d9e0f7a6b3c"])   # OpenAI's and Azure's shapes
def test_a_key_given_as_api_key_env_is_refused_without_being_echoed(mistake, monkeypatch):
    monkeypatch.delenv(mistake, raising=False)
    with pytest.raises(LLMConfigError, match="that looks like a key, not a variable name") as error:
        run(client_config("http://127.0.0.1:9/v1", f"intents.openai.api_key_env={mistake}"), messages(1))
    assert mistake not in str(error.value)
    with pytest.raises(LLMConfigError, match="NOT_SET_VARIABLE_NAME .* not set"):   # a real name is named
        run(client_config("http://127.0.0.1:9/v1", "intents.openai.api_key_env=NOT_SET_VARIABLE_NAME"), messages(1))


@pytest.mark.parametrize("stage,key", [("data_prep", "intents.openai.api_key_env"),
                                       ("simulate", "assistant.openai.api_key_env"),
                                       ("intrinsic", "judge.client.api_key_env")])
def test_a_key_given_as_api_key_env_is_never_written_to_a_stage_config(stage, key, tmp_path, monkeypatch):
    """Refused before the stage writes its config.yaml or manifest, whatever its backend."""
    import importlib
    monkeypatch.delenv(SECRET, raising=False)
    module = importlib.import_module({"data_prep": "data_prep.pipeline", "simulate": "evaluate.simulate",
                                      "intrinsic": "evaluate.intrinsic"}[stage])
    cfg = compose_config(stage, ["experiment=tiny", f"{key}={SECRET}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(LLMConfigError, match="that looks like a key"):
        module.run(cfg)
    assert not list(tmp_path.rglob("*"))


# ---- item 15 (c): perplexity warns of a trained model scored with the base tokenizer ---------------

def test_perplexity_warns_when_the_tokenizer_lacks_the_end_token_the_model_has(tiny_assets, tiny_userlm_model,
                                                                               caplog):
    from evaluate.perplexity import end_token_handling
    model = AutoModelForCausalLM.from_pretrained(tiny_userlm_model)
    cfg = compose_config("perplexity", ["experiment=tiny", f"model={tiny_userlm_model}",
                                        f"tokenizer={tiny_assets / 'tokenizer'}"])
    base = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    with caplog.at_level(logging.WARNING, logger="evaluate.perplexity"):
        assert end_token_handling(cfg, base, model) == (False, "plain_text")
    assert "has no <|endconversation|>" in caplog.text and "base tokenizer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evaluate.perplexity"):   # its own tokenizer: no warning
        assert end_token_handling(cfg, AutoTokenizer.from_pretrained(tiny_userlm_model), model) == (True, "token")
        untrained = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
        assert end_token_handling(cfg, base, untrained) == (False, "plain_text")   # no row for it: no warning
    assert not caplog.text


# ---- item 6 (a): user-LM prompts are cut to the context, by data_prep's rule ---------------------

INTENT = "You are a user chatting with an assistant language model to plan a trip to Algeria."
TURNS = [{"role": role, "content": f"{role} message number {i} about algeria"}
         for i in range(4) for role in ("user", "assistant")]


def protocols(tiny_tokenizer, tiny_chatml_model):
    from evaluate.protocols import make_protocol
    return {"userlm": make_protocol("userlm", tiny_tokenizer, end_token="token", pad_token="<|reserved_special_token_0|>"),
            "flipped_chat": make_protocol("flipped_chat", AutoTokenizer.from_pretrained(tiny_chatml_model),
                                          end_token="plain_text", system_prompt="Play the user.",
                                          system_prompt_with_intent="{intent} Play the user.")}


@pytest.mark.parametrize("name", ["userlm", "flipped_chat"])
def test_a_prompt_over_the_context_keeps_the_intent_and_loses_its_oldest_messages(name, tiny_tokenizer,
                                                                                    tiny_chatml_model):
    protocol = protocols(tiny_tokenizer, tiny_chatml_model)[name]
    full = protocol.build_prompt(INTENT, TURNS)
    assert protocol.prompt_within(INTENT, TURNS, len(full)) == (full, False)
    for limit in (len(full) - 1, len(full) // 2):
        ids, truncated = protocol.prompt_within(INTENT, TURNS, limit)
        # the longest suffix of whole messages that fits, behind the intent
        first = next(k for k in range(1, len(TURNS)) if len(protocol.build_prompt(INTENT, TURNS[k:])) <= limit)
        assert truncated and ids == protocol.build_prompt(INTENT, TURNS[first:]) and len(ids) <= limit
    # a newest message too long even alone keeps its first tokens, after the intent
    huge = TURNS[:1] + [{"role": "assistant", "content": "START " + "blah " * 5000 + "END"}]
    limit = len(protocol.build_prompt(INTENT, [])) + 60
    ids, truncated = protocol.prompt_within(INTENT, huge, limit)
    text = protocol.tokenizer.decode(ids)
    assert truncated and len(ids) <= limit and INTENT in text and "START blah" in text and "END" not in text
    assert "message number 0" not in text
    assert ids[-3:] == full[-3:]   # still ends where the user LM writes: the user header / generation prompt
    with pytest.raises(ValueError, match="leaves no room"):
        protocol.prompt_within(INTENT, TURNS, 10)


# ---- item 6 (a, c) end to end: bounded prompts, a failed conversation among ones that go on -------

def small_context_user_lm(tiny_userlm_model, out, positions: int):
    """The tiny user LM with a context of `positions` (max_position_embeddings), saved to `out`."""
    model = AutoModelForCausalLM.from_pretrained(tiny_userlm_model)
    model.config.max_position_embeddings = positions
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_userlm_model).save_pretrained(out)
    return out


def test_simulate_bounds_prompts_and_records_failed_conversations(tiny_assets, tiny_userlm_model, tiny_data,
                                                                  tmp_path):
    import evaluate.simulate_config  # noqa: F401
    from evaluate.simulate import run as simulate
    from evaluate.transcripts import read_transcripts
    from tests.test_simulate import openai_overrides
    positions, max_new_tokens = 192, 8
    user_lm = small_context_user_lm(tiny_userlm_model, tmp_path / "user_lm", positions)
    intents = tmp_path / "intents.jsonl"
    rows = [{"conversation_hash": f"c{i}", "intent": f"{INTENT_PREFIX} plan trip number {i}."} for i in range(6)]
    rows.append({"conversation_hash": "too-long", "intent": f"{INTENT_PREFIX} " + "travel " * 400})
    intents.write_text("".join(json.dumps(r) + "\n" for r in rows))
    requests = iter(range(10**6))

    def reply(body):   # every third reply is far longer than the user LM's context, the others short
        n = next(requests)
        return f"Reply {n}: " + ("tell me more about it " * (300 if n % 3 == 0 else 3))

    with OpenAIServer(reply=reply, huge_bytes=64 << 20) as server:
        answered = iter(range(10**6))
        server.rules.append((lambda body: next(answered) == 2, "huge"))     # the third request: 64 MiB
        out = simulate(compose_config("simulate", [
            "experiment=tiny", f"user_model.name_or_path={user_lm}", f"intents.path={intents}",
            f"output_dir={tmp_path / 'sim'}", "progress=false", f"sampling.max_new_tokens={max_new_tokens}",
            "guardrails.max_retries=1", "conversation.max_user_turns=4", "conversation.end_allowed_after=9",
            *openai_overrides(server.base_url), "assistant.openai.max_response_bytes=1048576"]))
        huge_sent = server.stats.huge_bytes_sent
    records = {r["id"]: r for r in read_transcripts(out / "transcripts.jsonl")}
    summary = json.loads((out / "summary.json").read_text())
    assert set(records) == {r["conversation_hash"] for r in rows} and summary["conversations"] == 7
    assert records["too-long"]["end_reason"] == "intent_too_long" and records["too-long"]["turns"] == []
    [failed] = [r for r in records.values() if r["end_reason"] == "assistant_error"]
    assert failed["assistant_error_reason"] == "response_too_large" and huge_sent < 32 << 20
    assert summary["assistant_errors"] == {"response_too_large": 1}
    assert summary["end_reasons"] == {"assistant_error": 1, "intent_too_long": 1, "max_turns": 5}
    prompt_lengths = [t["prompt_tokens"] for r in records.values() for t in r["turns"] if t["role"] == "user"]
    assert max(prompt_lengths) <= positions - max_new_tokens
    assert summary["truncated_prompts"] == sum(r["truncated_prompts"] for r in records.values()) > 0
