"""The simulated users of `python -m evaluate.extrinsic` (`user.kind=`): each wants a LiC task solved
and reveals it to the assistant over the conversation.

    user_lm          a user LM (evaluate.simulator.UserSimulator, with the paper's guardrails) given an
                     intent written from the task by `intent.template` ({question}: the full problem,
                     {shards}: the shards' texts in order, joined by spaces); the default carries the
                     task's full information, so coverage can be measured. Its turns name no shard
                     (shard_id null): which shards it conveyed is judged afterwards (metrics).
    prompted_llm     an LLM behind any OpenAI-compatible endpoint (core.llm_client) playing the user as
                     Lost-in-Conversation's user agent does: turn 1 is shard 1, verbatim (as LiC sends
                     it); every later turn the LLM sees the conversation, the shards revealed so far and
                     those not yet revealed (`user.prompted_llm.prompt`), and answers with JSON
                     {"response", "shard_id"}: its message, revealing at most one new shard, rephrased,
                     and the id of the shard it revealed (-1 or null: none). A reply that is not that
                     JSON (or names a shard the task does not have) is asked again, up to
                     `output_retries` times, each refusal counted in the turn (`malformed_replies`);
                     when every try fails, and when a request fails for good (an HTTP error, a reply
                     over max_response_bytes), that conversation ends as user_error with its reason.
                     A dead endpoint stops the run (resumable).
    verbatim_shards  deterministic: turn k is shard k's text as written. For tests, and the floor of
                     every diversity metric (its unigram difference is 0, its coverage 100).

All three plug into evaluate.conversation.run_conversations: `check_intent_fits(intent)` and
`generate([TurnRequest]) -> [turn]`; the scripted and prompted users find each conversation's task
by `TurnRequest.conversation_id`. When every shard has been given and answered, the runner's stop
rule ends the conversation (shards_exhausted) before another user turn is asked for.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence

from core.llm_client import LLMClient, RequestFailed, json_object_in
from data_prep.chat_format import USER
from evaluate.extrinsic.config import UserKind
from evaluate.extrinsic.tasks import Task
from evaluate.simulator import TurnRequest, UserSimulator

USER_LM, PROMPTED_LLM, VERBATIM_SHARDS = UserKind.user_lm, UserKind.prompted_llm, UserKind.verbatim_shards
MALFORMED_REPLY = "malformed_reply"   # the user_error reason when every try was not the JSON asked for
NO_SHARD = (None, -1, 0)              # shard_id values that reveal no shard


def derive_seed(*parts) -> int:
    """A 31-bit seed from any parts (the run's seed, a task id, a run number, a turn): the same parts
    give the same seed on every machine and in every order of work."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "big") >> 1


def task_intent(template: str, task: Task) -> str:
    """The user LM's intent for a task: `template` with {question} and {shards}, on one line (the
    chat format's intents are one line: every run of whitespace becomes one space)."""
    shards = " ".join(shard.text for shard in task.shards)
    return " ".join(template.format(question=task.question, shards=shards).split())


def revealed_shards(turns: Sequence[dict]) -> set[int]:
    """The shard ids the user turns of a transcript name."""
    return {t["shard_id"] for t in turns if t["role"] == USER and t.get("shard_id") is not None}


@dataclass
class ShardTurn:
    """A user turn of the scripted or the prompted user (evaluate.conversation reads these fields)."""
    text: str | None
    shard_id: int | None = None          # the shard this turn reveals (None: none)
    malformed_replies: int | None = None  # prompted_llm: replies refused before this one (None: not asked)
    error: str | None = None             # the user failed for good (prompted_llm): why
    error_reason: str | None = None
    ended: bool = False                  # these users never send <|endconversation|>
    prompt_truncated: bool = False

    def metadata(self) -> dict:
        extra = {} if self.malformed_replies is None else {"malformed_replies": self.malformed_replies}
        return {"shard_id": self.shard_id, **extra}


class VerbatimShardsUser:
    """Turn k of a conversation is its task's shard k, verbatim. `tasks`: conversation id -> task."""

    def __init__(self, tasks: Mapping[str, Task]):
        self.tasks = tasks

    def check_intent_fits(self, intent: str | None) -> None:
        """No context to overflow."""

    def generate(self, requests: Sequence[TurnRequest]) -> list[ShardTurn]:
        turns = []
        for request in requests:
            task = self.tasks[request.conversation_id]
            given = sum(t["role"] == USER for t in request.turns)
            if given >= len(task.shards):   # the stop rule ends a conversation once its last shard is answered
                raise RuntimeError(f"verbatim_shards: conversation {request.conversation_id} asked for a turn after "
                                   f"its task's last shard ({len(task.shards)})")
            shard = task.shards[given]
            turns.append(ShardTurn(shard.text, shard.id))
        return turns


def render_transcript(turns: Sequence[dict]) -> str:
    return "\n\n".join(f"[{t['role']}]\n{t['content']}" for t in turns)


def render_shards(shards) -> str:
    return "\n".join(f"- shard {shard.id}: {shard.text}" for shard in shards) or "(none)"


def parse_user_reply(text: str, shard_ids: set[int]) -> tuple[str, int | None] | None:
    """(message, shard id or None) from the prompted user's reply: the JSON object in it (code fences
    or words around it are ignored), with a non-empty string `response` and a `shard_id` that is one
    of the task's or none (-1, 0, null). None when the reply is not that."""
    reply = json_object_in(text)
    if reply is None:
        return None
    message, shard_id = reply.get("response"), reply.get("shard_id")
    if not isinstance(message, str) or not message.strip():
        return None
    if isinstance(shard_id, str) and shard_id.lstrip("-").isdigit():
        shard_id = int(shard_id)
    if shard_id in NO_SHARD:
        return message.strip(), None
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) or shard_id not in shard_ids:
        return None
    return message.strip(), shard_id


