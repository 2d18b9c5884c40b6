"""evaluate.extrinsic.metrics: every metric of extrinsic.json, computed by hand on tiny transcripts,
lexically and with a real local judge server (scripts/openai_server.py) whose replies are scripted."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from evaluate.extrinsic.metrics import MetricsConfig, extrinsic_metrics, make_judge
from evaluate.extrinsic.tasks import Shard, Task
from scripts.openai_server import OpenAIServer

APPLES = Task("sharded-GSM8K/0", "math", (Shard(1, "How many apples does Tom have left?"),
                                        Shard(2, "Tom starts with 12 apples."), Shard(3, "He gives 5 apples to Ann.")),
              question="Tom starts with 12 apples and gives 5 to Ann. How many apples does he have left?", answer="7")
FLIP = Task("sharded-HumanEval/0", "code", (Shard(1, "Write a function that reverses a list."),
                                           Shard(2, "Call it flip_list.")),
            question="def flip_list(xs):", source="humaneval", func_name="flip_list")
TASKS = {t.task_id: t for t in (APPLES, FLIP)}


def record(task, run, user_turns, end_reason, correct):
    turns = []
    for text in user_turns:
        turns += [{"role": "user", "content": text, "shard_id": None}, {"role": "assistant", "content": "ok"}]
    return {"task_id": task.task_id, "kind": task.kind, "run": run, "user": "test", "intent": None, "turns": turns,
            "end_reason": end_reason, "correct": correct}


VERBATIM = record(APPLES, 0, [s.text for s in APPLES.shards], "task_solved", True)
PARAPHRASE = record(APPLES, 1, ["Tom has apples and I need to know how many remain", "He had twelve at first."],
                    "user_ended", False)
FIRST_SHARD_ONLY = record(APPLES, 2, ["How many apples does Tom have left?"], "max_turns", False)
CODE_EXTRA = record(FLIP, 0, [" write a FUNCTION  that reverses a list. ", "Call it flip_list and add type hints."],
                    "task_solved", True)
RECORDS = [VERBATIM, PARAPHRASE, FIRST_SHARD_ONLY, CODE_EXTRA]


def test_every_metric_by_hand_lexical():
    result = extrinsic_metrics(RECORDS, TASKS, None)
    math, code, overall = result["by_kind"]["math"], result["by_kind"]["code"], result["overall"]
    # Coverage (threshold 0.5). PARAPHRASE: shard 1's content words {many, apples, tom, left}: 3 of 4 in
    # the user's words; shard 2's {tom, starts, 12, apples}: 2 of 4 (= 0.5: conveyed); shard 3's
    # {gives, 5, apples, ann}: 1 of 4 -> 2/3. FIRST_SHARD_ONLY: shard 1 verbatim; shard 2: {tom, apples}
    # of 4, conveyed; shard 3: {apples}, not -> 2/3. CODE_EXTRA: shard 1 verbatim once case and spaces
    # are folded; shard 2 {call, flip_list}: both -> 100.
    assert math["intent_coverage"] == pytest.approx((100 + 200 / 3 + 200 / 3) / 3)
    assert code["intent_coverage"] == 100.0
    assert overall["intent_coverage"] == pytest.approx((100 + 200 / 3 + 200 / 3 + 100) / 4)
    # Task score: 1 of 3 math, 1 of 1 code, 2 of 4.
    assert (math["task_score"], code["task_score"], overall["task_score"]) == pytest.approx((100 / 3, 100.0, 50.0))
    # Turns: math runs have 3, 2, 1 user turns: mean 2, population variance 2/3, p10 1.2, p90 2.8
    # (linear interpolation over [1, 2, 3]); code: one run of 2. Overall: the two tasks' means.
    assert math["turns"] == pytest.approx({"mean": 2.0, "variance": 2 / 3, "range_p10": 1.2, "range_p90": 2.8})
    assert code["turns"] == {"mean": 2.0, "variance": 0.0, "range_p10": 2.0, "range_p90": 2.0}
    assert overall["turns"] == pytest.approx({"mean": 2.0, "variance": 1 / 3, "range_p10": 1.6, "range_p90": 2.4})
    # Unigram difference. PARAPHRASE's 16 distinct words, 6 of them in the shards (tom apples to how many
    # he) -> 10/16; CODE_EXTRA's 13, not in the shards: and add type hints -> 4/13; verbatim turns: 0.
    assert math["unigram_difference"] == pytest.approx((0 + 10 / 16 + 0) / 3)
    assert code["unigram_difference"] == pytest.approx(4 / 13)
    assert overall["unigram_difference"] == pytest.approx((10 / 16 + 4 / 13) / 4)
    assert overall["without_user_words"] == 0
    # LiC: math scores [100, 0, 0]: P 33.3, A90 = p90 = 80, U90_10 = 80 - 0; code [100]: 100, 100, 0.
    assert math["lic"] == pytest.approx({"performance": 100 / 3, "aptitude_a90": 80.0, "unreliability_u90_10": 80.0})
    assert code["lic"] == {"performance": 100.0, "aptitude_a90": 100.0, "unreliability_u90_10": 0.0}
    assert overall["lic"] == pytest.approx({"performance": (100 / 3 + 100) / 2, "aptitude_a90": 90.0,
                                            "unreliability_u90_10": 40.0})
    assert [overall["added_requirements"], math["added_requirements"]] == [None, None]   # no judge
    assert (math["conversations"], math["tasks"], code["conversations"], overall["conversations"],
            overall["tasks"]) == (3, 1, 1, 4, 2)
    assert result["end_reasons"] == {"max_turns": 1, "task_solved": 2, "user_ended": 1}
    assert math["end_reasons"] == {"max_turns": 1, "task_solved": 1, "user_ended": 1}
    assert result["coverage"] == {"method": "lexical", "lexical_threshold": 0.5} and result["judge"] is None


def test_lexical_threshold_is_configurable():
    # At 0.6, PARAPHRASE keeps only shard 1 (3/4) and FIRST_SHARD_ONLY only its verbatim shard 1.
    result = extrinsic_metrics([PARAPHRASE, FIRST_SHARD_ONLY], TASKS, None, MetricsConfig(lexical_threshold=0.6))
    assert result["overall"]["intent_coverage"] == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="lexical_threshold"):
        extrinsic_metrics(RECORDS, TASKS, None, MetricsConfig(lexical_threshold=0.0))
    # As the runner's schema holds it: a structured config section, overridden from the command line.
    section = OmegaConf.merge(OmegaConf.structured(MetricsConfig), OmegaConf.from_dotlist(["lexical_threshold=0.6"]))
    assert make_judge(section) is None
    assert extrinsic_metrics([PARAPHRASE, FIRST_SHARD_ONLY], TASKS, None, section) == result


def test_verbatim_user_covers_everything_with_no_word_of_its_own():
    verbatim = [record(APPLES, run, [s.text for s in APPLES.shards][:2 + run], "shards_exhausted", False)
                for run in range(2)] + [record(FLIP, 0, [s.text for s in FLIP.shards], "shards_exhausted", True)]
    overall = extrinsic_metrics(verbatim, TASKS, None)["overall"]
    # run 0 gave two of three shards: coverage 2/3 there; the full ones 100.
    assert overall["intent_coverage"] == pytest.approx((200 / 3 + 100 + 100) / 3)
    assert overall["unigram_difference"] == 0.0
    full = [record(t, 0, [s.text for s in t.shards], "shards_exhausted", True) for t in (APPLES, FLIP)]
    result = extrinsic_metrics(full, TASKS, None)
    assert result["overall"]["intent_coverage"] == 100.0 and result["overall"]["unigram_difference"] == 0.0


def judge_reply(body: dict) -> str:
    question = body["messages"][-1]["content"]
    if question.startswith("A user talked with an AI assistant to get the task below done"):   # added requirements
        return "YES" if "type hints" in question else "NO"
    if "twelve" in question:          # PARAPHRASE: conveyed, except one reply that is neither YES nor NO
        return "Maybe, it depends." if "<piece>\nTom starts with 12 apples.\n</piece>" in question else "YES"
    return "YES" if "flip_list" in question else "NO"


def judged_config(server) -> MetricsConfig:
    cfg = MetricsConfig()
    cfg.judge.enabled, cfg.judge.client.base_url, cfg.judge.client.model = True, server.base_url, "judge-model"
    cfg.judge.client.max_retries, cfg.judge.client.backoff_base_s = 0, 0.0
    return cfg


def test_judge_path_with_a_malformed_reply_falling_back(caplog):
    with OpenAIServer(reply=judge_reply) as server:
        cfg = judged_config(server)
        result = extrinsic_metrics(RECORDS, TASKS, make_judge(cfg), cfg)
        # Asked: PARAPHRASE's 3 shards, FIRST_SHARD_ONLY's shards 2 and 3, CODE_EXTRA's shard 2 (the rest
        # verbatim), and added requirements for PARAPHRASE and CODE_EXTRA (the all-verbatim users added nothing).
        assert server.stats.replies == 8
    math, code, overall = result["by_kind"]["math"], result["by_kind"]["code"], result["overall"]
    # PARAPHRASE: YES, malformed -> lexical (2 of 4 content words: conveyed), YES -> 100 (lexically 2/3).
    # FIRST_SHARD_ONLY: verbatim shard 1, NO, NO -> 1/3. CODE_EXTRA: verbatim, YES -> 100.
    assert math["intent_coverage"] == pytest.approx((100 + 100 + 100 / 3) / 3)
    assert overall["intent_coverage"] == pytest.approx((300 + 100 / 3) / 4)
    assert (math["added_requirements"], code["added_requirements"], overall["added_requirements"]) == (0.0, 100.0, 25.0)
    assert result["coverage"]["method"] == "judge"
    assert result["judge"] == {"model": "judge-model",
                               "coverage": {"malformed": 1, "no": 2, "verbatim": 5, "yes": 3},
                               "added_requirements": {"no": 1, "verbatim": 2, "yes": 1}}
    assert overall["task_score"] == 50.0   # the judge changes no other metric
    assert "{'malformed': 1} of 8 answers unusable" in caplog.text


def test_a_failed_judge_request_is_counted_and_unjudged():
    with OpenAIServer(reply=judge_reply) as server:
        server.rules.append((lambda body: "type hints" in str(body) and "task below" in str(body), "400"))
        cfg = judged_config(server)
        result = extrinsic_metrics(RECORDS, TASKS, make_judge(cfg), cfg)
    assert result["by_kind"]["code"]["added_requirements"] is None          # its one conversation unjudged
    assert result["overall"]["added_requirements"] == 0.0                   # 0 of the 3 judged
    assert result["judge"]["added_requirements"] == {"failed": 1, "no": 1, "verbatim": 2}
    assert result["by_kind"]["code"]["intent_coverage"] == 100.0            # its coverage question still answered


def test_bad_records_are_errors_naming_the_record():
    with pytest.raises(ValueError, match=r"record 1: missing field 'correct'"):
        extrinsic_metrics([VERBATIM, {k: v for k, v in PARAPHRASE.items() if k != "correct"}], TASKS, None)
    with pytest.raises(ValueError, match=r"record 0 \(task 'nope/1', run 0\): field 'task_id'"):
        extrinsic_metrics([{**VERBATIM, "task_id": "nope/1"}], TASKS, None)
    with pytest.raises(ValueError, match=r"field 'kind' is 'code', the task's is 'math'"):
        extrinsic_metrics([{**VERBATIM, "kind": "code"}], TASKS, None)
    with pytest.raises(ValueError, match=r"task 'sharded-GSM8K/0' has run 0 more than once"):
        extrinsic_metrics([VERBATIM, VERBATIM], TASKS, None)


def test_a_kind_without_conversations_has_null_metrics():
    result = extrinsic_metrics([VERBATIM], TASKS, None)
    code = result["by_kind"]["code"]
    assert (code["conversations"], code["tasks"], code["task_score"], code["intent_coverage"],
            code["turns"]["variance"], code["lic"]["performance"], code["end_reasons"]) == (0, 0, None, None, None, None, {})
