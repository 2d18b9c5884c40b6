"""`python -m evaluate.extrinsic`: the paper's extrinsic evaluation (its Section 4) on Lost-in-Conversation
(LiC) tasks. A simulated user (evaluate.extrinsic.users) wants a GSM8K-style math problem solved or a
HumanEval-style Python function written and reveals the task shard by shard to an assistant
(evaluate.assistants, told the task kind's system prompt); every assistant reply is graded
(evaluate.extrinsic.grading), and the metrics of extrinsic.json (evaluate.extrinsic.metrics) are
computed over all conversations.

    python -m evaluate.extrinsic experiment=tiny                                # CPU, seconds
    OPENAI_API_KEY=... python -m evaluate.extrinsic experiment=paper            # UserLM-8b vs GPT-4o
    OPENAI_API_KEY=... python -m evaluate.extrinsic experiment=paper user.kind=prompted_llm \\
        user.prompted_llm.client.model=gpt-4o-mini-2024-07-18                   # GPT-4o-mini as the user

A conversation runs through evaluate.conversation.run_conversations and ends with one of:
    task_solved       the assistant's latest reply was graded correct
    shards_exhausted  every shard of the task was given (verbatim_shards, prompted_llm: the shard ids
                      their turns name) and the assistant answered the last one
    max_turns         conversation.max_user_turns user turns sent and answered
    user_ended        the user LM sent <|endconversation|>
    assistant_error   the assistant's request failed for good (its reason recorded)
    user_error        the prompted_llm user's request failed for good, or every try was malformed
    intent_too_long   the user LM's intent alone does not fit its context
The replies of a round are graded together (Grader.grade_many: judge requests and code runs in
parallel), before the stop rule reads each one's grade; checked in that order: a correct last answer
is task_solved even on the last allowed turn.

Outputs in <output_dir>/<name>/ (name: the user LM's model directory name, `prompted_llm--<model>`, or
`verbatim_shards`; `name=` sets it):
    transcripts.jsonl   one conversation per line: task_id, kind, run, user, intent (user_lm's, else
                        null), turns (user turns with shard_id, user_lm's with their guardrail metadata;
                        assistant turns with their grade {attempt, answer, correct, detail}),
                        end_reason, correct (the last answer attempt was correct; false without one),
                        and the end reason's error fields
    extrinsic.json      the metrics (by_kind, overall, end_reasons, ...) with config, tasks (provenance,
                        skipped), user, assistant and simulation (errors by reason, malformed user replies)
    config.yaml, manifest.json   the resolved config, the tasks' provenance, package versions
The API keys are read from the variables named by api_key_env and written nowhere; generated code
runs isolated (grading.code), with an environment that holds no key.

Seeds and resuming. Run r of task t is one of `simulations_per_task` conversations, with a seed derived
from (seed, task_id, r): the prompted_llm user sends seeds derived from it (and the turn) with its
requests. Conversations are simulated in chunks of up to `conversation.pool_size` consecutive
(task, run) pairs of one task kind, every chunk as one batch from a torch seed derived from its first
pair, so a chunk's sampling (a local user LM or assistant) does not depend on what ran before it.
transcripts.jsonl is append-only (core.jsonl); a rerun with the same config skips the pairs already
there, and a chunk a kill left unfinished is simulated again as a whole with only its missing
conversations written: the same bytes as one uninterrupted run (on the same machine and software),
at the cost of repeating at most one chunk's finished conversations.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from tqdm import tqdm

import evaluate.extrinsic.config  # noqa: F401  (registers the config schema)
from core import artifacts
from core.llm_client import check_config_key_names
from data_prep.chat_format import ASSISTANT, USER
from evaluate.assistants import describe, make_assistant, with_system_prompt
from evaluate.config import result_name
from evaluate.conversation import (ASSISTANT_ERROR, USER_ENDED, USER_ERROR, Conversation, max_user_turns,
                                   run_conversations)
from evaluate.extrinsic.grading import Grader
from evaluate.extrinsic.metrics import extrinsic_metrics, make_judge
from evaluate.extrinsic.tasks import Task, load_tasks
from evaluate.extrinsic.users import PROMPTED_LLM, USER_LM, derive_seed, make_user, revealed_shards, task_intent
from evaluate.simulate import resume_into
from evaluate.transcripts import read_transcripts

TASK_SOLVED, SHARDS_EXHAUSTED = "task_solved", "shards_exhausted"


@dataclass(frozen=True)
class Item:
    """Run `run` of a task: one conversation."""
    task: Task
    run: int

    @property
    def key(self) -> tuple[str, int]:
        return self.task.task_id, self.run

    @property
    def conversation_id(self) -> str:
        return f"{self.task.task_id}#{self.run}"


def plan(tasks: Sequence[Task], simulations_per_task: int) -> list[Item]:
    """Every (task, run), task by task: kind by kind (in the order kinds first occur), each kind in the
    tasks' order, so that chunks (one kind each) are full."""
    kinds = list(dict.fromkeys(task.kind for task in tasks))
    return [Item(task, run) for kind in kinds for task in tasks if task.kind == kind
            for run in range(simulations_per_task)]


