"""Running a code answer against its task's tests, in a separate process per attempt.

    result = run_code_tests(code, task, cfg.grading.code)   # ExecResult(passed, passed_tests, total_tests, reason)

THIS IS ISOLATION, NOT A SECURITY SANDBOX. It keeps honest mistakes and careless code (an infinite
loop, a memory hog, a stray file, a print) away from the evaluation and its secrets; it does not
stop code written to escape: the answer runs as the evaluating user, can read any file that user
can, write by absolute path wherever that user may, and open network connections. To run untrusted
models' code, put a real sandbox in front with `code.command_prefix` (`{attempt_dir}` in it is replaced
by the attempt's directory), e.g. bubblewrap:

    code.command_prefix='[bwrap,--ro-bind,/,/,--bind,{attempt_dir},{attempt_dir},--dev,/dev,--proc,/proc,--unshare-all,--die-with-parent]'

or a container (`docker run --rm --network none -v {attempt_dir}:{attempt_dir} -w {attempt_dir}/work
<image with the same python path>`).

What each attempt gets:
- its own temporary directory `<tmp>/userlm-attempt-*/` holding the harness, the answer and the
  tests, and below it `work/`: the working directory, HOME and TMPDIR of the code. The whole
  directory is removed afterwards, so a file written relatively (`out.txt`, `../out.txt`) or under
  `~` goes with it.
- a scrubbed environment: PATH, LANG, HOME and TMPDIR only (no API key or other secret of the
  evaluating process reaches the code), Python in isolated mode without site-packages
  (`python -I -S`: only the standard library imports), no inherited file descriptors, stdin closed
  (reading it gets EOF), stdout and stderr going to size-limited files, its own session and
  process group.
- limits the harness sets on itself before loading the answer: address space `code.memory_mb`
  (RLIMIT_AS: an allocation past it raises MemoryError, reason `memory`), CPU time
  `code.attempt_timeout_s` + 1 s (RLIMIT_CPU), files written at most 16 MiB (RLIMIT_FSIZE), and
  processes (RLIMIT_NPROC = 4, counted over all of its user's processes: in practice the answer
  cannot start any). Linux does not apply RLIMIT_NPROC to root, so under root each attempt gets
  its own pids cgroup instead (`/sys/fs/cgroup/pids/userlm-attempt-*`, pids.max = 1: the harness
  alone, so the answer can start no process or thread, as RLIMIT_NPROC gives in practice; the
  harness joins it before loading the answer; the cgroup is removed afterwards). Where root has
  no writable pids cgroup (cgroup v2 without delegation, a container), a warning says that a fork
  bomb is then bounded only by the attempt timeout killing the process group (children that start
  their own session escape it): run as another user or with a command prefix where that matters.
- time: each test `code.test_timeout_s` (a timer signal inside the harness; reason `timeout`), the
  whole attempt `code.attempt_timeout_s`, after which the evaluating process kills the attempt's
  process group (reason `timeout`; the tests that finished before still count in passed_tests).

How a test runs (LiC's functional tests): the imports of the HumanEval prompt are put before the
answer (`from typing import *` for a task without one); the function called is `func_name` at top level, else the method of that name of a
`Solution` class (LeetCode style), else the answer's last top-level function under that name (as
LiC renames it). Each test's input lines are JSON values, the arguments; the return value, passed
through JSON (tuples become lists), must equal the test's JSON output. The attempt passes when every
test does.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

log = logging.getLogger(__name__)

FILE_SIZE_LIMIT_BYTES = 16 << 20   # the most one file the answer writes may hold (RLIMIT_FSIZE)
PROCESS_LIMIT = 4                  # RLIMIT_NPROC: counts every process of the user, so this denies forks
# root's processes ignore RLIMIT_NPROC: there an attempt runs in a pids cgroup (cgroup v1's hierarchy)
# that holds the harness alone
PIDS_CGROUPS = Path("/sys/fs/cgroup/pids")
CGROUP_TASK_LIMIT = 1
KILL_WAIT_S = 5.0                  # after killing a timed-out attempt's group, how long to wait for it
IMPORT_LINE = re.compile(r"^(?:import\s+\S.*|from\s+\S+\s+import\s+.+)$")


@dataclass
class CodeExecConfig:
    test_timeout_s: float = MISSING     # one test's call (LiC: 6 s)
    attempt_timeout_s: float = MISSING  # the whole attempt: interpreter start, loading, every test
    memory_mb: int = MISSING            # address-space limit of the attempt's process
    workers: int = MISSING              # attempts run at once (one process each)
    command_prefix: list[str] = field(default_factory=list)   # e.g. a bwrap or docker command line;
                                        # "{attempt_dir}" in it becomes the attempt's directory


@dataclass
class ExecResult:
    passed: bool
    passed_tests: int
    total_tests: int
    reason: str | None   # None when passed; else no_tests, syntax_error, no_function, wrong_answer,
                         # error, timeout, memory, crashed


# The harness: the one file the attempt's interpreter runs. It reads its arguments from a JSON file
# beside it, writes one JSON line per test to the original stdout and sends the answer's own output
# to a file. Standard library only (the interpreter runs with -I -S).
HARNESS = r'''
import json, os, resource, signal, sys

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "spec.json")) as f:
    spec = json.load(f)
os.remove(os.path.join(here, "spec.json"))   # the expected outputs are not the answer's to read
limit = lambda which, value: resource.setrlimit(which, (value, value))
limit(resource.RLIMIT_AS, spec["memory_bytes"])
limit(resource.RLIMIT_CPU, spec["cpu_s"])
limit(resource.RLIMIT_FSIZE, spec["file_bytes"])
try:
    limit(resource.RLIMIT_NPROC, spec["processes"])
except (ValueError, OSError):
    pass
if spec["cgroup_procs"]:   # root: join the attempt's pids cgroup (RLIMIT_NPROC does not bind root)
    try:
        with open(spec["cgroup_procs"], "w") as f:
            f.write(str(os.getpid()))
    except OSError:   # a command prefix (a container, bwrap) hides it: its own limits apply
        pass
results = os.fdopen(os.dup(1), "w", buffering=1)
sink = os.open(os.path.join(here, "answer_output.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
os.dup2(sink, 1)
os.dup2(sink, 2)
os.close(sink)
sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)


class TestTimeout(BaseException):
    pass


def alarm(signum, frame):
    raise TestTimeout()


signal.signal(signal.SIGALRM, alarm)


def timed(fn, *args):
    signal.setitimer(signal.ITIMER_REAL, spec["test_timeout_s"])
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def status_of(error):
    if isinstance(error, TestTimeout):
        return "timeout"
    if isinstance(error, MemoryError):
        return "memory"
    return "error"


def report(**line):
    results.write(json.dumps(line) + "\n")


namespace = {"__name__": "__answer__"}
with open(os.path.join(here, "answer.py")) as f:
    source = f.read()
try:
    timed(exec, compile(source, "answer.py", "exec"), namespace)
    fn = namespace.get(spec["func_name"])
    if not callable(fn) and isinstance(namespace.get("Solution"), type):
        fn = getattr(timed(namespace["Solution"]), spec["func_name"], None)
except BaseException as error:
    report(load=status_of(error), error=f"{type(error).__name__}: {error}"[:300])
    sys.exit(0)
if not callable(fn):
    report(load="no_function")
    sys.exit(0)
report(load="ok")
for index, test in enumerate(spec["tests"]):
    try:
        got = timed(fn, *[json.loads(line) for line in test["input"].split("\n") if line.strip()])
    except BaseException as error:
        report(test=index, status=status_of(error))
        continue
    try:
        same = json.loads(json.dumps(got)) == json.loads(test["output"])
    except (TypeError, ValueError, RecursionError):   # not a JSON value: cannot equal the expected one
        same = False
    report(test=index, status="pass" if same else "wrong_answer")
'''


def prompt_imports(prompt: str | None) -> str:
    """The top-level import lines of a HumanEval prompt; without a prompt (LiveCodeBench, whose
    starter code annotates with List and the like unimported), `typing`'s names, as its harness does."""
    if prompt is None:
        return "from typing import *\n"
    return "".join(line + "\n" for line in prompt.splitlines() if IMPORT_LINE.match(line))


