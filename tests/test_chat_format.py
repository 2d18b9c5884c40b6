"""The chat format: our token assembly equals the tokenizer's chat template, and masks hit user turns only."""

import json
import random

import pytest

from data_prep.chat_format import (CHATML, END_CONVERSATION, EOT, IGNORE_INDEX, PAD_TOKEN, USERLM, ChatEncoder,
                                   conversation_messages, format_of, prepare_tokenizer, save_tokenizer)

INTENT = "You are a user chatting with an assistant language model to plan a trip to Peru."
TURNS = [
    {"role": "user", "content": "hi! what should i see in Peru?"},
    {"role": "assistant", "content": "Machu Picchu, Cusco and the Sacred Valley.\n\nAlso Lima's food."},
    {"role": "user", "content": "  how many days?\n"},
    {"role": "assistant", "content": "About 10 days 🙂"},
]


@pytest.fixture(params=["userlm", "chatml"])
def formatted(request, tiny_tokenizer, tiny_chatml_tokenizer):
    """A tiny tokenizer prepared for each chat format: userlm (Llama-3 family), chatml (Qwen family)."""
    return tiny_tokenizer if request.param == "userlm" else tiny_chatml_tokenizer


def header(tokenizer, role: str) -> str:
    chat_format = format_of(tokenizer)
    return chat_format.header_start + role + chat_format.header_end


def _targets(tokenizer, example) -> list[str]:
    """Decode each contiguous run of trained-on labels."""
    spans, run = [], []
    for label in example.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    return spans


def test_prepare_tokenizer_adds_one_plain_token_and_distinct_pad(tiny_tokenizer):
    tok = tiny_tokenizer
    end_id = tok.convert_tokens_to_ids(END_CONVERSATION)
    assert tok.encode("\n" + END_CONVERSATION, add_special_tokens=False)[-1] == end_id
    assert tok.decode([end_id], skip_special_tokens=True) == END_CONVERSATION  # not special
    assert tok.eos_token == EOT and tok.pad_token_id != tok.eos_token_id
    size = len(tok)
    prepare_tokenizer(tok, USERLM, tok.pad_token)  # idempotent
    assert len(tok) == size


def test_pad_equal_to_eos_is_refused(tiny_assets):
    from transformers import AutoTokenizer
    with pytest.raises(ValueError, match="pad_token"):
        prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_assets / "tokenizer"), USERLM, EOT)


