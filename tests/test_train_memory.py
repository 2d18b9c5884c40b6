"""benchmarks/train_memory.py: the meta-device memory planner (tiny model fast; the 8B presets slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.train_memory import AllocationTracker, plan
from tests.conftest import REPO


def tiny(tiny_assets, *extra):
    return ["experiment=tiny", f"model.name_or_path={tiny_assets / 'model'}", "train.global_batch_size=16", *extra]


def test_tracker_counts_allocations_until_freed_and_not_views():
    import torch
    existing = torch.empty(1000, device="meta")
    with AllocationTracker([existing]) as tracker:
        a = torch.empty(256, device="meta")           # 1 KiB
        view, transposed = a[:10], existing.view(10, 100).t()  # no new storage
        b = a * 2                                       # 1 KiB more
        del a, view, b
        assert tracker.live == 0
        c = existing + 1                                # 4000 bytes
    assert (tracker.peak, tracker.live) == (4000, 4000) and c.shape == transposed.t().reshape(-1).shape


def test_planner_on_the_tiny_model(tiny_assets):
    chunked = plan(tiny(tiny_assets), gpus=2, gpu_memory_gib=1.0)
    assert set(chunked) >= {"per_gpu_gib", "fits", "components"}
    components = chunked["components"]
    assert set(components) == {"model_states", "activations", "loss", "working_buffers"}
    assert chunked["per_gpu_gib"] == pytest.approx(sum(components.values()))
    assert chunked["fits"] is (chunked["per_gpu_gib"] <= 1.0)
    with_ckpt, without = (chunked["activations_gib"][f"gradient_checkpointing_{f}"] for f in ("true", "false"))
    assert with_ckpt < without
    full = plan(tiny(tiny_assets, "model.loss_chunk_tokens=null"), gpus=2, gpu_memory_gib=1.0)
    assert full["components"]["loss"] > chunked["components"]["loss"]  # whole logits cost more than chunks
    assert full["components"]["model_states"] == components["model_states"]
    bf16 = plan(tiny(tiny_assets, "train.grad_accum_dtype=bf16"), gpus=2, gpu_memory_gib=1.0)
    assert bf16["components"]["model_states"] < components["model_states"]  # 2 bytes less per parameter


@pytest.mark.slow
def test_paper_presets_fit_their_hardware_and_todays_path_did_not(tmp_path):
    """Llama-3-8B at full size on meta, through the command line: the presets fit with >= 10% to spare."""
    def run(gpus, memory, *overrides):
        out = tmp_path / "plan.json"
        subprocess.run([sys.executable, "benchmarks/train_memory.py", "--gpus", str(gpus), "--gpu-memory-gib",
                        str(memory), "--json", str(out), *overrides], cwd=REPO, check=True, timeout=600,
                       capture_output=True)
        return json.loads(out.read_text())
    for gpus, memory, preset in ((4, 48, "paper_4x48gb"), (8, 80, "paper_8x80gb"), (1, 80, "paper_1x80gb")):
        result = run(gpus, memory, f"experiment={preset}")
        assert result["fits"] and result["margin_gib"] >= 0.1 * memory, (preset, result)
    today = run(4, 48, "experiment=paper", "model.loss_chunk_tokens=null", "train.grad_accum_dtype=bf16")
    assert not today["fits"] and 46 <= today["per_gpu_gib"] <= 54, today
    assert today["components"]["model_states"] == pytest.approx(29.9, abs=0.1)  # 16 bytes x 8.03B / 4
