"""The GPU recipe checked on CPU: flash-attention on packed micro batches (emulated kernels), the
chunked loss, padding positions, and the recipe's configs (DeepSpeed JSONs, presets)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers.masking_utils import find_packed_sequence_indices

import train.config  # noqa: F401  (registers the train schema)
from data_prep.chat_format import IGNORE_INDEX
from tests import flash_emulation
from tests.conftest import REPO, compose_config
from train.data import batch_arithmetic, collate, load_split, make_rows
from train.model import load_model, load_tokenizer, token_losses
from train.optim import deepspeed_config


def model_cfg(tiny_assets, loss_chunk_tokens):
    return OmegaConf.create({"name_or_path": str(tiny_assets / "model"), "revision": None, "trust_remote_code": False,
                             "loss_chunk_tokens": loss_chunk_tokens})


def packed_micro_batch(split, rows_wanted: int) -> list[list[int]]:
    """`rows_wanted` packed rows of 512 tokens, each holding at least two examples."""
    rows = [row for row in make_rows(split.lengths, 512, packing=True) if len(row) >= 2]
    assert len(rows) >= rows_wanted
    return rows[:rows_wanted]


def test_flash_attention_keeps_packed_examples_apart_at_micro_batch_4(tiny_assets, tiny_data):
    """Under flash_attention_2 (flash-attn's kernels emulated exactly, transformers' dispatch as is),
    every example of a packed micro batch of 4 rows gets the losses it gets scored alone."""
    tokenizer = load_tokenizer(tiny_data)
    model = load_model(model_cfg(tiny_assets, 1024), tokenizer, torch.float32, "sdpa").eval()
    model.config._attn_implementation = "flash_attention_2"  # what load_model asks for on a GPU with flash-attn
    split = load_split(tiny_data, "train", None, 512)
    rows = packed_micro_batch(split, 4)
    with flash_emulation.installed(), torch.no_grad():
        losses = token_losses(model, collate(split, rows, tokenizer.pad_token_id, 512))
        assert flash_emulation.CALLS["flash_attn_varlen_func"] > 0  # the per-example (variable-length) kernel ran
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = int(split.lengths[i])
                alone = token_losses(model, collate(split, [[i]], tokenizer.pad_token_id, 512))[0, :n]
                torch.testing.assert_close(losses[r, at:at + n], alone, atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"row {r}, example {i}: {m}")
                at += n


def test_emulated_flash_kernels_equal_sdpa(tiny_assets, tiny_data):
    """The control: the emulation is the same attention as sdpa's (so the test above tests packing)."""
    tokenizer = load_tokenizer(tiny_data)
    model = load_model(model_cfg(tiny_assets, 1024), tokenizer, torch.float32, "sdpa").eval()
    split = load_split(tiny_data, "train", None, 512)
    batch = collate(split, packed_micro_batch(split, 2), tokenizer.pad_token_id, 512)
    with torch.no_grad():
        reference = token_losses(model, batch)
        model.config._attn_implementation = "flash_attention_2"
        with flash_emulation.installed():
            flash = token_losses(model, batch)
            assert flash_emulation.CALLS["flash_attn_varlen_func"] > 0
    torch.testing.assert_close(flash, reference, atol=1e-5, rtol=1e-5)