class PromptedLLMUser:
    """An LLM playing the user, one shard at a time (the module docstring). `cfg`: user.prompted_llm
    (client, prompt, temperature, max_tokens, output_retries); `tasks` and `seeds`: conversation id
    -> its task and its seed (each request carries a seed derived from it, the turn and the try)."""

    def __init__(self, cfg, tasks: Mapping[str, Task], seeds: Mapping[str, int]):
        self.cfg, self.tasks, self.seeds = cfg, tasks, seeds
        # conversation id -> the shard id of each of its user turns so far (the runner hands users
        # the messages only): a turn 1 starts the list afresh
        self.shards_given: dict[str, list[int | None]] = {}

    def check_intent_fits(self, intent: str | None) -> None:
        """The prompt is the conversation itself: an endpoint's context limit fails the request instead."""

    def prompt(self, request: TurnRequest) -> str:
        task = self.tasks[request.conversation_id]
        revealed = set(self.shards_given[request.conversation_id]) - {None}
        return self.cfg.prompt.format(
            conversation=render_transcript(request.turns),
            revealed=render_shards([s for s in task.shards if s.id in revealed]),
            unrevealed=render_shards([s for s in task.shards if s.id not in revealed]))

    def generate(self, requests: Sequence[TurnRequest]) -> list[ShardTurn]:
        turns: list[ShardTurn | None] = [None] * len(requests)
        asked = []
        for i, request in enumerate(requests):
            given = sum(t["role"] == USER for t in request.turns)
            if given == 0:   # turn 1: shard 1 as written, as LiC
                first = self.tasks[request.conversation_id].shards[0]
                turns[i] = ShardTurn(first.text, first.id)
                self.shards_given[request.conversation_id] = []
            else:
                asked.append(i)
        if asked:
            for i, turn in zip(asked, asyncio.run(self._ask([requests[i] for i in asked]))):
                turns[i] = turn
        for request, turn in zip(requests, turns):
            if turn.error is None:
                self.shards_given[request.conversation_id].append(turn.shard_id)
        return turns

    async def _ask(self, requests: Sequence[TurnRequest]) -> list[ShardTurn]:
        cfg = self.cfg
        messages = [[{"role": "user", "content": self.prompt(r)}] for r in requests]
        shard_ids = [{s.id for s in self.tasks[r.conversation_id].shards} for r in requests]
        turn_numbers = [sum(t["role"] == USER for t in r.turns) + 1 for r in requests]
        results: list[ShardTurn | None] = [None] * len(requests)
        refused = [0] * len(requests)
        last_text = [""] * len(requests)
        pending = list(range(len(requests)))
        async with LLMClient(cfg.client) as client:
            for attempt in range(cfg.output_retries + 1):
                async def complete(i):
                    seed = derive_seed(self.seeds[requests[i].conversation_id], turn_numbers[i], attempt)
                    return await client.complete(messages[i], max_tokens=cfg.max_tokens,
                                                 temperature=cfg.temperature, seed=seed)
                replies = await asyncio.gather(*(complete(i) for i in pending), return_exceptions=True)
                retry = []
                for i, reply in zip(pending, replies):
                    if isinstance(reply, RequestFailed):
                        results[i] = ShardTurn(None, error=str(reply), error_reason=reply.reason)
                        continue
                    if isinstance(reply, BaseException):   # LLMConfigError, EndpointUnreachable: stop the run
                        raise reply
                    parsed = parse_user_reply(reply.text, shard_ids[i])
                    if parsed is None:
                        refused[i] += 1
                        last_text[i] = reply.text
                        retry.append(i)
                        continue
                    results[i] = ShardTurn(parsed[0], parsed[1], malformed_replies=refused[i])
                pending = retry
                if not pending:
                    break
        for i in pending:
            results[i] = ShardTurn(None, malformed_replies=refused[i], error_reason=MALFORMED_REPLY,
                                   error=f"{refused[i]} replies were not the JSON asked for; the last: "
                                         f"{last_text[i][:200]!r}")
        return results


def make_user(cfg, tasks: Mapping[str, Task], seeds: Mapping[str, int]):
    """The user that `cfg.user` describes; `tasks` and `seeds` by conversation id."""
    kind = cfg.user.kind   # a UserKind: the schema refuses any other at composition
    if kind == USER_LM:
        lm = cfg.user.user_lm
        return UserSimulator.from_config(lm.model, lm.sampling, lm.guardrails)
    if kind == PROMPTED_LLM:
        return PromptedLLMUser(cfg.user.prompted_llm, tasks, seeds)
    return VerbatimShardsUser(tasks)
