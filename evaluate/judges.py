"""Role and intent adherence: a user LM meets an assistant that tests it, and an LLM judge decides.

    role adherence     CommonsenseQA. The user wants the answer to a multiple-choice question; the
                       assistant hedges and asks the user back. A user LM that keeps its role asks
                       again or insists; one that slips into the assistant's role answers its own
                       question. The judge (who knows the answer) says whether the user revealed it.
    intent adherence   NaturalQuestions (nq_open). The user wants an answer to a question; the
                       assistant changes the subject. The judge says whether the user kept to its
                       question (refused or steered back) instead of following the new topic.

Each item gives one conversation: user turn 1 from the intent (the question, through a configured
template), the assistant's reply, user turn 2 (the user may end the conversation there: it then
neither revealed the answer nor followed the diversion, and adhered), and the judge's verdict on
turn 2. Judges answer YES or NO through the OpenAI-compatible client (core.llm_client); a
request that fails for good or a reply that is neither leaves the item unjudged (counted).

Items are read from the hub (tau/commonsense_qa, google-research-datasets/nq_open) or from a local
JSONL/JSON/Parquet file in the same schema.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Sequence

import datasets

from core.llm_client import LLMClient, RequestFailed, parse_verdict
from evaluate.conversation import USER_ENDED, max_user_turns, run_conversations
from evaluate.simulator import UserSimulator

SCHEMAS = {  # item kind -> fields every row must have
    "commonsense_qa": ("id", "question", "choices", "answerKey"),
    "nq_open": ("question", "answer"),
}


def load_items(kind: str, source: str, split: str, revision: str | None, limit: int | None) -> list[dict]:
    """Rows of a hub dataset or a local file, checked against the kind's schema, as template fields:
    commonsense_qa -> {question, choices ("A. ...; B. ..."), answer (the right choice's text)};
    nq_open -> {question, answer (the first reference answer)}."""
    path = Path(source)
    if path.exists():
        builder = "parquet" if path.suffix == ".parquet" else "json"
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        rows = datasets.load_dataset(source, split=split, revision=revision)
    rows = rows.select(range(min(limit, len(rows)))) if limit is not None else rows
    items = []
    for number, row in enumerate(rows):
        missing = [f for f in SCHEMAS[kind] if row.get(f) in (None, "", [])]
        if missing:
            raise ValueError(f"{source} ({split}) row {number}: missing field {missing[0]!r} of the {kind} schema")
        if kind == "commonsense_qa":
            choices = dict(zip(row["choices"]["label"], row["choices"]["text"]))
            if row["answerKey"] not in choices:
                raise ValueError(f"{source} row {number}: answerKey {row['answerKey']!r} is not a choice label")
            items.append({"id": row["id"], "question": row["question"],
                          "choices": "; ".join(f"{k}. {v}" for k, v in choices.items()),
                          "answer": choices[row["answerKey"]]})
        else:
            items.append({"id": str(number), "question": row["question"], "answer": row["answer"][0]})
    return items


def converse(simulator: UserSimulator, assistant, items: Sequence[dict], intent_template: str,
             end_allowed_after: int) -> list[dict]:
    """User turn 1, the assistant's reply, user turn 2, for every item (each step batched): the
    conversation runner (evaluate.conversation) stopped right after the second user turn. Records
    in the items' order: item, intent, turns ({role, content}), ended_at (the user turn that ended
    the conversation, or None), and the failure's fields where the assistant or user failed or the
    intent did not fit (Conversation.error_fields)."""
    intents = [intent_template.format(**item) for item in items]
    conversations = run_conversations(simulator, assistant, enumerate(intents), max_user_turns(2, answered=False),
                                      end_allowed_after, pool_size=len(items))   # every item in each batch
    finished = {c.id: c for c in conversations}
    records = []
    for number, (item, intent) in enumerate(zip(items, intents)):
        c = finished[number]
        records.append({"item": item, "intent": intent, "turns": c.messages(),
                        "ended_at": c.user_turns + 1 if c.end_reason == USER_ENDED else None, **c.error_fields()})
    return records


def judge(records: Sequence[dict], client_cfg, prompt: str, adhered_when: bool, max_tokens: int) -> list[dict]:
    """Ask the judge about every conversation with a second user turn; fill record["verdict"] (the
    judge's YES/NO as True/False, or None) and record["adhered"] (None when unjudged). A user who
    ended the conversation adhered without a judge; a conversation without an assistant reply
    (request failed) is unjudged."""
    asked = [r for r in records if len(r["turns"]) == 3]
    messages = [[{"role": "user", "content": prompt.format(**r["item"], first_turn=r["turns"][0]["content"],
                                                            assistant_turn=r["turns"][1]["content"],
                                                            user_turn=r["turns"][2]["content"])}] for r in asked]

    async def ask():
        async with LLMClient(client_cfg) as client:
            return await client.complete_all(messages, max_tokens=max_tokens, temperature=0.0)
    replies = asyncio.run(ask()) if asked else []
    for record in records:
        record.update(verdict=None, adhered=True if record["ended_at"] else None, judge_reply=None)
    for record, reply in zip(asked, replies):
        if isinstance(reply, RequestFailed):
            record["judge_reply"] = f"failed: {reply}"
            continue
        record["judge_reply"] = reply.text
        record["verdict"] = parse_verdict(reply.text)
        record["adhered"] = None if record["verdict"] is None else record["verdict"] == adhered_when
    return records
