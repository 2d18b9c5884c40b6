"""Grading an assistant's reply to a LiC task: is it an answer attempt, what is the answer, is it right.

    grader = Grader(cfg.grading)
    grades = grader.grade_many([(task, reply_text), ...])   # [Grade(attempt, answer, correct, detail)]
    grader.close()

Two extractors (`grading.extractor`):
- `rule` (no LLM). Math: the last match in the reply of the GSM8K "flexible" pattern LiC uses,
  `(-?[$0-9.,]{2,})|(-?[0-9]+)`; a reply with no number is no attempt. So any reply holding a
  number counts as an attempt, a question ("did you mean 3 boxes?") included: the price of needing
  no judge. Code: the last fenced Python block (```python, ```py or a bare ```), else the last
  top-level `def` with its indented body; the code must define a function (`no_def` otherwise).
- `llm`: one judge request per reply (`grading.judge`, any OpenAI-compatible endpoint, temperature
  0), as LiC's system agent: the judge labels the reply with one of LiC's labels (`answer_attempt`,
  `clarification`, `interrogation`, `discussion`, `hedge`, `refuse`, `missing`) and, for math,
  copies the final answer. Only `answer_attempt` is an attempt (the other labels become the
  detail). The rule checks the judge: a math answer must occur verbatim in the reply and be a
  number, else the reply counts as no attempt (`answer_not_in_reply`, `answer_not_a_number`); code is extracted by the rule
  from a reply the judge called an attempt (`no_code_in_reply` when there is none). A judge request that fails for good, or a judge reply
  that is not the JSON asked for, makes no attempt (`judge_failed:<reason>`, `judge_unparsable`),
  logged.

Scoring. Math: GSM8K normalisation of the extracted number and of the gold (remove `,` and `$`,
then one trailing `.`), then exact string match: "$1,000." matches a gold "1,000"; "18.00" does
not match "18", as in LiC. Code: `code_exec.run_code_tests`; correct when every test passes; the
detail says `tests k/n` (and why: `timeout (tests 0/3)`).

Concurrency: the judge's requests go through core.llm_client (at most `judge.concurrency` in
flight); each code attempt runs in its own process, `code.workers` at a time, started as soon as
its reply is known to be an attempt, so code runs overlap the remaining judge requests.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import StrEnum, auto
from typing import Sequence

from omegaconf import MISSING, DictConfig, OmegaConf

from core.llm_client import ClientConfig, LLMClient, RequestFailed, json_object_in
from evaluate.extrinsic.code_exec import CodeExecConfig, ExecResult, run_code_tests
from evaluate.extrinsic.tasks import CODE, MATH, Task

log = logging.getLogger(__name__)

GSM8K_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")   # lm-eval-harness's "flexible-extract", as LiC
FENCED_BLOCK = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.IGNORECASE | re.DOTALL)
TOP_LEVEL_DEF = re.compile(r"^(?:async\s+)?def\s+\w+\s*\(", re.MULTILINE)
DEFINES_FUNCTION = re.compile(r"^\s*(?:async\s+)?def\s+\w+\s*\(", re.MULTILINE)
LABELS = ("answer_attempt", "clarification", "interrogation", "discussion", "hedge", "refuse", "missing")
JUDGE_MAX_TOKENS = 300

JUDGE_PROMPT = """You are reviewing one reply of an AI assistant in a conversation where a user wants help with {what}.

Label the reply with exactly one of these labels:
- answer_attempt: the reply commits to a complete final answer ({attempt}).
- clarification: the reply asks the user one question to clarify the request, without answering.
- interrogation: the reply asks the user several questions, without answering.
- discussion: the reply discusses the problem or explains, without committing to a final answer.
- hedge: the reply gives several alternative answers without choosing one.
- refuse: the reply declines to help.
- missing: the reply is empty or has no content.

{extract}

Answer with a JSON object only: {{"label": "<one label>", "answer": {answer_field}}}

The assistant's reply:
<<<
{reply}
>>>"""

KIND_PROMPTS = {
    MATH: dict(what="a math word problem", attempt="a final numerical answer",
               extract="If the label is answer_attempt, copy the final numerical answer exactly as it is "
                       "written in the reply (digits, signs, separators), without units or words.",
               answer_field='"<the final answer as written, or null>"'),
    CODE: dict(what="writing a Python function", attempt="a complete Python function",
               extract="Do not copy the code.", answer_field="null"),
}


class Extractor(StrEnum):
    rule = auto()     # regular expressions: no LLM
    llm = auto()      # a judge LLM labels and extracts; the rule checks it


@dataclass
class GradingConfig:
    extractor: Extractor = MISSING          # rule | llm
    judge: ClientConfig = field(default_factory=ClientConfig)   # read only when extractor=llm
    code: CodeExecConfig = field(default_factory=CodeExecConfig)


@dataclass
class Grade:
    attempt: bool            # the reply holds an answer attempt
    answer: str | None       # math: the number as written; code: the code
    correct: bool
    detail: str | None = None   # why not correct / how graded: no_attempt, wrong_answer, tests 2/3, ...

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the rule -------------------------------------------------------------------------------------------
def normalize_number(text: str) -> str:
    """GSM8K normalisation: without `,` and `$`, and without one trailing `.`."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def last_number(reply: str) -> str | None:
    """The last GSM8K flexible match in the reply, as written."""
    matches = GSM8K_NUMBER.findall(reply)
    if not matches:
        return None
    return next(group for group in matches[-1] if group)


