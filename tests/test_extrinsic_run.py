"""`python -m evaluate.extrinsic` end to end on the LiC fixture: a real local OpenAI-compatible assistant
whose answers are known, the three users, every end reason, resume to the same bytes, the presets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evaluate.config import result_name
from evaluate.extrinsic.run import run
from evaluate.transcripts import read_transcripts
from tests.conftest import compose_config
from scripts.openai_server import OpenAIServer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "lic" / "sharded_instructions.json"
KEY = "sk-test-extrinsic-4f1c9e0b7a2d"   # a fake key: it must reach no output file, nor the code run
FIRST_SHARDS = {t["shards"][0]["shard"]: t["task_id"] for t in json.loads(FIXTURE.read_text())}
MATH_PROMPT, CODE_PROMPT = "Solve it step by step.", "Write one Python function in a fenced block."
LOOP = "```python\ndef running_max(nums):\n    while True:\n        pass\n```"
READS_ENV = ("```python\nimport os\n\ndef count_vowels(text):\n    assert not any('KEY' in name for name in os.environ)\n"
             "    return sum(c in 'aeiou' for c in text.lower())\n```")
WRITES = ("```python\nimport os, tempfile\nDAYS = ['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday', "
          "'Sunday']\n\ndef add_days(day, n):\n    open('written.txt', 'w').write('x')\n"
          "    open(os.path.expanduser('~/written.txt'), 'w').write('x')\n    tempfile.mkstemp()\n"
          "    return DAYS[(DAYS.index(day) + n) % 7]\n```")


def known_answer(body: dict) -> str:
    """The assistant's reply: a fixed behaviour per task, by the conversation's first user turn."""
    messages = body["messages"]
    system, first = messages[0]["content"], messages[1]["content"]
    task = FIRST_SHARDS[first]
    assert system == (CODE_PROMPT if "HumanEval" in task else MATH_PROMPT)   # the kind's system prompt
    turn = sum(m["role"] == "user" for m in messages)
    return {
        "sharded-GSM8K/fixture-0": lambda: "24 + 48 = 72 muffins at $3: the bakery made $216.",     # right at once
        "sharded-GSM8K/fixture-1": lambda: "How many boxes does it order?" if turn == 1 else
                                           "45 x 12 x 8 = 4320, less 920: 3,400 pencils.",            # asks, then right
        "sharded-GSM8K/fixture-2": lambda: "It will be at 11 degrees.",                                # always wrong
        "sharded-GSM8K/fixture-3": lambda: "That is 125 pages a week." if turn < 4 else
                                           "In 3 weeks she reads 375 pages.",                          # wrong, then right
        "sharded-HumanEval/fixture-0": lambda: LOOP,                                                   # loops forever
        "sharded-HumanEval/fixture-1": lambda: READS_ENV,                                              # right iff no key
        "sharded-HumanEval/fixture-2": lambda: WRITES,                                                 # writes files
    }[task]()


def overrides(out: Path, *extra: str, turns: int = 4) -> list[str]:
    return ["experiment=tiny", f"tasks.source={FIXTURE}", "tasks.limit=null", f"output_dir={out}", "progress=false",
            f"conversation.max_user_turns={turns}",
            f"assistant.system_prompts.math='{MATH_PROMPT}'", f"assistant.system_prompts.code='{CODE_PROMPT}'",
            "grading.code.test_timeout_s=0.5", "grading.code.attempt_timeout_s=3",
            'assistant.scripted.replies=["Could you tell me more about what you need?","The answer is 216."]', *extra]


def served(base_url: str, prefix: str) -> list[str]:
    return [f"{prefix}.base_url={base_url}", f"{prefix}.model=test-model", f"{prefix}.api_key_env=OPENAI_API_KEY",
            f"{prefix}.backoff_base_s=0.01", f"{prefix}.backoff_max_s=0.05", f"{prefix}.max_retries=1"]


def every_file(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_known_answers_give_the_scores_they_imply(tmp_path, monkeypatch):
    """verbatim_shards against a real local assistant with known answers, rule grading, real code runs."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))   # where ~/written.txt would land without isolation
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    with OpenAIServer(reply=known_answer, api_key=KEY) as server:
        out = run(compose_config("extrinsic", overrides(tmp_path / "results", "user.kind=verbatim_shards",
                                                        "assistant.kind=openai",
                                                        *served(server.base_url, "assistant.openai"))))
    assert out == tmp_path / "results" / "verbatim_shards"
    records = read_transcripts(out / "transcripts.jsonl")
    outcome = {(r["task_id"], r["run"]): (r["end_reason"], r["correct"], sum(t["role"] == "user" for t in r["turns"]))
               for r in records}
    expected = {"sharded-GSM8K/fixture-0": ("task_solved", True, 1), "sharded-GSM8K/fixture-1": ("task_solved", True, 2),
                "sharded-GSM8K/fixture-2": ("shards_exhausted", False, 4),
                "sharded-GSM8K/fixture-3": ("task_solved", True, 4),
                "sharded-HumanEval/fixture-0": ("shards_exhausted", False, 4),
                "sharded-HumanEval/fixture-1": ("task_solved", True, 1),
                "sharded-HumanEval/fixture-2": ("task_solved", True, 1)}
    assert outcome == {(task, run): e for task, e in expected.items() for run in (0, 1)}
    loop = next(r for r in records if r["task_id"] == "sharded-HumanEval/fixture-0")
    assert all(t["grade"]["detail"].startswith("timeout") for t in loop["turns"] if t["role"] == "assistant")
    wrong_first = next(r for r in records if r["task_id"] == "sharded-GSM8K/fixture-3")["turns"][1]["grade"]
    assert wrong_first == {"attempt": True, "answer": "125", "correct": False, "detail": wrong_first["detail"]}
    result = json.loads((out / "extrinsic.json").read_text())
    assert result["by_kind"]["math"]["task_score"] == pytest.approx(75.0)      # 3 of 4 math tasks, both runs
    assert result["by_kind"]["code"]["task_score"] == pytest.approx(200 / 3)   # 2 of 3 code tasks
    assert result["overall"]["task_score"] == pytest.approx(500 / 7)
    assert result["end_reasons"] == {"shards_exhausted": 4, "task_solved": 10}
    # the shards each conversation gave (verbatim: conveyed), of the task's: 1/4, 2/5, 4/4, 4/4; 4/4, 1/4, 1/4
    assert result["overall"]["intent_coverage"] == pytest.approx(100 * (1 / 4 + 2 / 5 + 1 + 1 + 1 + 1 / 4 + 1 / 4) / 7)
    assert result["user"] == {"kind": "verbatim_shards"} and result["tasks"]["skipped"]["unknown_kind:summary"] == 1
    # the key is in no output, and nothing the code wrote landed outside its attempt's directory
    assert all(KEY.encode() not in data for data in every_file(tmp_path / "results").values())
    assert "api_key_env: OPENAI_API_KEY" in (out / "config.yaml").read_text()
    assert not (tmp_path / "written.txt").exists() and not (tmp_path / "home" / "written.txt").exists()


