"""The four generation guardrails change what real (tiny) models generate, and are counted.

Each effect is shown by sampling twice with the same seed, guardrail off and on: with the same seed
and untouched logits the two runs would be identical, so every difference is the guardrail's doing.
The random tiny model stands in for a user LM where any model will do (first words, length); the
biased one (tests/conftest.py: it ends at once, repeats itself, copies an intent) where the habit
must be frequent.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from evaluate.guardrails import FirstWordBan, LengthRule, first_word, guardrail_report, turn_violations
from evaluate.simulator import GuardrailSettings, SamplingSettings, TurnRequest, UserSimulator
from tests.conftest import BIASED_TURN

OFF = dict(first_word=False, end_conversation=False, length=False, repetition=False)
INTENT = "You are a user chatting with an assistant language model to learn how to cook falafel at home."
OTHER_INTENT = "You are a user chatting with an assistant language model to get an email written for a colleague."


def sample(model_dir, requests, seed=0, max_new_tokens=12, **guardrails):
    simulator = UserSimulator.from_pretrained(str(model_dir), SamplingSettings(max_new_tokens=max_new_tokens),
                                              GuardrailSettings(**{**OFF, **guardrails}), batch_size=64)
    torch.manual_seed(seed)
    return simulator.generate(requests)


def first_words(turns):
    return [first_word(t.text) for t in turns if t.text is not None]


# ---- 1. first word -------------------------------------------------------------------------------
def test_first_word_state_follows_the_open_word(tiny_tokenizer):
    ban = FirstWordBan(tiny_tokenizer, ["Here", "I"])
    assert ban.state("") == "" and ban.state("\n") == ""      # before the first word
    assert ban.state("\nHe") == "He"                           # a prefix of "Here": still bannable
    assert ban.state("\nHere") == "Here"                       # complete only once something follows
    assert ban.state("\nHere is") is None and ban.state("\nHereford") is None
    assert ban.state("\nhe") is None                           # case-sensitive: "here" is allowed
    assert ban.state("\n\"I") is None                          # a non-letter opening: nothing to ban
    # The masks stop exactly the completions of a banned word, whatever the tokenization.
    vocab = {tiny_tokenizer.decode([i]): i for i in range(len(tiny_tokenizer))}
    for text, state, banned in [(" ", "Here", True), (",", "I", True), ("<|eot_id|>", "I", True),
                                ("'", "I", True), ("n", "I", False), (" ", "He", False), ("re", "He", False)]:
        if text in vocab:
            assert bool(ban.masks[state][vocab[text]]) is banned, (text, state)


def test_first_word_ban_never_lets_a_banned_word_open_a_turn(tiny_assets, tiny_tokenizer):
    """Random model: ban the five most frequent first words of an unguarded run; with the same seed
    the guarded run never opens with them, and the interventions are counted."""
    requests = [TurnRequest(INTENT, [], allow_end=False)] * 96
    unguarded = sample(tiny_assets / "model", requests)
    ban = FirstWordBan(tiny_tokenizer, [])
    common = [w for w, _ in Counter(w for w in first_words(unguarded) if w).most_common(5)]
    assert sum(w in common for w in first_words(unguarded)) >= 5
    guarded = sample(tiny_assets / "model", requests, first_word=True, first_words=common)
    assert not any(w in common for w in first_words(guarded))
    report = guardrail_report([t.guardrails.to_dict() for t in guarded], GuardrailSettings(**OFF).enabled())
    assert report["first_word"]["turns_intervened"] >= 1
    assert report["first_word"]["mean_removed_mass"] > 0


def test_first_word_ban_on_a_habitual_opening(biased_user_lm, tiny_tokenizer):
    """The biased model opens nearly every non-ending turn with "learn"; banned, it never does."""
    requests = [TurnRequest(INTENT, [], allow_end=False)] * 32
    ban_word, ban = BIASED_TURN.split()[0], FirstWordBan(tiny_tokenizer, [])
    unguarded = sample(biased_user_lm, requests, end_conversation=True)
    assert first_words(unguarded).count(ban_word) >= 24
    guarded = sample(biased_user_lm, requests, end_conversation=True, first_word=True, first_words=[ban_word])
    assert ban_word not in first_words(guarded)
    assert sum(t.guardrails.intervened.get("first_word", False) for t in guarded) >= 24


# ---- 2. no early end -----------------------------------------------------------------------------
def test_end_token_never_before_it_is_allowed(biased_user_lm):
    history = [{"role": "user", "content": "hello there friend"}, {"role": "assistant", "content": "Hi!"}]
    forbidden = [TurnRequest(INTENT, [], allow_end=False), TurnRequest(INTENT, history, allow_end=False)] * 24
    unguarded = sample(biased_user_lm, forbidden)
    assert sum(t.ended for t in unguarded) >= 12            # the habit: ending at once
    guarded = sample(biased_user_lm, forbidden, end_conversation=True)
    assert not any(t.ended for t in guarded)
    assert all("<|endconversation|>" not in t.text for t in guarded)
    assert sum(t.guardrails.intervened["end_conversation"] for t in guarded) >= 12
    allowed = sample(biased_user_lm, [TurnRequest(INTENT, history, allow_end=True)] * 24, end_conversation=True)
    assert sum(t.ended for t in allowed) >= 6 and all(t.text is None for t in allowed if t.ended)


# ---- 3. length -----------------------------------------------------------------------------------
def test_length_guardrail_resamples_turns_outside_the_bounds(tiny_assets):
    requests = [TurnRequest(INTENT, [], allow_end=False)] * 48
    bounds = dict(min_words=3, max_words=5)
    unguarded = sample(tiny_assets / "model", requests, max_new_tokens=8, end_conversation=True)
    assert any(turn_violations(t.text, [], None, LengthRule(**bounds), None) for t in unguarded)
    guarded = sample(tiny_assets / "model", requests, max_new_tokens=8, end_conversation=True, length=True,
                     max_retries=8, **bounds)
    rejected = sum(t.guardrails.rejected.get("length", 0) for t in guarded)
    assert rejected >= 1
    for t in guarded:
        words = len(t.text.split())
        assert 3 <= words <= 5 or t.guardrails.failed == ["length"]
        assert t.guardrails.attempts == 1 + t.guardrails.rejected.get("length", 0) - bool(t.guardrails.failed)


# ---- 4. repetition -------------------------------------------------------------------------------
def test_repetition_guardrail_rejects_repeats_and_intent_copies(biased_user_lm):
    history = [{"role": "user", "content": BIASED_TURN.capitalize() + "!"}, {"role": "assistant", "content": "Ok."}]
    requests = [TurnRequest(OTHER_INTENT, history, allow_end=False), TurnRequest(INTENT, [], allow_end=False)] * 16
    unguarded = sample(biased_user_lm, requests, end_conversation=True)
    assert sum(t.text == BIASED_TURN for t in unguarded) >= 24   # repeats turn 1 / copies the intent
    guarded = sample(biased_user_lm, requests, end_conversation=True, repetition=True, max_retries=3)
    for t in guarded:
        assert t.text != BIASED_TURN or t.guardrails.failed == ["repetition"]
        assert t.guardrails.rejected.get("repetition", 0) >= 1
    failed = [t for t in guarded if t.guardrails.failed]
    assert all(t.guardrails.attempts == 4 for t in failed)          # the budget: 1 + max_retries
    report = guardrail_report([t.guardrails.to_dict() for t in guarded], GuardrailSettings().enabled())
    assert report["repetition"]["rate"] == 1.0
    assert report["repetition"]["failures"] == report["failed_turns"] == len(failed)


def test_turn_violations_by_hand():
    rule = LengthRule(min_words=3, max_words=5)
    assert turn_violations("two words", [], None, rule, None) == ["length"]
    assert turn_violations("one two three four five six", [], None, rule, None) == ["length"]
    assert turn_violations("one two three", [], None, rule, None) == []
    prefix = "You are a user chatting with an assistant language model to"
    assert turn_violations("Hello, THERE friend!", ["hello there friend"], None, None, prefix) == ["repetition"]
    assert turn_violations("please learn how to cook falafel at home now", [], INTENT, None, prefix) == ["repetition"]
    assert turn_violations("how to cook falafel", [], INTENT, None, prefix) == []       # part of it is fine
    assert turn_violations("a b", ["a b"], None, rule, prefix) == ["length", "repetition"]


def test_guardrail_report_by_hand():
    turns = [
        {"attempts": 1, "rejected": {}, "failed": [], "intervened": {"first_word": True}, "removed_mass": {"first_word": 0.5}},
        {"attempts": 3, "rejected": {"length": 2}, "failed": [], "intervened": {"length": True}, "removed_mass": {}},
        {"attempts": 2, "rejected": {"length": 1, "repetition": 2}, "failed": ["repetition"],
         "intervened": {"length": True, "repetition": True, "end_conversation": False}, "removed_mass": {"first_word": 0.3}},
        {"attempts": 1, "rejected": {}, "failed": [], "intervened": {}, "removed_mass": {}},
    ]
    report = guardrail_report(turns, GuardrailSettings().enabled())
    assert report["user_turns"] == 4 and report["samples"] == 7
    assert report["failed_turns"] == 1 and report["failure_rate"] == 0.25
    assert report["first_word"]["rate"] == 0.25 and report["first_word"]["mean_removed_mass"] == pytest.approx(0.2)
    assert report["length"]["rate"] == 0.5 and report["length"]["samples_rejected"] == 3
    assert report["repetition"]["turns_intervened"] == 1 and report["repetition"]["failures"] == 1
    assert report["end_conversation"]["turns_intervened"] == 0
