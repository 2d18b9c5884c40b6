"""`python -m evaluate.simulate` end to end: against a local HF assistant and a real local
OpenAI-compatible server; reproducible bytes; resume after kill -9 (with a torn last line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from evaluate.simulate import run
from evaluate.transcripts import read_transcripts
from tests.conftest import REPO, compose_config, preset_changes
from scripts.openai_server import OpenAIServer

SYSTEM_PROMPT = "You are a helpful assistant."


def simulate_overrides(tiny_assets, tiny_data, output_dir, *extra) -> list[str]:
    return ["experiment=tiny", f"user_model.name_or_path={tiny_assets / 'model'}",
            f"assistant.hf.name_or_path={tiny_assets / 'model'}", f"intents.path={tiny_data}",
            f"output_dir={output_dir}", "progress=false", "sampling.max_new_tokens=8", "guardrails.max_retries=1",
            *extra]


def openai_overrides(base_url) -> list[str]:
    return ["assistant.kind=openai", f"assistant.openai.base_url={base_url}", "assistant.openai.model=test-assistant",
            "assistant.openai.concurrency=4", "assistant.openai.backoff_base_s=0.01",
            "assistant.openai.backoff_max_s=0.05", "assistant.openai.timeout_s=30",
            f"assistant.system_prompt='{SYSTEM_PROMPT}'"]


def check_transcripts(records, intents_limit, max_user_turns):
    assert len(records) == intents_limit and len({r["id"] for r in records}) == intents_limit
    for r in records:
        roles = [t["role"] for t in r["turns"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        assert sum(role == "user" for role in roles) <= max_user_turns
        for turn in r["turns"]:
            if turn["role"] == "user":
                assert {"attempts", "rejected", "failed", "intervened", "removed_mass"} <= set(turn["guardrails"])
        assert r["ended"] == (r["end_reason"] == "user_ended") == (r["end_turn"] is not None)


def test_simulate_with_a_local_hf_assistant(tiny_assets, tiny_data, tmp_path):
    import evaluate.simulate_config  # noqa: F401
    out = run(compose_config("simulate", simulate_overrides(tiny_assets, tiny_data, tmp_path / "a")))
    records = read_transcripts(out / "transcripts.jsonl")
    check_transcripts(records, intents_limit=8, max_user_turns=3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conversations"] == 8 and sum(summary["end_reasons"].values()) == 8
    user_turns = sum(t["role"] == "user" for r in records for t in r["turns"])
    assert summary["guardrails"]["user_turns"] == user_turns + sum(r["ended"] for r in records)
    assert summary["user_turns_per_conversation"]["max"] <= 3
    assert all(summary["guardrails"][g]["enabled"] for g in ("first_word", "end_conversation", "length", "repetition"))
    # Same config, fresh directory: the same bytes. Same directory: nothing is redone.
    again = run(compose_config("simulate", simulate_overrides(tiny_assets, tiny_data, tmp_path / "b")))
    for name in ("transcripts.jsonl", "summary.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    before = (out / "transcripts.jsonl").read_bytes()
    run(compose_config("simulate", simulate_overrides(tiny_assets, tiny_data, tmp_path / "a")))
    assert (out / "transcripts.jsonl").read_bytes() == before
    with pytest.raises(FileExistsError, match="another config"):
        run(compose_config("simulate", simulate_overrides(tiny_assets, tiny_data, tmp_path / "a", "seed=1")))


def test_simulate_against_an_openai_compatible_server(tiny_assets, tiny_data, tmp_path):
    import evaluate.simulate_config  # noqa: F401
    seen = []

    def reply(body):
        seen.append(body["messages"])
        return f"Reply number {len(seen)}."

    with OpenAIServer(reply=reply) as server:
        server.faults.extend(["500", "429"])                       # retried, then answered
        server.rules.append((lambda body: len(body["messages"]) >= 6, "400"))   # third answer fails for good
        out = run(compose_config("simulate", simulate_overrides(
            tiny_assets, tiny_data, tmp_path / "sim", "conversation.max_user_turns=4",
            *openai_overrides(server.base_url))))
        stats = server.stats
    records = read_transcripts(out / "transcripts.jsonl")
    check_transcripts(records, intents_limit=8, max_user_turns=3)
    assistant_turns = sum(t["role"] == "assistant" for r in records for t in r["turns"])
    assert stats.replies == len(seen) == assistant_turns and stats.faults["500"] == stats.faults["429"] == 1
    for messages in seen:                                      # its own system prompt, never the intent
        assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * (len(messages) // 2 - 1) + ["user"]
        assert not any("You are a user chatting" in m["content"] for m in messages)
    replies = {t["content"] for r in records for t in r["turns"] if t["role"] == "assistant"}
    assert replies == {f"Reply number {i}." for i in range(1, len(seen) + 1)}
    for r in records:
        if r["end_reason"] == "assistant_error":
            assert "http_400" in r["assistant_error"] and len(r["turns"]) == 5
        else:
            assert r["end_reason"] == "user_ended"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["end_reasons"]) <= {"assistant_error", "user_ended"}


@pytest.mark.slow
def test_resume_after_kill(tiny_assets, tiny_data, tmp_path):
    """kill -9 mid-run (a torn line added, as if killed while writing), then resume: every intent
    done exactly once, finished conversations untouched, and only the rest asked of the assistant."""
    import evaluate.simulate_config  # noqa: F401
    out = tmp_path / "sim"
    with OpenAIServer(reply=lambda body: "Sure, tell me more.") as server:
        overrides = simulate_overrides(tiny_assets, tiny_data, out, "user_model.batch_size=2", "intents.limit=6",
                                       "conversation.max_user_turns=2", "guardrails.end_conversation.enabled=true",
                                       "conversation.end_allowed_after=9", *openai_overrides(server.base_url))
        server.hang_after = 4        # two conversations of two answered turns, then requests hang
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen([sys.executable, "-m", "evaluate.simulate", *overrides], cwd=tmp_path, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        transcripts = out / "transcripts.jsonl"
        deadline = time.monotonic() + 240
        while len(read_transcripts(transcripts)) < 2:
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first conversations were never written"
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        finished = transcripts.read_bytes()
        with open(transcripts, "ab") as f:
            f.write(b'{"id": "torn", "turns": [{"role": "us')
        answered_before = server.stats.replies
        server.hang_after = None
        run(compose_config("simulate", overrides))
        answered_after = server.stats.replies
    records = read_transcripts(transcripts)
    check_transcripts(records, intents_limit=6, max_user_turns=2)
    assert transcripts.read_bytes().startswith(finished)
    assert answered_after - answered_before == 4 * 2               # the four unfinished conversations only
    assert json.loads((out / "summary.json").read_text())["conversations"] == 6


def test_an_instruct_model_plays_the_user_through_flipped_chat(tiny_chatml_model):
    """flipped_chat: the instruct model's own template with roles swapped; its EOS ends a turn."""
    from evaluate.simulator import GuardrailSettings, SamplingSettings, TurnRequest, UserSimulator
    flipped_chat = {"system_prompt": "Play the user.", "system_prompt_with_intent": "{intent} Play the user.",
                    "template_kwargs": {}}
    simulator = UserSimulator.from_pretrained(str(tiny_chatml_model), SamplingSettings(max_new_tokens=6),
                                              GuardrailSettings(max_retries=0), protocol="flipped_chat",
                                              flipped_chat=flipped_chat)
    history = [{"role": "user", "content": "hello there friend"}, {"role": "assistant", "content": "Hi!"}]
    prompt = simulator.tokenizer.decode(simulator.protocol.build_prompt("Intent.", history))
    assert prompt.startswith("<|im_start|>system\nIntent. Play the user.<|im_end|>")
    assert "<|im_start|>assistant\nhello there friend<|im_end|>\n<|im_start|>user\nHi!" in prompt  # roles swapped
    assert prompt.endswith("<|im_start|>assistant\n")
    assert simulator.end_token_id is None                  # no such token: an early end is resampled instead
    torch.manual_seed(0)
    turns = simulator.generate([TurnRequest("Intent.", history, allow_end=False)] * 4)
    assert all(t.text is not None and not t.ended and 0 < t.tokens <= 6 for t in turns)


