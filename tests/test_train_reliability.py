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