def full_logits_losses(model, batch) -> torch.Tensor:
    """The loss as transformers' own forward computes it: all logits at once, then fp32 cross-entropy."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="none").view_as(batch["targets"])


@pytest.mark.parametrize("chunk", [None, 1024, 100, 1])
def test_chunked_loss_and_gradients_equal_the_full_ones(tiny_assets, tiny_data, chunk):
    """Per-token losses and every parameter's gradient, chunked through the output layer or not,
    equal those of the full logits (fp32); a ragged last chunk (100) and one token a chunk included."""
    tokenizer = load_tokenizer(tiny_data)
    split = load_split(tiny_data, "train", None, 512)
    batch = collate(split, packed_micro_batch(split, 3) + [[]], tokenizer.pad_token_id, 512)  # + an empty row
    results = []
    for loss_fn in (full_logits_losses, token_losses):
        torch.manual_seed(0)
        model = load_model(model_cfg(tiny_assets, chunk), tokenizer, torch.float32, "sdpa")
        losses = loss_fn(model, batch)
        (losses.sum() / 1000).backward()
        results.append((losses.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (full, full_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    assert (chunked[batch["targets"] == IGNORE_INDEX] == 0).all()
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-7, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_padding_continues_the_last_examples_positions(tiny_data):
    """Unpacked rows with padding read as one sequence each (sdpa keeps its mask-free kernel)."""
    split = load_split(tiny_data, "train", None, 512)
    rows = [[i] for i in range(4)]
    batch = collate(split, rows, pad_id=7, max_seq_len=512)
    assert find_packed_sequence_indices(batch["position_ids"]) is None
    n = int(split.lengths[0])
    assert batch["position_ids"][0].tolist() == list(range(batch["position_ids"].shape[1]))
    assert (batch["targets"][0, n - 1:] == IGNORE_INDEX).all()
    packed = collate(split, packed_micro_batch(split, 2), pad_id=7, max_seq_len=512)
    assert find_packed_sequence_indices(packed["position_ids"]) is not None


def test_export_is_sharded_and_complete(tiny_assets, tiny_data, tmp_path, monkeypatch):
    """An 8B exports in 5 GB shards; here a tiny shard size makes the tiny model's export several."""
    import train.model
    from train.model import save_model
    monkeypatch.setattr(train.model, "EXPORT_SHARD_SIZE", "300KB")
    tokenizer = load_tokenizer(tiny_data)
    model = load_model(model_cfg(tiny_assets, 1024), tokenizer, torch.float32, "sdpa")
    generation = OmegaConf.create({"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    written = save_model(model, model.state_dict(), tokenizer, generation, tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert written == sum(p.numel() for p in model.parameters())


def test_grad_accum_dtype_is_a_recipe_choice(tmp_path):
    arithmetic = batch_arithmetic(64, 2, 4, False)
    for path in sorted((REPO / "conf/deepspeed").glob("*.json")):  # every shipped JSON takes it
        config = deepspeed_config(path, arithmetic, 1.0, bf16=True, grad_accum_dtype="fp32")
        assert config["data_types"]["grad_accum_dtype"] == "fp32", path
    zero3 = REPO / "conf/deepspeed/zero3.json"
    assert deepspeed_config(zero3, arithmetic, 1.0, True, "bf16")["data_types"]["grad_accum_dtype"] == "bf16"
    assert deepspeed_config(zero3, arithmetic, 1.0, False, "bf16")["data_types"]["grad_accum_dtype"] == "fp32"
    fixed = tmp_path / "fixed.json"
    fixed.write_text('{"data_types": {"grad_accum_dtype": "bf16"}, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ValueError, match="disagrees with train.grad_accum_dtype"):
        deepspeed_config(fixed, arithmetic, 1.0, True, "fp32")
    assert compose_config("train", ["experiment=paper"]).train.grad_accum_dtype == "fp32"


@pytest.mark.parametrize("preset, deepspeed, micro", [("paper_4x48gb", "zero3.json", 4), ("paper_8x80gb", "zero2.json", 2),
                                                      ("paper_1x80gb", "zero3_offload_optimizer.json", 8)])
def test_hardware_presets_are_the_paper_run_with_their_settings(preset, deepspeed, micro):
    cfg, paper = compose_config("train", [f"experiment={preset}"]), compose_config("train", ["experiment=paper"])
    assert cfg.deepspeed == f"conf/deepspeed/{deepspeed}" and cfg.train.micro_batch_size == micro
    assert (cfg.data, cfg.optimizer, cfg.train.global_batch_size) == (paper.data, paper.optimizer, 1024)


def test_peak_table_knows_each_card_by_its_own_name():
    from train.metrics import peak_bf16_tflops
    names = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 NVL": 835.0, "NVIDIA H100 PCIe": 756.0,
             "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA GH200 480GB": 989.0, "NVIDIA A10G": 70.0,
             "NVIDIA A10": 125.0, "NVIDIA RTX A6000": 154.8, "NVIDIA A100-SXM4-80GB": 312.0, "Tesla T4": None}
    assert {name: peak_bf16_tflops(name) for name in names} == names


def test_run_sets_a_long_collective_timeout_and_expandable_segments():
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", "import os, train.run as r; "
                          "print(os.environ['PYTORCH_CUDA_ALLOC_CONF'], r.COLLECTIVE_TIMEOUT.total_seconds())"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert out[0] == "expandable_segments:True" and float(out[1]) >= 3600


def test_chunked_loss_never_holds_the_whole_logits(tiny_assets, tiny_data):
    """Peak memory of the loss's forward + backward (real CPU tensors, every allocation counted):
    chunks of 100 tokens stay well below the full path, which holds [tokens, vocab] fp32 tensors."""
    from benchmarks.train_memory import AllocationTracker
    tokenizer = load_tokenizer(tiny_data)
    split = load_split(tiny_data, "train", None, 512)
    batch = collate(split, packed_micro_batch(split, 4), tokenizer.pad_token_id, 512)
    peaks = {}
    for chunk in (None, 100):
        model = load_model(model_cfg(tiny_assets, chunk), tokenizer, torch.float32, "sdpa")
        for parameter in model.parameters():  # as ZeRO does: gradients leave once reduced
            parameter.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        with AllocationTracker([*model.parameters(), *model.buffers()]) as tracker:
            token_losses(model, batch).sum().backward()
        peaks[chunk] = tracker.peak
    logits_fp32 = batch["targets"].numel() * len(tokenizer) * 4
    assert peaks[100] < peaks[None] - 2 * logits_fp32, (peaks, logits_fp32)