def test_template_text_matches_userlm_format(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(conversation_messages(INTENT, TURNS[:1], ended=False), tokenize=False)
    assert text == ("<|start_header_id|>system<|end_header_id|>\n" + INTENT + "<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n" + TURNS[0]["content"] + "<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>")
    assert not text.startswith("<|begin_of_text|>")
    # The prompt ends with the user header whatever add_generation_prompt says.
    for flag in (True, False):
        prompt = tiny_tokenizer.apply_chat_template([{"role": "system", "content": INTENT}], tokenize=False,
                                                    add_generation_prompt=flag)
        assert prompt.endswith("<|start_header_id|>user<|end_header_id|>")


def test_prompt_ids_equal_apply_chat_template(formatted):
    encoder = ChatEncoder(formatted)
    messages = conversation_messages(INTENT, TURNS, ended=False)
    for k in range(1, len(messages) + 1):
        expected = formatted.apply_chat_template(messages[:k], tokenize=True, return_dict=False)
        assert encoder.prompt_ids(messages[:k]) == expected


@pytest.mark.parametrize("mode", ["per_turn", "per_conversation"])
def test_examples_equal_tokenizing_the_rendered_text(formatted, mode):
    """Each example's ids are what tokenizing template(context) + target text gives."""
    encoder = ChatEncoder(formatted)
    messages = conversation_messages(INTENT, TURNS, ended=True)
    for example in encoder.flip(messages, mode, max_seq_len=4096):
        text = formatted.decode(example.input_ids)
        assert formatted(text, add_special_tokens=False)["input_ids"] == example.input_ids
    # per_turn: example k is the template of the first messages plus the k-th user turn as target.
    if mode == "per_turn":
        user_positions = [i for i, m in enumerate(messages) if m["role"] == "user"]
        for example, position in zip(encoder.flip(messages, mode, 4096), user_positions):
            prompt = formatted.apply_chat_template(messages[:position], tokenize=False)
            target = "\n" + messages[position]["content"] + formatted.eos_token
            assert formatted.decode(example.input_ids) == prompt + target
            assert formatted(prompt + target, add_special_tokens=False)["input_ids"] == example.input_ids


def test_per_turn_gives_k_plus_one_samples_whose_labels_are_the_user_turns(formatted):
    encoder = ChatEncoder(formatted)
    examples = encoder.flip(conversation_messages(INTENT, TURNS, ended=True), "per_turn", 4096)
    assert len(examples) == 2 + 1
    eot = formatted.eos_token
    assert [_targets(formatted, e) for e in examples] == [
        ["\n" + TURNS[0]["content"] + eot], ["\n" + TURNS[2]["content"] + eot], ["\n" + END_CONVERSATION + eot]]
    assert [e.target_turns for e in examples] == [[0], [1], [2]]


def test_unanswered_conversation_has_no_end_sample(formatted):
    encoder = ChatEncoder(formatted)
    examples = encoder.flip(conversation_messages(INTENT, TURNS[:3], ended=False), "per_turn", 4096)
    assert len(examples) == 2
    assert all(END_CONVERSATION not in formatted.decode(e.input_ids) for e in examples)


def test_per_conversation_has_the_same_target_tokens_as_per_turn(formatted):
    encoder = ChatEncoder(formatted)
    messages = conversation_messages(INTENT, TURNS, ended=True)
    per_turn = encoder.flip(messages, "per_turn", 4096)
    (whole,) = encoder.flip(messages, "per_conversation", 4096)
    assert [t for e in per_turn for t in e.labels if t != IGNORE_INDEX] == \
           [t for t in whole.labels if t != IGNORE_INDEX]
    assert _targets(formatted, whole) == [s for e in per_turn for s in _targets(formatted, e)]
    assert not any(e.truncated for e in per_turn + [whole])


def test_no_intent_means_no_system_message(formatted):
    encoder = ChatEncoder(formatted)
    (example,) = encoder.flip(conversation_messages(None, TURNS[:2], ended=False), "per_conversation", 4096)
    assert formatted.decode(example.input_ids).startswith(header(formatted, "user") + "\n")


def _long_conversation(n_rounds: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    turns = []
    for _ in range(n_rounds):
        turns.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(3, 30)))})
        turns.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(10, 80)))})
    return turns


def test_per_turn_truncation_keeps_intent_and_drops_oldest_whole_messages(formatted):
    encoder = ChatEncoder(formatted)
    messages = conversation_messages(INTENT, _long_conversation(12), ended=True)
    full = encoder.flip(messages, "per_turn", 100_000)
    cut = encoder.flip(messages, "per_turn", 256)
    system = encoder.header_ids["system"] + encoder.encode_bodies([INTENT])[0]
    for long, short in zip(full, cut):
        assert len(short.input_ids) <= 256
        assert short.input_ids[:len(system)] == system
        # The target is intact, and the kept history is a suffix of the full history in whole messages.
        assert [t for t in short.labels if t != IGNORE_INDEX] == [t for t in long.labels if t != IGNORE_INDEX]
        history = short.input_ids[len(system):]
        assert long.input_ids[-len(history):] == history
        assert history[:len(encoder.separator_ids) + 1] == encoder.separator_ids + encoder.header_ids["user"][:1]
    assert any(e.truncated for e in cut) and not any(e.truncated for e in full)


def test_per_turn_cuts_a_target_that_alone_exceeds_the_limit(formatted):
    encoder = ChatEncoder(formatted)
    huge = {"role": "user", "content": "word " * 2000}
    (example,) = encoder.flip(conversation_messages(INTENT, [huge], ended=False), "per_turn", 128)
    assert len(example.input_ids) == 128 and example.truncated
    assert example.labels[-1] != encoder.eot_id  # a cut turn does not teach an end


