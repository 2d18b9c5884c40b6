"""Every metric of extrinsic.json, computed from the transcripts of `python -m evaluate.extrinsic`.

    judge = make_judge(cfg.metrics)                       # a ShardJudge, or None (metrics.judge.enabled=false)
    result = extrinsic_metrics(records, tasks, judge, cfg.metrics)
    result["overall"]["task_score"], result["by_kind"]["math"]["turns"]["variance"], result["end_reasons"]

`records`: transcripts.jsonl's conversations (task_id, kind, run, turns, end_reason, correct; user turns
are the turns with role "user": an ending `<|endconversation|>` is no turn); `tasks`: task_id -> Task.
Every conversation counts in every metric, whatever its end reason (one ended as intent_too_long has
no user turn: coverage 0, 0 turns). Blocks: `by_kind.math`, `by_kind.code` (always both; a kind
without conversations has counts 0 and null metrics) and `overall`, each with:

    conversations, tasks    how many conversations, and distinct tasks they belong to
    task_score              % of conversations with correct = true (the conversation's last answer attempt
                            was correct)
    intent_coverage         per conversation, the % of its task's shards the user's turns conveyed; the
                            mean over conversations. A shard is conveyed when
                              - its text (case and whitespace folded) occurs in one user turn: conveyed,
                                no judge asked (so the verbatim_shards user scores 100 by construction);
                              - else, with a judge: the judge says YES to "did the user convey this piece
                                of information?" (one question per conversation and shard, over all the
                                user's turns);
                              - else (no judge, or its reply was neither YES nor NO, or its request failed
                                for good: counted in `judge.coverage`), lexically: at least
                                `metrics.lexical_threshold` (0.5) of the shard's content words (lowercased
                                word tokens, apostrophes dropped, NLTK's English stopwords out; a shard of
                                stopwords only uses all its words) occur among the user turns' words.
                                A shard without words is conveyed.
    turns                   user turns per conversation. Per task over its runs: mean, variance
                            (population, ddof 0: a task with one run has 0), range_p10 and range_p90
                            (10th and 90th percentiles, linear interpolation); each then averaged over
                            the block's tasks (every task weighs the same).
    unigram_difference      per conversation, the share (0-1) of the distinct word unigrams (lowercased
                            word tokens, stopwords kept) of all the user's turns that occur in none of
                            its task's shards; the mean over conversations with at least one user word
                            (the others are counted in `without_user_words`). The verbatim user scores 0.
    lic                     Lost-in-Conversation's per-task statistics of the scores S (100 if correct,
                            else 0) over the task's runs: performance = mean(S), aptitude_a90 = the 90th
                            percentile of S, unreliability_u90_10 = the 90th minus the 10th percentile
                            (linear interpolation); each averaged over the block's tasks.
    added_requirements      % of the judged conversations in which the judge says YES to "did the user
                            ask for anything that is not part of the task?" (the task given as all its
                            shards). A conversation whose every user turn is one of its shards verbatim
                            added nothing, without a judge. Null without a judge, or when no
                            conversation could be judged (malformed or failed replies, counted).
    end_reasons             conversations by end reason

Plus, at the top: `end_reasons` (overall's), `coverage` (judge | lexical, and the threshold) and `judge`
(the model and the counts of its answers per question kind; null without a judge).

The UserLM paper (Section 4, Table 3) reports intent coverage, turn-count variance and range, unigram
difference and the assistant's task score without publishing how it computed them; LiC defines P, A90
and U90_10. Every definition above where the paper is silent is ours: the paper's "range" is read as
the 10th-90th percentile range, "unigram difference" as the share of the user's unigrams that are not
the task's own words. Judge prompts and the lexical threshold are configuration (MetricsConfig).
Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Sequence

import numpy as np

from core.llm_client import ClientConfig, LLMClient, RequestFailed, parse_verdict
from evaluate.extrinsic.tasks import CODE, MATH, Task
from evaluate.lexical import STOPWORDS, unigrams

log = logging.getLogger(__name__)
USER = "user"
RECORD_FIELDS = ("task_id", "kind", "run", "turns", "end_reason", "correct")
YES, NO, MALFORMED, FAILED = "yes", "no", "malformed", "failed"   # a judge's answer to one question
VERBATIM, LEXICAL, ASKED = "verbatim", "lexical", "asked"         # how a shard's coverage was decided

COVERAGE_PROMPT = """A user talked with an AI assistant to get a task done. The task is made of pieces of information. Below are one piece, and every message the user wrote.

