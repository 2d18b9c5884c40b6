"""A user LM served over /v1/completions (evaluate.served) against a real local server in front of
the tiny model (scripts/completions_server.py): the same conversations as the local backend when
greedy, the guardrails holding in the transcripts when sampling, prompts without BOS, and a
request that cannot succeed recorded as a failed conversation."""

from __future__ import annotations

import json

from evaluate.guardrails import first_word
from evaluate.simulate import run
from evaluate.transcripts import read_transcripts
from scripts.completions_server import CompletionsServer
from tests.conftest import compose_config
from tests.test_simulate import simulate_overrides


def served(base_url: str, *extra: str) -> list[str]:
    return ["user_model.backend=openai", f"user_model.openai.base_url={base_url}", "user_model.openai.model=tiny",
            "user_model.openai.backoff_base_s=0.01", "user_model.openai.timeout_s=60", *extra]


def overrides(tiny_assets, tiny_data, user_lm, out, *extra) -> list[str]:
    return [*simulate_overrides(tiny_assets, tiny_data, out, "assistant.kind=scripted"),
            f"user_model.name_or_path={user_lm}", *extra]


def user_turns(records) -> list[tuple]:
    return [(r["id"], r["end_reason"], [t["content"] for t in r["turns"] if t["role"] == "user"]) for r in records]


def test_greedy_served_conversations_equal_the_local_backends(tiny_assets, tiny_data, tiny_userlm_model, tmp_path):
    import evaluate.simulate_config  # noqa: F401
    greedy = ["sampling.do_sample=false", "guardrails.first_word.enabled=false", "conversation.end_allowed_after=2"]
    local = run(compose_config("simulate", overrides(tiny_assets, tiny_data, tiny_userlm_model, tmp_path / "hf", *greedy)))
    with CompletionsServer(str(tiny_userlm_model)) as server:
        remote = run(compose_config("simulate", overrides(tiny_assets, tiny_data, tiny_userlm_model, tmp_path / "api",
                                                          *greedy, *served(server.base_url))))
    expected, got = (user_turns(read_transcripts(d / "transcripts.jsonl")) for d in (local, remote))
    assert got == expected and sum(len(turns) for _, _, turns in got) >= 8
    bos = server.tokenizer.bos_token_id
    header = server.tokenizer("<|start_header_id|>user<|end_header_id|>", add_special_tokens=False)["input_ids"]
    assert server.stats.prompts and all(p[0] != bos and p[-len(header):] == header for p in server.stats.prompts)


def banned_words_override(words) -> str:
    return "guardrails.first_word.words=[" + ",".join(f"'{w}'" for w in words) + "]"


def test_the_guardrails_hold_over_the_api(tiny_assets, tiny_data, tiny_userlm_model, tmp_path):
    import evaluate.simulate_config  # noqa: F401
    with CompletionsServer(str(tiny_userlm_model)) as server:
        # Greedy first turns open with a known word; banned, every candidate breaks the rule (greedy
        # draws the same turn again), so each such turn is rejected to the budget and marked failed.
        greedy = ["sampling.do_sample=false", "conversation.max_user_turns=1", "guardrails.max_retries=2"]
        probe = run(compose_config("simulate", overrides(tiny_assets, tiny_data, tiny_userlm_model, tmp_path / "probe",
                                                         "guardrails.first_word.enabled=false", *greedy,
                                                         *served(server.base_url))))
        openings = [first_word(r["turns"][0]["content"]) for r in read_transcripts(probe / "transcripts.jsonl")
                    if r["turns"]]
        common = max({w for w in openings if w}, key=openings.count)
        banned_run = run(compose_config("simulate", overrides(tiny_assets, tiny_data, tiny_userlm_model, tmp_path / "ban",
                                                              banned_words_override([common]), *greedy,
                                                              *served(server.base_url))))
        # Sampling, every guardrail on, three candidates a request.
        out = run(compose_config("simulate", overrides(
            tiny_assets, tiny_data, tiny_userlm_model, tmp_path / "guarded", banned_words_override([common]),
            "guardrails.length.min_words=2", "guardrails.length.max_words=12", "conversation.end_allowed_after=2",
            "guardrails.max_retries=3", *served(server.base_url, "user_model.openai.candidates=3"))))
    first_turns = [r["turns"][0] for r in read_transcripts(banned_run / "transcripts.jsonl") if r["turns"]]
    hit = [t for t in first_turns if first_word(t["content"]) == common]
    assert hit   # a kept turn opening with the banned word used its whole budget and is marked failed
    assert all(t["guardrails"]["failed"] == ["first_word"] and t["guardrails"]["attempts"] == 3 for t in hit)
    assert json.loads((banned_run / "summary.json").read_text())["guardrails"]["first_word"]["samples_rejected"] \
        >= 3 * len(hit)
    records = read_transcripts(out / "transcripts.jsonl")
    for turn in (t for r in records for t in r["turns"] if t["role"] == "user"):
        failed = turn["guardrails"]["failed"]
        assert first_word(turn["content"]) != common or "first_word" in failed
        assert 2 <= len(turn["content"].split()) <= 12 or "length" in failed
        assert turn["guardrails"]["attempts"] <= 4
    assert all(sum(t["role"] == "user" for t in r["turns"]) >= 2 for r in records if r["end_reason"] == "user_ended")


