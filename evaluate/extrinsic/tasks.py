"""Lost-in-Conversation (LiC) tasks: loading `sharded_instructions_600.json` and selecting from it.

    loaded = load_tasks(cfg.tasks)      # LoadedTasks: .tasks, .skipped (reason -> count), .provenance

`tasks.source` is a local JSON file in LiC's layout or the hub dataset id
`microsoft/lost_in_conversation`, whose file `sharded_instructions_600.json` is fetched at
`tasks.revision` (pin a commit sha; the sha actually read is recorded in `provenance`). With
HF_HUB_OFFLINE=1 (the project's default) a hub id works only from the local cache, and otherwise
fails with a message saying how to give a local file instead.

The file is a JSON list, one object per task: `task_id`, `task` (its kind), `shards` (a list of
`{"shard_id", "shard"}`; `shard_text`, the name LiC's README uses, is accepted too; shard 1 is the
high-level request). Math tasks add `question` and `answer` (a GSM8K rationale ending in
`#### <gold>`); code tasks add `source` (humaneval | lcb_easy | lcb_medium), the HumanEval `prompt`
and/or `question_content`, `metadata.func_name`, `public_test_cases` (a JSON string of a list of
functional tests `{"input", "output", "testtype"}`: the input is the call's arguments, one JSON value
per line, the output one JSON value) and optionally `private_test_cases`.

What is kept, skipped and refused:
- Only the kinds in `tasks.kinds` (math, code) are kept; a task of another kind (LiC's summary,
  database, ...) is skipped and counted as `unknown_kind:<kind>` (or `kind_not_selected:<kind>`
  for math or code left out of `tasks.kinds`). Code tasks from a source outside
  `tasks.code_sources` (default: HumanEval only, as in the paper) are counted as
  `code_source:<source>`; a code task with a test that is not functional as `non_functional_tests`.
- `private_test_cases` given as JSON are added to the task's tests. In LiveCodeBench's other form,
  base64 of zlib of a pickle, they are NEVER decoded (unpickling runs arbitrary code): the task keeps
  its public tests only, and each such task is counted as `pickled_private_tests`. A code task left
  with no test at all is skipped as `no_tests`.
- A malformed task (a missing or mistyped field, no `####` in a math answer, a test input that is not
  JSON, a duplicate task id or shard id) is an error naming the file, the task's index and id, and
  the field.

Selection: the kept tasks are sorted by task id first, so the selection does not depend on the
file's order. `tasks.per_kind` (`{math: N, code: M}`; null: all) draws N tasks of a kind with a
generator seeded by `tasks.seed` and the kind; asking for more than there are is an error. The
selected tasks are then listed kind by kind in turn (math, code, math, ...), each kind in task id
order, and `tasks.limit` keeps the first `limit`, so a small limit still holds both kinds.

The paper's 65 task intents: the UserLM paper does not publish how they split between math and
code. The paper preset (conf/extrinsic/experiment/paper.yaml, `tasks.per_kind`) takes 33 math and
32 code tasks: an even split (LiC's file holds comparable numbers of GSM8K- and HumanEval-derived
tasks, and the paper reports both kinds side by side), the odd task going to math, the kind whose
grading needs no code execution.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum, auto
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from core.artifacts import sha256_of

log = logging.getLogger(__name__)

HUB_DATASET = "microsoft/lost_in_conversation"
HUB_FILENAME = "sharded_instructions_600.json"
SHA = re.compile(r"[0-9a-f]{40}")
SAMPLE_TASKS = Path(__file__).parent / "sample" / "sharded_instructions.json"   # the quickstart's 6 math + 4 code


class TaskKind(StrEnum):
    math = auto()      # GSM8K-derived: a number to find
    code = auto()      # HumanEval- or LiveCodeBench-derived: a Python function to write


class CodeSource(StrEnum):
    humaneval = auto()
    lcb_easy = auto()
    lcb_medium = auto()


MATH, CODE = TaskKind.math, TaskKind.code


@dataclass
class TasksConfig:
    source: str = MISSING                    # a local .json file in LiC's layout, or the hub id HUB_DATASET
    revision: Optional[str] = MISSING        # hub revision (pin a commit sha); ignored for a local file
    kinds: list[TaskKind] = MISSING          # kinds kept (paper: [math, code])
    code_sources: list[CodeSource] = MISSING  # code tasks kept by origin (paper: [humaneval])
    limit: Optional[int] = MISSING           # the first N selected tasks only (null: all)
    per_kind: Optional[dict[str, int]] = MISSING  # {math: N, code: M} drawn per kind (null: all);
                                             # the paper's 65: its preset's
    seed: int = MISSING                      # seeds the per_kind draw


@dataclass(frozen=True)
class Shard:
    id: int            # LiC's shard_id; 1 = the high-level request
    text: str          # LiC's "shard" (or "shard_text")


@dataclass(frozen=True)
class CodeTest:
    input: str         # the call's arguments, one JSON value per line
    output: str        # the expected return value, one JSON value


@dataclass(frozen=True)
class Task:
    task_id: str
    kind: str                      # MATH | CODE
    shards: tuple[Shard, ...]      # sorted by id, shard 1 first
    question: str                  # math: the full problem; code: question_content, else the prompt
    answer: str | None = None      # math: the gold after "####", as written (may hold "1,000")
    source: str | None = None      # code: humaneval | lcb_easy | lcb_medium
    prompt: str | None = None      # code: the HumanEval prompt (signature + docstring, may hold imports)
    func_name: str | None = None   # code: metadata.func_name, the function the tests call
    tests: tuple[CodeTest, ...] = ()   # code: public + (JSON) private tests


@dataclass
class LoadedTasks:
    tasks: list[Task]                                   # the selection, in a deterministic order
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> tasks (or test sets) left out
    provenance: dict = field(default_factory=dict)      # source, revision, sha256, counts per kind


class TaskDataError(ValueError):
    """A task file that cannot be read as LiC's layout: the message names the file, task and field."""


