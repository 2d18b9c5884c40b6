"""Output safety: a stage never deletes or overwrites what it did not write, and one run writes an output
directory at a time (core.artifacts; every stage calls it)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SAMPLE, run_data_prep
from core import artifacts


def _hold_lock(directory: Path) -> subprocess.Popen:
    """Another process that holds the output lock on `directory` until killed."""
    code = ("import sys, time; from core import artifacts\n"
            "with artifacts.output_lock(sys.argv[1], 'data_prep'):\n"
            "    print('locked', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    holder = _hold_lock(tmp_path / "out")
    try:
        started = time.monotonic()
        with pytest.raises(artifacts.OutputLocked, match=f"pid {holder.pid}"):
            with artifacts.output_lock(tmp_path / "out", "data_prep"):
                pass
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
    # kill -9 releases the lock: the next run gets it.
    with artifacts.output_lock(tmp_path / "out", "data_prep"):
        pass


def test_data_prep_refuses_a_locked_output_dir(tiny_assets, tmp_path):
    holder = _hold_lock(tmp_path / "data")
    try:
        with pytest.raises(artifacts.OutputLocked, match=f"pid {holder.pid}"):
            run_data_prep(tiny_assets, tmp_path / "data")
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "data").exists()


def test_data_prep_never_deletes_a_users_files(tiny_assets, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "thesis.txt").write_text("thesis")
    # Siblings named like the old fixed temporaries are the user's too.
    for name in ("keep.old", "keep.incomplete"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="files that no stage of this pipeline wrote"):
        run_data_prep(tiny_assets, keep)
    assert (keep / "thesis.txt").read_text() == "thesis"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.lock", "keep", "keep.incomplete", "keep.old"]
    assert (tmp_path / "keep.old" / "notes.txt").read_text() == "mine"


def test_data_prep_never_replaces_a_folder_holding_its_inputs(tiny_assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    source = out / "wildchat.parquet"
    source.write_bytes((SAMPLE / "wildchat.parquet").read_bytes())
    with pytest.raises(FileExistsError, match="holds inputs of this run"):
        run_data_prep(tiny_assets, out, f"data.source={source}", "overwrite=true")
    assert source.read_bytes() == (SAMPLE / "wildchat.parquet").read_bytes()


def test_data_prep_replaces_its_own_output_and_overwrite_replaces_others(tiny_assets, tiny_data, tmp_path):
    out = tmp_path / "data"
    run_data_prep(tiny_assets, out)
    assert artifacts.stage_of(out) == "data_prep" and artifacts.is_complete(out)
    (out / "funnel.json").write_text("stale")
    run_data_prep(tiny_assets, out)  # its own complete output: replaced without asking
    assert (out / "funnel.json").read_text() == (tiny_data / "funnel.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.lock", "data"]  # no temporaries left

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    run_data_prep(tiny_assets, other, "overwrite=true")
    assert not (other / "notes.txt").exists() and artifacts.is_complete(other)


def test_atomic_directory_refuses_another_stages_output_and_cleans_only_its_own(tmp_path):
    target = tmp_path / "model"
    with artifacts.output_lock(target, "train"):
        with artifacts.atomic_directory(target, "train") as tmp:
            (tmp / "weights").write_text("1")
        assert artifacts.stage_of(target) == "train"
        with pytest.raises(FileExistsError, match="an output of train"):
            with artifacts.atomic_directory(target, "data_prep"):
                pass
        with pytest.raises(ZeroDivisionError):  # a failed block removes its own temporary, keeps the output
            with artifacts.atomic_directory(target, "train") as tmp:
                (tmp / "weights").write_text("2")
                1 / 0
    assert (target / "weights").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]
    with pytest.raises(RuntimeError, match="needs artifacts.output_lock"):
        with artifacts.atomic_directory(target, "train"):
            pass


def test_claim_directory_builds_only_its_own_directory(tmp_path):
    out = tmp_path / "run"
    with artifacts.output_lock(out, "simulate"):
        artifacts.claim_directory(out, "simulate")
        (out / "transcripts.jsonl").write_text("")
        artifacts.claim_directory(out, "simulate")  # a resume
        with pytest.raises(FileExistsError, match="an output of simulate"):
            artifacts.claim_directory(out, "train")
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.yaml").write_text("mine")
    with artifacts.output_lock(user, "simulate"), pytest.raises(FileExistsError, match="no stage of this pipeline"):
        artifacts.claim_directory(user, "simulate")
    assert (user / "config.yaml").read_text() == "mine"


def test_concurrent_writers_of_one_file_never_share_a_temporary(tmp_path):
    """write_text's temporary is unique to the writer: two processes writing one path never tear it."""
    path = tmp_path / "result.json"
    code = ("import sys; from pathlib import Path; from core import artifacts\n"
            "for i in range(300): artifacts.write_text(Path(sys.argv[1]), sys.argv[2] * 100000)\n")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(path), letter], cwd=REPO) for letter in "ab"]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    assert path.read_text() in ("a" * 100000, "b" * 100000)
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_data_prep_cli_refuses_with_a_clear_message(tiny_assets, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "thesis.txt").write_text("thesis")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "data_prep", "experiment=tiny", f"output_dir={keep}",
                             f"tokenizer.name_or_path={tiny_assets / 'tokenizer'}",
                             f"intents.path={SAMPLE / 'intents.jsonl'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{keep} is not empty" in result.stderr
    assert (keep / "thesis.txt").read_text() == "thesis"


