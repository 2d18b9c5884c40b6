"""Training under the failures of issue 9: torn metrics, corrupt checkpoints, a killed launcher.

The unit tests work on real files; the slow ones launch the real training (2 CPU processes,
DeepSpeed ZeRO-3 over gloo, the tiny model) and kill or race real processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from core import artifacts
from tests.conftest import REPO
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


# ---- real launches -------------------------------------------------------------------------------

def launch_command(output_dir: Path, overrides: list[str]) -> tuple[list[str], dict]:
    """train/run.py under `accelerate launch` with conf/accelerate/cpu.yaml (2 processes), as
    tests/test_train_deepspeed.py launches it."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env.pop("ACCELERATE_USE_CPU", None)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "conf/accelerate/cpu.yaml"),
            str(REPO / "train/run.py"), f"output_dir={output_dir}", *overrides], env


def launch(output_dir: Path, overrides: list[str], expect_success: bool = True) -> str:
    command, env = launch_command(output_dir, overrides)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert (done.returncode == 0) == expect_success, log[-5000:]
    return log


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


# Slow enough to be killed in the middle: 2 s of steps or more after the first two checkpoints.
LONG = ("data.packing=false", "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_steps=40",
        "train.eval_every=0", "train.save_every=2", "train.save_total_limit=2")


def tiny_overrides(tiny_assets: Path, tiny_data: Path, *extra: str) -> list[str]:
    return ["experiment=tiny", f"data.path={tiny_data}", f"model.name_or_path={tiny_assets / 'model'}",
            "wandb.mode=disabled", *extra]


@pytest.fixture(scope="module")
def killed_run(tiny_assets, tiny_data, tmp_path_factory):
    """A long training whose launcher is SIGKILLed once its checkpoint at step 4 is in place.
    Returns the output_dir, the workers' exit and the seconds they outlived the launcher."""
    output_dir = tmp_path_factory.mktemp("train") / "killed"
    command, env = launch_command(output_dir, tiny_overrides(tiny_assets, tiny_data, *LONG))
    with open(output_dir.parent / "killed.log", "w") as log_file:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    workers: list[psutil.Process] = []
    try:
        wait_for(lambda: (output_dir / "checkpoints" / "step_00000004").is_dir() or launcher.poll() is not None,
                 300, "the checkpoint at step 4")
        assert launcher.poll() is None, (output_dir.parent / "killed.log").read_text()[-3000:]
        workers = [p for p in psutil.Process(launcher.pid).children() if "train/run.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        launcher.kill()
        launcher.wait()
        killed = time.monotonic()
        _, alive = psutil.wait_procs(workers, timeout=10)
        outlived = time.monotonic() - killed
        yield output_dir, alive, outlived
    finally:
        for process in [launcher, *workers]:  # whatever is left, by pid
            try:
                process.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass


@pytest.mark.slow
def test_killing_the_launcher_stops_its_workers(killed_run):
    output_dir, alive, outlived = killed_run
    assert not alive, f"{len(alive)} workers still training {outlived:.0f} s after their launcher was killed"
    time.sleep(1)
    assert not (output_dir / "model").exists()
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert 4 <= max(steps) < 40


@pytest.mark.slow
def test_rerun_after_the_kill_resumes_from_the_newest_complete_checkpoint(killed_run, tiny_assets, tiny_data,
                                                                           tmp_path):
    """The killed run's newest checkpoint is then damaged (a shard cut short): the rerun warns,
    resumes from the one before and finishes with every step logged once."""
    killed_dir, _, _ = killed_run
    output_dir = tmp_path / "rerun"
    shutil.copytree(killed_dir, output_dir)
    shard = output_dir / "checkpoints/step_00000004/pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    log = launch(output_dir, tiny_overrides(tiny_assets, tiny_data, *LONG))
    assert f"not resuming from {output_dir}/checkpoints/step_00000004: {shard} has" in log
    assert f"resumed from {output_dir}/checkpoints/step_00000002 at step 2" in log
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert (output_dir / "model" / "model.safetensors").is_file()


# ---- output_dir: one training at a time, and never among someone else's files --------------------

def test_an_output_dir_holding_a_users_file_is_refused_before_training(tiny_assets, tiny_data, tmp_path):
    from tests.conftest import compose_config
    from train.run import run
    output_dir = tmp_path / "thesis"
    output_dir.mkdir()
    (output_dir / "thesis.txt").write_text("four years of work")
    cfg = compose_config("train", ["output_dir=" + str(output_dir), "train.max_steps=1",
                                   *tiny_overrides(tiny_assets, tiny_data)])
    with pytest.raises(FileExistsError, match=f"{output_dir} is not empty and holds files that no stage"):
        run(cfg)
    assert sorted(p.name for p in output_dir.iterdir()) == ["thesis.txt"]
    assert (output_dir / "thesis.txt").read_text() == "four years of work"


def test_a_model_dir_of_someone_elses_files_is_refused_before_training(tiny_assets, tiny_data, tmp_path):
    """output_dir is train's own (a resume), but model/ holds a user's files: refused at the start,
    not after hours of training."""
    from tests.conftest import compose_config
    from train.run import run
    output_dir = tmp_path / "train"
    (output_dir / "model").mkdir(parents=True)
    (output_dir / ".userlm-stage").write_text("train\n")
    (output_dir / "model" / "weights.bin").write_text("mine")
    cfg = compose_config("train", ["output_dir=" + str(output_dir), "train.max_steps=1",
                                   *tiny_overrides(tiny_assets, tiny_data)])
    with pytest.raises(FileExistsError, match=f"{output_dir / 'model'} is not empty"):
        run(cfg)
    assert sorted(p.name for p in output_dir.rglob("*")) == [".userlm-stage", "model", "weights.bin"]


@pytest.mark.slow
def test_a_second_training_on_the_same_output_dir_fails_at_once_and_the_first_finishes(
        tiny_assets, tiny_data, tmp_path):
    output_dir = tmp_path / "shared"
    first_steps = ("data.packing=false", "train.global_batch_size=8", "train.micro_batch_size=2",
                   "train.max_steps=150", "train.eval_every=0", "train.save_every=50")
    command, env = launch_command(output_dir, tiny_overrides(tiny_assets, tiny_data, *first_steps))
    with open(tmp_path / "first.log", "w") as log_file:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        lock = tmp_path / ".shared.lock"
        wait_for(lambda: (lock.exists() and "train, pid" in lock.read_text()) or first.poll() is not None, 300,
                 "the first training to take the lock")
        started = time.monotonic()
        # The same training again, marked (wandb.name is bookkeeping) to find its processes afterwards.
        second_log = launch(output_dir, tiny_overrides(tiny_assets, tiny_data, *first_steps, "wandb.name=second"),
                            expect_success=False)
        seconds = time.monotonic() - started
        assert first.poll() is None, "the first training ended before the second could race it: make it longer"
        assert f"{output_dir} is being written by another run (train, pid " in second_log
        assert "run: 2 processes" not in second_log  # the second never trained
        assert seconds < 120, seconds
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if "wandb.name=second" in " ".join(p.info["cmdline"] or [])]
        assert not leftovers, "the failed launch left processes behind"
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    steps = [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 151))
    assert artifacts.is_complete(output_dir / "model")
