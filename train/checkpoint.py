"""Checkpoints: the full training state every N steps, the newest few kept, resumable.

<output_dir>/checkpoints/step_00000040/ holds accelerate's `save_state`: the DeepSpeed engine's
model and optimiser shards (one per process; resuming needs the same number of processes), the
RNG states of every process and the registered learning-rate scheduler; plus train_state.json
(the step, which is the data position: train.data.Plan turns it back into the next batch) and a
COMPLETED marker written last, which lists every file of the checkpoint with its size. A
checkpoint is written under a temporary name unique to the run and renamed when complete, so a
killed run never leaves a half checkpoint that looks finished, and two runs never share a
temporary (train/run.py also holds output_dir's lock). All processes must see the same filesystem.

A checkpoint is complete when every file its marker lists is there with the recorded size.
`train.resume=auto` resumes from the newest complete one and warns about each newer one it skips
and why (the file missing or truncated); an explicit `train.resume=<dir>` that is not complete is
an error naming the file. Sizes, not hashes: checking them is a stat per file, while hashing the
paper's ~112 GB checkpoint would add minutes to every save and every resume; and sizes catch
what actually damages a checkpoint (a write cut short by a kill or a full disk, a partial copy,
data lost in a crash after the rename). A same-size corruption still fails the load, naming the
checkpoint. Resuming unpickles these files: resume only from checkpoints you trust.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate.utils import broadcast_object_list

from core import artifacts
from core.artifacts import COMPLETED, write_json

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d{8})")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` is not a complete checkpoint (naming the file), or None if it is one: its
    COMPLETED marker lists every file with its size, and every file is there with that size."""
    marker = directory / COMPLETED
    if not marker.is_file():
        return f"{marker} is missing (the checkpoint was never finished)"
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        sizes = None
    if not isinstance(sizes, dict) or "train_state.json" not in sizes:
        return f"{marker} does not list the checkpoint's files and sizes (damaged, or written by an older version)"
    for name, size in sizes.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, its marker recorded {size} (truncated or overwritten)"
    return None


def checkpoints(output_dir: Path) -> list[Path]:
    """Every checkpoint directory in output_dir, complete or not, oldest first."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.exists() else []
    return sorted(found, key=lambda p: p.name)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose files all match their marker, oldest first."""
    return [p for p in checkpoints(output_dir) if checkpoint_problem(p) is None]


def find_resume_point(output_dir: Path, resume: str | None) -> Path | None:
    """train.resume: auto -> the newest complete checkpoint in output_dir (None if there is none),
    skipping newer damaged ones with a warning that says why; a path -> that checkpoint, which must
    be complete; null -> start fresh, refusing to mix with an earlier run's checkpoints."""
    if resume is None:
        if existing := checkpoints(output_dir):
            raise FileExistsError(f"{output_dir} already has checkpoints ({existing[-1].name}): set "
                                  "train.resume=auto to continue, or choose another output_dir")
        return None
    if resume == "auto":
        for candidate in reversed(checkpoints(output_dir)):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate
            log.warning("not resuming from %s: %s", candidate, problem)
        return None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={resume}: no such checkpoint directory")
    if problem := checkpoint_problem(path):
        raise ValueError(f"train.resume={resume} is not a complete checkpoint: {problem}")
    return path


def read_train_state(path: Path) -> dict:
    """The checkpoint's train_state.json (step and fingerprints); damage is an error naming the file."""
    state_file = path / "train_state.json"
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{state_file}: not a readable train state ({e})") from None


def mark_complete(directory: Path) -> None:
    """Write the COMPLETED marker, last: every file of the checkpoint with its size."""
    write_json(directory / COMPLETED, {"files": {str(f.relative_to(directory)): f.stat().st_size
                                                 for f in sorted(directory.rglob("*")) if f.is_file()}})


def save_checkpoint(accelerator, output_dir: Path, step: int, train_state: dict, keep: int) -> Path:
    """Every process saves its shards into a temporary directory named uniquely for this run (rank 0
    draws the name); the main process then marks, renames and prunes. A failed save removes its own
    temporary; a killed one leaves `.step_XXXXXXXX.incomplete-<pid>-<random>`, which no run removes."""
    final = checkpoint_dir(output_dir, step)
    main = accelerator.is_main_process
    partial = Path(broadcast_object_list([str(artifacts.temporary_name(final, "incomplete")) if main else None])[0])
    try:
        if main:
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if main:
            write_json(partial / "train_state.json", train_state)
            mark_complete(partial)
            shutil.rmtree(final, ignore_errors=True)  # an earlier one of this step (damaged, skipped at resume)
            os.replace(partial, final)
            for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(old)
    finally:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> None:
    """Restore every process's shards, RNG states and the registered scheduler."""
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # torch names no file: a damaged shard whose size still matches its marker
        raise RuntimeError(f"{path}: cannot load this checkpoint ({type(e).__name__}: {e})") from e