def test_verbatim_transcripts_and_every_scripted_end_reason(tmp_path):
    """verbatim_shards + a scripted assistant (asks, then says 216): task_solved (the task whose answer
    is 216), shards_exhausted (four-shard tasks), max_turns (the five-shard task, cut at four turns)."""
    out = run(compose_config("extrinsic", overrides(tmp_path, "user.kind=verbatim_shards", "assistant.kind=scripted",
                                                    "simulations_per_task=1")))
    records = {r["task_id"]: r for r in read_transcripts(out / "transcripts.jsonl")}
    asked = {"content": "Could you tell me more about what you need?", "role": "assistant",
             "grade": {"attempt": False, "answer": None, "correct": False, "detail": "no_attempt"}}
    assert records["sharded-GSM8K/fixture-0"] == {
        "task_id": "sharded-GSM8K/fixture-0", "kind": "math", "run": 0, "user": "verbatim_shards", "intent": None,
        "turns": [{"role": "user", "content": "How much money did the bakery make from muffins over two days?",
                   "shard_id": 1}, asked,
                  {"role": "user", "content": "Each muffin costs $3.", "shard_id": 2},
                  {"role": "assistant", "content": "The answer is 216.",
                   "grade": {"attempt": True, "answer": "216.", "correct": True, "detail": None}}],
        "end_reason": "task_solved", "correct": True}
    pencils = records["sharded-GSM8K/fixture-1"]
    assert pencils["end_reason"] == "max_turns" and [t.get("shard_id") for t in pencils["turns"]][::2] == [1, 2, 3, 4]
    assert pencils["correct"] is False   # its last attempt said 216
    assert {r["end_reason"] for task, r in records.items() if task not in
            ("sharded-GSM8K/fixture-0", "sharded-GSM8K/fixture-1")} == {"shards_exhausted"}
    code = records["sharded-HumanEval/fixture-1"]
    assert [t["shard_id"] for t in code["turns"] if t["role"] == "user"] == [1, 2, 3, 4]
    assert all(t["grade"]["detail"] == "no_attempt" for t in code["turns"] if t["role"] == "assistant")