def test_a_chatml_user_lm_prompts_and_stops_in_its_own_format(tiny_chatml_user_model):
    """A user LM prepared with chat_format=chatml: the simulator reads the format from its tokenizer
    (the prompt ends with the bare ChatML user header), stops at <|im_end|> and ends on <|endconversation|>."""
    from evaluate.simulator import GuardrailSettings, SamplingSettings, TurnRequest, UserSimulator
    simulator = UserSimulator.from_pretrained(str(tiny_chatml_user_model), SamplingSettings(max_new_tokens=6),
                                              GuardrailSettings(max_retries=0))
    history = [{"role": "user", "content": "hello there friend"}, {"role": "assistant", "content": "Hi!"}]
    prompt = simulator.tokenizer.decode(simulator.protocol.build_prompt("Intent.", history))
    assert prompt == ("<|im_start|>system\nIntent.<|im_end|>\n<|im_start|>user\nhello there friend<|im_end|>\n"
                      "<|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>user")
    tokenizer = simulator.tokenizer
    assert set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])) <= set(simulator.sampler.stop_token_ids)
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") is None   # a Qwen-family vocabulary: no Llama-3 tokens
    assert simulator.end_token_id == tokenizer.convert_tokens_to_ids("<|endconversation|>")
    torch.manual_seed(0)
    turns = simulator.generate([TurnRequest("Intent.", history, allow_end=False)] * 4)
    assert all(t.text is not None and not t.ended and 0 < t.tokens <= 6 for t in turns)


