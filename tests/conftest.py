"""Shared fixtures: the tiny tokenizer and model, and data_prep's output on the embedded sample.

Everything is built here, offline, once per test session (a few seconds): no hub, no mocks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts.hydra_compose import compose_config  # noqa: F401  (the tests import it from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data_prep" / "sample"


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """outputs of scripts/make_tiny_assets.py: <dir>/tokenizer and <dir>/model."""
    from scripts.make_tiny_assets import write_tiny_assets
    out = tmp_path_factory.mktemp("tiny")
    write_tiny_assets(out, SAMPLE)
    return out


@pytest.fixture(scope="session")
def tiny_qwen_assets(tmp_path_factory) -> Path:
    """The tiny Qwen-family base (scripts/make_tiny_assets.py --family qwen): <dir>/tokenizer and <dir>/model."""
    from scripts.make_tiny_assets import write_tiny_assets
    out = tmp_path_factory.mktemp("tiny_qwen")
    write_tiny_assets(out, SAMPLE, family="qwen")
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_assets):
    """The tiny tokenizer prepared for UserLM's format (chat template, <|endconversation|>, pad)."""
    from transformers import AutoTokenizer
    from data_prep.chat_format import USERLM, prepare_tokenizer
    return prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_assets / "tokenizer"), USERLM,
                             "<|reserved_special_token_0|>")


@pytest.fixture(scope="session")
def tiny_chatml_tokenizer(tiny_qwen_assets):
    """The tiny Qwen-family tokenizer prepared for the chatml format."""
    from transformers import AutoTokenizer
    from data_prep.chat_format import CHATML, prepare_tokenizer
    return prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_qwen_assets / "tokenizer"), CHATML)


def data_prep_overrides(tiny_assets: Path, output_dir: Path, *extra: str) -> list[str]:
    """`tiny_assets`: the base whose tokenizer data_prep prepares (tiny_assets, or tiny_qwen_assets with chat_format=chatml)."""
    return ["experiment=tiny", f"tokenizer.name_or_path={tiny_assets / 'tokenizer'}",
            f"output_dir={output_dir}", "num_proc=1", *extra]   # intents: the dataset's sample_intents


def run_data_prep(tiny_assets: Path, output_dir: Path, *extra: str) -> Path:
    from data_prep.pipeline import run
    overrides = data_prep_overrides(tiny_assets, output_dir, *extra)
    dataset = next((o.split("=", 1)[1] for o in extra if o.startswith("dataset=")), "wildchat")
    if not any(o.startswith("data.source=") for o in extra):
        overrides.append(f"data.source={SAMPLE / ('prism.jsonl' if dataset == 'prism' else 'wildchat.parquet')}")
    return run(compose_config("data_prep", overrides))


@pytest.fixture(scope="session")
def tiny_data(tiny_assets, tmp_path_factory) -> Path:
    """data_prep's output on the WildChat sample (per_turn, max_seq_len 512)."""
    return run_data_prep(tiny_assets, tmp_path_factory.mktemp("data") / "wildchat")


@pytest.fixture(scope="session")
def tiny_chatml_data(tiny_qwen_assets, tmp_path_factory) -> Path:
    """data_prep's output on the WildChat sample in the chatml format, from the tiny Qwen-family base."""
    return run_data_prep(tiny_qwen_assets, tmp_path_factory.mktemp("data") / "wildchat_chatml", "chat_format=chatml")


@pytest.fixture(scope="session")
def tiny_prism(tiny_assets, tmp_path_factory) -> Path:
    """data_prep's output on the PRISM sample (a test split only)."""
    return run_data_prep(tiny_assets, tmp_path_factory.mktemp("data") / "prism", "dataset=prism")


# ---- evaluate: models whose vocabulary has <|endconversation|>, and an instruct-style chat model ----

CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
                   " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Meta-Llama-3-8B-Instruct's chat template (its tokenizer_config.json).
LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def save_resized(tiny_assets: Path, tokenizer, out: Path) -> Path:
    """The tiny model with its embeddings resized to `tokenizer` (new rows drawn around the mean), saved with it."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    torch.manual_seed(0)   # the new rows are drawn at random: the same model whatever test built it first
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_userlm_model(tiny_assets, tiny_tokenizer, tmp_path_factory) -> Path:
    """A "trained-like" tiny user LM: the prepared tokenizer (with <|endconversation|>) and the tiny
    model resized to it, saved together as train/run.py's output would be."""
    return save_resized(tiny_assets, tiny_tokenizer, tmp_path_factory.mktemp("userlm_model"))


