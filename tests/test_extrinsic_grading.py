"""evaluate.extrinsic.grading: the rule on tricky replies, the Grader with real code runs, and the llm
extractor against the real local OpenAI-compatible server (scripts/openai_server.py)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from core.llm_client import ClientConfig
from evaluate.extrinsic.code_exec import CodeExecConfig
from evaluate.extrinsic.grading import (Grade, Grader, GradingConfig, extract_code, grade_math, last_number,
                                        normalize_number, parse_judge)
from evaluate.extrinsic.tasks import TasksConfig, load_tasks
from scripts.openai_server import OpenAIServer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "lic" / "sharded_instructions.json"
COUNT_VOWELS = "def count_vowels(text):\n    return sum(c in 'aeiou' for c in text.lower())\n"


@pytest.fixture(scope="module")
def tasks():
    cfg = TasksConfig(source=str(FIXTURE), revision=None, kinds=["math", "code"], code_sources=["humaneval"],
                      limit=None, per_kind=None, seed=0)
    return {t.task_id: t for t in load_tasks(cfg).tasks}


def code_cfg() -> CodeExecConfig:
    return CodeExecConfig(test_timeout_s=0.5, attempt_timeout_s=3.0, memory_mb=256, workers=2, command_prefix=[])


@pytest.mark.parametrize("reply, number, normalized", [
    ("So the school has $1,000. left", "$1,000.", "1000"),
    ("The answer is 216. Let me know if you need anything else!", "216.", "216"),
    ("She reads 75 pages, then 50, so 125 a week and 375 in total", "375", "375"),
    ("It ends at 4 - 15 = -11 degrees.", "-11", "-11"),
    ("That makes -11.", "-11.", "-11"),
    ("It travels 3.5 km", "3.5", "3.5"),
    ("Total: 1,234,567 grains", "1,234,567", "1234567"),
    ("7", "7", "7"),                       # a single digit: the second alternative
    ("I need more details first.", None, None),
])
def test_the_gsm8k_rule_takes_the_last_number_and_normalises_it(reply, number, normalized):
    assert last_number(reply) == number
    if number is not None:
        assert normalize_number(number) == normalized


def test_math_is_an_exact_match_after_normalisation(tasks):
    pencils = tasks["sharded-GSM8K/fixture-1"]           # gold "3,400"
    assert grade_math("3400", pencils) == Grade(True, "3400", True, None)
    assert grade_math("$3,400.", pencils) == Grade(True, "$3,400.", True, None)
    assert grade_math("3400.00", pencils) == Grade(True, "3400.00", False, "wrong_answer")   # as in LiC
    assert grade_math(None, pencils) == Grade(False, None, False, "no_attempt")
    assert tasks["sharded-GSM8K/fixture-2"].answer == "-11" and grade_math("-11.", tasks["sharded-GSM8K/fixture-2"]).correct


def test_code_extraction_fenced_blocks_and_bare_defs():
    two_blocks = ("Here is a first try:\n```python\ndef f(x):\n    return 1\n```\nBetter:\n```python\n"
                  "def f(x):\n    return 2\n```\nDone.")
    assert extract_code(two_blocks) == "def f(x):\n    return 2\n"
    assert extract_code("```py\nimport math\n\ndef g():\n    return math.pi\n```") == \
        "import math\n\ndef g():\n    return math.pi\n"
    assert extract_code("```\ndef h():\n    pass\n```") == "def h():\n    pass\n"
    bare = ("You could write:\n\ndef f(x):\n    return x\n\nor rather\n\ndef g(x):\n    if x:\n        return 1\n\n"
            "    return 0\nThis returns 1 for truthy x.")
    assert extract_code(bare) == "def g(x):\n    if x:\n        return 1\n\n    return 0\n"
    assert extract_code("Call it like `def f(x):` and so on.") is None     # not at the start of a line
    assert extract_code("Use a loop over the characters.") is None


def test_the_rule_grader_grades_math_and_runs_code(tasks):
    muffins, vowels = tasks["sharded-GSM8K/fixture-0"], tasks["sharded-HumanEval/fixture-1"]
    items = [
        (muffins, "72 muffins at $3 each make $216."),
        (muffins, "They made 72 * 3 = 206 dollars."),
        (muffins, "Could you tell me the price of a muffin?"),
        (vowels, f"Here you go:\n```python\n{COUNT_VOWELS}```"),
        (vowels, "```python\ndef count_vowels(text):\n    return sum(c in 'aeiou' for c in text)\n```"),
        (vowels, "```python\nprint('no function here')\n```"),
        (vowels, "I would loop over the characters and count the vowels."),
        (vowels, "def count_vowels(text):\n    while True:\n        pass\n"),
    ]
    grader = Grader(GradingConfig(extractor="rule", code=code_cfg()))
    try:
        grades = grader.grade_many(items)
    finally:
        grader.close()
    assert grades == [
        Grade(True, "$216.", True, None),
        Grade(True, "206", False, "wrong_answer"),
        Grade(False, None, False, "no_attempt"),
        Grade(True, COUNT_VOWELS, True, "tests 3/3"),
        Grade(True, "def count_vowels(text):\n    return sum(c in 'aeiou' for c in text)\n", False, "tests 2/3"),
        Grade(False, None, False, "no_def"),
        Grade(False, None, False, "no_attempt"),
        Grade(True, "def count_vowels(text):\n    while True:\n        pass\n", False, "timeout (tests 0/3)"),
    ]
    assert grades[0].to_dict() == {"attempt": True, "answer": "$216.", "correct": True, "detail": None}


def test_code_attempts_run_concurrently(tasks):
    """Two attempts that outlive their 3 s deadline, on 2 workers: killed together, not one after the other."""
    stubborn = "def count_vowels(text):\n    while True:\n        try:\n            while True:\n                pass\n" \
               "        except BaseException:\n            pass\n"
    cfg = code_cfg()
    cfg.attempt_timeout_s = 3.0
    grader = Grader(GradingConfig(extractor="rule", code=cfg))
    started = time.monotonic()
    try:
        grades = grader.grade_many([(tasks["sharded-HumanEval/fixture-1"], stubborn)] * 2)
    finally:
        grader.close()
    assert [g.detail for g in grades] == ["timeout (tests 0/3)"] * 2
    assert time.monotonic() - started < 2 * 3.0 - 0.5   # one after the other: 6 s and more


def test_a_composed_grading_config_needs_a_judge_only_for_llm():
    schema = OmegaConf.structured(GradingConfig)
    code = {"test_timeout_s": 1, "attempt_timeout_s": 2, "memory_mb": 256, "workers": 1}
    rule = OmegaConf.merge(schema, {"extractor": "rule", "code": code})   # judge.model stays ???
    Grader(rule).close()
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {"extractor": "regex"})
    with pytest.raises(MissingMandatoryValue):
        Grader(OmegaConf.merge(schema, {"extractor": "llm", "code": code}))


def test_parse_judge():
    assert parse_judge('```json\n{"label": "answer_attempt", "answer": "3,400"}\n```') == ("answer_attempt", "3,400")
    assert parse_judge('{"label": "hedge", "answer": null}') == ("hedge", None)
    assert parse_judge('{"label": "guess"}') is None
    assert parse_judge("answer_attempt") is None


# ---- the llm extractor against a real server ---------------------------------------------------------
JUDGED = {   # assistant reply -> the judge's scripted reply
    "So 3,400 pencils are left.": '{"label": "answer_attempt", "answer": "3,400"}',
    "Is that 45 boxes in total, or per class?": '{"label": "clarification", "answer": null}',
    "It comes to 3,400 pencils.": '{"label": "answer_attempt", "answer": "3400"}',   # not written so
    "Maybe 3,400, maybe 3,500.": "I think this is a hedge.",                         # not the JSON asked for
    "About three thousand four hundred.": '{"label": "answer_attempt", "answer": "three thousand four hundred"}',
    "After the gift, 3,300 remain.": '```json\n{"label": "answer_attempt", "answer": "3,300"}\n```',
    "Please FAULT this one: 3,400": '{"label": "answer_attempt", "answer": "3,400"}',
    f"```python\n{COUNT_VOWELS}```": '{"label": "answer_attempt", "answer": null}',
    "I will write count_vowels with a loop.": '{"label": "answer_attempt", "answer": null}',
}


def judge_reply(body: dict) -> str:
    prompt = body["messages"][-1]["content"]
    reply = re.search(r"<<<\n(.*)\n>>>$", prompt, re.DOTALL).group(1)
    return JUDGED[reply]


def test_the_llm_extractor_is_checked_by_the_rule(tasks):
    pencils, vowels = tasks["sharded-GSM8K/fixture-1"], tasks["sharded-HumanEval/fixture-1"]
    replies = list(JUDGED)
    items = [(pencils, r) for r in replies[:7]] + [(vowels, r) for r in replies[7:]]
    with OpenAIServer(reply=judge_reply, latency_s=0.05) as server:
        server.rules.append((lambda body: "FAULT" in json.dumps(body), "400"))   # fails for good
        judge = ClientConfig(base_url=server.base_url, model="judge", concurrency=4, max_retries=0)
        grader = Grader(GradingConfig(extractor="llm", judge=judge, code=code_cfg()))
        try:
            grades = grader.grade_many(items)
        finally:
            grader.close()
        assert server.stats.requests == len(items) and server.stats.max_in_flight > 1   # concurrent
    assert grades == [
        Grade(True, "3,400", True, None),
        Grade(False, None, False, "clarification"),
        Grade(False, None, False, "answer_not_in_reply"),    # "3400" does not occur in the reply
        Grade(False, None, False, "judge_unparsable"),
        Grade(False, None, False, "answer_not_a_number"),
        Grade(True, "3,300", False, "wrong_answer"),
        Grade(False, None, False, "judge_failed:http_400"),
        Grade(True, COUNT_VOWELS, True, "tests 3/3"),
        Grade(False, None, False, "no_code_in_reply"),
    ]


def test_the_judge_sees_the_reply_at_temperature_zero(tasks):
    seen = []

    def record(body):
        seen.append(body)
        return '{"label": "answer_attempt", "answer": "216"}'
    with OpenAIServer(reply=record) as server:
        judge = ClientConfig(base_url=server.base_url, model="judge-model", max_retries=0)
        grader = Grader(GradingConfig(extractor="llm", judge=judge, code=code_cfg()))
        try:
            assert grader.grade_many([(tasks["sharded-GSM8K/fixture-0"], "It made $216.")]) == \
                [Grade(True, "216", True, None)]
        finally:
            grader.close()
    (body,) = seen
    assert (body["model"], body["temperature"], len(body["messages"])) == ("judge-model", 0.0, 1)
    assert body["messages"][0]["content"].endswith("<<<\nIt made $216.\n>>>")
    assert "a math word problem" in body["messages"][0]["content"]