# ---- reading one task -----------------------------------------------------------------------------
class _Fields:
    """Typed access to one task object; every error names the file, the task's index and id, and the field."""

    def __init__(self, path: str, index: int, row: Any):
        self.path, self.index = path, index
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}: task {index}: expected an object, got {type(row).__name__}")
        self.row = row
        self.task_id = row.get("task_id") if isinstance(row.get("task_id"), str) else None

    def error(self, name: str, why: str) -> TaskDataError:
        return TaskDataError(f"{self.path}: task {self.index} ({self.task_id or 'no task_id'}): field {name!r}: {why}")

    def get(self, name: str, kind: type | tuple, required: bool = True, value: Any = None) -> Any:
        """row[name] (or `value` when given, for nested fields), checked to be of type `kind`."""
        present = value is not None or name in self.row
        value = value if value is not None else self.row.get(name)
        if value is None:
            if required:
                raise self.error(name, "missing" if not present else "is null")
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.error(name, f"expected {names}, got {type(value).__name__}")
        if isinstance(value, str) and required and not value.strip():
            raise self.error(name, "is empty")
        return value


def _shards(f: _Fields) -> tuple[Shard, ...]:
    shards = []
    for position, item in enumerate(f.get("shards", list)):
        where = f"shards[{position}]"
        if not isinstance(item, dict):
            raise f.error(where, f"expected an object, got {type(item).__name__}")
        text_key = "shard" if "shard" in item else "shard_text"
        shard_id = f.get(f"{where}.shard_id", int, value=item.get("shard_id"))
        text = f.get(f"{where}.{text_key}", str, value=item.get(text_key))
        if not text.strip():
            raise f.error(f"{where}.{text_key}", "is empty")
        shards.append(Shard(shard_id, text))
    ids = [s.id for s in shards]
    if len(set(ids)) != len(ids):
        raise f.error("shards", f"duplicate shard_id in {ids}")
    if 1 not in ids:
        raise f.error("shards", f"no shard 1 (the high-level request) among shard_ids {ids}")
    return tuple(sorted(shards, key=lambda s: s.id))


def _math_task(f: _Fields, task_id: str, shards: tuple[Shard, ...]) -> Task:
    question = f.get("question", str)
    rationale = f.get("answer", str)
    if "####" not in rationale:
        raise f.error("answer", "no '#### <gold>' at the end of the rationale")
    gold = rationale.rsplit("####", 1)[1].strip()
    if not gold:
        raise f.error("answer", "nothing after '####'")
    return Task(task_id, MATH.value, shards, question, answer=gold)


