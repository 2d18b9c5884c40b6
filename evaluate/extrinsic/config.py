"""Schema of `python -m evaluate.extrinsic`: key names and types (torch-free).

Values live in conf/extrinsic/ (YAML). Registered as the first entry of its defaults list, the schema
makes every key strict: an unknown key, a wrong type or a value outside an enum (`user.kind=user-lm`,
`grading.extractor=regex`) fails at composition. The blocks shared with other commands are their
schemas: the user LM's `model` is evaluate.simulate's UserModelConfig, every endpoint a
core.llm_client ClientConfig, the assistant evaluate.simulate's AssistantConfig (plus the per-kind
system prompts), tasks, grading and metrics their modules' own. The user LM's guardrails and
sampling are not repeated in conf/extrinsic: their defaults are conf/simulate/'s (the paper's
guardrails in its config.yaml, the model card's sampling in sampling/card.yaml), loaded into the
schema here, and overridable as `user.user_lm.guardrails.length.enabled=false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum, auto
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from core.llm_client import ClientConfig
from evaluate.extrinsic.grading import GradingConfig
from evaluate.extrinsic.metrics import MetricsConfig
from evaluate.extrinsic.tasks import TasksConfig
from evaluate.simulate_config import (AssistantConfig, ConversationConfig, GuardrailsConfig, SamplingConfig,
                                      UserModelConfig)

SIMULATE_CONF = Path(__file__).resolve().parents[2] / "conf" / "simulate"


class UserKind(StrEnum):            # evaluate/extrinsic/users.py
    user_lm = auto()                # a user LM with the paper's guardrails, given an intent from the task
    prompted_llm = auto()           # an LLM endpoint playing LiC's user agent: one shard per turn, rephrased
    verbatim_shards = auto()        # shard k as turn k, verbatim (deterministic)


@dataclass
class UserLMConfig:
    model: UserModelConfig = field(default_factory=UserModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)        # default: conf/simulate/sampling/card.yaml
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)  # default: conf/simulate/config.yaml's


@dataclass
class PromptedLLMConfig:
    client: ClientConfig = field(default_factory=ClientConfig)
    prompt: str = MISSING             # {conversation} {revealed} {unrevealed}; literal braces doubled
    temperature: float = MISSING
    max_tokens: int = MISSING
    output_retries: int = MISSING     # a reply that is not the JSON asked for is asked again this many times


@dataclass
class UserConfig:
    kind: UserKind = MISSING
    user_lm: UserLMConfig = field(default_factory=UserLMConfig)
    prompted_llm: PromptedLLMConfig = field(default_factory=PromptedLLMConfig)


@dataclass
class IntentConfig:
    template: str = MISSING           # user_lm's intent: {question} (the full problem), {shards} (joined)


@dataclass
class SystemPromptsConfig:
    math: str = MISSING
    code: str = MISSING


@dataclass
class ExtrinsicAssistantConfig(AssistantConfig):
    system_prompts: SystemPromptsConfig = field(default_factory=SystemPromptsConfig)   # per task kind


@dataclass
class ExtrinsicConversationConfig(ConversationConfig):
    pool_size: int = MISSING          # conversations simulated together (one batch: see evaluate.extrinsic.run)


@dataclass
class ExtrinsicConfig:
    tasks: TasksConfig = field(default_factory=TasksConfig)
    user: UserConfig = field(default_factory=UserConfig)
    intent: IntentConfig = field(default_factory=IntentConfig)
    assistant: ExtrinsicAssistantConfig = field(default_factory=ExtrinsicAssistantConfig)
    grading: GradingConfig = field(default_factory=GradingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    conversation: ExtrinsicConversationConfig = field(default_factory=ExtrinsicConversationConfig)
    simulations_per_task: int = MISSING
    seed: int = MISSING
    name: Optional[str] = MISSING     # results go to <output_dir>/<name>/; null: named after the user
    output_dir: str = MISSING
    progress: bool = MISSING


def schema():
    """ExtrinsicConfig with the user LM's guardrails and sampling defaulted from conf/simulate/."""
    shared = {"user": {"user_lm": {"guardrails": OmegaConf.load(SIMULATE_CONF / "config.yaml").guardrails,
                                   "sampling": OmegaConf.load(SIMULATE_CONF / "sampling" / "card.yaml")}}}
    return OmegaConf.merge(OmegaConf.structured(ExtrinsicConfig), shared)


ConfigStore.instance().store(name="extrinsic_schema", node=schema())
