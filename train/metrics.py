"""Training metrics: metrics.jsonl (always) and wandb (offline by default), main process only;
and the FLOP count behind the MFU estimate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from core import artifacts
from core.jsonl import JsonlWriter, jsonl_rows

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name(); the first
# match wins, so the more specific names come first (H100 NVL before H100, A10G before A10). NVL
# cards are the lower-power PCIe forms (NVIDIA datasheets: 1,671 TFLOP/s with sparsity, half dense).
# A10G (AWS's variant of the A10) has no NVIDIA datasheet: 70 is the figure usually quoted for it.
# train.peak_tflops overrides.
PEAK_BF16_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200 NVL", 835.0),
                    ("GH200", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A6000", 154.8),
                    ("A10G", 70.0), ("A10", 125.0))


def peak_flops_per_device(override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, or None (CPU, or a GPU not in the table: no MFU is reported)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    tflops = peak_bf16_tflops(name)
    if tflops is None:
        log.warning("no peak FLOP/s known for %r: set train.peak_tflops for an MFU estimate", name)
        return None
    return tflops * 1e12


def peak_bf16_tflops(device_name: str) -> float | None:
    """The table's peak for a device name (torch.cuda.get_device_name()), or None."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def training_flops(matmul_params: int, layers: int, hidden: int, tokens: int, squared_lengths: int) -> float:
    """FLOPs of one training step (forward + backward, no recomputation counted).

    6 per parameter per token for the weight matrices (`matmul_params`: every parameter except the
    input embedding table, which is a lookup), plus causal attention: per layer and example of n
    tokens, QK^T and AV cost 2 * 2 * n^2 * hidden / 2 forward, x3 with the backward pass.
    """
    return 6.0 * matmul_params * tokens + 6.0 * layers * hidden * squared_lengths


class MetricsLog:
    """Appends one JSON line per event to <output_dir>/metrics.jsonl and mirrors it to wandb.

    Lines go through core.jsonl.JsonlWriter (a kill loses at most the line being written); `sync`
    puts the file on disk, and runs before every checkpoint, so a checkpoint never refers to
    metrics that a power cut could lose. On resume the lines after the checkpoint's step are dropped
    first, so the file never holds two different values for one step; a torn last line (a write cut
    short by a kill) is dropped with a warning, like the intents store's.
    """

    def __init__(self, output_dir: Path, resume_step: int, wandb_cfg, config: dict, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.wandb_run = None
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            # Keep what the checkpoint's steps logged; a fresh start (step 0) logs everything anew.
            kept = [row for _, row in jsonl_rows(self.path) if row is not None and row["step"] <= resume_step] \
                if resume_step else []
            artifacts.write_text(self.path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
        self.writer = JsonlWriter(self.path)
        if wandb_cfg.mode != "disabled":
            import wandb
            (output_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or output_dir.name,
                                        mode=wandb_cfg.mode, dir=str(output_dir), config=config)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.writer.append(record)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def sync(self) -> None:
        """Put every line written so far on disk (fsync)."""
        if self.writer is not None:
            self.writer.sync()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
