"""Training under the failures of issue 9: torn metrics, corrupt checkpoints, a killed launcher.

The unit tests work on real files; the slow ones launch the real training (2 CPU processes,
DeepSpeed ZeRO-3 over gloo, the tiny model) and kill or race real processes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from train.metrics import MetricsLog

WANDB_OFF = OmegaConf.create({"mode": "disabled", "project": "p", "name": None})


# ---- metrics.jsonl -------------------------------------------------------------------------------

def write_metrics(output_dir: Path, text: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.jsonl").write_text(text)


def test_resume_survives_a_torn_last_metrics_line(tmp_path, caplog):
    """A run killed mid-write leaves `{"step": 4, "lo`: resume keeps steps 1..3 and warns."""
    lines = "".join(json.dumps({"loss": 1.0 / step, "step": step}, sort_keys=True) + "\n" for step in (1, 2, 3))
    write_metrics(tmp_path, lines + '{"loss": 0.2, "st')
    with caplog.at_level(logging.WARNING):
        metrics = MetricsLog(tmp_path, 2, WANDB_OFF, {}, enabled=True)
    assert "torn last line" in caplog.text and "metrics.jsonl" in caplog.text
    metrics.write({"loss": 0.3, "step": 3})
    metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}, {"loss": 0.3, "step": 3}]


def test_a_bad_line_inside_metrics_is_an_error_naming_file_and_line(tmp_path):
    """Only the last line can be torn by a kill; damage before it is not silently dropped."""
    write_metrics(tmp_path, '{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        MetricsLog(tmp_path, 2, WANDB_OFF, {}, enabled=True)


# ---- checkpoints: a completeness marker with every file's size -----------------------------------

def fake_checkpoint(output_dir: Path, step: int) -> Path:
    """A checkpoint directory as save_checkpoint leaves it (shards, train state, marker last)."""
    from train.checkpoint import checkpoint_dir, mark_complete
    directory = checkpoint_dir(output_dir, step)
    (directory / "pytorch_model").mkdir(parents=True)
    (directory / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    (directory / "random_states_0.pkl").write_bytes(b"r" * 10)
    (directory / "train_state.json").write_text(json.dumps({"step": step}))
    mark_complete(directory)
    return directory


@pytest.mark.parametrize("damage", ["truncated shard", "empty train state", "missing shard", "empty marker"])
def test_auto_resume_skips_a_damaged_newest_checkpoint_and_says_why(tmp_path, caplog, damage):
    from train.checkpoint import complete_checkpoints, find_resume_point
    older, newest = fake_checkpoint(tmp_path, 10), fake_checkpoint(tmp_path, 20)
    shard = newest / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "truncated shard":
        shard.write_bytes(b"x" * 300)
        culprit = "zero_pp_rank_0_mp_rank_00_optim_states.pt has 300 bytes, its marker recorded 1000"
    elif damage == "empty train state":
        (newest / "train_state.json").write_text("")
        culprit = "train_state.json has 0 bytes"
    elif damage == "missing shard":
        shard.unlink()
        culprit = "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"
    else:  # the COMPLETED of an older version, or one cut short
        (newest / "COMPLETED").write_text("")
        culprit = "COMPLETED does not list the checkpoint's files and sizes"
    with caplog.at_level(logging.WARNING):
        assert find_resume_point(tmp_path, "auto") == older
    assert f"not resuming from {newest}" in caplog.text and culprit in caplog.text
    assert complete_checkpoints(tmp_path) == [older]
    with pytest.raises(ValueError, match=f"train.resume={newest} is not a complete checkpoint: .*{culprit}"):
        find_resume_point(tmp_path, str(newest))
    assert find_resume_point(tmp_path, str(older)) == older


def test_auto_resume_with_no_complete_checkpoint_starts_fresh_and_null_refuses_any(tmp_path, caplog):
    from train.checkpoint import find_resume_point
    damaged = fake_checkpoint(tmp_path, 10)
    (damaged / "train_state.json").write_text("")
    with caplog.at_level(logging.WARNING):
        assert find_resume_point(tmp_path, "auto") is None
    assert "train_state.json has 0 bytes" in caplog.text
    with pytest.raises(FileExistsError, match="already has checkpoints"):
        find_resume_point(tmp_path, None)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        find_resume_point(tmp_path, str(tmp_path / "nowhere"))


def test_a_same_size_damaged_train_state_is_an_error_naming_it(tmp_path):
    from train.checkpoint import find_resume_point, read_train_state
    directory = fake_checkpoint(tmp_path, 10)
    size = (directory / "train_state.json").stat().st_size
    (directory / "train_state.json").write_text("{" * size)
    assert find_resume_point(tmp_path, "auto") == directory  # sizes match: only reading it can tell
    with pytest.raises(ValueError, match=r"step_00000010/train_state\.json: not a readable train state"):
        read_train_state(directory)
