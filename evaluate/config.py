"""Schemas of `python -m evaluate.perplexity` and `python -m evaluate.table`: key names and types.

Values live in conf/perplexity/ and conf/table/ (YAML). Registered as the first entry of each
defaults list, a schema makes every key strict: an unknown key or a wrong type fails at composition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


def result_name(model: str, protocol: str) -> str:
    """A directory name for a model id or path: "/" -> "--", other unsafe characters -> "_".

    Perplexity results and simulations are named by it (here, beside the schemas, so that composing
    a config imports no model code)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", "--".join(p for p in model.split("/") if p not in ("", ".")))
    return name if protocol == "userlm" else f"{name}--{protocol}"


@dataclass
class FlippedChatConfig:
    system_prompt: str = MISSING              # intent=none
    system_prompt_with_intent: str = MISSING  # intent=task|generic; contains {intent}
    template_kwargs: dict[str, str] = MISSING  # extra variables for the chat template


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
    intent: str = MISSING                     # none | task | generic
    generic_intent: str = MISSING
    protocol: str = MISSING                   # userlm | flipped_chat
    flipped_chat: FlippedChatConfig = field(default_factory=FlippedChatConfig)
    pad_token: str = MISSING                  # userlm protocol: prepare_tokenizer's pad token
    missing_end_token: str = MISSING          # plain_text | exclude
    mode: str = MISSING                       # per_conversation | per_turn
    max_seq_len: int = MISSING
    max_tokens_per_batch: int = MISSING
    max_batch_size: int = MISSING
    chunk_conversations: int = MISSING        # conversations flipped and scored (and saved) at a time
    device: str = MISSING                     # auto | cpu | cuda | cuda:N
    dtype: str = MISSING                      # auto | float32 | bfloat16 | float16
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
class TableConfig:
    tables: list[str] = MISSING               # each is evaluate/tables/<name>.py, configured by <name>
    output_dir: str = MISSING
    perplexity: PerplexityTableConfig = field(default_factory=PerplexityTableConfig)
    intrinsic: IntrinsicTableConfig = field(default_factory=IntrinsicTableConfig)


ConfigStore.instance().store(name="perplexity_schema", node=PerplexityConfig)
ConfigStore.instance().store(name="table_schema", node=TableConfig)
