"""The six intrinsic metrics on hand-made inputs whose answers are worked out by hand here, and the
model-driven parts (termination decisions, the detector) against an independent computation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from evaluate import intrinsic_metrics as m
from evaluate.judges import load_items, parse_verdict
from evaluate.protocols import make_protocol
from tests.conftest import REPO, build_tiny_detector

FIXTURES = REPO / "tests" / "fixtures"
PREFIX = "You are a user chatting with an assistant language model to"


def test_first_turn_diversity_by_hand():
    result = m.first_turn_diversity(["a b", "B c!", "c"])
    # unigrams: {a,b} {b,c} {c}: 3 distinct of 5 -> 60; Jaccard: 1/3, 0, 1/2 -> mean 5/18
    assert result["distinct_1"] == pytest.approx(60.0)
    assert result["jaccard_diversity"] == pytest.approx(100 * 13 / 18)
    assert result["pairs"] == 3
    assert m.first_turn_diversity(["same words", "Same words."])["jaccard_diversity"] == pytest.approx(0.0)
    assert m.first_turn_diversity(["?", "!"])["jaccard_diversity"] == pytest.approx(0.0)   # no words: identical


def test_intent_decomposition_by_hand():
    intent = f"{PREFIX} learn how to cook falafel at home."        # content words: learn cook falafel home
    turns = ["How do I cook falafel?",                              # {cook, falafel}: 2 of 2 -> 100
             "Thanks, that helps a lot",                            # {thanks, helps, lot}: 0 of 3 -> 0
             "the",                                                 # no content word -> 0
             "Can I bake it at home, or cook it?"]                  # {bake, home, cook}: 2 of 3 -> 66.67
    result = m.intent_decomposition([(intent, turns)], PREFIX)
    assert result["user_turns"] == 4
    assert result["overlap"] == pytest.approx((100 + 0 + 0 + 200 / 3) / 4)
    # The fixed opening is not the intent's content: "user", "assistant" and "model" do not count.
    assert m.intent_decomposition([(intent, ["user assistant model"])], PREFIX)["overlap"] == 0.0


def test_dialogue_termination_by_hand():
    result = m.dialogue_termination([True, True, False, False, True], [True, False, True, False, False])
    # TP 1, predicted 3, real 2: precision 1/3, recall 1/2, F1 = 2/5
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx((100 / 3, 50.0, 40.0))
    assert result["true_positives"] == 1 and result["positions"] == 5
    assert m.dialogue_termination([False, False], [True, False])["f1"] == 0.0


def test_termination_decisions_match_a_prompt_by_prompt_computation(biased_user_lm):
    """Teacher-forced in one pass per conversation vs one prompt per position (prompt ids + "\\n")."""
    tokenizer = AutoTokenizer.from_pretrained(biased_user_lm)
    model = AutoModelForCausalLM.from_pretrained(biased_user_lm).eval()
    protocol = make_protocol("userlm", tokenizer, end_token="token", pad_token="<|reserved_special_token_0|>")
    u, a = "user", "assistant"
    conversations = [
        {"intent": f"{PREFIX} plan a trip.", "ended": True,
         "turns": [{"role": u, "content": "hi, plan my trip"}, {"role": a, "content": "Where to?"},
                   {"role": u, "content": "to Lisbon please"}, {"role": a, "content": "Here is a plan."}]},
        {"intent": None, "ended": False,
         "turns": [{"role": u, "content": "what is rust"}, {"role": a, "content": "A language."},
                   {"role": u, "content": "show me code"}, {"role": a, "content": "fn main() {}"},
                   {"role": u, "content": "thanks"}]},
    ]
    decisions = m.termination_decisions(model, protocol, conversations, max_seq_len=512, max_tokens_per_batch=4096,
                                        max_batch_size=8)
    assert sorted(decisions["positions"]) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    end_id = tokenizer.convert_tokens_to_ids("<|endconversation|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for (number, turn), predicted, real, probability in zip(decisions["positions"], decisions["predicted_end"],
                                                            decisions["real_end"], decisions["end_probability"]):
        row = conversations[number]
        prompt = protocol.build_prompt(row["intent"], row["turns"][:2 * turn]) + newline
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], dim=-1)
        assert predicted == (int(probs.argmax()) == end_id)
        assert probability == pytest.approx(float(probs[end_id]), abs=1e-5)
        assert real == (number == 0 and turn == 2)
    assert sum(decisions["predicted_end"]) >= 1            # the biased model does end


def test_naturalness_is_the_detector_mean_human_probability(tiny_assets, tiny_detector, tmp_path):
    texts = ["hello there, can you help me", "Here is a detailed, structured answer.", "ok"]
    flat = build_tiny_detector(tiny_assets, tmp_path / "flat", zero_head=True)
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(flat), AutoTokenizer.from_pretrained(flat)
    assert m.naturalness(texts, model, tokenizer, "human", 2, 64)["human_probability"] == pytest.approx(50.0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_detector).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_detector)
    expected = []
    for text in texts:                                     # one text at a time, no padding
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
        expected.append(float(torch.softmax(logits, dim=-1)[1]))
    result = m.naturalness(texts, model, tokenizer, "human", 2, 64)
    assert result["human_probability"] == pytest.approx(100 * sum(expected) / 3, abs=1e-4)
    with pytest.raises(ValueError, match="labels are"):
        m.naturalness(texts, model, tokenizer, "Real", 2, 64)


def test_adherence_and_verdicts_by_hand():
    assert m.adherence([True, False, None, True]) == {"conversations": 4, "judged": 3, "unjudged": 1,
                                                      "adherence": pytest.approx(200 / 3)}
    assert [parse_verdict(t) for t in ["YES", "no.", " Yes, because", "Maybe", "NOPE"]] == [True, False, True, None, None]


def test_item_loaders_read_the_fixture_schemas(tmp_path):
    questions = load_items("commonsense_qa", str(FIXTURES / "commonsense_qa.jsonl"), "validation", None, 4)
    assert len(questions) == 4 and questions[1]["answer"] == "scissors"
    assert questions[0]["choices"].startswith("A. cupboard; B. garden")
    answers = load_items("nq_open", str(FIXTURES / "nq_open.jsonl"), "validation", None, None)
    assert len(answers) == 6 and answers[1] == {"id": "1", "question": "what is the capital city of australia",
                                                "answer": "Canberra"}
    broken = tmp_path / "broken.jsonl"
    rows = [json.loads(line) for line in open(FIXTURES / "commonsense_qa.jsonl")][:2]
    rows[1]["answerKey"] = ""
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="row 1: missing field 'answerKey'"):
        load_items("commonsense_qa", str(broken), "validation", None, None)