def _functional_tests(f: _Fields, name: str, tests: Any) -> tuple[CodeTest, ...] | None:
    """The tests of a parsed test list; None when one of them is not functional."""
    if not isinstance(tests, list):
        raise f.error(name, f"expected a list of tests, got {type(tests).__name__}")
    out = []
    for position, test in enumerate(tests):
        where = f"{name}[{position}]"
        if not isinstance(test, dict):
            raise f.error(where, f"expected an object, got {type(test).__name__}")
        if test.get("testtype", "functional") != "functional":
            return None
        given = f.get(f"{where}.input", str, value=test.get("input"))
        expected = f.get(f"{where}.output", str, value=test.get("output"))
        for line_no, line in enumerate(given.split("\n"), 1):
            if line.strip():
                _check_json(f, f"{where}.input", line, f"line {line_no}")
        _check_json(f, f"{where}.output", expected, "the value")
        out.append(CodeTest(given, expected))
    return tuple(out)


def _check_json(f: _Fields, name: str, text: str, what: str) -> None:
    try:
        json.loads(text)
    except ValueError as e:
        raise f.error(name, f"{what} is not a JSON value ({e})") from None


def _looks_pickled(text: str) -> bool:
    """base64 text, the form LiveCodeBench wraps zlib(pickle) in: recognised, never decompressed or unpickled."""
    try:
        base64.b64decode(text.strip(), validate=True)
        return True
    except (binascii.Error, ValueError):
        return False


def _code_task(f: _Fields, task_id: str, shards: tuple[Shard, ...], sources: set[str],
               skipped: Counter) -> Task | None:
    source = f.get("source", str)
    if source not in sources:
        skipped[f"code_source:{source}"] += 1
        return None
    prompt = f.get("prompt", str, required=False)
    question = f.get("question_content", str, required=False) or prompt
    if not question:
        raise f.error("question_content", "missing, and no 'prompt' either")
    metadata = f.get("metadata", dict)
    func_name = f.get("metadata.func_name", str, value=metadata.get("func_name"))
    public = f.get("public_test_cases", (str, list))
    if isinstance(public, str):
        try:
            public = json.loads(public)
        except ValueError as e:
            raise f.error("public_test_cases", f"not a JSON list ({e})") from None
    tests = _functional_tests(f, "public_test_cases", public)
    private = f.get("private_test_cases", (str, list), required=False)
    if tests is not None and private:
        if isinstance(private, str):
            try:
                private = json.loads(private)
            except ValueError:
                if not _looks_pickled(private):
                    raise f.error("private_test_cases", "neither JSON nor base64") from None
                skipped["pickled_private_tests"] += 1
                private = []
        more = _functional_tests(f, "private_test_cases", private)
        tests = None if more is None else tests + more
    if tests is None:
        skipped["non_functional_tests"] += 1
        return None
    if not tests:
        skipped["no_tests"] += 1
        return None
    return Task(task_id, CODE.value, shards, question, source=source, prompt=prompt, func_name=func_name,
                tests=tests)


def parse_tasks(rows: Any, path: str, kinds: set[str], code_sources: set[str]) -> tuple[list[Task], Counter]:
    """Every kept task of a parsed file, sorted by task id, and the skip counts."""
    if not isinstance(rows, list):
        raise TaskDataError(f"{path}: expected a JSON list of tasks, got {type(rows).__name__}")
    tasks, skipped, seen = [], Counter(), {}
    for index, row in enumerate(rows):
        f = _Fields(path, index, row)
        task_id = f.get("task_id", str)
        if task_id in seen:
            raise f.error("task_id", f"duplicate of task {seen[task_id]}")
        seen[task_id] = index
        kind = f.get("task", str)
        if kind not in TaskKind.__members__:
            skipped[f"unknown_kind:{kind}"] += 1
            continue
        if kind not in kinds:
            skipped[f"kind_not_selected:{kind}"] += 1
            continue
        shards = _shards(f)
        task = _math_task(f, task_id, shards) if kind == MATH else _code_task(f, task_id, shards, code_sources, skipped)
        if task is not None:
            tasks.append(task)
    tasks.sort(key=lambda t: t.task_id)
    return tasks, skipped


# ---- the file: local or from the hub ----------------------------------------------------------------
def _is_local(source: str) -> bool:
    return source.endswith(".json") or Path(source).exists()