SHARD_LINE = re.compile(r"^- shard (\d+): (.*)$", re.MULTILINE)


def playing_user(body: dict) -> str:
    """An LLM playing LiC's user: reveals the first unrevealed shard, rephrased, as JSON. The freezer task
    gets one malformed reply first; the pencils task only malformed ones."""
    prompt = body["messages"][0]["content"]
    unrevealed = SHARD_LINE.findall(prompt.split("Shards you have not revealed yet:")[1].split("The conversation")[0])
    playing_user.seeds.append(body["seed"])
    if "45 boxes" in prompt or ("4 degrees" in prompt and prompt not in playing_user.refused):
        playing_user.refused.add(prompt)   # the freezer's: once per prompt, so each turn's retry succeeds
        return "Sure! Here is what I would say: the boxes"
    shard_id, text = unrevealed[0]
    return json.dumps({"response": f"oh and {text[0].lower()}{text[1:]}", "shard_id": int(shard_id)})


def test_prompted_llm_user(tmp_path, monkeypatch):
    """prompted_llm through a real local endpoint: turn 1 is shard 1 verbatim, then one rephrased shard per
    turn with its shard_id; a malformed reply is asked again and counted; all malformed: user_error; an
    HTTP error that persists: user_error with its reason."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    playing_user.seeds, playing_user.refused = [], set()
    with OpenAIServer(reply=playing_user, api_key=KEY) as server:
        server.rules.append((lambda body: "running maximum" in body["messages"][0]["content"], "400"))
        out = run(compose_config("extrinsic", overrides(tmp_path, "user.kind=prompted_llm", "assistant.kind=scripted",
                                                        "simulations_per_task=1",
                                                        *served(server.base_url, "user.prompted_llm.client"))))
    assert out.name == "prompted_llm--test-model"
    records = {r["task_id"]: r for r in read_transcripts(out / "transcripts.jsonl")}
    muffins = records["sharded-GSM8K/fixture-0"]   # solved at turn 2 by the scripted "216"
    assert [(t["content"], t["shard_id"], t.get("malformed_replies")) for t in muffins["turns"] if t["role"] == "user"] \
        == [("How much money did the bakery make from muffins over two days?", 1, None),
            ("oh and each muffin costs $3.", 2, 0)]
    assert muffins["end_reason"] == "task_solved"
    freezer = records["sharded-GSM8K/fixture-2"]
    assert freezer["end_reason"] == "shards_exhausted"
    assert [t.get("malformed_replies") for t in freezer["turns"] if t["role"] == "user"] == [None, 1, 1, 1]
    pencils = records["sharded-GSM8K/fixture-1"]
    assert (pencils["end_reason"], pencils["user_error_reason"]) == ("user_error", "malformed_reply")
    running_max = records["sharded-HumanEval/fixture-0"]
    assert (running_max["end_reason"], running_max["user_error_reason"]) == ("user_error", "http_400")
    assert len(set(playing_user.seeds)) > len(records)   # each request its own seed
    simulation = json.loads((out / "extrinsic.json").read_text())["simulation"]
    assert simulation["user_errors"] == {"http_400": 1, "malformed_reply": 1}
    assert simulation["malformed_user_replies"] == 3   # the freezer's, one per turn (pencils' ended the conversation)
    assert "3 replies were not the JSON asked for" in pencils["user_error"]
    assert all(KEY.encode() not in data for data in every_file(out).values())


def tiny_lm_overrides(model: Path, out: Path, *extra: str) -> list[str]:
    return overrides(out, f"user.user_lm.model.name_or_path={model}", "tasks.limit=4",
                     "user.user_lm.sampling.max_new_tokens=8", "user.user_lm.guardrails.max_retries=1", *extra, turns=3)


def test_user_lm_ends_and_intents_too_long(biased_user_lm, tmp_path):
    """user_lm: the biased tiny user LM ends conversations when allowed (user_ended); its intent is the
    template's; an intent that leaves no room in the context ends the conversation at once."""
    out = run(compose_config("extrinsic", tiny_lm_overrides(biased_user_lm, tmp_path / "a", "assistant.kind=scripted",
                                                            "intent.template='Solve this: {shards}'")))
    records = read_transcripts(out / "transcripts.jsonl")
    assert out.name == result_name(str(biased_user_lm), "userlm")
    assert "user_ended" in {r["end_reason"] for r in records}
    muffins = next(r for r in records if r["task_id"] == "sharded-GSM8K/fixture-0")
    assert muffins["intent"] == ("Solve this: How much money did the bakery make from muffins over two days? Each "
                                 "muffin costs $3. It sold 24 muffins on Monday. On Tuesday it sold twice as many "
                                 "muffins as on Monday.")
    user_turn = muffins["turns"][0]
    assert user_turn["shard_id"] is None and {"tokens", "guardrails", "prompt_tokens"} <= set(user_turn)
    out = run(compose_config("extrinsic", tiny_lm_overrides(biased_user_lm, tmp_path / "b", "assistant.kind=scripted",
                                                            "user.user_lm.sampling.max_new_tokens=8190")))
    records = read_transcripts(out / "transcripts.jsonl")
    assert {r["end_reason"] for r in records} == {"intent_too_long"} and len(records) == 8
    assert all(r["turns"] == [] and r["correct"] is False and "leaves no room" in r["error"] for r in records)


