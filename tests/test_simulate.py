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
from tests.conftest import REPO, compose_config
from tests.openai_server import OpenAIServer

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


def test_presets_compose():
    import evaluate.simulate_config  # noqa: F401
    for preset in ("tiny", "paper"):
        cfg = compose_config("simulate", [f"experiment={preset}"])
        assert cfg.sampling.top_p == 0.8 and cfg.sampling.temperature == 1.0          # the card's settings
        assert compose_config("intrinsic", [f"experiment={preset}", "simulation=x"]).first_turns > 0
    generation_config = compose_config("simulate", ["sampling=generation_config"]).sampling
    assert (generation_config.temperature, generation_config.top_p) == (0.6, 0.9)
    assert compose_config("simulate", ["experiment=paper"]).output_dir == "outputs/paper/simulate/microsoft--UserLM-8b"