def extract_code(reply: str) -> str | None:
    """The last fenced Python block of the reply, else its last top-level `def` with its body."""
    blocks = [code for language, code in FENCED_BLOCK.findall(reply)]
    if blocks:
        return blocks[-1].strip("\n") + "\n"
    starts = [m.start() for m in TOP_LEVEL_DEF.finditer(reply)]
    if not starts:
        return None
    lines = reply[starts[-1]:].split("\n")
    body = [lines[0]]
    for line in lines[1:]:
        if line.strip() and not line[0].isspace():   # back at column 0: the function has ended
            break
        body.append(line)
    return "\n".join(body).rstrip() + "\n"


def grade_math(answer: str | None, task: Task) -> Grade:
    if answer is None:
        return Grade(False, None, False, "no_attempt")
    correct = normalize_number(answer) == normalize_number(task.answer)
    return Grade(True, answer, correct, None if correct else "wrong_answer")


def code_grade(code: str, result: ExecResult) -> Grade:
    tests = f"tests {result.passed_tests}/{result.total_tests}"
    detail = tests if result.reason in (None, "wrong_answer") else f"{result.reason} ({tests})"
    return Grade(True, code, result.passed, detail)


# ---- the judge ------------------------------------------------------------------------------------------
def judge_messages(task: Task, reply: str) -> list[dict]:
    return [{"role": "user", "content": JUDGE_PROMPT.format(**KIND_PROMPTS[task.kind], reply=reply)}]


def parse_judge(text: str) -> tuple[str, str | None] | None:
    """(label, answer) of a judge reply; None when it is not the JSON object asked for."""
    verdict = json_object_in(text)
    if verdict is None or verdict.get("label") not in LABELS:
        return None
    answer = verdict.get("answer")
    return verdict["label"], (str(answer).strip() if answer is not None else None)


def math_answer_check(answer: str | None, reply: str) -> str | None:
    """Why the rule rejects the judge's math answer (None: it is a number written in the reply)."""
    if not answer or answer not in reply:
        return "answer_not_in_reply"
    return "answer_not_a_number" if last_number(answer) is None else None


class Grader:
    """Grades replies (see the module docstring); holds the code workers' thread pool until close()."""

    def __init__(self, cfg: GradingConfig):
        self.extractor = Extractor(str(cfg.extractor))
        code = cfg.code
        self.code_cfg: CodeExecConfig = OmegaConf.to_object(code) if isinstance(code, DictConfig) else code
        self.judge_cfg: ClientConfig | None = None
        if self.extractor == Extractor.llm:
            judge = cfg.judge
            self.judge_cfg = OmegaConf.to_object(judge) if isinstance(judge, DictConfig) else judge
        self.pool = ThreadPoolExecutor(max_workers=self.code_cfg.workers, thread_name_prefix="code-attempt")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _run_code(self, code: str | None, task: Task, no_code: str = "no_attempt") -> Future | Grade:
        """A future Grade of code that runs, or a Grade at once when there is nothing to run."""
        if code is None:
            return Grade(False, None, False, no_code)
        if not DEFINES_FUNCTION.search(code):
            return Grade(False, None, False, "no_def")
        return self.pool.submit(lambda: code_grade(code, run_code_tests(code, task, self.code_cfg)))

    def _rule(self, task: Task, reply: str) -> Future | Grade:
        if task.kind == MATH:
            return grade_math(last_number(reply), task)
        return self._run_code(extract_code(reply), task)

    def _judged(self, task: Task, reply: str, outcome) -> Future | Grade:
        if isinstance(outcome, RequestFailed):
            log.warning("judge request failed for %s: %s", task.task_id, outcome)
            return Grade(False, None, False, f"judge_failed:{outcome.reason}")
        verdict = parse_judge(outcome.text)
        if verdict is None:
            log.warning("judge reply for %s is not the JSON asked for: %.200r", task.task_id, outcome.text)
            return Grade(False, None, False, "judge_unparsable")
        label, answer = verdict
        if label != "answer_attempt":
            return Grade(False, None, False, label)
        if task.kind == CODE:
            return self._run_code(extract_code(reply), task, no_code="no_code_in_reply")
        rejected = math_answer_check(answer, reply)
        if rejected:
            return Grade(False, None, False, rejected)
        return grade_math(answer, task)

    def grade_many(self, items: Sequence[tuple[Task, str]]) -> list[Grade]:
        """Grade every (task, reply), in order; judge requests and code runs proceed concurrently."""
        for task, _ in items:
            if task.kind not in (MATH, CODE):
                raise ValueError(f"task {task.task_id}: cannot grade kind {task.kind!r}")
        if self.extractor == Extractor.rule:
            pending = [self._rule(task, reply) for task, reply in items]
        else:
            pending = asyncio.run(self._judge_all(items))
        return [p.result() if isinstance(p, Future) else p for p in pending]

    async def _judge_all(self, items: Sequence[tuple[Task, str]]) -> list[Future | Grade]:
        pending: list = [None] * len(items)
        async with LLMClient(self.judge_cfg) as client:
            requests = [judge_messages(task, reply) for task, reply in items]
            async for index, outcome in client.complete_many(requests, temperature=0.0, max_tokens=JUDGE_MAX_TOKENS):
                task, reply = items[index]
                pending[index] = self._judged(task, reply, outcome)   # code starts on the pool at once
        return pending