def test_a_request_that_cannot_succeed_fails_its_conversation(tiny_assets, tiny_data, tiny_userlm_model, tmp_path):
    """A server whose model lacks <|endconversation|> answers the end token's logit_bias with a 400."""
    import evaluate.simulate_config  # noqa: F401
    with CompletionsServer(str(tiny_assets / "model")) as server:
        out = run(compose_config("simulate", overrides(tiny_assets, tiny_data, tiny_userlm_model, tmp_path / "api",
                                                       *served(server.base_url))))
    records = read_transcripts(out / "transcripts.jsonl")
    assert len(records) == 8 and {r["end_reason"] for r in records} == {"user_error"}
    assert all(r["user_error_reason"] == "http_400" and r["turns"] == [] for r in records)


def test_extrinsic_user_lm_served_equals_local_when_greedy(biased_user_lm, tmp_path):
    import evaluate.extrinsic.config  # noqa: F401
    from evaluate.extrinsic.run import run as run_extrinsic
    from tests.test_extrinsic_run import tiny_lm_overrides
    greedy = ["assistant.kind=scripted", "user.user_lm.sampling.do_sample=false",
              "user.user_lm.guardrails.first_word.enabled=false"]
    local = run_extrinsic(compose_config("extrinsic", tiny_lm_overrides(biased_user_lm, tmp_path / "hf", *greedy)))
    with CompletionsServer(str(biased_user_lm)) as server:
        remote = run_extrinsic(compose_config("extrinsic", tiny_lm_overrides(
            biased_user_lm, tmp_path / "api", *greedy, "user.user_lm.model.backend=openai",
            f"user.user_lm.model.openai.base_url={server.base_url}", "user.user_lm.model.openai.model=tiny")))
    turns = [[(r["task_id"], r["run"], r["end_reason"], [t["content"] for t in r["turns"] if t["role"] == "user"])
              for r in read_transcripts(d / "transcripts.jsonl")] for d in (local, remote)]
    assert turns[1] == turns[0] and len(turns[0]) == 8 and server.stats.requests > 0


def test_intrinsic_drives_the_user_lm_its_simulation_served(biased_user_lm, tiny_data, tmp_path):
    """evaluate.intrinsic generates with the simulation's user LM: served there, served here."""
    import evaluate.simulate_config  # noqa: F401
    from evaluate.intrinsic import run as run_intrinsic
    from scripts.openai_server import OpenAIServer
    from tests.test_intrinsic import FIXTURES, judge_rule
    with CompletionsServer(str(biased_user_lm)) as server, \
            OpenAIServer(reply=lambda body: judge_rule(body["messages"][-1]["content"])) as judge:
        simulation = run(compose_config("simulate", [
            "experiment=tiny", f"user_model.name_or_path={biased_user_lm}", "assistant.kind=scripted",
            f"intents.path={tiny_data}", f"output_dir={tmp_path / 'simulation'}", "progress=false",
            "sampling.max_new_tokens=16", "guardrails.max_retries=1", *served(server.base_url)]))
        during_simulation = server.stats.requests
        path = run_intrinsic(compose_config("intrinsic", [
            f"simulation={simulation}", f"output_dir={tmp_path / 'results'}", "first_turns=6",
            "metrics=[first_turn_diversity,role_adherence]",
            f"role_adherence.data.source={FIXTURES / 'commonsense_qa.jsonl'}", f"judge.client.base_url={judge.base_url}",
            "judge.client.model=test-judge", "judge.client.backoff_base_s=0.01", "judge.client.max_retries=1"]))
    metrics = json.loads(path.read_text())["metrics"]
    assert {"first_turn_diversity", "role_adherence"} <= set(metrics)
    assert server.stats.requests > during_simulation > 0   # the metrics' turns came from the server too


def test_the_server_cuts_the_text_before_a_stop_string(tiny_userlm_model):
    """scripts/completions_server.py's `stop`: greedy text with a piece of itself as the stop string
    ends right before that piece's first occurrence, finish_reason stop."""
    import aiohttp
    import asyncio

    async def complete(base_url, **params):
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base_url}/completions", json={"model": "tiny", "prompt": [1, 2, 3],
                                                                     "temperature": 0, **params}) as response:
                return (await response.json())["choices"][0]
    with CompletionsServer(str(tiny_userlm_model)) as server:
        free = asyncio.run(complete(server.base_url, max_tokens=24))
        text = free["text"]
        stop = text[len(text) // 2:len(text) // 2 + 3]
        assert len(text) > 8 and stop.strip()
        cut = asyncio.run(complete(server.base_url, max_tokens=24, stop=[stop]))
    assert (cut["text"], cut["finish_reason"]) == (text[:text.find(stop)], "stop")
