"""The schema of `train/run.py`'s configuration: key names and types, no values.

Values live in conf/train/ (YAML). Registered as `train_schema`, the first entry of the defaults
list, so an unknown key or a wrong type fails at composition instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Precision(StrEnum):     # train's names, as accelerate and DeepSpeed say them (core.config_types.Dtype's via train.model)
    auto = "auto"             # bf16 on a GPU, fp32 on CPU (bf16 is ~3x slower on CPUs)
    bf16 = "bf16"
    fp32 = "fp32"


class GradAccumDtype(StrEnum):  # the dtype ZeRO sums micro-step gradients in (train.optim)
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class DataConfig:
    path: str = MISSING                           # data_prep output: train/, validation/, tokenizer/
    packing: bool = MISSING                       # several examples per row (true) or one (false)
    max_seq_len: int = MISSING                    # tokens per row
    max_train_examples: Optional[int] = MISSING   # first N train examples only (quick runs, tests)
    max_validation_examples: Optional[int] = MISSING


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    revision: Optional[str] = MISSING
    trust_remote_code: bool = MISSING
    precision: Precision = MISSING
    attn_implementation: str = MISSING        # auto | sdpa | eager | flash_attention_2
    gradient_checkpointing: Optional[bool] = MISSING   # null: on with a GPU, off on CPU
    loss_chunk_tokens: Optional[int] = MISSING  # tokens per pass through the output layer + loss (null: all at once)


@dataclass
class OptimizerConfig:
    lr: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING
    warmup_ratio: float = MISSING
    min_lr_ratio: float = MISSING             # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = MISSING


@dataclass
class TrainConfig:
    global_batch_size: int = MISSING          # rows per optimizer step, all processes together
    micro_batch_size: int = MISSING           # rows per process per forward pass
    round_global_batch: bool = MISSING        # round to a reachable global batch instead of failing
    epochs: int = MISSING
    max_steps: Optional[int] = MISSING        # stop after this many optimizer steps (null: epochs)
    seed: int = MISSING
    eval_every: int = MISSING                 # optimizer steps between validation passes (0: never)
    save_every: int = MISSING                 # optimizer steps between checkpoints (0: never)
    save_total_limit: int = MISSING           # checkpoints kept (older ones deleted)
    resume: Optional[str] = MISSING           # auto | null | <checkpoint dir>
    peak_tflops: Optional[float] = MISSING    # per-device peak for the MFU estimate (null: by GPU name)
    grad_accum_dtype: GradAccumDtype = MISSING


@dataclass
class GenerationConfig:
    do_sample: bool = MISSING
    temperature: float = MISSING
    top_p: float = MISSING


@dataclass
class WandbConfig:
    mode: str = MISSING                       # offline | online | disabled
    project: str = MISSING
    name: Optional[str] = MISSING


@dataclass
class TrainRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    deepspeed: str = MISSING                  # DeepSpeed JSON; relative paths: from the repository root
    output_dir: str = MISSING


ConfigStore.instance().store(name="train_schema", node=TrainRunConfig)