def chunks(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive items of one task kind, at most `size` at a time (a kind's assistant has its system prompt)."""
    chunk: list[Item] = []
    for item in items:
        if chunk and (len(chunk) == size or item.task.kind != chunk[0].task.kind):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def stop_rule(tasks: Mapping[str, Task], limit: int):
    """After each assistant reply (graded by then): task_solved, shards_exhausted, max_turns, in that order."""
    cap = max_user_turns(limit)

    def stop(conversation: Conversation) -> str | None:
        last = conversation.turns[-1]
        if last["role"] != ASSISTANT:
            return None
        if last["grade"]["correct"]:
            return TASK_SOLVED
        if revealed_shards(conversation.turns) >= {s.id for s in tasks[conversation.id].shards}:
            return SHARDS_EXHAUSTED
        return cap(conversation)
    return stop


def grade_replies(grader: Grader, tasks: Mapping[str, Task]):
    """The runner's on_replies: one grade_many call for a round's replies, each grade stored in its turn."""
    def grade(conversations: Sequence[Conversation]) -> None:
        grades = grader.grade_many([(tasks[c.id], c.turns[-1]["content"]) for c in conversations])
        for conversation, g in zip(conversations, grades):
            conversation.turns[-1]["grade"] = g.to_dict()
    return grade


def record(conversation: Conversation, item: Item, user_kind: str) -> dict:
    """The transcripts.jsonl line of a finished conversation."""
    attempts = [t["grade"] for t in conversation.turns if t["role"] == ASSISTANT and t["grade"]["attempt"]]
    turns = [{"shard_id": None, **t} if t["role"] == USER and "shard_id" not in t else t   # user_lm names none
             for t in conversation.turns]
    row = {"task_id": item.task.task_id, "kind": str(item.task.kind), "run": item.run, "user": user_kind,
           "intent": conversation.intent, "turns": turns, "end_reason": conversation.end_reason,
           "correct": bool(attempts) and attempts[-1]["correct"]}
    if user_kind == USER_LM:
        row["truncated_prompts"] = conversation.truncated_prompts
    if conversation.end_reason == USER_ENDED:
        row["end_turn"] = conversation.end_turn
    return {**row, **conversation.error_fields()}


def describe_user(cfg) -> dict:
    """Who plays the user, for reports (an endpoint's key variable name, never the key)."""
    kind = str(cfg.user.kind)
    if kind == USER_LM:
        model = cfg.user.user_lm.model
        return {"kind": kind, "model": model.name_or_path, "protocol": str(model.protocol)}
    if kind == PROMPTED_LLM:
        client = cfg.user.prompted_llm.client
        return {"kind": kind, "base_url": client.base_url, "model": client.model, "api_key_env": client.api_key_env}
    return {"kind": kind}


def default_name(cfg) -> str:
    """The results folder's name: the user LM's model directory name, else the user kind (+ its model)."""
    kind = str(cfg.user.kind)
    if kind == USER_LM:
        return result_name(cfg.user.user_lm.model.name_or_path, str(cfg.user.user_lm.model.protocol))
    if kind == PROMPTED_LLM:
        return f"{kind}--{result_name(cfg.user.prompted_llm.client.model, 'userlm')}"
    return kind


def run(cfg) -> Path:
    """Converse, grade and measure into <output_dir>/<name>/, holding that directory's lock."""
    check_config_key_names(cfg)  # before the config is written anywhere
    with artifacts.owned_directory(Path(cfg.output_dir) / (cfg.name or default_name(cfg)), "extrinsic") as out_dir:
        return evaluate(cfg, out_dir)


def evaluate(cfg, out_dir: Path) -> Path:
    # ---- config, tasks and what is already done ----------------------------------------------------
    run_config, transcripts_path, writer = resume_into(cfg, out_dir)
    done = {(r["task_id"], r["run"]) for r in read_transcripts(transcripts_path)}
    loaded = load_tasks(cfg.tasks)
    tasks_provenance = {**loaded.provenance, "skipped": loaded.skipped}
    items = plan(loaded.tasks, cfg.simulations_per_task)
    user_kind = str(cfg.user.kind)
    artifacts.write_json(out_dir / "manifest.json", {
        "config": artifacts.resolved_config(run_config), "tasks": tasks_provenance, "user": describe_user(cfg),
        "assistant": describe(cfg.assistant), "packages": artifacts.package_versions()})
    todo = [chunk for chunk in chunks(items, cfg.conversation.pool_size) if any(i.key not in done for i in chunk)]
    finished = sum(i.key in done for i in items)
    print(f"{len(loaded.tasks)} tasks x {cfg.simulations_per_task} runs (skipped: {dict(loaded.skipped)}): "
          f"{finished} conversations already done, {len(items) - finished} to simulate")

    # ---- converse: every finished conversation is written (and fsynced) at once ---------------------
    if todo:
        tasks = {i.conversation_id: i.task for i in items}
        seeds = {i.conversation_id: derive_seed(cfg.seed, i.task.task_id, i.run) for i in items}
        by_id = {i.conversation_id: i for i in items}
        user = make_user(cfg, tasks, seeds)
        base = make_assistant(cfg.assistant)
        assistants = {kind: with_system_prompt(base, prompt) for kind, prompt in cfg.assistant.system_prompts.items()}
        grader = Grader(cfg.grading)
        stop = stop_rule(tasks, cfg.conversation.max_user_turns)
        try:
            with writer, tqdm(total=len(items), initial=finished, desc="extrinsic", unit="conversation",
                              disable=not cfg.progress) as bar:
                for chunk in todo:
                    torch.manual_seed(seeds[chunk[0].conversation_id])
                    conversations = [(i.conversation_id, task_intent(cfg.intent.template, i.task)
                                      if user_kind == USER_LM else None) for i in chunk]
                    for c in run_conversations(user, assistants[str(chunk[0].task.kind)], conversations, stop,
                                               cfg.conversation.end_allowed_after, len(chunk),
                                               on_replies=grade_replies(grader, tasks)):
                        item = by_id[c.id]
                        if item.key in done:   # simulated again only so that the rest is drawn as in one run
                            continue
                        writer.append(record(c, item, user_kind))
                        bar.update()
        finally:
            grader.close()
    else:
        writer.close()

    # ---- metrics over the whole run (resumed parts included), in the plan's order --------------------
    by_key = {(r["task_id"], r["run"]): r for r in read_transcripts(transcripts_path)}
    records = [by_key[i.key] for i in items if i.key in by_key]
    result = extrinsic_metrics(records, {t.task_id: t for t in loaded.tasks}, make_judge(cfg.metrics), cfg.metrics)
    result.update(config=artifacts.resolved_config(run_config), tasks=tasks_provenance, user=describe_user(cfg),
                  assistant=describe(cfg.assistant), simulation=simulation_counts(records))
    artifacts.write_json(out_dir / "extrinsic.json", result)
    overall = result["overall"]
    print(f"{overall['conversations']} conversations of {overall['tasks']} tasks: task score "
          f"{overall['task_score']}, intent coverage {overall['intent_coverage']}; end reasons "
          f"{result['end_reasons']} -> {out_dir / 'extrinsic.json'}")
    return out_dir


def simulation_counts(records: Sequence[dict]) -> dict:
    """What went wrong while conversing: errors by reason, the prompted user's refused replies."""
    return {"conversations": len(records),
            "assistant_errors": dict(sorted(Counter(r["assistant_error_reason"] for r in records
                                                    if r["end_reason"] == ASSISTANT_ERROR).items())),
            "user_errors": dict(sorted(Counter(r["user_error_reason"] for r in records
                                               if r["end_reason"] == USER_ERROR).items())),
            "malformed_user_replies": sum(t.get("malformed_replies", 0) for r in records for t in r["turns"]),
            "truncated_prompts": sum(r.get("truncated_prompts", 0) for r in records)}