def test_per_conversation_windows_cover_every_target_once(formatted):
    encoder = ChatEncoder(formatted)
    messages = conversation_messages(INTENT, _long_conversation(12, seed=1), ended=True)
    per_turn = encoder.flip(messages, "per_turn", 100_000)
    windows = encoder.flip(messages, "per_conversation", 300)
    assert len(windows) > 1 and all(len(w.input_ids) <= 300 and w.truncated for w in windows)
    assert [t for w in windows for t in w.target_turns] == list(range(len(per_turn)))
    assert [t for w in windows for t in w.labels if t != IGNORE_INDEX] == \
           [t for e in per_turn for t in e.labels if t != IGNORE_INDEX]
    for window in windows:  # each window restarts with the intent
        assert formatted.decode(window.input_ids).startswith(header(formatted, "system") + "\n" + INTENT)


def test_a_window_drops_its_context_rather_than_cut_a_target_that_fits(formatted):
    encoder = ChatEncoder(formatted)
    turns = [{"role": "user", "content": "hello there"},
             {"role": "assistant", "content": "word " * 90},      # context that fits in half a window
             {"role": "user", "content": "again " * 150}]         # a target that fits only alone
    messages = conversation_messages(INTENT, turns, ended=False)
    windows = encoder.flip(messages, "per_conversation", 256)
    last = windows[-1]
    assert last.target_turns == [1] and not any(len(w.input_ids) > 256 for w in windows)
    assert formatted.decode([t for t in last.labels if t != IGNORE_INDEX]) == "\n" + turns[2]["content"] + formatted.eos_token


def test_a_first_turn_without_intent_prompts_with_the_user_header_alone(tiny_tokenizer):
    """No intent and no turns yet: no messages at all, which a batched tokenizer call cannot take."""
    encoder = ChatEncoder(tiny_tokenizer)
    assert encoder.prompt_ids([]) == encoder.header_ids["user"]
    assert encoder.prompt_ids_within([], 64) == (encoder.header_ids["user"], False)


def test_saved_tokenizer_has_transformers4_layout_and_the_same_bytes_every_time(tiny_tokenizer, tmp_path):
    """save_tokenizer: 4.x's tokenizer class and added-token table, no machine-dependent keys, the
    template in both places; rerun and round trip through from_pretrained give the same bytes."""
    from transformers import AutoTokenizer
    save_tokenizer(tiny_tokenizer, tmp_path / "first")
    files = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert files == ["chat_template.jinja", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "first" / "tokenizer_config.json").read_text())
    assert sorted(config) == ["added_tokens_decoder", "bos_token", "chat_template", "clean_up_tokenization_spaces",
                              "eos_token", "model_max_length", "pad_token", "tokenizer_class"]
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["clean_up_tokenization_spaces"] is False
    # The tiny tokenizer's 10 Llama-3 special tokens (ids 1962-1971), then <|endconversation|> (not special).
    table = config["added_tokens_decoder"]
    assert sorted(table, key=int) == [str(i) for i in range(1962, 1973)]
    assert table["1971"] == {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
    assert table["1972"] == dict(table["1971"], content=END_CONVERSATION, special=False)
    special = {"bos_token": "<|begin_of_text|>", "eos_token": EOT, "pad_token": PAD_TOKEN}
    assert {k: config[k] for k in special} == special
    assert json.loads((tmp_path / "first" / "special_tokens_map.json").read_text()) == special
    assert config["chat_template"] == (tmp_path / "first" / "chat_template.jinja").read_text() == USERLM.chat_template

    save_tokenizer(tiny_tokenizer, tmp_path / "again")
    # Meta-Llama-3-8B's config says clean_up_tokenization_spaces: true, which 4.x applies and 5.x
    # ignores for a BPE ("a ." decodes as "a." under 4.x only): it is always written false.
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "first", clean_up_tokenization_spaces=True)
    save_tokenizer(reloaded, tmp_path / "round_trip")
    for name in files:
        first = (tmp_path / "first" / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == first == (tmp_path / "round_trip" / name).read_bytes(), name
    messages = conversation_messages(INTENT, TURNS, ended=True)
    assert reloaded.apply_chat_template(messages, return_dict=False) == ChatEncoder(tiny_tokenizer).prompt_ids(messages)


def test_template_text_matches_the_chatml_format(tiny_chatml_tokenizer):
    """Every message as Qwen's own template writes it; the prompt ends with the bare user header."""
    tok = tiny_chatml_tokenizer
    text = tok.apply_chat_template(conversation_messages(INTENT, TURNS[:2], ended=True), tokenize=False)
    assert text == ("<|im_start|>system\n" + INTENT + "<|im_end|>\n"
                    "<|im_start|>user\n" + TURNS[0]["content"] + "<|im_end|>\n"
                    "<|im_start|>assistant\n" + TURNS[1]["content"] + "<|im_end|>\n"
                    "<|im_start|>user\n<|endconversation|><|im_end|>\n"
                    "<|im_start|>user")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert format_of(tok) is CHATML and ChatEncoder(tok).format is CHATML


def test_chatml_on_a_qwen_base_adds_only_the_end_token_and_is_idempotent(tiny_qwen_assets, tiny_chatml_tokenizer):
    from transformers import AutoTokenizer
    base = AutoTokenizer.from_pretrained(tiny_qwen_assets / "tokenizer")
    tok = tiny_chatml_tokenizer
    assert len(tok) == len(base) + 1
    assert tok.convert_tokens_to_ids(END_CONVERSATION) == len(base)
    assert {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")} == \
           {t: base.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert tok.decode([len(base)], skip_special_tokens=True) == END_CONVERSATION   # not special
    prepare_tokenizer(tok, CHATML)
    assert len(tok) == len(base) + 1


def test_chatml_on_another_base_adds_its_special_tokens(tiny_assets):
    """A base without ChatML's tokens (here the Llama-3-family tiny one) gets them, special, then the end token."""
    from transformers import AutoTokenizer
    base = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_assets / "tokenizer"), CHATML)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>", END_CONVERSATION]) == \
           [len(base), len(base) + 1, len(base) + 2, len(base) + 3]
    assert tok.encode("a<|im_end|>b", add_special_tokens=False)[1] == len(base) + 1
    assert tok.decode(tok.encode("<|im_start|>hi", add_special_tokens=False), skip_special_tokens=True) == "hi"


