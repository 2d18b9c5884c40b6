"""Prompting protocols: what is labelled is exactly the user turns, decoded; prompts match the templates."""

import pytest
from transformers import AutoTokenizer

from data_prep.chat_format import END_CONVERSATION, IGNORE_INDEX, USER, conversation_messages
from evaluate.protocols import make_protocol, plain_text_ids
from tests.conftest import LLAMA3_INSTRUCT_TEMPLATE

INTENT = "You are a user chatting with an assistant language model to plan a trip to Algeria."
TURNS = [{"role": "user", "content": "where should i go in algeria"},
         {"role": "assistant", "content": "Algiers, Oran and the Sahara are popular."},
         {"role": "user", "content": " what about food?\n"},
         {"role": "assistant", "content": "Try couscous and chakhchoukha."}]
PROMPTS = dict(system_prompt="Play the user.", system_prompt_with_intent="{intent} Play the user.")


def target_spans(example):
    """Token runs that carry loss, in order."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    return spans + ([run] if run else [])


@pytest.fixture(params=["chatml", "llama3_instruct"])
def chat_tokenizer(request, tiny_chatml_model, tiny_assets):
    if request.param == "chatml":
        return AutoTokenizer.from_pretrained(tiny_chatml_model), "<|im_end|>", lambda text: text
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    tokenizer.chat_template = LLAMA3_INSTRUCT_TEMPLATE
    return tokenizer, "<|eot_id|>", str.strip  # this template trims message content


def test_flipped_chat_labels_exactly_the_user_turns(chat_tokenizer):
    tokenizer, end_of_turn, as_rendered = chat_tokenizer
    protocol = make_protocol("flipped_chat", tokenizer, end_token="plain_text", **PROMPTS)
    [example] = protocol.examples(INTENT, TURNS, ended=True, mode="per_conversation", max_seq_len=4096)
    decoded = [tokenizer.decode(span) for span in target_spans(example)]
    user_texts = [as_rendered(t["content"]) for t in TURNS if t["role"] == USER] + [END_CONVERSATION]
    assert decoded == [text + end_of_turn for text in user_texts]
    assert sorted(set(example.target_turn) - {-1}) == [0, 1, 2]
    context = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    assert INTENT + " Play the user." in context and "couscous" in context and "where should i go" not in context

    # per_turn: one example per user turn, each the per_conversation sequence up to that turn's end.
    per_turn = protocol.examples(INTENT, TURNS, ended=True, mode="per_turn", max_seq_len=4096)
    assert len(per_turn) == 3
    for number, turn_example in enumerate(per_turn):
        assert turn_example.input_ids == example.input_ids[:len(turn_example.input_ids)]
        assert [tokenizer.decode(s) for s in target_spans(turn_example)] == [decoded[number]]
        assert not turn_example.truncated


def test_flipped_chat_prompt_is_the_templates_generation_prompt(chat_tokenizer):
    tokenizer, _, _ = chat_tokenizer
    protocol = make_protocol("flipped_chat", tokenizer, end_token="plain_text", **PROMPTS)
    swapped = [{"role": "system", "content": "Play the user."},
               {"role": "assistant", "content": TURNS[0]["content"]}, {"role": "user", "content": TURNS[1]["content"]}]
    expected = tokenizer.apply_chat_template(swapped, add_generation_prompt=True, return_dict=False)
    assert protocol.build_prompt(None, TURNS[:2]) == expected
    assert tokenizer.decode(expected).rstrip().endswith(("<|im_start|>assistant", "assistant<|end_header_id|>"))


def test_flipped_chat_truncation_keeps_system_and_drops_oldest_history(tiny_chatml_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml_model)
    protocol = make_protocol("flipped_chat", tokenizer, end_token="exclude", **PROMPTS)
    full = protocol.examples(INTENT, TURNS, ended=True, mode="per_turn", max_seq_len=4096)
    assert len(full) == 2  # exclude: no end-of-conversation target
    limit = len(full[1].input_ids) - 5
    short = protocol.examples(INTENT, TURNS, ended=True, mode="per_conversation", max_seq_len=limit)
    assert [e.truncated for e in short] == [False, True]  # too long as one: per_turn fallback
    text = tokenizer.decode(short[1].input_ids)
    assert text.startswith("<|im_start|>system\n" + INTENT)
    assert "where should i go" not in text and "Sahara" in text
    assert target_spans(short[1]) == target_spans(full[1])


def test_flipped_chat_refuses_a_template_that_is_not_prefix_stable(tiny_chatml_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml_model)
    tokenizer.chat_template = "{{ messages | length }}" + tokenizer.chat_template
    protocol = make_protocol("flipped_chat", tokenizer, end_token="plain_text", **PROMPTS)
    with pytest.raises(ValueError, match="cannot score this template"):
        protocol.examples(INTENT, TURNS, ended=False, mode="per_conversation", max_seq_len=4096)


def test_userlm_prompt_and_end_token_handling(tiny_assets, tiny_tokenizer):
    raw = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    protocol = make_protocol("userlm", AutoTokenizer.from_pretrained(tiny_assets / "tokenizer"),
                             end_token="plain_text", pad_token="<|reserved_special_token_0|>")
    expected = tiny_tokenizer.apply_chat_template(conversation_messages(INTENT, TURNS, False), return_dict=False)
    assert protocol.build_prompt(INTENT, TURNS) == expected
    # plain_text: the end string as the pieces a tokenizer without the token splits it into.
    pieces = raw("\n" + END_CONVERSATION, add_special_tokens=False)["input_ids"]
    assert plain_text_ids(tiny_tokenizer, "\n" + END_CONVERSATION) == pieces and len(pieces) > 2
    [example] = protocol.examples(None, TURNS, ended=True, mode="per_conversation", max_seq_len=4096)
    assert target_spans(example)[-1] == pieces + [raw.convert_tokens_to_ids("<|eot_id|>")]
    for end_token, last in (("token", "\n" + END_CONVERSATION + "<|eot_id|>"), ("exclude", "\n what about food?\n<|eot_id|>")):
        protocol = make_protocol("userlm", AutoTokenizer.from_pretrained(tiny_assets / "tokenizer"),
                                 end_token=end_token, pad_token="<|reserved_special_token_0|>")
        [example] = protocol.examples(None, TURNS, ended=True, mode="per_conversation", max_seq_len=4096)
        assert tiny_tokenizer.decode(target_spans(example)[-1]) == last


def test_flipped_chat_passes_template_variables(tiny_chatml_model):
    # Llama-3.1/3.2 templates print today's date unless given date_string: the config fixes it.
    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml_model)
    tokenizer.chat_template = "{{ 'Today Date: ' + date_string + '\\n' }}" + tokenizer.chat_template
    protocol = make_protocol("flipped_chat", tokenizer, end_token="plain_text", **PROMPTS,
                             template_kwargs={"date_string": "26 Jul 2024"})
    assert tokenizer.decode(protocol.build_prompt(INTENT, TURNS[:2])).startswith("Today Date: 26 Jul 2024\n")
