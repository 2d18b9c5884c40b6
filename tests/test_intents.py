"""The intents stage: prompt rendering, output checks, the durable store, generation with a real
OpenAI-compatible server and the tiny local model, resume after kill -9, the key's secrecy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import datasets
import pyarrow as pa
import pytest

from data_prep.intents import get_intents, read_intents
from data_prep.intents.__main__ import run as run_intents
from data_prep.intents.backends import HFBackend
from data_prep.intents.checks import check_reply
from data_prep.intents.prompt import IntentPrompt
from core.jsonl import JsonlWriter
from tests.conftest import REPO, SAMPLE, compose_config, run_data_prep
from scripts.openai_server import INTENT_PREFIX, OpenAIServer


def intents_overrides(store, base_url: str, *extra: str) -> list[str]:
    return ["experiment=tiny", f"data.source={SAMPLE / 'wildchat.parquet'}", "num_proc=1", f"intents.path={store}",
            "intents.backend=openai", f"intents.openai.base_url={base_url}", "intents.openai.model=test-model",
            "intents.openai.concurrency=8", "intents.openai.backoff_base_s=0.01", "intents.openai.backoff_max_s=0.05",
            "intents.openai.timeout_s=5", "intents.progress=false", *extra]


def generate(store, base_url: str, *extra: str) -> dict:
    return run_intents(compose_config("data_prep", intents_overrides(store, base_url, *extra)))


def store_rows(store) -> list[dict]:
    return [json.loads(line) for line in open(store, encoding="utf-8")]


def saved_intents(data_dir) -> dict[str, str]:
    """conversation_hash -> intent in data_prep's conversations/ (splits with rows: an empty saved
    split cannot be loaded back by datasets)."""
    kept = json.loads((data_dir / "funnel.json").read_text())["kept"]
    return {c["conversation_hash"]: c["intent"] for split, n in kept.items() if n
            for c in datasets.Dataset.load_from_disk(str(data_dir / "conversations" / split))}


# ---- prompt and output checks ------------------------------------------------------------------

PROMPT_VERSIONS = ["v1", "v2"]


def prompt_config(version: str, *extra: str):
    return compose_config("data_prep", ["experiment=tiny", f"intents/prompt={version}", *extra]).intents


@pytest.mark.parametrize("version", PROMPT_VERSIONS)
def test_prompt_has_instruction_three_examples_and_the_conversation(version):
    prompt = IntentPrompt(prompt_config(version).prompt)
    assert prompt.version == version
    turns = [{"role": "user", "content": "Plan a trip to Lisbon"}, {"role": "assistant", "content": "Sure."}]
    messages = prompt.messages(turns)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert INTENT_PREFIX in messages[0]["content"]
    assert all(m["content"].startswith(INTENT_PREFIX) for m in messages[2:7:2])
    assert messages[-1]["content"] == "<user>\nPlan a trip to Lisbon\n</user>\n<assistant>\nSure.\n</assistant>"


@pytest.mark.parametrize("version", PROMPT_VERSIONS)
def test_the_example_intents_pass_the_checks_as_one_sentence(version):
    """What the model is shown is what it must write: prefix, length, no control tokens, one line,
    and one sentence (one full stop, at the end)."""
    intents_cfg = prompt_config(version)
    for example in intents_cfg.prompt.examples:
        intent = example.intent
        assert check_reply(intent, "stop", intents_cfg.checks) == (intent, None)
        assert intent.endswith(".") and sum(intent.count(p) for p in ".!?") == 1, intent
        assert 15 <= len(intent.split()) <= 40


def test_v2_asks_for_the_topic_names_v1_for_none_and_the_paper_preset_uses_v2():
    v1, v2 = (prompt_config(v).prompt.instruction for v in PROMPT_VERSIONS)
    assert "no names" in v1 and "Keep what the conversation is about" not in v1
    assert "Keep what the conversation is about: name the place, product, person" in v2 and "no names" not in v2
    assert "no numbers, dates, prices, code, quoted text, step-by-step content" in v2
    paper = compose_config("data_prep", ["experiment=paper"]).intents.prompt
    assert paper.version == "v2"
    assert compose_config("data_prep", ["experiment=paper", "intents/prompt=v1"]).intents.prompt.version == "v1"
    assert compose_config("data_prep", []).intents.prompt.version == "v1"  # the default (tiny) keeps v1
    assert len({IntentPrompt(prompt_config(v).prompt).fingerprint for v in PROMPT_VERSIONS}) == 2


def test_long_conversations_are_cut_to_the_budget():
    prompt_cfg = compose_config("data_prep", [
        "experiment=tiny", "intents.prompt.budget.conversation_tokens=100", "intents.prompt.budget.first_user_turn_tokens=50",
        "intents.prompt.budget.user_turn_tokens=20", "intents.prompt.budget.assistant_turn_tokens=10"]).intents.prompt
    first = "START " + "x" * 1000 + " END?"
    turns = [{"role": "user", "content": first}] + [
        {"role": role, "content": f"{role} turn {i} " + "y" * 300} for i in range(10) for role in ("assistant", "user")]
    text = IntentPrompt(prompt_cfg).messages(turns)[-1]["content"]
    assert text.startswith("<user>\nSTART ") and "END?\n</user>" in text and "[...]" in text
    assert len(text) <= 100 * 4 + 60 and text.endswith("later turns not shown]")
    assert "assistant turn 0" in text and "user turn 9" not in text


@pytest.mark.parametrize("reply,expected", [
    (f'"{INTENT_PREFIX} plan a trip."', (f"{INTENT_PREFIX} plan a trip.", None)),
    (f"Intent: {INTENT_PREFIX} plan a trip.", (f"{INTENT_PREFIX} plan a trip.", None)),
    (f"Here is the summary:\n\n“{INTENT_PREFIX} plan a trip.”", (f"{INTENT_PREFIX} plan a trip.", None)),
    ('  "" ', (None, "empty")),
    (f"{INTENT_PREFIX} plan a trip.\n\nI hope this helps!", (None, "multi_paragraph")),
    (f"{INTENT_PREFIX} " + "plan " * 80, (None, "too_long")),
    ("The user wants to plan a trip.", (None, "missing_prefix")),
    (f"{INTENT_PREFIX} plan a trip.<|eot_id|>", (None, "control_token")),
])
@pytest.mark.parametrize("version", PROMPT_VERSIONS)
def test_output_checks(reply, expected, version):
    assert check_reply(reply, "stop", prompt_config(version).checks) == expected


def test_a_torn_last_line_is_ignored_by_readers_and_cut_by_the_writer(tmp_path):
    store = tmp_path / "intents.jsonl"
    whole = [json.dumps({"conversation_hash": h, "intent": f"{INTENT_PREFIX} {h}."}) for h in "ab"]
    store.write_text("\n".join(whole) + '\n{"conversation_hash": "c", "inte')
    assert set(read_intents(store)) == {"a", "b"}
    with JsonlWriter(store) as writer:
        assert writer.torn_lines_removed == 1
        writer.append({"conversation_hash": "c", "intent": f"{INTENT_PREFIX} c."})
    assert set(read_intents(store)) == {"a", "b", "c"} and len(store.read_text().splitlines()) == 3
    # a row cut just before its newline is whole: kept, and completed
    store.write_text(whole[0] + "\n" + whole[1])
    with JsonlWriter(store) as writer:
        assert writer.torn_lines_removed == 0
    assert store.read_text() == whole[0] + "\n" + whole[1] + "\n"


def test_the_file_backend_never_uses_another_prompt_versions_intents(tmp_path):
    """A v1 store read under prompt v2 (the paper preset's) is refused; in a mixed store each
    version reads its own rows and the hand-written ones; an edited text under a version is refused."""
    configs = {v: prompt_config(v, f"intents.path={tmp_path / 'intents.jsonl'}") for v in PROMPT_VERSIONS}
    sha = {v: IntentPrompt(cfg.prompt).fingerprint for v, cfg in configs.items()}

    def row(h, version, text=None):
        return {"conversation_hash": h, "intent": f"{INTENT_PREFIX} {version} {h}.", "prompt_version": version,
                "prompt_sha": text or sha[version], "model": "m"}

    with JsonlWriter(tmp_path / "intents.jsonl") as writer:
        writer.append(row("a", "v1"))
        writer.append(row("b", "v1"))
    with pytest.raises(ValueError, match=r"generated with prompt version\(s\) \['v1'\], and this run's prompt is 'v2'"):
        get_intents(configs["v2"], None)
    assert get_intents(configs["v1"], None) == {"a": f"{INTENT_PREFIX} v1 a.", "b": f"{INTENT_PREFIX} v1 b."}
    with JsonlWriter(tmp_path / "intents.jsonl") as writer:
        writer.append(row("a", "v2"))
        writer.append({"conversation_hash": "c", "intent": f"{INTENT_PREFIX} by hand c."})
    assert get_intents(configs["v2"], None) == {"a": f"{INTENT_PREFIX} v2 a.", "c": f"{INTENT_PREFIX} by hand c."}
    assert get_intents(configs["v1"], None) == {"a": f"{INTENT_PREFIX} v1 a.", "b": f"{INTENT_PREFIX} v1 b.",
                                                "c": f"{INTENT_PREFIX} by hand c."}
    with JsonlWriter(tmp_path / "intents.jsonl") as writer:
        writer.append(row("d", "v2", text="0" * 16))
    with pytest.raises(ValueError, match="different prompt text"):
        get_intents(configs["v2"], None)



def test_only_the_wanted_conversations_intents_are_held_but_every_row_is_checked(tmp_path):
    """data_prep asks for its kept conversations' intents: others' rows are not returned (nor
    compared: two intents for a dropped conversation do not matter), yet a malformed row or an
    edited prompt text anywhere in the store is still refused."""
    cfg = prompt_config("v1", f"intents.path={tmp_path / 'intents.jsonl'}")
    sha = IntentPrompt(cfg.prompt).fingerprint
    with JsonlWriter(tmp_path / "intents.jsonl") as writer:
        for h, text in (("a", "a"), ("b", "b"), ("b", "b again"), ("c", "c")):
            writer.append({"conversation_hash": h, "intent": f"{INTENT_PREFIX} {text}.", "prompt_version": "v1",
                           "prompt_sha": sha, "model": "m"})
    of = pa.array(["c", "x", "a", "c"])   # in data_prep's order, a hash kept twice, one with no intent
    assert get_intents(cfg, None, of).to_pylist() == [f"{INTENT_PREFIX} c.", None, f"{INTENT_PREFIX} a.",
                                                      f"{INTENT_PREFIX} c."]
    assert get_intents(cfg, None, pa.array([], pa.string())).to_pylist() == []
    with pytest.raises(ValueError, match="several intents"):
        get_intents(cfg, None, pa.array(["a", "b"]))
    # The generating backend's rows: the newest of a conversation wins.
    assert read_intents(tmp_path / "intents.jsonl", "v1", "m", of=pa.array(["c", "b"])).to_pylist() == [
        f"{INTENT_PREFIX} c.", f"{INTENT_PREFIX} b again."]
    with JsonlWriter(tmp_path / "intents.jsonl") as writer:
        writer.append({"conversation_hash": "d", "intent": "x", "prompt_version": "v1", "prompt_sha": "0" * 16})
    with pytest.raises(ValueError, match="different prompt text"):
        get_intents(cfg, None, pa.array(["a"]))
    (tmp_path / "intents.jsonl").write_text((tmp_path / "intents.jsonl").read_text() + '{"conversation_hash": "e"}\n')
    with pytest.raises(ValueError, match="intent"):
        read_intents(tmp_path / "intents.jsonl", of=pa.array(["a"]))

# ---- generation against a real server -------------------------------------------------------------

def test_cached_intents_are_not_asked_again_and_stale_ones_not_reused(tmp_path):
    store = tmp_path / "intents.jsonl"
    with OpenAIServer() as server:
        report = generate(store, server.base_url)
        n = report["conversations"]
        assert report["done"] == n > 200 and report["failed_total"] == 0 and report["cached"] == 0
        assert report["tokens"]["prompt"] == server.stats.prompt_tokens > 0
        again = generate(store, server.base_url)
        assert (again["cached"], again["done"], server.stats.replies) == (n, 0, n)
        # another model: nothing of test-model's is reused
        other = generate(store, server.base_url, "intents.openai.model=other-model")
        assert (other["cached"], other["done"]) == (0, n)
        # the same version with an edited text is refused
        with pytest.raises(ValueError, match="new version"):
            generate(store, server.base_url, "intents.prompt.instruction=Summarise.")
        bumped = generate(store, server.base_url, "intents.prompt.instruction=Summarise.", "intents.prompt.version=v2")
        assert (bumped["cached"], bumped["done"]) == (0, n)
    assert len(store_rows(store)) == 3 * n
    assert set(read_intents(store, "v1", "test-model")) == set(read_intents(store, "v2", "test-model"))


def test_generation_under_prompt_v2_does_not_reuse_v1s_intents(tmp_path):
    store = tmp_path / "intents.jsonl"
    with OpenAIServer() as server:
        v1 = generate(store, server.base_url, "data.limit=30")
        v2 = generate(store, server.base_url, "data.limit=30", "intents/prompt=v2")
        again = generate(store, server.base_url, "data.limit=30", "intents/prompt=v2")
    n = v1["conversations"]
    assert (v1["done"], v2["cached"], v2["done"], again["cached"], again["done"]) == (n, 0, n, n, 0) and n > 10
    assert (v1["prompt_version"], v2["prompt_version"]) == ("v1", "v2") and v1["prompt_sha"] != v2["prompt_sha"]
    of_v1, of_v2 = read_intents(store, "v1", "test-model"), read_intents(store, "v2", "test-model")
    assert set(of_v1) == set(of_v2) and not any(of_v1[h] == of_v2[h] for h in of_v1)  # each asked with its prompt
    assert len(store_rows(store)) == 2 * n


def test_faults_are_retried_and_failures_reported(tmp_path):
    store = tmp_path / "intents.jsonl"
    # A "slow" reply takes twice the client's timeout; an ordinary one must stay well inside it even
    # on a loaded 2-core machine (at 1 s it did not always: the run then failed with timeouts).
    with OpenAIServer(slow_s=6.0) as server:
        server.faults.extend(["429", "500", "503", "malformed", "disconnect", "slow", "bad_intent"] * 2)
        poisoned = {"500": "short story", "bad_intent": "email"}  # these conversations always get that fault
        for fault, marker in poisoned.items():
            server.rules.append((lambda body, marker=marker: marker in body["messages"][-1]["content"].lower(), fault))
        report = generate(store, server.base_url, "intents.openai.timeout_s=3", "intents.openai.max_retries=2")
    failed = Counter(f["reason"] for f in report["failures"])
    assert set(failed) == {"http_500", "multi_paragraph"} and failed == Counter(report["failed"])
    assert report["cached"] + report["done"] + report["failed_total"] == report["conversations"]
    assert report["done"] == len(store_rows(store)) > 150
    assert all(server.stats.faults[f] >= 2 for f in ("429", "500", "503", "malformed", "disconnect", "slow"))
    saved = json.loads((tmp_path / "intents.report.json").read_text())
    assert saved["failed"] == report["failed"] and saved["failures"] == report["failures"]


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_repeats_and_loses_nothing(tmp_path):
    """A run killed with SIGKILL while requests are in flight, then restarted: one intent per
    conversation in the store, and no prompt answered twice by the server."""
    store = tmp_path / "intents.jsonl"
    with OpenAIServer(latency_s=0.01) as server:
        server.hang_after = 60   # the 61st request onwards is held: the kill finds 8 in flight
        command = [sys.executable, "-m", "data_prep.intents", *intents_overrides(store, server.base_url)]
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (store.exists() and len(store.read_bytes().splitlines()) >= 60 and server.stats.in_flight == 8):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run did not reach the hang point"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        server.hang_after = None
        report = generate(store, server.base_url)
    rows = store_rows(store)
    hashes = Counter(row["conversation_hash"] for row in rows)
    assert report["cached"] == 60 and report["done"] == report["conversations"] - 60
    assert len(hashes) == report["conversations"] and set(hashes.values()) == {1}
    assert sum(server.stats.answered.values()) == report["conversations"]
    assert set(server.stats.answered.values()) == {1}, "a finished request was sent again"


def test_data_prep_generates_intents_then_flips_in_one_run_and_never_writes_the_key(
        tiny_assets, tmp_path, monkeypatch, capfd):
    secret = "sk-secret-do-not-write-42"
    monkeypatch.setenv("TEST_LLM_KEY", secret)
    store, output = tmp_path / "store" / "intents.jsonl", tmp_path / "data"
    with OpenAIServer(api_key=secret) as server:
        server.rules.append((lambda body: "short story" in body["messages"][-1]["content"].lower(), "400"))
        run_data_prep(tiny_assets, output, *intents_overrides(store, server.base_url,
                                                              "intents.openai.api_key_env=TEST_LLM_KEY"))
    intents = saved_intents(output)
    assert intents == read_intents(store, "v1", "test-model")
    assert all(i.startswith(INTENT_PREFIX) for i in intents.values())
    funnel = json.loads((output / "funnel.json").read_text())
    missing = next(s for s in funnel["steps"] if s["step"] == "missing_intent")["removed"]
    report = json.loads((store.parent / "intents.report.json").read_text())
    assert missing == report["failed"]["http_400"] > 0
    captured = capfd.readouterr()
    written = [p.read_bytes() for p in [*output.rglob("*"), *store.parent.rglob("*")] if p.is_file()]
    assert "TEST_LLM_KEY" in (output / "config.yaml").read_text()
    assert not any(secret.encode() in data for data in written)
    assert secret not in captured.out + captured.err


# ---- the local transformers backend ----------------------------------------------------------------

@pytest.mark.slow
def test_hf_backend_on_the_tiny_model_end_to_end(tiny_assets, tmp_path):
    """Batched greedy generation with the tiny random model (its intents are gibberish; the checks
    that judge meaning are relaxed), once through a chat template and once through plain text."""
    with_template = tmp_path / "model_with_template"
    shutil.copytree(tiny_assets / "model", with_template)
    config = json.loads((with_template / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n"
                               "{{ m['content'] }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n")
    (with_template / "tokenizer_config.json").write_text(json.dumps(config))
    store, output = tmp_path / "intents.jsonl", tmp_path / "data"
    relaxed = ["intents.backend=hf", "intents.checks.require_prefix=null", "intents.checks.reject_truncated=false",
               "intents.checks.max_words=1000", "intents.checks.max_chars=10000", "intents.generation.max_tokens=6",
               "intents.generation.output_retries=1", "intents.hf.batch_size=4", "data.limit=12",
               "intents.prompt.budget.conversation_tokens=100", "intents.prompt.budget.first_user_turn_tokens=60",
               f"intents.path={store}", "intents.progress=false"]
    for model in (with_template, tiny_assets / "model"):
        run_data_prep(tiny_assets, output, *relaxed, f"intents.hf.model={model}")
        report = json.loads((tmp_path / "intents.report.json").read_text())
        assert report["cached"] + report["done"] + report["failed_total"] == report["conversations"] > 5
        assert report["done"] > 0 and report["tokens"]["completion"] > 0
        generated = read_intents(store, "v1", str(model))
        assert saved_intents(output) == generated
    for model, start in ((with_template, "<|start_header_id|>system<|end_header_id|>\n"), (tiny_assets / "model", "System: ")):
        backend = HFBackend(compose_config("data_prep", ["experiment=tiny", "intents.backend=hf",
                                                         f"intents.hf.model={model}"]).intents)
        backend.load()
        assert backend.format_prompt([{"role": "system", "content": "S"}]).startswith(start)
    # a second run over the same store asks for nothing new
    run_data_prep(tiny_assets, output, *relaxed, f"intents.hf.model={tiny_assets / 'model'}")
    report = json.loads((tmp_path / "intents.report.json").read_text())
    assert report["cached"] == len(read_intents(store, "v1", str(tiny_assets / "model")))