The piece of information:
<piece>
{shard}
</piece>

The user's messages:
<messages>
{user_turns}
</messages>

Did the user convey this piece of information in their messages, in any words? Answer with YES or NO only."""

ADDED_REQUIREMENTS_PROMPT = """A user talked with an AI assistant to get the task below done.

Everything the task asks for:
<task>
{shards}
</task>

The user's messages:
<messages>
{user_turns}
</messages>

Did the user ask for anything that is not part of the task, such as an extra requirement or constraint, example test cases, a naming convention or an output format the task does not ask for? Restating the task, or answering the assistant's questions about it, does not count. Answer with YES or NO only."""


@dataclass
class MetricsJudgeConfig:
    """The LLM judge of intent coverage and added requirements (YES/NO questions, temperature 0)."""
    enabled: bool = False                 # false: lexical coverage only, added_requirements null
    client: ClientConfig = field(default_factory=ClientConfig)   # model ??? : metrics.judge.client.model=...
    max_tokens: int = 4
    coverage_prompt: str = COVERAGE_PROMPT                        # {shard} {user_turns}
    added_requirements_prompt: str = ADDED_REQUIREMENTS_PROMPT    # {shards} {user_turns}


@dataclass
class MetricsConfig:
    """extrinsic.json's metrics (YAML `metrics:`): the defaults are written here once, as ClientConfig's are."""
    # Lexical coverage (no judge, or an unusable judge reply): a shard is conveyed when at least this
    # share of its content words occurs in the user's turns. Ours: the paper does not say.
    lexical_threshold: float = 0.5
    judge: MetricsJudgeConfig = field(default_factory=MetricsJudgeConfig)


class ShardJudge:
    """Asks the metrics' YES/NO questions through core.llm_client, all of a run's in one client session."""

    def __init__(self, cfg: MetricsJudgeConfig):
        self.cfg = cfg

    @property
    def model(self) -> str:
        return self.cfg.client.model

    def coverage_question(self, shard: str, user_turns: str) -> str:
        return self.cfg.coverage_prompt.format(shard=shard, user_turns=user_turns)

    def added_requirements_question(self, shards: str, user_turns: str) -> str:
        return self.cfg.added_requirements_prompt.format(shards=shards, user_turns=user_turns)

    def answers(self, questions: Sequence[str]) -> list[str]:
        """YES, NO, MALFORMED (a reply that is neither) or FAILED (the request failed for good), in order."""
        if not questions:
            return []

        async def ask():
            async with LLMClient(self.cfg.client) as client:
                return await client.complete_all([[{"role": "user", "content": q}] for q in questions],
                                                 max_tokens=self.cfg.max_tokens, temperature=0.0)
        answers = []
        for reply in asyncio.run(ask()):
            verdict = None if isinstance(reply, RequestFailed) else parse_verdict(reply.text)
            answers.append(FAILED if isinstance(reply, RequestFailed) else MALFORMED if verdict is None
                           else YES if verdict else NO)
        return answers


def make_judge(cfg: MetricsConfig) -> ShardJudge | None:
    return ShardJudge(cfg.judge) if cfg.judge.enabled else None


