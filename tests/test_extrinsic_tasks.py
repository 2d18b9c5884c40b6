"""evaluate.extrinsic.tasks: LiC's layout read from the fixture, skips counted, bad tasks refused, selection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub.constants
import pytest

from evaluate.extrinsic.tasks import (CODE, HUB_DATASET, HUB_FILENAME, MATH, SAMPLE_TASKS, CodeTest,
                                      Shard, TaskDataError, TasksConfig, load_tasks)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "lic" / "sharded_instructions.json"
ROWS = json.loads(FIXTURE.read_text())


def tasks_cfg(source, **overrides) -> TasksConfig:
    return TasksConfig(**{"source": str(source), "revision": None, "kinds": ["math", "code"],
                          "code_sources": ["humaneval"], "limit": None, "per_kind": None, "seed": 0, **overrides})


def write(tmp_path: Path, rows, name="tasks.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def test_the_fixture_loads_with_every_skip_counted():
    loaded = load_tasks(tasks_cfg(FIXTURE))
    assert [t.task_id for t in loaded.tasks] == [   # kinds in turn, each in task id order
        "sharded-GSM8K/fixture-0", "sharded-HumanEval/fixture-0", "sharded-GSM8K/fixture-1",
        "sharded-HumanEval/fixture-1", "sharded-GSM8K/fixture-2", "sharded-HumanEval/fixture-2",
        "sharded-GSM8K/fixture-3"]
    assert loaded.skipped == {"code_source:lcb_easy": 1, "pickled_private_tests": 1, "unknown_kind:summary": 1}
    assert loaded.provenance == {
        "source": str(FIXTURE), "revision": None, "resolved_sha": None, "file": str(FIXTURE),
        "sha256": hashlib.sha256(FIXTURE.read_bytes()).hexdigest(), "tasks_in_file": 9,
        "loaded": {"math": 4, "code": 3}, "selected": {"math": 4, "code": 3}, "per_kind": None, "seed": 0,
        "limit": None}
    by_id = {t.task_id: t for t in loaded.tasks}
    pencils = by_id["sharded-GSM8K/fixture-1"]
    assert (pencils.kind, pencils.answer, len(pencils.shards)) == (MATH, "3,400", 5)
    assert pencils.shards[0] == Shard(1, "How many pencils does the school have left?")
    running = by_id["sharded-HumanEval/fixture-0"]
    assert (running.kind, running.source, running.func_name) == (CODE, "humaneval", "running_max")
    assert running.prompt.startswith("from typing import List\n") and running.question == running.prompt
    assert running.tests == (CodeTest("[1, 3, 2, 5, 4]", "[1, 3, 3, 5, 5]"), CodeTest("[]", "[]"),
                             CodeTest("[-2, -5, -1]", "[-2, -2, -1]"))   # public, then the JSON private test
    assert len(by_id["sharded-HumanEval/fixture-1"].tests) == 3          # public only: the pickle is not read
    assert by_id["sharded-HumanEval/fixture-2"].tests[2] == CodeTest('"Friday"\n-5', '"Sunday"')


def test_kinds_and_sources_select_what_is_kept():
    code_only = load_tasks(tasks_cfg(FIXTURE, kinds=["code"], code_sources=["humaneval", "lcb_easy"]))
    assert [t.task_id for t in code_only.tasks][-1] == "sharded-LiveCodeBench/fixture-0"
    assert code_only.tasks[-1].question.startswith("You are given an integer array")   # question_content
    assert code_only.skipped == {"kind_not_selected:math": 4, "pickled_private_tests": 1, "unknown_kind:summary": 1}
    with pytest.raises(TaskDataError, match="unknown kind"):
        load_tasks(tasks_cfg(FIXTURE, kinds=["summary"]))


def test_the_embedded_sample_holds_six_math_and_four_code_tasks():
    loaded = load_tasks(tasks_cfg(SAMPLE_TASKS))
    assert loaded.provenance["selected"] == {"math": 6, "code": 4} and loaded.skipped == {}
    assert {t.answer for t in loaded.tasks if t.kind == MATH} == {"33", "260", "60", "1,400", "9", "64"}


def test_selection_is_seeded_and_independent_of_the_file_order(tmp_path):
    reordered = write(tmp_path, list(reversed(ROWS)))
    picks = {}
    for path in (FIXTURE, reordered):
        loaded = load_tasks(tasks_cfg(path, per_kind={"math": 2, "code": 2}, seed=7))
        picks[path] = [t.task_id for t in loaded.tasks]
    assert picks[FIXTURE] == picks[reordered]
    assert len(picks[FIXTURE]) == 4 and picks[FIXTURE][0].startswith("sharded-GSM8K/")
    assert picks[FIXTURE][1].startswith("sharded-HumanEval/")
    seeds = {tuple(t.task_id for t in load_tasks(tasks_cfg(FIXTURE, per_kind={"math": 2}, seed=s)).tasks
                   if t.kind == MATH) for s in range(10)}
    assert len(seeds) > 1                                   # the seed matters
    limited = load_tasks(tasks_cfg(FIXTURE, limit=3))
    assert [t.task_id for t in limited.tasks] == ["sharded-GSM8K/fixture-0", "sharded-HumanEval/fixture-0",
                                                  "sharded-GSM8K/fixture-1"]
    assert paper_per_kind() == {"math": 33, "code": 32} and sum(paper_per_kind().values()) == 65


def paper_per_kind() -> dict:
    import evaluate.extrinsic.config  # noqa: F401  (registers the schema)
    from scripts.hydra_compose import compose_config
    return dict(compose_config("extrinsic", ["experiment=paper"]).tasks.per_kind)


def test_selection_errors():
    with pytest.raises(TaskDataError, match=r"per_kind.math=33, but 4 math tasks were loaded"):
        load_tasks(tasks_cfg(FIXTURE, per_kind=paper_per_kind()))
    with pytest.raises(TaskDataError, match=r"per_kind: \['summary'\] not among tasks.kinds"):
        load_tasks(tasks_cfg(FIXTURE, per_kind={"summary": 1}))
    with pytest.raises(TaskDataError, match="limit=0"):
        load_tasks(tasks_cfg(FIXTURE, limit=0))


def test_shard_text_and_any_shard_order_are_accepted(tmp_path):
    row = json.loads(json.dumps(ROWS[0]))
    row["shards"] = [{"shard_id": s["shard_id"], "shard_text": s["shard"]} for s in reversed(row["shards"])]
    task = load_tasks(tasks_cfg(write(tmp_path, [row]))).tasks[0]
    assert [s.id for s in task.shards] == [1, 2, 3, 4] and task.shards[1].text == "Each muffin costs $3."


def test_non_functional_tests_skip_the_task(tmp_path):
    row = json.loads(json.dumps(ROWS[6]))
    row["public_test_cases"] = json.dumps([{"input": "1\n", "output": "2\n", "testtype": "stdin"}])
    loaded = load_tasks(tasks_cfg(write(tmp_path, [row])))
    assert loaded.tasks == [] and loaded.skipped == {"non_functional_tests": 1}


def broken(index: int, change) -> list:
    rows = json.loads(json.dumps(ROWS))
    change(rows[index])
    return rows


@pytest.mark.parametrize("index, change, field, why", [
    (1, lambda r: r.update(answer="It is 3400."), "answer", "no '#### <gold>'"),
    (2, lambda r: r.pop("question"), "question", "missing"),
    (0, lambda r: r["shards"].pop(0), "shards", "no shard 1"),
    (0, lambda r: r["shards"][1].update(shard_id=3), "shards", "duplicate shard_id"),
    (3, lambda r: r["shards"][0].update(shard_id="1"), "shards[0].shard_id", "expected int, got str"),
    (4, lambda r: r.update(public_test_cases='[{"input": "[1, 3", "output": "[1]"}]'),
     "public_test_cases[0].input", "line 1 is not a JSON value"),
    (4, lambda r: r.update(private_test_cases="not JSON, not base64!"), "private_test_cases", "neither JSON nor base64"),
    (5, lambda r: r.pop("metadata"), "metadata", "missing"),
    (5, lambda r: r.update(task_id="sharded-HumanEval/fixture-0"), "task_id", "duplicate of task 4"),
])
def test_a_malformed_task_is_an_error_naming_file_task_and_field(tmp_path, index, change, field, why):
    path = write(tmp_path, broken(index, change))
    with pytest.raises(TaskDataError) as error:
        load_tasks(tasks_cfg(path))
    message = str(error.value)
    assert message.startswith(f"{path}: task {index} (sharded-"), message
    assert f"field {field!r}: {why}" in message, message


def test_a_hub_id_offline_without_a_cached_file_says_how_to_give_a_local_one(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(TaskDataError, match=rf"tasks.source=/path/to/{HUB_FILENAME}"):
        load_tasks(tasks_cfg(HUB_DATASET, revision="main"))


def test_a_hub_id_reads_the_cached_file_and_records_its_commit(tmp_path, monkeypatch):
    """The hub cache's own layout (what a download with HF_HUB_OFFLINE=0 leaves), read offline."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / f"datasets--{HUB_DATASET.replace('/', '--')}"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / HUB_FILENAME).write_bytes(FIXTURE.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    loaded = load_tasks(tasks_cfg(HUB_DATASET, revision="main"))
    assert len(loaded.tasks) == 7
    assert (loaded.provenance["source"], loaded.provenance["revision"], loaded.provenance["resolved_sha"]) == \
        (HUB_DATASET, "main", sha)
    assert loaded.provenance["sha256"] == hashlib.sha256(FIXTURE.read_bytes()).hexdigest()


def test_a_source_that_is_not_a_json_task_file_is_an_error(tmp_path):
    with pytest.raises(TaskDataError, match="no such file"):
        load_tasks(tasks_cfg(tmp_path / "missing.json"))
    with pytest.raises(TaskDataError, match="cannot be read"):
        load_tasks(tasks_cfg(tmp_path))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(TaskDataError, match="bad.json: not a JSON file"):
        load_tasks(tasks_cfg(tmp_path / "bad.json"))
    with pytest.raises(TaskDataError, match="expected a JSON list of tasks, got dict"):
        load_tasks(tasks_cfg(write(tmp_path, {"task_id": "x"})))
