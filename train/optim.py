"""Optimiser, learning-rate schedule and the DeepSpeed config they run under."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from train.data import BatchArithmetic


def deepspeed_config(path: Path, arithmetic: BatchArithmetic, max_grad_norm: float, bf16: bool,
                     grad_accum_dtype: str) -> dict:
    """The DeepSpeed JSON with its "auto" batch, accumulation, clipping, precision and gradient
    accumulation dtype filled from our config (the one place that sets them). A concrete value
    there that disagrees is an error.

    `grad_accum_dtype` (train.grad_accum_dtype) is the dtype ZeRO sums micro-step gradients in:
    DeepSpeed's default under bf16 is bf16, which drifts (~0.6% relative error over 32 micro steps,
    ~1.7% over 256); fp32 costs 2 more bytes per parameter and process (ZeRO-3: / processes).
    An fp32 model accumulates in fp32 whatever is asked.
    """
    config = json.loads(path.read_text())
    ours = {"train_batch_size": arithmetic.global_batch_size,
            "train_micro_batch_size_per_gpu": arithmetic.micro_batch_size,
            "gradient_accumulation_steps": arithmetic.accumulation,
            "gradient_clipping": max_grad_norm}
    for key, value in ours.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"{path}: {key}={config[key]} disagrees with the training config ({value}); "
                             'write "auto" there')
        config[key] = value
    if config.get("bf16", {}).get("enabled", "auto") not in ("auto", bf16):
        raise ValueError(f"{path}: bf16.enabled={config['bf16']['enabled']} disagrees with model.precision")
    config["bf16"] = {**config.get("bf16", {}), "enabled": bf16}
    accumulate = grad_accum_dtype if bf16 else "fp32"
    if config.get("data_types", {}).get("grad_accum_dtype", "auto") not in ("auto", accumulate):
        raise ValueError(f"{path}: data_types.grad_accum_dtype={config['data_types']['grad_accum_dtype']} disagrees "
                         f"with train.grad_accum_dtype ({accumulate}); write \"auto\" there")
    config["data_types"] = {**config.get("data_types", {}), "grad_accum_dtype": accumulate}
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ValueError(f"{path}: ZeRO-3 needs stage3_gather_16bit_weights_on_model_save: true to export the model")
    return config


def make_optimizer(model, optimizer_cfg, ds_config: dict) -> torch.optim.Optimizer:
    """AdamW; DeepSpeed's CPU Adam when the DeepSpeed config offloads the optimizer (it requires it)."""
    kwargs = dict(lr=optimizer_cfg.lr, betas=tuple(optimizer_cfg.betas), eps=optimizer_cfg.eps,
                  weight_decay=optimizer_cfg.weight_decay)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **kwargs)
    return torch.optim.AdamW(model.parameters(), fused=torch.cuda.is_available(), **kwargs)


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """LambdaLR factor of step s (0-based): linear warmup to 1 (the first step already learns), then
    cosine decay towards min_lr_ratio, reached one step after the last (so no step is wasted)."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor
