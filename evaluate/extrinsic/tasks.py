"""Lost-in-Conversation tasks: the data model the runner, the grader and the metrics share.

(The task model as the issue-11 contract gives it; the loader, `TasksConfig` and `load_tasks`,
live beside it.)
"""

from __future__ import annotations

from dataclasses import dataclass

MATH, CODE = "math", "code"


@dataclass(frozen=True)
class Shard:
    id: int            # LiC's shard_id, 1 = the high-level request
    text: str          # LiC's "shard"


@dataclass(frozen=True)
class CodeTest:
    input: str         # functional test: the arguments, one JSON value per line
    output: str        # one JSON value


@dataclass(frozen=True)
class Task:
    task_id: str                   # e.g. "sharded-GSM8K/0"
    kind: str                      # MATH | CODE
    shards: tuple[Shard, ...]      # sorted by id, shard 1 first
    question: str                  # math: the full problem; code: question_content, else the HumanEval prompt
    answer: str | None = None      # math: the gold after "####", as written in the file
    source: str | None = None      # code: humaneval | lcb_easy | lcb_medium
    prompt: str | None = None      # code: the HumanEval prompt (signature + docstring)
    func_name: str | None = None   # code: metadata.func_name
    tests: tuple[CodeTest, ...] = ()   # code: public + (JSON) private tests