def test_assistant_error_ends_that_conversation_only(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with OpenAIServer(reply=known_answer, api_key=KEY) as server:
        server.rules.append((lambda body: "freezer" in body["messages"][1]["content"], "400"))
        out = run(compose_config("extrinsic", overrides(tmp_path, "user.kind=verbatim_shards", "assistant.kind=openai",
                                                        "tasks.kinds=[math]", "simulations_per_task=1",
                                                        *served(server.base_url, "assistant.openai"))))
    records = {r["task_id"]: r for r in read_transcripts(out / "transcripts.jsonl")}
    assert records["sharded-GSM8K/fixture-2"]["end_reason"] == "assistant_error"
    assert records["sharded-GSM8K/fixture-2"]["assistant_error_reason"] == "http_400"
    assert {r["end_reason"] for t, r in records.items() if t != "sharded-GSM8K/fixture-2"} == {"task_solved"}
    assert json.loads((out / "extrinsic.json").read_text())["simulation"]["assistant_errors"] == {"http_400": 1}


def test_resume_after_a_partial_transcript_gives_the_same_bytes(tiny_userlm_model, tiny_assets, tmp_path):
    """A sampling user LM and a sampling HF assistant, chunks of 3: a run cut after 4 conversations (in its
    second chunk, with a torn line) and resumed writes what one uninterrupted run writes, byte for byte."""
    cfg = compose_config("extrinsic", tiny_lm_overrides(tiny_userlm_model, tmp_path, "conversation.pool_size=3",
                                                        f"assistant.hf.name_or_path={tiny_assets / 'model'}",
                                                        "assistant.sampling.max_new_tokens=6"))
    out = run(cfg)
    whole = every_file(out)
    lines = whole["transcripts.jsonl"].splitlines(keepends=True)
    assert len(lines) == 8
    (out / "transcripts.jsonl").write_bytes(b"".join(lines[:4]) + lines[4][:40])
    (out / "extrinsic.json").unlink()
    run(cfg)
    assert every_file(out) == whole
    run(cfg)   # nothing left to do: the same bytes again
    assert every_file(out) == whole


def test_presets_compose():
    import evaluate.extrinsic.config  # noqa: F401
    paper = compose_config("extrinsic", ["experiment=paper"])
    assert (paper.simulations_per_task, sum(paper.tasks.per_kind.values())) == (10, 65)
    assert paper.user.user_lm.model.name_or_path == "microsoft/UserLM-8b"
    assert paper.assistant.openai.model.startswith("gpt-4o") and paper.grading.judge.model.startswith("gpt-4o")
    assert paper.user.user_lm.guardrails.length.max_words == 25   # the paper's guardrails, from conf/simulate
    tiny = compose_config("extrinsic", ["experiment=tiny"])
    assert tiny.tasks.source.endswith("evaluate/extrinsic/sample/sharded_instructions.json")
    for bad in (["user.kind=user-lm"], ["grading.extractor=regex"], ["user.prompted_llm.temprature=1"]):
        with pytest.raises(Exception):
            compose_config("extrinsic", bad)