def extrinsic_metrics(records: Sequence[dict], tasks: Mapping[str, Task], judge: ShardJudge | None,
                      cfg: MetricsConfig | None = None) -> dict:
    """extrinsic.json's metrics (the module docstring defines each). A record naming an unknown task,
    missing a field, of another kind than its task, or repeating a (task_id, run) is an error naming it."""
    cfg = cfg or MetricsConfig()
    if not 0.0 < cfg.lexical_threshold <= 1.0:
        raise ValueError(f"metrics.lexical_threshold must be in (0, 1], got {cfg.lexical_threshold}")
    conversations = [_conversation(number, record, tasks) for number, record in enumerate(records)]
    _judge_all(conversations, judge, cfg.lexical_threshold)
    kinds = [MATH, CODE] + sorted({c.task.kind for c in conversations} - {MATH, CODE})
    overall = _block(conversations, judge is not None)
    return {"by_kind": {kind: _block([c for c in conversations if c.task.kind == kind], judge is not None)
                        for kind in kinds},
            "overall": overall,
            "end_reasons": overall["end_reasons"],
            "coverage": {"method": "judge" if judge else "lexical", "lexical_threshold": cfg.lexical_threshold},
            "judge": None if judge is None else {
                "model": judge.model,
                "coverage": dict(sorted(Counter(c for conv in conversations for c in conv.coverage_how).items())),
                "added_requirements": dict(sorted(Counter(conv.added_how for conv in conversations).items()))}}


# ---- one conversation --------------------------------------------------------------------------------
@dataclass
class _Conversation:
    task: Task
    run: int
    user_turns: list[str]
    end_reason: str
    correct: bool
    conveyed: list[bool] = field(default_factory=list)      # per shard of the task, in its order
    coverage_how: list[str] = field(default_factory=list)   # per shard: verbatim, lexical, yes, no, malformed, failed
    added: bool | None = None                                # None: not judged
    added_how: str | None = None                             # verbatim, yes, no, malformed, failed

    @cached_property
    def user_words(self) -> set[str]:
        """The words of every user turn, as _lexically_conveyed compares them (each shard asks for them)."""
        return set().union(*map(_words, self.user_turns))

    @cached_property
    def unigram_difference(self) -> float | None:
        """The share of the user turns' distinct unigrams that no shard holds (None: no user words);
        computed once, though the conversation is in several blocks (overall, its kind)."""
        user = set().union(*(unigrams(turn) for turn in self.user_turns))
        if not user:
            return None
        shards = set().union(*(unigrams(shard.text) for shard in self.task.shards))
        return len(user - shards) / len(user)


def _conversation(number: int, record: dict, tasks: Mapping[str, Task]) -> _Conversation:
    where = f"transcript record {number}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: not a JSON object")
    for name in RECORD_FIELDS:
        if name not in record:
            raise ValueError(f"{where}: missing field {name!r}")
    where += f" (task {record['task_id']!r}, run {record['run']})"
    task = tasks.get(record["task_id"])
    if task is None:
        raise ValueError(f"{where}: field 'task_id' names a task that is not among the {len(tasks)} loaded")
    if not task.shards:
        raise ValueError(f"{where}: its task has no shards")
    if record["kind"] != task.kind:
        raise ValueError(f"{where}: field 'kind' is {record['kind']!r}, the task's is {task.kind!r}")
    if not isinstance(record["turns"], list) or any(
            not isinstance(t, dict) or not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str)
            for t in record["turns"]):
        raise ValueError(f"{where}: field 'turns' must be a list of {{role, content}} objects")
    if not isinstance(record["correct"], bool):
        raise ValueError(f"{where}: field 'correct' must be true or false, got {record['correct']!r}")
    return _Conversation(task, record["run"], [t["content"] for t in record["turns"] if t["role"] == USER],
                         record["end_reason"], record["correct"])


def _folded(text: str) -> str:
    return " ".join(text.lower().split())


def _words(text: str) -> set[str]:
    return {w.replace("'", "") for w in unigrams(text)}


def _lexically_conveyed(shard: str, c: _Conversation, threshold: float) -> bool:
    words = _words(shard)
    words = (words - STOPWORDS) or words
    return not words or len(words & c.user_words) / len(words) >= threshold


def _user_text(turns: Sequence[str]) -> str:
    return "\n\n".join(f"Message {number}: {turn}" for number, turn in enumerate(turns, 1))


