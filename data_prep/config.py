"""The schema of `python -m data_prep`'s configuration: key names and types, no values.

Values live in conf/data_prep/ (YAML). Registering this schema as the first entry of the defaults
list makes every key strict: a YAML file or command-line override that names an unknown key, or
gives a wrong type, fails at composition instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from core.llm_client import ClientConfig


@dataclass
class DataConfig:
    kind: str = MISSING               # wildchat | prism (set by the `dataset` group)
    source: str = MISSING             # hub id, local parquet/jsonl file or folder
    revision: Optional[str] = None    # hub revision (commit sha, tag or branch)
    hub_config: Optional[str] = None  # hub dataset configuration (PRISM: conversations)
    sample: str = MISSING             # the embedded sample of this dataset (experiment=tiny reads it)
    limit: Optional[int] = None       # read only the first N rows (quick runs); N >= 1, null: all


@dataclass
class NearDuplicateConfig:
    enabled: bool = MISSING
    ngram: int = MISSING              # words of the normalised first user turn that form the key
    max_per_key: int = MISSING        # conversations kept per key; the rest are near-duplicates


@dataclass
class FiltersConfig:
    languages: Optional[list[str]] = MISSING    # null keeps every language
    unanswered_last_turn: str = MISSING         # keep_no_end | trim | drop
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
    missing_user: str = MISSING                 # own_user | drop


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
    device: str = MISSING             # cpu | cuda | cuda:1 ...
    dtype: str = MISSING              # float32 | bfloat16 | float16
    trust_remote_code: bool = MISSING


@dataclass
class IntentsConfig:
    backend: str = MISSING            # file: read `path` | openai: an OpenAI-compatible endpoint | hf: a local model
    path: Optional[str] = MISSING     # jsonl of {conversation_hash, intent, ...}: read by data_prep, filled by generation
    prompt: IntentPromptConfig = field(default_factory=IntentPromptConfig)
    generation: IntentGenerationConfig = field(default_factory=IntentGenerationConfig)
    checks: IntentChecksConfig = field(default_factory=IntentChecksConfig)
    openai: ClientConfig = field(default_factory=ClientConfig)
    hf: HFGeneratorConfig = field(default_factory=HFGeneratorConfig)
    progress: bool = MISSING          # progress bar (rate, ETA) while generating


@dataclass
class FlipConfig:
    mode: str = MISSING               # per_turn | per_conversation


@dataclass
class TokenizerConfig:
    name_or_path: str = MISSING
    pad_token: str = MISSING
    trust_remote_code: bool = MISSING


@dataclass
class DataPrepConfig:
    data: DataConfig = field(default_factory=DataConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    intents: IntentsConfig = field(default_factory=IntentsConfig)
    flip: FlipConfig = field(default_factory=FlipConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    max_seq_len: int = MISSING
    output_dir: str = MISSING
    overwrite: bool = MISSING         # replace an output_dir that is not data_prep's own complete output
    num_proc: int = MISSING
    batch_size: int = MISSING         # conversations per datasets.map batch
    preview_examples: int = MISSING   # decoded examples written to examples.txt


ConfigStore.instance().store(name="data_prep_schema", node=DataPrepConfig)