def prepare_answer(code: str, func_name: str, prompt: str | None) -> str | None:
    """The source the harness runs: the prompt's imports, the answer, and, when the answer defines no
    top-level `func_name` (nor a class), its last top-level function bound to that name. None when
    the answer does not parse."""
    source = prompt_imports(prompt) + code.strip("\n") + "\n"
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):   # null bytes, absurd nesting
        return None
    top = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    names = {node.name for node in top}
    functions = [node for node in top if isinstance(node, ast.FunctionDef)]
    if func_name not in names and "Solution" not in names and functions:
        source += f"\n{func_name} = {functions[-1].name}\n"
    return source


def _environment(work: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}


def _read_results(path: Path) -> tuple[list[dict], str]:
    """The harness's JSON lines, and the rest (an interpreter's traceback, a torn last line)."""
    lines, other = [], []
    for line in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            other.append(line)
    return lines, "\n".join(other)


def _outcome(lines: list[dict], total: int, timed_out: bool, returncode: int | None) -> ExecResult:
    load = next((line for line in lines if "load" in line), None)
    statuses = {line["test"]: line.get("status") for line in lines if isinstance(line.get("test"), int)}
    passed = sum(status == "pass" for status in statuses.values())
    if load is not None and load["load"] != "ok":   # error, timeout, memory or no_function while loading
        return ExecResult(False, 0, total, load["load"])
    if timed_out:
        return ExecResult(False, passed, total, "timeout")
    if len(statuses) < total:   # the harness died mid-way: CPU limit (SIGXCPU), a signal, a crash
        reason = "timeout" if returncode == -signal.SIGXCPU else "memory" if returncode == -signal.SIGKILL else "crashed"
        return ExecResult(False, passed, total, reason)
    failures = [statuses[i] for i in range(total) if statuses[i] != "pass"]
    if not failures:
        return ExecResult(True, passed, total, None)
    return ExecResult(False, passed, total, next((s for s in failures if s != "wrong_answer"), "wrong_answer"))


