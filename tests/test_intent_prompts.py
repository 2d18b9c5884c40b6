"""benchmarks/intent_prompts.py: comparing two intent stores (length, entities named, decomposition),
on a hand-computed case, on the prompts' own few-shot examples and on the 20 hand-written v1/v2
pairs of the embedded sample (the figures docs/intents.md reports)."""

from __future__ import annotations

import json

import pytest

from benchmarks.intent_prompts import compare, entities, main
from tests.conftest import REPO, compose_config
from scripts.openai_server import INTENT_PREFIX

P = INTENT_PREFIX + " "
USER_TURNS = {
    "c1": ["i am going to Kenya next month, what should i see"],
    "c2": ["reverse a string in go", "and in Python?"],
    "c3": ["write an email to my boss Anna about the Q3 report, 5 pages"],
}
VAGUE = {"c1": P + "get ideas for a trip abroad.",
         "c2": P + "learn a basic string operation in two programming languages.",
         "c3": P + "get a work email written about a report.",
         "only-here": P + "a conversation the other store and the selection lack."}
NAMED = {"c1": P + "get ideas for a trip to Kenya.",
         "c2": P + "learn how to reverse a string in Go and Python.",
         # Anna and Q3 count; Acme is not in the conversation, Report is sentence-initial, I a
         # stopword, 5 a bare number
         "c3": P + "get an email to Anna about the Q3 report for Acme. Report needed in 5 pages, I said.",
         "not-selected": P + "a conversation not among the selected ones."}


def test_hand_case_exact_figures():
    """By hand. Words: 17, 20, 19 (vague) and 18, 21, 29 (named), the 11-word opening included.
    Decomposition, content words of each user turn found in the intent: c1 {going, kenya, next,
    month, see}: vague 0/5, named 1/5 (kenya); c2 turn 1 {reverse, string, go}: vague 1/3
    (string), named 3/3; turn 2 {python}: 0/1, 1/1; c3 {write, email, boss, anna, q3, report, 5,
    pages}: vague 2/8 (email, report), named 6/8 (all but write, boss)."""
    result = compare({"vague": VAGUE, "named": NAMED}, USER_TURNS)
    assert result["conversations"] == 3
    assert result["left_out"] == {"vague": {"not_in_other_stores": 0, "not_among_conversations": 1},
                                  "named": {"not_in_other_stores": 0, "not_among_conversations": 1}}
    vague, named = result["stores"]["vague"], result["stores"]["named"]
    assert (vague["intents"], vague["user_turns"], named["user_turns"]) == (3, 4, 4)
    assert vague["mean_words"] == pytest.approx(56 / 3) and named["mean_words"] == pytest.approx(68 / 3)
    assert (vague["entity_share"], vague["entities_per_intent"], vague["entities"]) == (0.0, 0.0, {})
    assert named["entity_share"] == 100.0 and named["entities_per_intent"] == pytest.approx(5 / 3)
    assert named["entities"] == {"c1": ["Kenya"], "c2": ["Go", "Python"], "c3": ["Anna", "Q3"]}
    assert vague["decomposition"] == pytest.approx((0 + 100 / 3 + 0 + 25) / 4)
    assert named["decomposition"] == pytest.approx((20 + 100 + 100 + 75) / 4)


def test_a_store_missing_a_conversation_of_the_other_is_counted_and_no_overlap_is_an_error():
    result = compare({"a": VAGUE, "b": {"c1": NAMED["c1"]}}, USER_TURNS)
    assert result["conversations"] == 1
    assert result["left_out"]["a"] == {"not_in_other_stores": 2, "not_among_conversations": 1}
    with pytest.raises(ValueError, match="same data"):
        compare({"a": {"c1": VAGUE["c1"]}, "b": {"c2": NAMED["c2"]}}, USER_TURNS)


def test_v2s_examples_name_their_conversations_entities_v1s_none():
    """The prompts' own few-shot examples, measured the benchmark's way: v2's each keep what their
    conversation is about (Morocco, Python, Marie Curie); v1's keep none."""
    def named(version):
        examples = compose_config("data_prep", [f"intents/prompt={version}"]).intents.prompt.examples
        return [entities(e.intent, [t.content for t in e.conversation if t.role == "user"]) for e in examples]
    assert named("v1") == [[], [], []]
    assert named("v2") == [["Morocco"], ["Python"], ["Marie", "Curie"]]


def test_the_20_hand_written_pairs_of_the_sample(tmp_path):
    """The figures of docs/intents.md's table: v2's intents are longer, name more of what the
    conversation is about, and so share more words with the real user turns."""
    out = tmp_path / "comparison.json"
    data = REPO / "benchmarks" / "data"
    result = main([str(data / "intents_v1_sample20.jsonl"), str(data / "intents_v2_sample20.jsonl"),
                   "--labels", "v1", "v2", "--out", str(out), "experiment=tiny", "num_proc=1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    v1, v2 = result["stores"]["v1"], result["stores"]["v2"]
    assert result["conversations"] == v1["intents"] == v2["intents"] == 20
    figures = [(round(f["mean_words"], 2), f["entity_share"], round(f["entities_per_intent"], 2),
                round(f["decomposition"], 2)) for f in (v1, v2)]
    assert figures == [(21.9, 10.0, 0.1, 19.95), (22.85, 30.0, 0.35, 47.96)]
    assert v2["mean_words"] > v1["mean_words"] and v2["entity_share"] > v1["entity_share"]
