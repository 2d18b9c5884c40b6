"""`python -m evaluate.intrinsic` end to end: a simulation of the biased tiny user LM, all six
metrics with a tiny detector, the fixture items, and a judge behind a real local OpenAI-compatible
server whose rule the test applies again, independently, to the recorded conversations."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from evaluate import intrinsic_metrics as m
from evaluate.intrinsic import run as run_intrinsic
from evaluate.simulate import run as run_simulate
from evaluate.table import run as run_table
from evaluate.transcripts import read_transcripts
from tests.conftest import REPO, compose_config
from scripts.openai_server import OpenAIServer

FIXTURES = REPO / "tests" / "fixtures"


def judge_rule(prompt: str) -> str:
    """The test judge: role -> YES when the reply names the correct answer; intent -> YES when the
    reply repeats a word (4+ letters) of the question."""
    reply = prompt.split("<reply>\n")[1].split("\n</reply>")[0].lower()
    if "Correct answer:" in prompt:
        answer = re.search(r"Correct answer: (.*)\n", prompt).group(1).lower()
        return "YES" if answer in reply else "NO"
    question = re.search(r"this question: (.*)\n", prompt).group(1).lower()
    return "YES" if any(w in reply.split() for w in question.split() if len(w) >= 4) else "NO"


def expected_adherence(records, adhered_when: bool, failing: str | None) -> dict:
    verdicts = []
    for r in records:
        if r["ended_at"]:
            verdicts.append(True)
        elif len(r["turns"]) < 3 or (failing and failing in r["item"]["question"]):
            verdicts.append(None)
        else:
            reply, item = r["turns"][2]["content"].lower(), r["item"]
            if "choices" in item:
                said_yes = item["answer"].lower() in reply
            else:
                said_yes = any(w in reply.split() for w in item["question"].lower().split() if len(w) >= 4)
            verdicts.append(said_yes == adhered_when)
    return m.adherence(verdicts)


def detector_human_percent(detector_dir, texts) -> float:
    """100 x the mean P(human) of the detector, one text at a time (no padding, no batching)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(detector_dir)
    detector = AutoModelForSequenceClassification.from_pretrained(detector_dir).eval()
    human = detector.config.label2id["human"]
    with torch.no_grad():
        return 100 * sum(torch.softmax(detector(**tokenizer(text, return_tensors="pt")).logits[0], -1)[human].item()
                         for text in texts) / len(texts)


def test_intrinsic_metrics_end_to_end(biased_user_lm, tiny_data, tiny_prism, tiny_detector, tmp_path):
    import evaluate.simulate_config  # noqa: F401
    simulation = run_simulate(compose_config("simulate", [
        "experiment=tiny", f"user_model.name_or_path={biased_user_lm}", "assistant.kind=scripted",
        f"intents.path={tiny_data}", f"output_dir={tmp_path / 'simulation'}", "progress=false",
        "sampling.max_new_tokens=16", "guardrails.max_retries=1"]))
    with OpenAIServer(reply=lambda body: judge_rule(body["messages"][-1]["content"])) as server:
        server.rules.append((lambda body: "spider" in body["messages"][-1]["content"], "400"))
        path = run_intrinsic(compose_config("intrinsic", [
            f"simulation={simulation}", f"output_dir={tmp_path / 'results'}", f"termination.data_dir={tiny_prism}",
            "termination.max_seq_len=512", f"naturalness.detector={tiny_detector}", "naturalness.human_label=human",
            f"role_adherence.data.source={FIXTURES / 'commonsense_qa.jsonl'}",
            f"intent_adherence.data.source={FIXTURES / 'nq_open.jsonl'}", f"judge.client.base_url={server.base_url}",
            "judge.client.model=test-judge", "judge.client.backoff_base_s=0.01", "judge.client.max_retries=1"]))
        judged_requests = server.stats.requests
    result = json.loads(path.read_text())
    metrics = result["metrics"]
    assert set(metrics) == {"first_turn_diversity", "intent_decomposition", "dialogue_termination", "naturalness",
                            "role_adherence", "intent_adherence"}
    # Transcript metrics: the functions on the transcripts' turns.
    records = read_transcripts(simulation / "transcripts.jsonl")
    turns = [[t["content"] for t in r["turns"] if t["role"] == "user"] for r in records]
    first_turns = [t[0] for t in turns if t]
    assert metrics["first_turn_diversity"]["value"] == pytest.approx(
        m.first_turn_diversity(first_turns)["jaccard_diversity"])
    assert metrics["intent_decomposition"]["value"] == pytest.approx(m.intent_decomposition(
        [(r["intent"], t) for r, t in zip(records, turns)], "You are a user chatting with an assistant language model to"
    )["overlap"])
    assert metrics["naturalness"]["texts"] == len(first_turns)
    assert metrics["naturalness"]["value"] == pytest.approx(detector_human_percent(tiny_detector, first_turns), rel=1e-4)
    termination = metrics["dialogue_termination"]
    assert termination["positions"] > 0 and termination["real_ends"] > 0 and termination["value"] is not None
    # Judged metrics: the server's verdicts, recomputed here from the recorded conversations.
    run_dir = path.parent
    asked = 0
    for metric, adhered_when in (("role_adherence", False), ("intent_adherence", True)):
        exchanges = [json.loads(line) for line in open(run_dir / f"{metric}.jsonl")]
        assert len(exchanges) == 6
        expected = expected_adherence(exchanges, adhered_when, "spider" if metric == "intent_adherence" else None)
        assert {k: metrics[metric][k] for k in expected} == pytest.approx(expected)
        asked += sum(len(e["turns"]) == 3 for e in exchanges)
        assert all(e["turns"][1]["content"].startswith(("I'm not sure", "Before we get")) for e in exchanges
                   if len(e["turns"]) > 1)
    assert judged_requests == asked
    # The human reference: the same metrics on the real conversations of the same intents.
    human = json.loads((tmp_path / "results" / "human" / "intrinsic.json").read_text())["metrics"]
    assert set(human) == {"first_turn_diversity", "intent_decomposition", "naturalness"}
    assert human["first_turn_diversity"]["turns"] == len(records)

    # The paper's Table 2 layout, ours beside its numbers.
    md, table_csv, png = run_table(compose_config("table", [
        "tables=[intrinsic]", f"intrinsic.results_dir={tmp_path / 'results'}", f"output_dir={tmp_path / 'tables'}",
        f"+intrinsic.paper_rows.{simulation.name}=UserLM-8b"]))
    cells = {(r["row"], r["column"]): r for r in csv.DictReader(open(table_csv))}
    diversity = cells["UserLM-8b", "First-turn diversity (↑)"]
    assert float(diversity["ours"]) == metrics["first_turn_diversity"]["value"] and float(diversity["paper"]) == 94.55
    assert float(cells["Human", "Naturalness (↑)"]["ours"]) == human["naturalness"]["value"]
    assert cells["Human", "Role adherence (↑)"]["paper"] == "" and cells["Llama3-8b-Instruct", "Naturalness (↑)"]["paper"]
    assert "| UserLM-8b |" in md.read_text() and png.read_bytes()[:4] == b"\x89PNG"
