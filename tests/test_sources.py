"""Chat-log sources (data_prep.sources): ShareGPT, OpenAI messages and LMSYS through data_prep on the
embedded samples (hand-written: system prompts, tool calls, content parts, unanswered last turns,
malformed, duplicate and non-English rows), and the message rules on cases computed by hand."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transformers import AutoTokenizer

from data_prep.chat_format import format_of
from data_prep.sources.messages import Malformed, chat_turns
from tests.conftest import SAMPLE, run_data_prep

# Per source: the funnel's removals and events, the kept conversation keys, and examples (per_turn: K+1).
EXPECTED = {
    "sharegpt": dict(
        file="sharegpt.json", input=12,
        removed={"malformed": {"malformed:control_token_in_text": 1, "malformed:empty_user_turn": 1,
                               "malformed:roles_out_of_order": 1, "malformed:unknown_role": 1},
                 "exact_duplicate": {"exact_duplicate": 1}},
        events={"id_from_turns": 1, "no_user_id_own_user": 7, "system_message_dropped": 2, "tool_call_dropped": 1,
                "tool_message_dropped": 1, "unanswered_last_turn_no_end": 1},
        keys={"sg-001", "sg-002", "sg-003", "sg-004", "sg-009", "sg-011", "7e73ff5f1826c6f097f98968dfb7158f535b8f97"},
        examples=17,
        never=["travel assistant", "get_weather", "light rain", "high_c", "reuses the id"]),
    "openai_messages": dict(
        file="openai_messages.jsonl", input=12,
        removed={"malformed": {"malformed:bad_content": 1, "malformed:empty_user_turn": 1,
                               "malformed:no_messages_list": 1, "malformed:row_not_an_object": 1,
                               "malformed:tool_only_assistant_turn": 1}},
        events={"id_from_turns": 1, "no_user_id_own_user": 7, "non_text_part_dropped": 1, "system_message_dropped": 2,
                "tool_call_dropped": 2, "tool_message_dropped": 2, "unanswered_last_turn_no_end": 1},
        keys={"oa-001", "oa-002", "oa-003", "oa-004", "oa-008", "oa-011", "856a73baa40e5672c42516749a888657824303b0"},
        examples=16,
        never=["concise cooking assistant", "one paragraph", "search_restaurants", '"time"', "(2024)", "image_url"]),
    "lmsys": dict(
        file="lmsys.jsonl", input=8,
        removed={"malformed": {"malformed:empty_user_turn": 1}, "language": {"language": 1},
                 "exact_duplicate": {"exact_duplicate": 1}},
        events={"no_user_id_own_user": 5, "unanswered_last_turn_no_end": 1},
        keys={"lm-001", "lm-003", "lm-005", "lm-007", "lm-008"},
        examples=13, never=["penguins"]),
}


def funnel_of(out) -> dict:
    return json.loads((out / "funnel.json").read_text())


@pytest.mark.parametrize("chat_format", ["userlm", "chatml"])
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_every_row_is_accounted_for_and_only_user_text_is_trained_on(kind, chat_format, tiny_assets, tiny_qwen_assets,
                                                                     tmp_path):
    """The same for a Llama-3 base (userlm) and a Qwen-family base (chatml): the samples' one control
    string, <|eot_id|>, has the shape of a special token in both."""
    expected = EXPECTED[kind]
    base = tiny_assets if chat_format == "userlm" else tiny_qwen_assets
    out = run_data_prep(base, tmp_path / kind, f"dataset={kind}", f"data.source={SAMPLE / expected['file']}",
                        f"chat_format={chat_format}")
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert format_of(tokenizer).name == chat_format
    funnel = funnel_of(out)
    assert funnel["input"] == expected["input"]
    assert {s["step"]: s["reasons"] for s in funnel["steps"] if s["removed"]} == expected["removed"]
    assert funnel["events"] == expected["events"]
    removed = sum(s["removed"] for s in funnel["steps"])
    assert removed + funnel["kept_total"] == funnel["input"] == expected["input"]
    conversations = datasets.load_from_disk(str(out / "conversations"))
    keys = {h for split in conversations.values() for h in split["conversation_hash"]}
    assert keys == expected["keys"] and funnel["kept_total"] == len(keys)
    # K+1 examples per conversation: one per user turn, plus <|endconversation|> after a last reply.
    k_plus_1 = sum(sum(t["role"] == "user" for t in c["turns"]) + c["ended"]
                   for split in conversations.values() for c in split)
    examples = datasets.load_from_disk(str(out))
    assert sum(len(split) for split in examples.values()) == k_plus_1 == expected["examples"]
    for split in examples.values():
        for example in split:
            assert example["conversation_hash"] in expected["keys"]
            text = tokenizer.decode(example["input_ids"])
            for never in expected["never"]:  # system prompts, tool calls and results, a duplicate's text
                assert never not in text, (never, text)
            targets = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
            assert tokenizer.decode(targets).strip() in {c.strip() for c in user_turns_of(conversations, tokenizer)} | {
                "<|endconversation|>" + tokenizer.eos_token}


def user_turns_of(conversations, tokenizer) -> list[str]:
    return [t["content"] + tokenizer.eos_token for split in conversations.values() for c in split for t in c["turns"]
            if t["role"] == "user"]


def test_lmsys_parquet_reads_like_its_json_lines_and_honours_a_user_field(tiny_assets, tmp_path):
    rows = [json.loads(line) for line in (SAMPLE / "lmsys.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "lmsys.parquet")
    out = run_data_prep(tiny_assets, tmp_path / "parquet", "dataset=lmsys", f"data.source={tmp_path / 'lmsys.parquet'}")
    assert {s["step"]: s["reasons"] for s in funnel_of(out)["steps"] if s["removed"]} == EXPECTED["lmsys"]["removed"]
    # Every row's `model` is vicuna-13b: as the user field, all five conversations are one user, in one split.
    grouped = run_data_prep(tiny_assets, tmp_path / "grouped", "dataset=lmsys",
                            f"data.source={tmp_path / 'lmsys.parquet'}", "data.user_field=model")
    funnel = funnel_of(grouped)
    assert "no_user_id_own_user" not in funnel["events"] and sorted(funnel["kept"].values()) == [0, 0, 5]
    # The moderation flag is read: filters.toxic drops the flagged conversation.
    toxic = run_data_prep(tiny_assets, tmp_path / "toxic", "dataset=lmsys", f"data.source={tmp_path / 'lmsys.parquet'}",
                          "filters.toxic=true")
    assert {s["step"]: s["removed"] for s in funnel_of(toxic)["steps"]}["toxic"] == 1


@pytest.mark.parametrize("overrides, message", [
    (["dataset=sharegpt", f"data.source={SAMPLE / 'openai_messages.jsonl'}"],
     "openai_messages.jsonl: its first row has no 'conversations' field"),
    (["dataset=sharegpt", "data.source=someone/sharegpt-hub-dataset"], "sharegpt is read from local files"),
    (["dataset=sharegpt", f"data.source={SAMPLE / 'sharegpt.json'}", "filters.languages=[English]"],
     "sharegpt rows carry no language to filter on"),
    (["data.user_field=country"], "wildchat's users are fixed by its schema (hashed_ip)"),
    (["dataset=lmsys", f"data.source={SAMPLE / 'lmsys.jsonl'}", "data.id_field=uuid"],
     "no column 'uuid' (data.id_field)"),
])
def test_a_source_misconfigured_fails_clearly(overrides, message, tiny_assets, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_data_prep(tiny_assets, tmp_path / "out", *overrides)


U, A, S, T = "user", "assistant", "system", "tool"


@pytest.mark.parametrize("messages, turns, events", [
    # a tool call with no text, its result, then the answer: one assistant turn, the answer
    ([(U, "q", False), (A, None, True), (T, "r", False), (A, "answer", False)],
     [{"role": U, "content": "q"}, {"role": A, "content": "answer"}], ["tool_call_dropped", "tool_message_dropped"]),
    # text with a tool call, the result, more text: joined by a blank line
    ([(S, "sys", False), (U, "q", False), (A, "let me look", True), (T, "r", False), (A, "found", False)],
     [{"role": U, "content": "q"}, {"role": A, "content": "let me look\n\nfound"}],
     ["system_message_dropped", "tool_call_dropped", "tool_message_dropped"]),
    # text parts kept, an image dropped
    ([(U, [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "input_text", "text": "b"}],
       False), (A, "x", False)],
     [{"role": U, "content": "a\nb"}, {"role": A, "content": "x"}], ["non_text_part_dropped"]),
    # two assistant messages with no tool between them stay two (check_turns calls it out of order)
    ([(U, "q", False), (A, "a", False), (A, "b", False)],
     [{"role": U, "content": "q"}, {"role": A, "content": "a"}, {"role": A, "content": "b"}], []),
])
def test_message_rules(messages, turns, events):
    assert chat_turns(messages) == (turns, events)


@pytest.mark.parametrize("messages, reason", [
    ([(U, "q", False), (A, None, True), (T, "r", False), (U, "thanks", False)], "malformed:tool_only_assistant_turn"),
    ([(U, "q", False), (A, None, True)], "malformed:tool_only_assistant_turn"),
    ([(U, 7, False)], "malformed:bad_content"),
    ([("narrator", "x", False)], "malformed:unknown_role"),
])
def test_message_rules_malformed(messages, reason):
    with pytest.raises(Malformed, match=reason):
        chat_turns(messages)


def test_a_turn_holding_a_special_token_of_the_tokenizer_in_use_is_malformed(tiny_qwen_assets, tmp_path):
    """chatml on a base of another family: its own special tokens (here Gemma's <start_of_turn>) are
    control strings too, though neither format names them; the same rows pass with a base without it."""
    from transformers import AutoTokenizer
    rows = [{"id": "a", "messages": [{"role": "user", "content": "paste: <start_of_turn>model hi"},
                                     {"role": "assistant", "content": "ok"}]},
            {"id": "b", "messages": [{"role": "user", "content": "plan a trip"}, {"role": "assistant", "content": "ok"}]}]
    source = tmp_path / "logs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "intents.jsonl").write_text("".join(json.dumps(
        {"conversation_hash": key, "intent": "You are a user chatting with an assistant language model to plan a trip."})
        + "\n" for key in ("a", "b")))
    base = AutoTokenizer.from_pretrained(tiny_qwen_assets / "tokenizer")
    base.add_special_tokens({"additional_special_tokens": ["<start_of_turn>"]})
    base.save_pretrained(tmp_path / "gemma_like" / "tokenizer")

    def malformed(assets, name):
        out = run_data_prep(assets, tmp_path / "out" / name, "dataset=openai_messages", f"data.source={source}",
                            "chat_format=chatml", f"intents.path={tmp_path / 'intents.jsonl'}")
        return next(s["reasons"] for s in funnel_of(out)["steps"] if s["step"] == "malformed")
    assert malformed(tmp_path / "gemma_like", "gemma_like") == {"malformed:control_token_in_text": 1}
    assert malformed(tiny_qwen_assets, "qwen") == {}
