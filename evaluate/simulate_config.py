"""Schemas of `python -m evaluate.simulate` and `python -m evaluate.intrinsic`: key names and types.

Values live in conf/simulate/ and conf/intrinsic/ (YAML). Registered as the first entry of each
defaults list, a schema makes every key strict: an unknown key or a wrong type fails at composition,
and so does a value outside an enum field's members (`assistant.kind=hff`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, auto
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from core.config_types import Dtype
from core.llm_client import ClientConfig
from data_prep.chat_format import PAD_TOKEN
from evaluate.config import FlippedChatConfig, Protocol, result_name


class AssistantKind(StrEnum):       # evaluate/assistants.py
    hf = auto()                     # a local model with its chat template
    openai = auto()                 # any OpenAI-compatible chat-completions endpoint
    scripted = auto()               # fixed replies, in turn (deterministic, free)


@dataclass
class SamplingConfig:
    do_sample: bool = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    top_k: int = MISSING              # 0: off
    max_new_tokens: int = MISSING


class UserBackend(StrEnum):         # where the user LM runs
    hf = auto()                     # a local transformers model in this process
    openai = auto()                 # a server's OpenAI-compatible /v1/completions (vLLM, SGLang): evaluate.served


class PromptFormat(StrEnum):        # how a served user LM gets its prompt
    token_ids = auto()              # our rendering's token ids (vLLM, SGLang): nothing re-tokenized
    text = auto()                   # the rendered text, sent with add_special_tokens: false (no BOS)


@dataclass
class ServedUserConfig(ClientConfig):
    """user_model.openai: the endpoint (core.llm_client.ClientConfig's keys) and how turns are drawn."""
    candidates: int = 4                          # samples per request (n), judged in turn by the guardrails
    prompt_format: PromptFormat = PromptFormat.token_ids


@dataclass
class UserModelConfig:
    name_or_path: str = MISSING       # hub id or local directory (backend openai: the tokenizer and config)
    # Defaults here, not only in YAML: simulations saved before the served backend existed still load.
    backend: UserBackend = UserBackend.hf
    openai: ServedUserConfig = field(default_factory=ServedUserConfig)
    protocol: Protocol = MISSING
    flipped_chat: FlippedChatConfig = field(default_factory=FlippedChatConfig)
    pad_token: str = MISSING
    batch_size: int = MISSING         # turns sampled per generate call (and conversations in flight)
    dtype: Dtype = MISSING            # auto | float32 | bfloat16 | float16
    device: str = MISSING             # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = MISSING


@dataclass
class FirstWordGuardrail:
    enabled: bool = MISSING
    words: list[str] = MISSING


@dataclass
class EndGuardrail:
    enabled: bool = MISSING


@dataclass
class LengthGuardrail:
    enabled: bool = MISSING
    min_words: int = MISSING
    max_words: int = MISSING


@dataclass
class RepetitionGuardrail:
    enabled: bool = MISSING
    intent_prefix: str = MISSING


@dataclass
class GuardrailsConfig:
    first_word: FirstWordGuardrail = field(default_factory=FirstWordGuardrail)
    end_conversation: EndGuardrail = field(default_factory=EndGuardrail)
    length: LengthGuardrail = field(default_factory=LengthGuardrail)
    repetition: RepetitionGuardrail = field(default_factory=RepetitionGuardrail)
    max_retries: int = MISSING


@dataclass
class HFAssistantConfig:
    """A local model as the assistant; the defaults here are the one copy that simulate's
    assistant.hf and intrinsic's assistant.hf share (each YAML lists only what it changes)."""
    name_or_path: Optional[str] = None       # hub id or local directory
    chat_template: Optional[str] = None      # null: the tokenizer's own
    pad_token: str = PAD_TOKEN               # used when the tokenizer has no pad token distinct from EOS
    stop_tokens: Optional[list[str]] = None  # null: the model's EOS tokens
    batch_size: int = 32                     # replies per generate call
    dtype: Dtype = Dtype.auto                # auto: bfloat16 on cuda, float32 on cpu
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass
class ScriptedAssistantConfig:
    replies: list[str] = MISSING


@dataclass
class AssistantConfig:
    kind: AssistantKind = MISSING
    system_prompt: Optional[str] = MISSING
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    hf: HFAssistantConfig = field(default_factory=HFAssistantConfig)
    openai: ClientConfig = field(default_factory=ClientConfig)
    scripted: ScriptedAssistantConfig = field(default_factory=ScriptedAssistantConfig)


@dataclass
class IntentsSourceConfig:
    path: str = MISSING               # JSONL of {id | conversation_hash, intent}, or a data_prep output dir
    split: str = MISSING              # the split read from a data_prep output dir
    limit: Optional[int] = MISSING    # the first N intents only


@dataclass
class ConversationConfig:
    max_user_turns: int = MISSING     # answered user turns before the conversation is cut (max_turns)
    end_allowed_after: int = MISSING  # user turns sent before <|endconversation|> is allowed


@dataclass
class SimulateConfig:
    user_model: UserModelConfig = field(default_factory=UserModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)
    assistant: AssistantConfig = field(default_factory=AssistantConfig)
    intents: IntentsSourceConfig = field(default_factory=IntentsSourceConfig)
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    seed: int = MISSING
    output_dir: str = MISSING
    progress: bool = MISSING


@dataclass
class TerminationConfig:
    data_dir: str = MISSING           # data_prep output with real conversations (PRISM in the paper)
    split: str = MISSING
    limit: Optional[int] = MISSING
    max_seq_len: int = MISSING
    max_tokens_per_batch: int = MISSING
    max_batch_size: int = MISSING


@dataclass
class NaturalnessConfig:
    detector: str = MISSING           # hub id or local directory of a sequence-classification model
    human_label: str = MISSING        # the detector's label (config.id2label) for human-written text
    batch_size: int = MISSING
    max_length: int = MISSING
    device: str = MISSING             # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = MISSING


@dataclass
class ItemsConfig:
    source: str = MISSING             # hub id or local JSONL/JSON/Parquet file in the same schema
    split: str = MISSING
    revision: Optional[str] = MISSING
    limit: Optional[int] = MISSING


@dataclass
class AdherenceConfig:
    data: ItemsConfig = field(default_factory=ItemsConfig)
    intent_template: str = MISSING    # the user's intent; {question}, {choices}, {answer} from the item
    assistant_system_prompt: str = MISSING   # for assistant.kind hf | openai
    assistant_replies: list[str] = MISSING   # for assistant.kind scripted
    judge_prompt: str = MISSING       # {question} {choices} {answer} {first_turn} {assistant_turn} {user_turn}
    adhered_when: bool = MISSING      # the verdict (YES: true) that means the user adhered


@dataclass
class JudgeConfig:
    client: ClientConfig = field(default_factory=ClientConfig)
    max_tokens: int = MISSING


@dataclass
class IntrinsicConfig:
    simulation: str = MISSING         # an evaluate.simulate output_dir: transcripts and the user LM's settings
    name: Optional[str] = MISSING     # results go to <output_dir>/<name>/; null: the simulation dir's name
    metrics: list[str] = MISSING
    first_turns: int = MISSING        # first turns (of the transcripts, in order) for diversity and naturalness
    intent_prefix: str = MISSING      # the intents' fixed opening, removed before measuring overlap
    termination: TerminationConfig = field(default_factory=TerminationConfig)
    naturalness: NaturalnessConfig = field(default_factory=NaturalnessConfig)
    assistant: AssistantConfig = field(default_factory=AssistantConfig)
    role_adherence: AdherenceConfig = field(default_factory=AdherenceConfig)
    intent_adherence: AdherenceConfig = field(default_factory=AdherenceConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    human: bool = MISSING             # also measure the real conversations of the same intents (row "human")
    seed: int = MISSING
    output_dir: str = MISSING


ConfigStore.instance().store(name="simulate_schema", node=SimulateConfig)
ConfigStore.instance().store(name="intrinsic_schema", node=IntrinsicConfig)
# ${model_dir:<model>,<protocol>}: a directory name for a model id or path (as evaluate.perplexity names results)
OmegaConf.register_new_resolver("model_dir", result_name, replace=True)