def test_first_turn_and_next_turn(biased_user_lm):
    """The public one-turn API. The biased user LM ends conversations whenever it can: the first
    turn may not end (the end token is masked), a later one may when allowed, and never when not."""
    from evaluate.simulator import GuardrailSettings, SamplingSettings, UserSimulator
    from tests.conftest import BIASED_TURN
    simulator = UserSimulator.from_pretrained(str(biased_user_lm), SamplingSettings(max_new_tokens=16),
                                              GuardrailSettings(max_retries=2))
    intent = "You are a user chatting with an assistant language model to plan a trip to Lisbon."
    torch.manual_seed(0)
    first = simulator.first_turn(intent)
    assert not first.ended and first.text == BIASED_TURN
    assert first.prompt_tokens == len(simulator.protocol.build_prompt(intent, []))
    assert first.guardrails.intervened["end_conversation"] and first.guardrails.removed_mass["end_conversation"] > 0.2
    history = [{"role": "user", "content": first.text}, {"role": "assistant", "content": "Sure, what kind of trip?"}]
    allowed = [simulator.next_turn(intent, history, allow_end=True) for _ in range(8)]
    assert any(t.ended for t in allowed) and all((t.text is None) == t.ended for t in allowed)
    assert all(t.prompt_tokens == len(simulator.protocol.build_prompt(intent, history)) for t in allowed)
    forbidden = [simulator.next_turn(intent, history, allow_end=False) for _ in range(4)]
    assert all(t.text and not t.ended and t.guardrails.intervened["end_conversation"] for t in forbidden)
    # Its one habitual text repeats the first turn: the repetition guardrail resamples it.
    assert all(t.guardrails.rejected.get("repetition", 0) > 0 for t in forbidden)