def fetch_from_hub(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """The cached path of the hub dataset's task file and the commit sha it was read at."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    try:
        path = Path(hf_hub_download(repo_id, HUB_FILENAME, repo_type="dataset", revision=revision))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as e:
        raise TaskDataError(
            f"tasks.source={repo_id}: {HUB_FILENAME} is not in the local hub cache and the hub cannot be "
            f"reached ({type(e).__name__}; the scripts set HF_HUB_OFFLINE=1). Download it once with "
            f"HF_HUB_OFFLINE=0, or give the file itself: tasks.source=/path/to/{HUB_FILENAME}") from None
    except HfHubHTTPError as e:
        raise TaskDataError(f"tasks.source={repo_id} at revision {revision}: the hub refused {HUB_FILENAME} "
                            f"({str(e).splitlines()[0]})") from None
    # the cache lays files out as .../snapshots/<commit sha>/<file>: the revision actually read
    return path, path.parent.name


def _read_json(path: Path, shown: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskDataError(f"tasks.source={shown}: no such file") from None
    except OSError as e:
        raise TaskDataError(f"tasks.source={shown}: cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise TaskDataError(f"{shown}: not a JSON file ({e})") from None


# ---- selection ----------------------------------------------------------------------------------------
def select(tasks: list[Task], kinds: list[str], per_kind: dict[str, int] | None, seed: int,
           limit: int | None) -> list[Task]:
    """Draw per_kind tasks of each kind (from the task-id order, seeded by seed and kind), list the
    kinds in turn, and keep the first `limit`."""
    unknown = set(per_kind or {}) - set(kinds)
    if unknown:
        raise TaskDataError(f"tasks.per_kind: {sorted(unknown)} not among tasks.kinds={list(kinds)}")
    if limit is not None and limit < 1:
        raise TaskDataError(f"tasks.limit={limit}: must be positive (null: all)")
    by_kind = []
    for kind in kinds:
        of_kind = [t for t in tasks if t.kind == kind]
        wanted = (per_kind or {}).get(kind)
        if wanted is not None:
            if not 0 <= wanted <= len(of_kind):
                raise TaskDataError(f"tasks.per_kind.{kind}={wanted}, but {len(of_kind)} {kind} tasks were loaded")
            of_kind = sorted(random.Random(f"{seed}:{kind}").sample(of_kind, wanted), key=lambda t: t.task_id)
        by_kind.append(of_kind)
    interleaved = [t for group in _round_robin(by_kind) for t in group]
    return interleaved if limit is None else interleaved[:limit]


def _round_robin(lists: list[list[Task]]):
    for position in range(max((len(x) for x in lists), default=0)):
        yield [x[position] for x in lists if position < len(x)]


def load_tasks(cfg: TasksConfig) -> LoadedTasks:
    """Read, check and select the tasks of `cfg.source` (see the module docstring)."""
    kinds = [str(k) for k in cfg.kinds]
    unknown = [k for k in kinds if k not in TaskKind.__members__]
    if unknown:
        raise TaskDataError(f"tasks.kinds: unknown kind(s) {unknown}; known: {list(TaskKind.__members__)}")
    source = str(cfg.source)
    if _is_local(source):
        path, shown, sha = Path(source), source, None
    else:
        if not (cfg.revision and SHA.fullmatch(cfg.revision)):
            log.warning("tasks.revision=%s is not a commit sha: the hub file may change under it (the sha read "
                        "is recorded)", cfg.revision)
        path, sha = fetch_from_hub(source, cfg.revision)
        shown = f"{source}/{HUB_FILENAME}@{sha}"
    rows = _read_json(path, shown)
    per_kind = dict(cfg.per_kind) if cfg.per_kind is not None else None
    tasks, skipped = parse_tasks(rows, shown, set(kinds), {str(s) for s in cfg.code_sources})
    selected = select(tasks, kinds, per_kind, cfg.seed, cfg.limit)
    if skipped:
        log.info("tasks skipped: %s", dict(sorted(skipped.items())))
    provenance = {
        "source": source, "revision": None if sha is None else cfg.revision, "resolved_sha": sha,
        "file": str(path), "sha256": sha256_of(path), "tasks_in_file": len(rows),
        "loaded": dict(Counter(t.kind for t in tasks)), "selected": dict(Counter(t.kind for t in selected)),
        "per_kind": per_kind, "seed": cfg.seed, "limit": cfg.limit,
    }
    log.info("%d tasks selected from %s (%s)", len(selected), shown, provenance["selected"])
    return LoadedTasks(selected, dict(sorted(skipped.items())), provenance)