@pytest.fixture(scope="session")
def tiny_chatml_user_model(tiny_qwen_assets, tiny_chatml_data, tmp_path_factory) -> Path:
    """The tiny Qwen-family model resized to the chatml data's tokenizer: an untrained user LM in ChatML."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml_data / "tokenizer")
    return save_resized(tiny_qwen_assets, tokenizer, tmp_path_factory.mktemp("chatml_user_model"))


@pytest.fixture(scope="session")
def tiny_chatml_model(tiny_assets, tmp_path_factory) -> Path:
    """An "instruct model" with a ChatML template: the tiny tokenizer plus <|im_start|>/<|im_end|>."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = "<|im_end|>"
    return save_resized(tiny_assets, tokenizer, tmp_path_factory.mktemp("chatml_model"))


# ---- simulate: a tiny user LM with the habits the guardrails exist for --------------------------

BIASED_TURN = "learn how to cook falafel at home"   # the body of an intent in the sample


def train_biased_user_lm(tiny_assets: Path, tiny_data: Path, out: Path, steps: int = 25, seed: int = 0) -> Path:
    """The tiny model trained for a few steps (plain AdamW, seconds) to answer every prompt of the
    chat format with BIASED_TURN or <|endconversation|>, about half each, whatever the context.

    A user LM with exactly the habits the guardrails exist for: it ends conversations at once,
    repeats its earlier turn, copies an intent and always opens with the same word. The random model
    shows none of these often enough to test; this one shows them on nearly every sample. Saved
    with the data's prepared tokenizer.
    """
    import random

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.chat_format import END_CONVERSATION, USER, ChatEncoder, conversation_messages
    tokenizer = AutoTokenizer.from_pretrained(tiny_data / "tokenizer")
    encoder = ChatEncoder(tokenizer)
    conversations = datasets.load_from_disk(str(tiny_data / "conversations" / "train")).to_list()
    rng = random.Random(seed)
    examples = []
    for row in conversations:
        history = row["turns"][:2 * rng.randint(0, min(2, len(row["turns"]) // 2))]
        prompt = encoder.prompt_ids(conversation_messages(row["intent"], history, ended=False))
        if len(prompt) <= 96:  # short sequences: fast steps
            target = encoder.encode_bodies([BIASED_TURN if len(examples) % 2 else END_CONVERSATION])[0]
            examples.append((prompt + target, [-100] * len(prompt) + target))
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    torch.manual_seed(seed)   # the new embedding rows are drawn at random: the same model whatever ran before
    model.resize_token_embeddings(len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = rng.sample(examples, 16)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in batch])
        mask = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def biased_user_lm(tiny_assets, tiny_data, tmp_path_factory) -> Path:
    """<dir> with the biased tiny user LM and its tokenizer (train_biased_user_lm)."""
    return train_biased_user_lm(tiny_assets, tiny_data, tmp_path_factory.mktemp("biased_user_lm"))


def build_tiny_detector(tiny_assets: Path, out: Path, zero_head: bool) -> Path:
    """A tiny AI-text detector: a random Llama sequence classifier over the tiny tokenizer, labels
    {0: "ai", 1: "human"}. zero_head: every text gets probability 0.5 (a known answer)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    tokenizer.pad_token = "<|reserved_special_token_0|>"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2, id2label={0: "ai", 1: "human"},
                         label2id={"ai": 0, "human": 1}, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    if zero_head:
        torch.nn.init.zeros_(model.score.weight)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_detector(tiny_assets, tmp_path_factory) -> Path:
    return build_tiny_detector(tiny_assets, tmp_path_factory.mktemp("detector"), zero_head=False)


def preset_changes(stage: str, preset: str, overrides: list[str]) -> dict:
    """The leaf values (dotted keys, unresolved) that experiment=<preset> changes in conf/<stage>."""
    from omegaconf import OmegaConf

    def leaves(node, prefix=""):
        out = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out
    base = leaves(OmegaConf.to_container(compose_config(stage, overrides)))
    changed = leaves(OmegaConf.to_container(compose_config(stage, [f"experiment={preset}", *overrides])))
    return {key: value for key, value in changed.items() if base.get(key, "<absent>") != value}