def run_code_tests(code: str, task, cfg: CodeExecConfig) -> ExecResult:
    """Run `code` against `task.tests` in a fresh process (see the module docstring)."""
    total = len(task.tests)
    if not total:
        return ExecResult(False, 0, 0, "no_tests")
    source = prepare_answer(code, task.func_name, task.prompt)
    if source is None:
        return ExecResult(False, 0, total, "syntax_error")
    root = Path(tempfile.mkdtemp(prefix="userlm-attempt-"))
    cgroup = _process_cgroup(root.name)
    try:
        work = root / "work"
        work.mkdir()
        (root / "harness.py").write_text(HARNESS)
        (root / "answer.py").write_text(source)
        (root / "spec.json").write_text(json.dumps({
            "func_name": task.func_name, "tests": [{"input": t.input, "output": t.output} for t in task.tests],
            "test_timeout_s": cfg.test_timeout_s, "memory_bytes": cfg.memory_mb << 20,
            "cpu_s": math.ceil(cfg.attempt_timeout_s) + 1, "file_bytes": FILE_SIZE_LIMIT_BYTES,
            "processes": PROCESS_LIMIT, "cgroup_procs": str(cgroup / "cgroup.procs") if cgroup else None}))
        prefix = [part.replace("{attempt_dir}", str(root)) for part in cfg.command_prefix]
        results = root / "results.jsonl"
        with open(results, "wb") as out:
            process = subprocess.Popen([*prefix, sys.executable, "-I", "-S", str(root / "harness.py")],
                                       cwd=work, env=_environment(work), stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=out, close_fds=True, start_new_session=True)
            timed_out = _wait(process, cfg.attempt_timeout_s)
        lines, other = _read_results(results)
        result = _outcome(lines, total, timed_out, process.returncode)
        if result.reason == "crashed":
            log.warning("%s: the attempt's interpreter exited with %s: %.500s", task.task_id, process.returncode, other)
        return result
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup)
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            log.warning("could not remove the attempt directory %s", root)


_warned_no_cgroup = False


def _process_cgroup(name: str) -> Path | None:
    """Under root, a new pids cgroup capped at CGROUP_TASK_LIMIT tasks for one attempt; else None."""
    global _warned_no_cgroup
    if os.geteuid() != 0:
        return None   # RLIMIT_NPROC binds
    cgroup = PIDS_CGROUPS / name
    try:
        cgroup.mkdir()
        (cgroup / "pids.max").write_text(str(CGROUP_TASK_LIMIT))
        return cgroup
    except OSError as error:
        if cgroup.exists():
            _remove_cgroup(cgroup)
        if not _warned_no_cgroup:
            log.warning("running as root without a writable pids cgroup (%s: %s): an answer's processes are not "
                        "capped, and a fork bomb is bounded only by the attempt timeout", PIDS_CGROUPS, error)
            _warned_no_cgroup = True
        return None


def _remove_cgroup(cgroup: Path) -> None:
    """Remove the attempt's cgroup; its one process, the harness, was waited for (or killed) already."""
    try:
        cgroup.rmdir()
    except OSError as error:
        log.warning("could not remove the attempt's cgroup %s: %s", cgroup, error)


def _wait(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the attempt; past `timeout_s`, kill its process group. Whether it timed out."""
    try:
        process.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        pass
    started = time.monotonic()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        log.warning("attempt process %d still alive %.0f s after SIGKILL", process.pid, time.monotonic() - started)
    return True