@pytest.mark.parametrize("stage,module,directory", [
    ("perplexity", "evaluate.perplexity", "results/m"),
    ("simulate", "evaluate.simulate", "results"),
    ("intrinsic", "evaluate.intrinsic", "results/sim"),
    ("table", "evaluate.table", "results"),
])
def test_evaluation_stages_never_write_among_a_users_files(tmp_path, stage, module, directory):
    """Each refuses before any work; a locked directory is refused the same way."""
    import importlib

    from conftest import compose_config
    results = tmp_path / "results"
    overrides = {"perplexity": ["experiment=tiny", "model=m", "name=m"], "simulate": ["experiment=tiny"],
                 "intrinsic": ["experiment=tiny", f"simulation={tmp_path / 'sim'}", "name=null"],
                 "table": ["experiment=tiny"]}
    stage_module = importlib.import_module(module)  # registers the stage's config schema
    cfg = compose_config(stage, overrides[stage] + [f"output_dir={results}"])
    target = tmp_path / directory
    target.mkdir(parents=True)
    (target / "manifest.json").write_text("mine")
    with pytest.raises(FileExistsError, match="no stage of this pipeline wrote"):
        stage_module.run(cfg)
    assert (target / "manifest.json").read_text() == "mine"
    (target / "manifest.json").unlink()
    holder = _hold_lock(target)
    try:
        with pytest.raises(artifacts.OutputLocked, match=f"pid {holder.pid}"):
            stage_module.run(cfg)
    finally:
        holder.kill()
        holder.wait()


def test_one_intents_generation_per_store(tmp_path):
    from conftest import compose_config
    from data_prep.intents.__main__ import run as run_intents
    store = tmp_path / "intents.jsonl"
    cfg = compose_config("data_prep", ["experiment=tiny", f"data.source={SAMPLE / 'wildchat.parquet'}",
                                       "data.limit=5", "num_proc=1", f"intents.path={store}", "intents.backend=openai",
                                       "intents.openai.base_url=http://127.0.0.1:9/v1", "intents.progress=false"])
    holder = _hold_lock(store)
    try:
        with pytest.raises(artifacts.OutputLocked, match=f"pid {holder.pid}"):
            run_intents(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert not store.exists()


def test_every_stage_reads_data_prep_output_through_one_checked_reader(tiny_data, tmp_path):
    """An incomplete output (a run still writing, or killed) and an absent split are clear errors."""
    import shutil

    from core.prepared import load_conversations, load_examples
    assert len(load_conversations(tiny_data, "test", limit=3)) == 3
    partial = tmp_path / "partial"
    shutil.copytree(tiny_data, partial)
    with pytest.raises(FileNotFoundError, match="no such split"):
        load_examples(partial, "nonexistent")
    (partial / artifacts.COMPLETED).unlink()
    for load in (load_examples, load_conversations):
        with pytest.raises(FileNotFoundError, match="not a complete data_prep output"):
            load(partial, "test")
