"""Schemas of `python -m evaluate.perplexity` and `python -m evaluate.table`: key names and types.

Values live in conf/perplexity/ and conf/table/ (YAML). Registered as the first entry of each
defaults list, a schema makes every key strict: an unknown key or a wrong type fails at composition.
Fields with a fixed set of values are enums (the YAML spells the member's name), so a typo such as
`mode=per_turns` fails at composition too, naming the key and the allowed values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum, auto
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

import data_prep.config  # noqa: F401  (registers ${chat_format:NAME}, which conf/ uses for the constants)
from core.config_types import Dtype
from data_prep.chat_format import FlipMode


class Protocol(StrEnum):            # how a model is prompted to play the user (evaluate.protocols)
    userlm = auto()                 # UserLM-8b's chat format (user LMs; base models get the same text)
    flipped_chat = auto()           # the model's own chat template with roles swapped


class Intent(StrEnum):              # the system message a conversation is scored under
    none = auto()                   # no system message (the paper's "no intent" column)
    task = auto()                   # the conversation's own intent (the paper's "intent" column)
    generic = auto()                # generic_intent, the same for every conversation


class MissingEndToken(StrEnum):     # a model without an embedding row for <|endconversation|>
    plain_text = auto()             # scores it as the text pieces its tokenizer splits it into
    exclude = auto()                # scores no end-of-conversation target


def result_name(model: str, protocol: str) -> str:
    """A directory name for a model id or path: "/" -> "--", other unsafe characters -> "_".

    Perplexity results and simulations are named by it (here, beside the schemas, so that composing
    a config imports no model code)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", "--".join(p for p in model.split("/") if p not in ("", ".")))
    return name if protocol == "userlm" else f"{name}--{protocol}"


# How an instruct model is told to play the user (protocol flipped_chat), for perplexity and
# simulate alike: written here once, overridable per run (flipped_chat.system_prompt=...).
FLIPPED_CHAT_RULES = ("In this chat, your messages are the assistant turns and the assistant language model's "
                      "replies are the user turns. Write only the user's next message, as a real user would "
                      "type it; when you have nothing more to ask, write <|endconversation|>.")


@dataclass
class FlippedChatConfig:
    system_prompt: str = f"You are a user chatting with an assistant language model. {FLIPPED_CHAT_RULES}"  # intent=none
    system_prompt_with_intent: str = f"{{intent}} {FLIPPED_CHAT_RULES}"  # intent=task|generic
    # Variables for the chat template. Llama-3.1/3.2 templates print today's date in the system
    # message unless date_string is given: a fixed date gives the same tokens every day.
    template_kwargs: dict[str, str] = field(default_factory=lambda: {"date_string": "26 Jul 2024"})


@dataclass
class BootstrapConfig:
    samples: int = MISSING
    confidence: float = MISSING
    seed: int = MISSING


@dataclass
class PerplexityConfig:
    model: str = MISSING                      # hub id or local directory
    revision: Optional[str] = MISSING         # hub revision of model (and tokenizer)
    tokenizer: Optional[str] = MISSING        # null: the model's own
    name: Optional[str] = MISSING             # results/perplexity/<name>/; null: derived from model
    dataset: str = MISSING                    # a key of data_dirs
    data_dirs: dict[str, str] = MISSING       # dataset -> data_prep output directory
    split: str = MISSING
    intent: Intent = MISSING
    generic_intent: str = MISSING
    protocol: Protocol = MISSING
    flipped_chat: FlippedChatConfig = field(default_factory=FlippedChatConfig)
    pad_token: str = MISSING                  # userlm protocol: prepare_tokenizer's pad token
    missing_end_token: MissingEndToken = MISSING
    mode: FlipMode = MISSING
    max_seq_len: int = MISSING
    max_tokens_per_batch: int = MISSING
    max_batch_size: int = MISSING
    chunk_conversations: int = MISSING        # conversations flipped and scored (and saved) at a time
    device: str = MISSING                     # auto | cpu | cuda | cuda:N
    dtype: Dtype = MISSING                    # auto | float32 | bfloat16 | float16
    limit: Optional[int] = MISSING            # first N conversations only
    max_turn: int = MISSING                   # by_turn breakdown: turns >= max_turn pooled
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    trust_remote_code: bool = MISSING
    output_dir: str = MISSING
    overwrite: bool = MISSING


@dataclass
class PerplexityTableConfig:
    results_dir: str = MISSING                # evaluate.perplexity's output_dir
    intent: str = MISSING                     # our intent that fills the paper's "intent" columns
    paper_rows: dict[str, str] = MISSING      # result name -> the paper's row it reproduces


@dataclass
class IntrinsicTableConfig:
    results_dir: str = MISSING                # evaluate.intrinsic's output_dir
    paper_rows: dict[str, str] = MISSING      # result name -> the paper's row it reproduces


@dataclass
class ExtrinsicTableConfig:
    results_dir: str = MISSING                # evaluate.extrinsic's output_dir
    paper_rows: dict[str, str] = MISSING      # result name -> the paper's row it reproduces


@dataclass
class FunnelTableConfig:
    files: dict[str, str] = MISSING           # result name -> data_prep's funnel.json (absent files: left out)
    paper_rows: dict[str, str] = MISSING      # result name -> the paper's row it reproduces


@dataclass
class TableConfig:
    tables: list[str] = MISSING               # each is evaluate/tables/<name>.py, configured by <name>
    output_dir: str = MISSING
    perplexity: PerplexityTableConfig = field(default_factory=PerplexityTableConfig)
    intrinsic: IntrinsicTableConfig = field(default_factory=IntrinsicTableConfig)
    extrinsic: ExtrinsicTableConfig = field(default_factory=ExtrinsicTableConfig)
    funnel: FunnelTableConfig = field(default_factory=FunnelTableConfig)


ConfigStore.instance().store(name="perplexity_schema", node=PerplexityConfig)
ConfigStore.instance().store(name="table_schema", node=TableConfig)
