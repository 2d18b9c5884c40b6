"""The schema of `python -m data_prep`'s configuration: key names and types, no values.

Values live in conf/data_prep/ (YAML). Registering this schema as the first entry of the defaults
list makes every key strict: a YAML file or command-line override that names an unknown key, or
gives a wrong type, fails at composition instead of being silently ignored. Fields with a fixed
set of values are enums (the YAML spells the member's name), so `flip.mode=per_turns` fails at
composition too, naming the key and the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, auto
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from core.config_types import Dtype
from core.llm_client import ClientConfig
from data_prep import chat_format, sources
from data_prep.chat_format import FlipMode

# The strings that code and conf/ share, defined once in data_prep.chat_format; YAML writes
# ${chat_format:INTENT_PREFIX}. Registered here; evaluate's schemas import this module for it.
CHAT_FORMAT_CONSTANTS = {"INTENT_PREFIX": chat_format.INTENT_PREFIX, "PAD_TOKEN": chat_format.PAD_TOKEN}


def chat_format_constant(name: str) -> str:
    if name not in CHAT_FORMAT_CONSTANTS:
        raise ValueError(f"${{chat_format:{name}}}: expected one of {', '.join(CHAT_FORMAT_CONSTANTS)}")
    return CHAT_FORMAT_CONSTANTS[name]


OmegaConf.register_new_resolver("chat_format", chat_format_constant, replace=True)


DatasetKind = StrEnum("DatasetKind", {name: name for name in sources.NAMES})   # data_prep/sources/<name>.py
ChatFormatName = StrEnum("ChatFormatName", {name: name for name in chat_format.FORMATS})   # data_prep/chat_format.py


class UnansweredLastTurn(StrEnum):   # a last user turn that got no reply
    keep_no_end = auto()             # keep it as a target, emit no <|endconversation|> sample
    trim = auto()                    # remove it
    drop = auto()                    # drop the conversation


class MissingUser(StrEnum):          # a conversation without hashed_ip
    own_user = auto()                # is its own user
    drop = auto()                    # is left out


class IntentsBackend(StrEnum):
    file = auto()                    # read intents.path as given
    openai = auto()                  # generate the missing intents with an OpenAI-compatible endpoint
    hf = auto()                      # ... or with a local model


@dataclass
class DataConfig:
    kind: DatasetKind = MISSING       # set by the `dataset` group
    source: str = MISSING             # hub id, local parquet/jsonl file or folder
    # The field holding the source's own conversation id: the key intents are stored under. A row
    # without one gets a hash of its normalised turns (WildChat's conversation_hash is required).
    id_field: str = MISSING
    # The field holding a user id for the user-level split; null: each conversation is its own user
    # (counted). WildChat's (hashed_ip, with country) and PRISM's (user_id) are fixed by their schema.
    user_field: Optional[str] = MISSING
    revision: Optional[str] = None    # hub revision (commit sha, tag or branch)
    hub_config: Optional[str] = None  # hub dataset configuration (PRISM: conversations)
    sample: str = MISSING             # the embedded sample of this dataset (experiment=tiny reads it)
    sample_intents: str = MISSING     # ... and its hand-written intents
    limit: Optional[int] = None       # read only the first N rows (quick runs); N >= 1, null: all


class NearDuplicateMethod(StrEnum):  # data_prep.funnel
    prefix_key = auto()              # the first `ngram` normalised words of the first user turn are a key
    ngram_count = auto()             # a first turn holding a whitespace n-gram seen > threshold times


@dataclass
class NearDuplicateConfig:
    enabled: bool = MISSING
    method: NearDuplicateMethod = MISSING
    ngram: int = MISSING              # prefix_key: words that form the key; ngram_count: words per n-gram
    max_per_key: int = MISSING        # prefix_key: conversations kept per key; the rest are near-duplicates
    threshold: int = MISSING          # ngram_count: occurrences over the corpus above which an n-gram marks one


@dataclass
class FiltersConfig:
    languages: Optional[list[str]] = MISSING    # null keeps every language
    unanswered_last_turn: UnansweredLastTurn = MISSING
    exact_duplicates: bool = MISSING
    near_duplicates: NearDuplicateConfig = field(default_factory=NearDuplicateConfig)
    toxic: bool = MISSING                       # drop conversations flagged toxic
    redacted: bool = MISSING                    # drop conversations with redacted PII
    max_user_turns: Optional[int] = MISSING
    max_chars: Optional[int] = MISSING          # longest conversation kept, in characters
    write_dropped: bool = MISSING               # write dropped.jsonl (hash + reason) for audit


@dataclass
class SplitConfig:
    fractions: dict[str, float] = MISSING       # split name -> share of each country's users
    seed: int = MISSING
    missing_user: MissingUser = MISSING


@dataclass
class TurnConfig:
    role: str = MISSING
    content: str = MISSING


@dataclass
class IntentExampleConfig:
    conversation: list[TurnConfig] = MISSING
    intent: str = MISSING


@dataclass
class PromptBudgetConfig:             # see data_prep/intents/prompt.py for how a conversation is cut
    chars_per_token: float = MISSING
    conversation_tokens: int = MISSING
    first_user_turn_tokens: int = MISSING
    user_turn_tokens: int = MISSING
    assistant_turn_tokens: int = MISSING


@dataclass
class IntentPromptConfig:             # conf/data_prep/intents/prompt/<version>.yaml
    version: str = MISSING
    instruction: str = MISSING
    examples: list[IntentExampleConfig] = MISSING
    turn_format: str = MISSING        # "{role}" and "{content}" are filled in
    omitted_format: str = MISSING     # "{count}": later turns dropped for the budget
    cut_marker: str = MISSING         # replaces the middle of an over-long turn
    budget: PromptBudgetConfig = field(default_factory=PromptBudgetConfig)


@dataclass
class IntentGenerationConfig:
    max_tokens: int = MISSING
    temperature: float = MISSING
    retry_temperature: float = MISSING  # a reply that fails the checks is asked again, sampled at this
    output_retries: int = MISSING       # new replies asked after one fails the checks
    seed: int = MISSING                 # hf backend's sampling on retries


@dataclass
class IntentChecksConfig:
    max_words: int = MISSING
    max_chars: int = MISSING
    require_prefix: Optional[str] = MISSING  # the reply must start with this (case-insensitive); null: any
    reject_truncated: bool = MISSING         # reject a reply cut by max_tokens (finish_reason "length")


@dataclass
class HFGeneratorConfig:
    model: str = MISSING              # local path or hub id of a causal LM
    batch_size: int = MISSING
    device: str = MISSING             # auto | cpu | cuda | cuda:1 ... (core.runtime)
    dtype: Dtype = MISSING            # auto | float32 | bfloat16 | float16 (auto: bf16 on a GPU that has it)
    trust_remote_code: bool = MISSING


@dataclass
class IntentsConfig:
    backend: IntentsBackend = MISSING
    path: Optional[str] = MISSING     # jsonl of {conversation_hash, intent, ...}: read by data_prep, filled by generation
    prompt: IntentPromptConfig = field(default_factory=IntentPromptConfig)
    generation: IntentGenerationConfig = field(default_factory=IntentGenerationConfig)
    checks: IntentChecksConfig = field(default_factory=IntentChecksConfig)
    openai: ClientConfig = field(default_factory=ClientConfig)
    hf: HFGeneratorConfig = field(default_factory=HFGeneratorConfig)
    progress: bool = MISSING          # progress bar (rate, ETA) while generating


@dataclass
class FlipConfig:
    mode: FlipMode = MISSING


@dataclass
class TokenizerConfig:
    name_or_path: str = MISSING
    pad_token: Optional[str] = MISSING    # null: the chat format's (userlm <|reserved_special_token_0|>, chatml <|endoftext|>)
    trust_remote_code: bool = MISSING


@dataclass
class DataPrepConfig:
    data: DataConfig = field(default_factory=DataConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    intents: IntentsConfig = field(default_factory=IntentsConfig)
    flip: FlipConfig = field(default_factory=FlipConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # The base model's family: userlm (UserLM-8b's Llama-3 format) or chatml (Qwen2.5/Qwen3 and any
    # other base). The saved tokenizer carries it; train and evaluate read it from there.
    chat_format: ChatFormatName = MISSING
    max_seq_len: int = MISSING
    output_dir: str = MISSING
    overwrite: bool = MISSING         # replace an output_dir that is not data_prep's own complete output
    num_proc: int = MISSING
    batch_size: int = MISSING         # conversations per datasets.map batch
    preview_examples: int = MISSING   # decoded examples written to examples.txt


ConfigStore.instance().store(name="data_prep_schema", node=DataPrepConfig)
