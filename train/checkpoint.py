"""Checkpoints: the full training state every N steps, the newest few kept, resumable.

<output_dir>/checkpoints/step_00000040/ holds accelerate's `save_state`: the DeepSpeed engine's
model and optimiser shards (one per process; resuming needs the same number of processes), the
RNG states of every process and the registered learning-rate scheduler; plus train_state.json
(the step, which is the data position: train.data.Plan turns it back into the next batch) and a
COMPLETED marker written last. A checkpoint is written under a temporary name and renamed when
complete, so a killed run never leaves a half checkpoint that looks finished. All processes must
see the same filesystem.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from data_prep.artifacts import COMPLETED, is_complete, write_json

STEP_DIR = re.compile(r"step_(\d{8})")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and is_complete(p)] if root.exists() else []
    return sorted(found, key=lambda p: p.name)


def find_resume_point(output_dir: Path, resume: str | None) -> Path | None:
    """train.resume: auto -> the latest checkpoint in output_dir (None if there is none); a path ->
    that checkpoint; null -> start fresh, refusing to mix with an earlier run's checkpoints."""
    existing = complete_checkpoints(output_dir)
    if resume is None:
        if existing:
            raise FileExistsError(f"{output_dir} already has checkpoints ({existing[-1].name}): set "
                                  "train.resume=auto to continue, or choose another output_dir")
        return None
    if resume == "auto":
        return existing[-1] if existing else None
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint directory")
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, train_state: dict, keep: int) -> Path:
    """Every process saves its shards; the main process then marks, renames and prunes."""
    final = checkpoint_dir(output_dir, step)
    partial = final.with_name(final.name + ".incomplete")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(partial / "train_state.json", train_state)
        (partial / COMPLETED).write_text("")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> None:
    """Restore every process's shards, RNG states and the registered scheduler."""
    accelerator.load_state(str(path))