def _judge_all(conversations: Sequence[_Conversation], judge: ShardJudge | None, threshold: float) -> None:
    """Fill each conversation's conveyed shards and added requirements: verbatim ones first, then one
    batch of judge questions for the rest (lexical coverage where there is no judge or no usable answer)."""
    questions, pending = [], []   # pending: (conversation, shard index or None for added requirements)
    for c in conversations:
        folded_turns = [_folded(turn) for turn in c.user_turns]
        for index, shard in enumerate(c.task.shards):
            if any(_folded(shard.text) in turn for turn in folded_turns):
                how = VERBATIM
            elif judge is None:
                how = LEXICAL
            else:
                how = ASKED
                questions.append(judge.coverage_question(shard.text, _user_text(c.user_turns)))
                pending.append((c, index))
            c.coverage_how.append(how)
            c.conveyed.append(how == VERBATIM or (how == LEXICAL and _lexically_conveyed(shard.text, c, threshold)))
        if judge is None:
            continue
        shard_texts = {_folded(shard.text) for shard in c.task.shards}
        if all(turn in shard_texts for turn in folded_turns):
            c.added, c.added_how = False, VERBATIM
        else:
            questions.append(judge.added_requirements_question(
                "\n".join(f"- {shard.text}" for shard in c.task.shards), _user_text(c.user_turns)))
            pending.append((c, None))
    answers = judge.answers(questions) if judge is not None else []
    unusable = Counter(a for a in answers if a in (MALFORMED, FAILED))
    if unusable:
        log.warning("metrics judge: %s of %d answers unusable (coverage falls back to the lexical rule; added "
                    "requirements unjudged)", dict(sorted(unusable.items())), len(answers))
    for (c, index), answer in zip(pending, answers, strict=True):
        if index is None:
            c.added, c.added_how = {YES: True, NO: False}.get(answer), answer
        else:   # an unusable answer falls back to the lexical rule
            c.coverage_how[index] = answer
            c.conveyed[index] = (answer == YES if answer in (YES, NO)
                                 else _lexically_conveyed(c.task.shards[index].text, c, threshold))


# ---- a block of conversations -------------------------------------------------------------------------
def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _block(conversations: Sequence[_Conversation], judged: bool) -> dict:
    by_task: dict[str, list[_Conversation]] = {}
    for c in sorted(conversations, key=lambda c: (c.task.task_id, c.run)):
        by_task.setdefault(c.task.task_id, []).append(c)
    per_task = []
    for task_id, runs in by_task.items():
        runs_seen = [c.run for c in runs]
        if len(set(runs_seen)) != len(runs_seen):
            raise ValueError(f"transcript records: task {task_id!r} has run {Counter(runs_seen).most_common(1)[0][0]} "
                             "more than once")
        turns = np.array([len(c.user_turns) for c in runs], dtype=np.float64)
        scores = np.array([100.0 if c.correct else 0.0 for c in runs])
        t10, t90 = np.percentile(turns, [10, 90])
        s10, s90 = np.percentile(scores, [10, 90])
        per_task.append({"mean": float(turns.mean()), "variance": float(turns.var()), "range_p10": float(t10),
                         "range_p90": float(t90), "performance": float(scores.mean()), "aptitude_a90": float(s90),
                         "unreliability_u90_10": float(s90 - s10)})
    differences = [c.unigram_difference for c in conversations if c.unigram_difference is not None]
    added = [c.added for c in conversations if c.added is not None]
    return {
        "conversations": len(conversations),
        "tasks": len(by_task),
        "task_score": _mean(100.0 * c.correct for c in conversations),
        "intent_coverage": _mean(100.0 * sum(c.conveyed) / len(c.conveyed) for c in conversations),
        "turns": {key: _mean(t[key] for t in per_task) for key in ("mean", "variance", "range_p10", "range_p90")},
        "unigram_difference": _mean(differences),
        "without_user_words": len(conversations) - len(differences),
        "lic": {key: _mean(t[key] for t in per_task) for key in ("performance", "aptitude_a90", "unreliability_u90_10")},
        "added_requirements": _mean(100.0 * a for a in added) if judged else None,
        "end_reasons": dict(sorted(Counter(c.end_reason for c in conversations).items())),
    }
