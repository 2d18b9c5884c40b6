"""evaluate.extrinsic.code_exec: answers run in real processes against real tests (no mocks).

Each attempt is one `python -I -S` process (about 0.2 s); the timeouts are kept short."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from evaluate.extrinsic.code_exec import PIDS_CGROUPS, CodeExecConfig, ExecResult, prepare_answer, run_code_tests
from evaluate.extrinsic.tasks import CODE, SAMPLE_TASKS, CodeTest, Task, TasksConfig, load_tasks

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "lic" / "sharded_instructions.json"

# a correct solution of every code task in the fixture and the sample: proves their tests right
SOLUTIONS = {
    "sharded-HumanEval/fixture-0": "def running_max(numbers: List[int]) -> List[int]:\n"   # List: the prompt's import
                                   "    out = []\n    for x in numbers:\n        out.append(x if not out else max(out[-1], x))\n"
                                   "    return tuple(out)\n",                                # a tuple is the JSON list
    "sharded-HumanEval/fixture-1": "def count_vowels(text):\n    return sum(c in 'aeiou' for c in text.lower())\n",
    "sharded-HumanEval/fixture-2": "DAYS = ['Monday', 'Tuesday', 'Wednesday', 'Thursday', 'Friday', 'Saturday', 'Sunday']\n"
                                   "def shift(day, n):\n    return DAYS[(DAYS.index(day) + n) % 7]\n",   # renamed
    "sharded-LiveCodeBench/fixture-0": "class Solution:\n    def sumOfEvens(self, nums: List[int]) -> int:\n"
                                       "        return sum(x for x in nums if x % 2 == 0)\n",
    "sharded-HumanEval/sample-0": "def is_palindrome(text):\n    kept = [c.lower() for c in text if c.isalnum()]\n"
                                  "    return kept == kept[::-1]\n",
    "sharded-HumanEval/sample-1": "def second_largest(numbers):\n    values = sorted(set(numbers))\n"
                                  "    return values[-2] if len(values) > 1 else None\n",
    "sharded-HumanEval/sample-2": "from collections import Counter\n\ndef letter_counts(text):\n"
                                  "    return dict(Counter(c for c in text.lower() if c.isalpha()))\n",
    "sharded-HumanEval/sample-3": "def fizzbuzz(n):\n    return ['FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else"
                                  " 'Buzz' if i % 5 == 0 else str(i) for i in range(1, n + 1)]\n",
}


def exec_cfg(**overrides) -> CodeExecConfig:
    return CodeExecConfig(**{"test_timeout_s": 0.5, "attempt_timeout_s": 3.0, "memory_mb": 256, "workers": 1,
                             "command_prefix": [], **overrides})


def all_code_tasks(path: Path) -> dict[str, Task]:
    cfg = TasksConfig(source=str(path), revision=None, kinds=["code"], code_sources=["humaneval", "lcb_easy"],
                      limit=None, per_kind=None, seed=0)
    return {t.task_id: t for t in load_tasks(cfg).tasks}


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    return {**all_code_tasks(FIXTURE), **all_code_tasks(SAMPLE_TASKS)}


def probe(func: str, expected) -> Task:
    """A one-test task whose function takes no argument and must return `expected`."""
    return Task("probe", CODE, (), "probe", func_name=func, tests=(CodeTest("", json.dumps(expected)),))


@pytest.fixture
def attempts_root(tmp_path, monkeypatch) -> Path:
    """Attempt directories go here (the parent of every attempt's directory), and HOME is a fresh folder."""
    root, home = tmp_path / "attempts", tmp_path / "home"
    root.mkdir(), home.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    monkeypatch.setenv("HOME", str(home))
    return root


def test_every_reference_solution_passes(tasks, attempts_root):
    assert set(SOLUTIONS) == set(tasks)
    for task_id, code in SOLUTIONS.items():
        result = run_code_tests(code, tasks[task_id], exec_cfg())
        assert result == ExecResult(True, len(tasks[task_id].tests), len(tasks[task_id].tests), None), task_id
    assert list(attempts_root.iterdir()) == []   # every attempt's directory removed


def test_wrong_answers_fail_with_the_tests_that_passed(tasks, attempts_root):
    task = tasks["sharded-HumanEval/fixture-1"]   # tests: "Hello World" -> 3, "" -> 0, "AEIOUxyz" -> 5
    lower_only = "def count_vowels(text):\n    print('noise ' * 1000)\n    return sum(c in 'aeiou' for c in text)\n"
    assert run_code_tests(lower_only, task, exec_cfg()) == ExecResult(False, 2, 3, "wrong_answer")
    raises = "def count_vowels(text):\n    if not text:\n        raise ValueError('empty')\n    return 3\n"
    assert run_code_tests(raises, task, exec_cfg()) == ExecResult(False, 1, 3, "error")
    assert run_code_tests("def count_vowels(text) return 1", task, exec_cfg()) == ExecResult(False, 0, 3, "syntax_error")
    exits = "import os\ndef count_vowels(text):\n    if not text:\n        os._exit(3)\n    return 3\n"
    assert run_code_tests(exits, task, exec_cfg()) == ExecResult(False, 1, 3, "crashed")   # the harness died with it
    loops_on_load = "while True:\n    pass\n"
    assert run_code_tests(loops_on_load, task, exec_cfg()) == ExecResult(False, 0, 3, "timeout")
    assert run_code_tests("COUNT = 3\n", task, exec_cfg()) == ExecResult(False, 0, 3, "no_function")
    assert run_code_tests("import nonexistent_module\ndef count_vowels(t):\n    return 0\n", task,
                          exec_cfg()) == ExecResult(False, 0, 3, "error")


def test_an_infinite_loop_times_out_and_scores_zero(tasks, attempts_root):
    task = tasks["sharded-HumanEval/fixture-1"]
    started = time.monotonic()
    result = run_code_tests("def count_vowels(text):\n    while True:\n        pass\n", task, exec_cfg())
    assert result == ExecResult(False, 0, 3, "timeout")
    assert time.monotonic() - started < 3.0 + 2.0    # three 0.5 s test timeouts, else the attempt's 3 s
    # a loop that swallows the per-test timer: the attempt's deadline kills its process group
    stubborn = "def count_vowels(text):\n    while True:\n        try:\n            while True:\n                pass\n" \
               "        except BaseException:\n            pass\n"
    started = time.monotonic()
    assert run_code_tests(stubborn, task, exec_cfg(attempt_timeout_s=1.5)) == ExecResult(False, 0, 3, "timeout")
    assert time.monotonic() - started < 1.5 + 2.0
    assert list(attempts_root.iterdir()) == []


def test_no_secret_of_the_evaluating_process_reaches_the_code(attempts_root, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key-123")
    names = probe("env_names", ["HOME", "LANG", "PATH", "TMPDIR"])
    code = "import os\ndef env_names():\n    return sorted(os.environ)\n"
    assert run_code_tests(code, names, exec_cfg()).passed
    # HOME and TMPDIR are the working directory, inside the attempt's directory
    where = probe("where", [True, True, True])
    code = ("import os, tempfile\ndef where():\n    cwd = os.getcwd()\n    return [os.environ['HOME'] == cwd, "
            "tempfile.gettempdir() == cwd, os.path.dirname(cwd).startswith(%r)]\n" % str(attempts_root))
    assert run_code_tests(code, where, exec_cfg()).passed


def test_files_written_relatively_or_at_home_stay_in_the_attempt_directory(attempts_root):
    home = Path(os.environ["HOME"])
    task = probe("scribble", [True, True, True])
    code = ("import os\ndef scribble():\n    paths = ['inside.txt', '../outside.txt', os.path.expanduser('~/home.txt')]\n"
            "    for path in paths:\n        with open(path, 'w') as f:\n            f.write('x')\n"
            "    return [os.path.exists(p) for p in paths]\n")
    assert run_code_tests(code, task, exec_cfg()).passed   # the writes happened...
    assert list(attempts_root.iterdir()) == []             # ...and went with the attempt's directory
    assert list(home.iterdir()) == []                      # the evaluating process's HOME is untouched


def test_a_memory_hog_is_stopped(tasks, attempts_root):
    task = tasks["sharded-HumanEval/fixture-1"]
    at_once = "def count_vowels(text):\n    block = bytearray(1 << 30)\n    return 3\n"   # 1 GiB > 256 MiB
    assert run_code_tests(at_once, task, exec_cfg()) == ExecResult(False, 0, 3, "memory")
    growing = "def count_vowels(text):\n    held = []\n    while True:\n        held.append(' ' * (1 << 20))\n"
    roomy = exec_cfg(test_timeout_s=10.0, attempt_timeout_s=40.0)   # filling 256 MiB takes ~0.7 s here
    assert run_code_tests(growing, task, roomy) == ExecResult(False, 0, 3, "memory")


NO_PROCESS_CAP = os.geteuid() == 0 and not os.access(PIDS_CGROUPS, os.W_OK)


@pytest.mark.skipif(NO_PROCESS_CAP, reason="root without a writable pids cgroup: processes are not capped (documented)")
def test_forking_is_refused(attempts_root):
    task = probe("fork", "refused")
    code = ("import os\ndef fork():\n    try:\n        pid = os.fork()\n    except OSError:\n        return 'refused'\n"
            "    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)\n    return 'forked'\n")
    assert run_code_tests(code, task, exec_cfg()).passed
    # As root, where RLIMIT_NPROC does not bind, a pids cgroup of the attempt's own refused it; it is gone.
    assert not list(PIDS_CGROUPS.glob("userlm-attempt-*"))


def test_stdin_is_closed(attempts_root):
    code = "import sys\ndef read_stdin():\n    return sys.stdin.read()\n"
    assert run_code_tests(code, probe("read_stdin", ""), exec_cfg()).passed


def test_command_prefix_wraps_the_interpreter(attempts_root):
    """{attempt_dir} in the prefix is the attempt's directory: here `env` sets a variable to it."""
    task = probe("marked", True)
    code = "import os\ndef marked():\n    return os.environ['ATTEMPT'] == os.path.dirname(os.getcwd())\n"
    cfg = exec_cfg(command_prefix=["/usr/bin/env", "ATTEMPT={attempt_dir}"])
    assert run_code_tests(code, task, cfg).passed


def test_prepare_answer_adds_the_prompt_imports_and_names_the_last_function():
    prompt = "from typing import List\nimport math\n\n\ndef f(x: List[int]) -> int:\n    \"\"\"doc\"\"\"\n"
    assert prepare_answer("def helper(x):\n    return x\n\ndef mine(x):\n    return helper(x)\n", "f", prompt) == (
        "from typing import List\nimport math\ndef helper(x):\n    return x\n\ndef mine(x):\n    return helper(x)\n"
        "\nf = mine\n")
    assert prepare_answer("def f(x):\n    return 1\n", "f", prompt) == "from typing import List\nimport math\n" \
                                                                      "def f(x):\n    return 1\n"
    assert prepare_answer("def f(x) return", "f", prompt) is None


def test_the_harness_sets_its_limits_before_the_answer_runs(attempts_root):
    """The limits themselves, as the answer sees them (root ignores RLIMIT_NPROC, but it is set)."""
    task = probe("limits", [[256 << 20] * 2, [4, 4], [16 << 20] * 2, [4, 4]])   # AS, CPU (ceil(3.0) + 1), FSIZE, NPROC
    code = ("import resource\ndef limits():\n    return [resource.getrlimit(getattr(resource, 'RLIMIT_' + n))"
            " for n in ('AS', 'CPU', 'FSIZE', 'NPROC')]\n")
    assert run_code_tests(code, task, exec_cfg()).passed