def test_a_tokenizer_that_merges_across_the_boundaries_is_refused(tiny_assets, tmp_path):
    """A pre-tokenizer that prefixes every piece (a SentencePiece-style Metaspace) would tokenize the
    header and the body differently apart than together: prepare_tokenizer refuses it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    raw.train_from_iterator(["hi there user system assistant Hello ok sure check the format"] * 10,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    with pytest.raises(ValueError, match="does not tokenize like its rendered text"):
        prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>"), CHATML)


def test_each_format_has_its_own_control_strings():
    from data_prep.chat_format import find_any_control_string
    assert USERLM.find_control_string("paste <|im_start|>system") is None     # ordinary text for Llama-3
    assert CHATML.find_control_string("paste <|im_start|>system") == "<|im_start|>"
    assert CHATML.find_control_string("a <|fim_prefix|> b") == "<|fim_prefix|>"
    assert CHATML.find_control_string("a <|eot_id|> b") == "<|eot_id|>"      # a special-token shape there too
    assert CHATML.find_control_string("x <| spaced |> and <|Upper|>") is None
    assert find_any_control_string("an intent with <|im_end|>") == "<|im_end|>"
    assert find_any_control_string("an intent with <|eot_id|>") == "<|eot_id|>"


@pytest.mark.parametrize("intent", [INTENT, None])
def test_a_sequence_that_fits_exactly_is_not_cut(formatted, intent):
    """The budgets are exact: each example (and prompt) at a limit of its own length is the same,
    uncut, with or without a system message (chatml's first message then has no separator)."""
    encoder = ChatEncoder(formatted)
    messages = conversation_messages(intent, TURNS, ended=True)
    for mode in ("per_turn", "per_conversation"):
        for example in encoder.flip(messages, mode, 4096):
            (again,) = [e for e in encoder.flip(messages, mode, len(example.input_ids))
                        if e.target_turns == example.target_turns] if mode == "per_turn" else \
                encoder.flip(messages, mode, len(example.input_ids))
            assert again.input_ids == example.input_ids and not again.truncated
    prompt = encoder.prompt_ids(messages[:-1])
    assert encoder.prompt_ids_within(messages[:-1], len(prompt)) == (prompt, False)
