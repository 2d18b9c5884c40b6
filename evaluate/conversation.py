"""One conversation runner: a user simulator (evaluate.simulator) and an assistant
(evaluate.assistants) take turns, many conversations at once. evaluate.simulate's transcripts and
the adherence metrics' two-turn exchanges (evaluate.judges) both come from here.

    for c in run_conversations(simulator, assistant, [("id-1", intent), ...], stop=max_user_turns(3),
                               end_allowed_after=1, pool_size=32):
        c.end_reason, c.turns            # finished conversations, in the order they finish

Every round draws the next user turn of all running conversations in one batch and asks the
assistant for all replies at once; a finished conversation makes room for the next one.

A conversation ends with one of these end reasons:
    intent_too_long   at once: the intent alone does not fit in the user LM's context (`error`)
    user_ended        the user sent <|endconversation|> (allowed once `end_allowed_after` user turns
                      were sent); `end_turn` holds the guardrail metadata of that sample
    user_error        the user's own request failed for good (an LLM playing the user over HTTP,
                      evaluate.extrinsic.users): `user_error`, its `reason`
    assistant_error   the assistant's request failed for good (`assistant_error`, its `reason`)
    a stop rule's     the stop rule is called after every turn added (user or assistant) and ends
                      the conversation by returning an end reason: `max_user_turns` returns
                      max_turns; the extrinsic evaluation's rule grades the assistant's answer in
                      that call and returns task_solved
A failed conversation is recorded and the others go on.

The user is any object with `check_intent_fits(intent)` and `generate([TurnRequest]) -> [turn]`
(evaluate.simulator.UserSimulator; the scripted and prompted users of evaluate.extrinsic.users).
A turn has `text`, `ended`, `prompt_truncated`, `error` (None, or why the user failed for good, with
`error_reason`) and `metadata()`: the keys recorded beside role and content. `on_replies`, when
given, sees every round's answered conversations (their new assistant turn last) before the stop
rule does: the extrinsic evaluation grades a round's replies together there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from data_prep.chat_format import ASSISTANT, USER
from evaluate.simulator import TurnRequest

INTENT_TOO_LONG, USER_ENDED, USER_ERROR = "intent_too_long", "user_ended", "user_error"
ASSISTANT_ERROR, MAX_TURNS = "assistant_error", "max_turns"


class Assistant(Protocol):
    def reply(self, conversations: Sequence[Sequence[dict]]) -> list:
        """evaluate.assistants.AssistantReply (text, or error) for each conversation (user turn last)."""


@dataclass
class Conversation:
    id: str
    intent: str | None
    turns: list[dict] = field(default_factory=list)   # user turns carry their guardrail metadata
    end_reason: str | None = None
    end_turn: dict | None = None           # user_ended: the guardrail metadata of the ending sample
    truncated_prompts: int = 0             # user-LM prompts of this conversation cut to the context
    error: str | None = None               # intent_too_long: why
    assistant_error: str | None = None     # assistant_error: the error and its short reason
    assistant_error_reason: str | None = None
    user_error: str | None = None          # user_error: the error and its short reason
    user_error_reason: str | None = None

    @property
    def user_turns(self) -> int:
        return sum(t["role"] == USER for t in self.turns)

    def messages(self) -> list[dict]:
        """The turns without their metadata: what the user LM and the assistant see."""
        return [{"role": t["role"], "content": t["content"]} for t in self.turns]

    def transcript(self) -> dict:
        """The record evaluate.simulate writes to transcripts.jsonl (evaluate.transcripts reads it):
        id, intent, turns, ended, end_reason, end_turn, truncated_prompts, then the error fields of
        its end reason."""
        return {"id": self.id, "intent": self.intent, "turns": self.turns, "ended": self.end_reason == USER_ENDED,
                "end_reason": self.end_reason, "end_turn": self.end_turn, "truncated_prompts": self.truncated_prompts,
                **self.error_fields()}

    def error_fields(self) -> dict:
        """What its end reason records of a failure: `error` (intent_too_long), `assistant_error` and
        its reason, `user_error` and its reason; {} for the other end reasons."""
        if self.end_reason == INTENT_TOO_LONG:
            return {"error": self.error}
        if self.end_reason == ASSISTANT_ERROR:
            return {"assistant_error": self.assistant_error, "assistant_error_reason": self.assistant_error_reason}
        if self.end_reason == USER_ERROR:
            return {"user_error": self.user_error, "user_error_reason": self.user_error_reason}
        return {}


StopRule = Callable[[Conversation], "str | None"]   # after every turn added: an end reason ends it


def max_user_turns(limit: int, answered: bool = True) -> StopRule:
    """max_turns once `limit` user turns were sent: after the assistant answered the last one
    (`answered`, evaluate.simulate) or right after it (the adherence metrics judge that turn)."""
    last_role = ASSISTANT if answered else USER
    return lambda c: MAX_TURNS if c.turns[-1]["role"] == last_role and c.user_turns >= limit else None


def run_conversations(simulator, assistant: Assistant, items: Iterable[tuple[str, str | None]], stop: StopRule,
                      end_allowed_after: int, pool_size: int,
                      on_replies: Callable[[Sequence[Conversation]], None] | None = None) -> Iterator[Conversation]:
    """Converse for each (id, intent) of `items`, up to `pool_size` at once; yield each finished one."""
    queue = iter(items)
    active: list[Conversation] = []
    while True:
        while len(active) < pool_size and (item := next(queue, None)) is not None:
            conversation = Conversation(*item)
            try:
                simulator.check_intent_fits(conversation.intent)
            except ValueError as e:
                conversation.end_reason, conversation.error = INTENT_TOO_LONG, str(e)
                yield conversation
                continue
            active.append(conversation)
        if not active:
            return
        user_turns = simulator.generate([
            TurnRequest(c.intent, c.messages(), allow_end=c.user_turns >= end_allowed_after, conversation_id=c.id)
            for c in active])
        waiting = []
        for conversation, turn in zip(active, user_turns):
            conversation.truncated_prompts += turn.prompt_truncated
            if turn.error is not None:
                conversation.end_reason = USER_ERROR
                conversation.user_error, conversation.user_error_reason = turn.error, turn.error_reason
                yield conversation
                continue
            if turn.ended:
                conversation.end_reason, conversation.end_turn = USER_ENDED, turn.guardrails.to_dict()
                yield conversation
                continue
            conversation.turns.append({"role": USER, "content": turn.text, **turn.metadata()})
            if (reason := stop(conversation)) is not None:
                conversation.end_reason = reason
                yield conversation
                continue
            waiting.append(conversation)
        replies = assistant.reply([c.messages() for c in waiting]) if waiting else []
        for conversation, reply in zip(waiting, replies):
            if reply.text is not None:
                conversation.turns.append({"role": ASSISTANT, "content": reply.text})
        answered = [c for c, reply in zip(waiting, replies) if reply.text is not None]
        if on_replies is not None and answered:
            on_replies(answered)
        active = []
        for conversation, reply in zip(waiting, replies):   # in the round's order, failed or not
            if reply.text is None:
                conversation.end_reason = ASSISTANT_ERROR
                conversation.assistant_error, conversation.assistant_error_reason = reply.error, reply.reason
                yield conversation
                continue
            if (reason := stop(conversation)) is not None:
                conversation.end_reason = reason
                yield conversation
            else:
                active.append(conversation)