def test_a_stop_rule_ends_conversations_with_its_own_reason(tiny_userlm_model):
    """The runner's extension point (the extrinsic evaluation's task_solved): the rule sees every
    turn as it is added, and its end reason ends that conversation; a pool of one refills."""
    from evaluate.assistants import ScriptedAssistant
    from evaluate.conversation import max_user_turns, run_conversations
    from evaluate.simulator import GuardrailSettings, SamplingSettings, UserSimulator
    simulator = UserSimulator.from_pretrained(str(tiny_userlm_model), SamplingSettings(max_new_tokens=6),
                                              GuardrailSettings(max_retries=0))
    seen = []

    def solved_on_the_second_answer(conversation):
        seen.append((conversation.id, conversation.turns[-1]["role"]))
        answers = sum(t["role"] == "assistant" for t in conversation.turns)
        return "task_solved" if answers == 2 else None

    torch.manual_seed(0)
    items = [("a", "You are a user chatting with an assistant language model to fix a bike."),
             ("b", "You are a user chatting with an assistant language model to bake bread.")]
    finished = list(run_conversations(simulator, ScriptedAssistant(["One.", "Two."]), items,
                                      solved_on_the_second_answer, end_allowed_after=99, pool_size=1))
    assert [(c.id, c.end_reason) for c in finished] == [("a", "task_solved"), ("b", "task_solved")]
    assert [[t["role"] for t in c.turns] for c in finished] == [["user", "assistant"] * 2] * 2
    assert [t["content"] for t in finished[0].turns[1::2]] == ["One.", "Two."]
    assert seen == [(c, role) for c in "ab" for role in ("user", "assistant") * 2]
    # max_user_turns: after the answer (evaluate.simulate) or right after the user turn (judges).
    for answered, roles in ((True, ["user", "assistant"]), (False, ["user"])):
        [c] = run_conversations(simulator, ScriptedAssistant(["One."]), items[:1], max_user_turns(1, answered),
                                end_allowed_after=99, pool_size=1)
        assert c.end_reason == "max_turns" and [t["role"] for t in c.turns] == roles
        assert c.transcript()["ended"] is False and c.transcript()["end_reason"] == "max_turns"


def test_presets_compose():
    """Each preset by the values it changes (and nothing else)."""
    import evaluate.simulate_config  # noqa: F401
    tiny = preset_changes("simulate", "tiny", [])
    assert tiny.pop("assistant.hf.chat_template").startswith("{%- for m in messages -%}")
    assert tiny == {"user_model.name_or_path": "outputs/tiny/train/model", "user_model.batch_size": 8,
                    "sampling.max_new_tokens": 40, "guardrails.max_retries": 2, "assistant.kind": "hf",
                    "assistant.sampling.do_sample": True, "assistant.sampling.max_new_tokens": 24,
                    "assistant.hf.name_or_path": "outputs/tiny/model",
                    "assistant.hf.stop_tokens": ["<|eot_id|>", "<|end_of_text|>"], "assistant.hf.batch_size": 8,
                    "intents.path": "outputs/tiny/data/wildchat", "intents.limit": 8, "conversation.max_user_turns": 3,
                    "output_dir": "outputs/tiny/simulate"}
    assert preset_changes("simulate", "paper", []) == {
        "user_model.batch_size": 64, "assistant.sampling.max_new_tokens": 1024,
        "assistant.openai.base_url": "https://api.openai.com/v1", "assistant.openai.model": "gpt-4o-2024-08-06",
        "assistant.openai.api_key_env": "OPENAI_API_KEY", "intents.path": "outputs/paper/data/wildchat",
        "intents.limit": 2000, "output_dir": "outputs/paper/simulate/${model_dir:${user_model.name_or_path},"
                                             "${user_model.protocol}}"}
    assert compose_config("simulate", ["experiment=paper"]).output_dir == "outputs/paper/simulate/microsoft--UserLM-8b"
    assert preset_changes("intrinsic", "tiny", ["simulation=x"]) == {
        "name": "tiny-user-lm", "metrics": ["first_turn_diversity", "intent_decomposition", "dialogue_termination"],
        "termination.data_dir": "outputs/tiny/data/prism", "termination.max_seq_len": 512,
        "output_dir": "outputs/tiny/results/intrinsic"}
    assert preset_changes("intrinsic", "paper", ["simulation=x"]) == {
        "termination.data_dir": "outputs/paper/data/prism", "judge.client.base_url": "https://api.openai.com/v1",
        "judge.client.model": "gpt-4o-2024-08-06", "judge.client.api_key_env": "OPENAI_API_KEY"}
    # The sampling presets: the card's (the default) and generation_config.json's.
    card, generation_config = (compose_config("simulate", [f"sampling={name}"]).sampling
                               for name in ("card", "generation_config"))
    assert (card.temperature, card.top_p) == (1.0, 0.8)
    assert (generation_config.temperature, generation_config.top_p) == (0.6, 0.9)
